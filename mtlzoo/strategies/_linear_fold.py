"""A rotation folded into the linear layer that reads it: ``W (R z) = (W R) z``.

A head that starts with a linear layer ``W`` (m x n) reads ``R z`` through ``W`` alone, so ``W R`` can be
formed once per step (m n^2 multiply-adds) instead of rotating the batch (B n^2 in the forward, and
B n^2 again to take the gradient back through ``R``): below the cost of the rotation itself when
m < B. The function and its gradients are the same up to rounding. A layer is folded only when
nothing could tell the difference: a plain ``nn.Linear`` (not a subclass or a parametrized one) on
the rotated (last) dimension, inside a plain ``nn.Sequential`` or as the head itself, with no hook
on either and no global module hook.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as module_hooks


def foldable_linear(head: nn.Module, rows: int) -> tuple[nn.Linear, list[nn.Module]] | None:
    """The head's first layer and the modules after it when the rotation can be folded into that layer.

    Args:
        head: A task head.
        rows: Rows of the representation the head reads (the batch): folding pays when the layer
            has fewer outputs.
    """
    if type(head) is nn.Linear:
        first, rest = head, []
    elif type(head) is nn.Sequential and len(head) > 0 and type(head[0]) is nn.Linear:
        first, rest = head[0], list(head)[1:]
    else:
        return None
    if first.out_features >= rows or _hooked(head) or _hooked(first) or _global_hooks():
        return None
    return first, rest


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOKS)


def _global_hooks() -> bool:
    return any(getattr(module_hooks, "_global" + name, None) for name in _HOOKS)
