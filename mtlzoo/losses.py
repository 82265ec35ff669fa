"""Checking what a user hands to ``MTLWrapper.backward``: K finite scalar losses, one per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtlzoo.errors import LossError

Losses = Sequence[Tensor] | Mapping[str, Tensor] | Tensor


def loss_vector(losses: Losses, task_names: Sequence[str] | None, num_tasks: int) -> Tensor:
    """Stack the K losses into a 1-D tensor in task order, or raise :class:`LossError`.

    Args:
        losses: A list or tuple of K scalars, a dict keyed by task name (named heads only), or a
            1-D tensor of K elements.
        task_names: The task names when the heads are named, else ``None``.
        num_tasks: K.
    """
    if isinstance(losses, Mapping):
        if task_names is None:
            raise LossError("Losses were given as a dict, but the heads are not named: pass a list of "
                            f"{num_tasks} losses in head order, or name the heads with an nn.ModuleDict.")
        missing = [name for name in task_names if name not in losses]
        unexpected = [name for name in losses if name not in task_names]
        if missing or unexpected:
            raise LossError(f"The loss dict's keys should be the task names {list(task_names)}. "
                            f"Missing: {missing}; unexpected: {unexpected}.")
        items = [losses[name] for name in task_names]
    elif isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise LossError(f"A tensor of losses should be 1-D with {num_tasks} elements, one per task. "
                            f"Found shape {tuple(losses.shape)}.")
        items = list(losses.unbind())
    elif isinstance(losses, Sequence) and not isinstance(losses, str):
        items = list(losses)
    else:
        raise LossError(f"Losses should be a list, tuple, dict or 1-D tensor of {num_tasks} scalars. "
                        f"Found {type(losses).__name__}.")

    labels = list(task_names) if task_names is not None else [str(k) for k in range(num_tasks)]
    if len(items) != num_tasks:
        raise LossError(f"Expected {num_tasks} losses, one per task (head), but got {len(items)}.")
    for label, loss in zip(labels, items):
        check_scalar(loss, f"The loss of task {label}")
    vector = torch.stack([loss.reshape(()) for loss in items])
    if not vector.requires_grad:
        raise LossError("None of the losses requires grad: compute them from this step's predictions, "
                        "with the wrapper in training mode and gradients enabled.")
    finite = torch.isfinite(vector.detach())
    if not bool(finite.all()):
        bad = [f"{label}={value:g}" for label, value, ok in zip(labels, vector.tolist(), finite.tolist()) if not ok]
        raise LossError(f"Non-finite losses: {', '.join(bad)}. Nothing was back-propagated; check the "
                        "predictions and targets of those tasks (or lower the learning rate).")
    return vector


def check_scalar(loss: object, what: str) -> None:
    """Raise :class:`LossError` unless ``loss`` is a floating tensor with exactly one element."""
    if not isinstance(loss, Tensor):
        raise LossError(f"{what} should be a scalar tensor. Found {type(loss).__name__}.")
    if loss.numel() != 1:
        raise LossError(f"{what} should be a scalar, but has shape {tuple(loss.shape)}: "
                        "reduce it first, e.g. with .mean().")
    if not loss.is_floating_point():
        raise LossError(f"{what} should be a floating-point tensor. Found dtype {loss.dtype}.")


def check_backbone_loss(loss: Tensor) -> None:
    """Raise :class:`LossError` unless the backbone loss is one finite floating-point scalar."""
    check_scalar(loss, "`backbone_loss`")
    if not bool(torch.isfinite(loss.detach()).all()):
        raise LossError(f"`backbone_loss` is not finite ({loss.item():g}); nothing was back-propagated.")
