"""Hard parameter sharing: a shared backbone and one head per task, and how their outputs split.

A backbone or head may return a tuple: its first element is the representation ``z`` or the
prediction, the rest are extras that the wrapper hands back beside the predictions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from mtlzoo.errors import InvalidModelError

BACKBONE_EXTRAS = "backbone"
"""Key of the backbone's extra outputs in the extras dict of a model with named heads."""


def split_output(output: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """``(first, rest)`` of a tuple/list output, ``(output, None)`` otherwise."""
    if isinstance(output, (tuple, list)):
        return output[0], tuple(output[1:])
    return output, None


def detached_leaves(value: Any, roots: list[Tensor], leaves: list[Tensor]) -> Any:
    """``value`` with every tensor that requires grad replaced by a detached leaf (nested tuples, lists, dicts)."""
    if isinstance(value, Tensor) and value.requires_grad:
        leaf = value.detach().requires_grad_()
        roots.append(value)
        leaves.append(leaf)
        return leaf
    if isinstance(value, (tuple, list)):
        return type(value)(detached_leaves(v, roots, leaves) for v in value)
    if isinstance(value, dict):
        return {key: detached_leaves(v, roots, leaves) for key, v in value.items()}
    return value


def as_heads(heads: Any) -> nn.ModuleList | nn.ModuleDict:
    if isinstance(heads, (nn.ModuleList, nn.ModuleDict)):
        return heads
    items = list(heads.items()) if isinstance(heads, Mapping) else list(enumerate(heads)) \
        if isinstance(heads, Sequence) and not isinstance(heads, str) else None
    if items is not None:
        bad = [f"{key} ({type(head).__name__})" for key, head in items if not isinstance(head, nn.Module)]
        if bad:
            raise InvalidModelError(f"Every head should be an nn.Module (wrap a function in a module); heads "
                                    f"{', '.join(bad)} are not.")
        return nn.ModuleDict(heads) if isinstance(heads, Mapping) else nn.ModuleList(heads)
    raise InvalidModelError(f"The model should have `heads`: a sequence or mapping of nn.Modules, one per "
                            f"task. Found {type(heads).__name__}.")


class HardSharing(nn.Module):
    """A shared ``backbone`` and one head per task, for users who hold the parts.

    Args:
        backbone: The shared module; its output (or the first element of a tuple) is ``z``.
        heads: One module per task: a sequence or ``nn.ModuleList``, or for named tasks a mapping
            or ``nn.ModuleDict`` from task name to head.

    Calling it runs every head on the backbone output, with no strategy involved.
    """

    def __init__(self, backbone: nn.Module, heads: Sequence[nn.Module] | Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = as_heads(heads)

    def forward(self, *args: Any, **kwargs: Any) -> list[Any] | dict[str, Any]:
        z, _ = split_output(self.backbone(*args, **kwargs))
        if isinstance(self.heads, nn.ModuleDict):
            return {name: head(z) for name, head in self.heads.items()}
        return [head(z) for head in self.heads]


class TaskModel(nn.Module):
    """End-to-end model of one task: the backbone, the strategy's transform for it (its rotation), its head.

    It owns (shares with the wrapper) every part, so its ``state_dict()`` round trip keeps its outputs.
    """

    def __init__(self, backbone: nn.Module, transform: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.transform, self.head = backbone, transform, head

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        z, _ = split_output(self.backbone(*args, **kwargs))
        return self.head(self.transform(z))
