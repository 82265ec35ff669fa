"""A head's leading linear layer: where a head starts with ``W``, what reaches it is read through ``W`` alone.

Two uses rest on it: RotoGrad folds its rotation into that layer, ``W (R z) = (W R) z``, formed once per step (m n^2
multiply-adds) instead of rotating the batch (B n^2, twice); GradNorm's norms on the last shared layer factor through it
(:func:`mtlzoo.engine.last_layer.layer_norms_and_gradients`). A layer is used so only when nothing could tell the
difference: a plain ``nn.Linear`` (not a subclass or a parametrized one), as the head itself or first in a plain
``nn.Sequential``, with no hook on either and no global module hook.
"""

from __future__ import annotations

from torch import nn

from mtlzoo.engine.internals import has_global_module_hooks, has_module_hooks


def leading_linear(head: nn.Module) -> tuple[nn.Linear, list[nn.Module]] | None:
    """The head's first layer and the modules after it, when it is a plain, unhooked ``nn.Linear``."""
    if type(head) is nn.Linear:
        first, rest = head, []
    elif type(head) is nn.Sequential and len(head) > 0 and type(head[0]) is nn.Linear:
        first, rest = head[0], list(head)[1:]
    else:
        return None
    if has_module_hooks(head) or has_module_hooks(first) or has_global_module_hooks():
        return None
    return first, rest
