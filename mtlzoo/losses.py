"""Checking what a user hands to ``MTLWrapper.backward``: K finite scalar losses, one per task."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

from mtlzoo.errors import LossError

Losses = Sequence[Tensor | None] | Mapping[str, Tensor | None] | Tensor


@dataclass
class StepLosses:
    """The losses of one backward, checked: the present tasks' losses in task order.

    Attributes:
        values: ``(K',)`` the present tasks' losses; ``host`` the same read once on the host, ``scalars``
            as given (before stacking), ``requires_grad`` whether each depends on anything that does.
        tasks: ``(K',)`` long tensor of their task indices; ``present`` the same as a list.
        labels: Every task's label (its name, or its index as a string), for messages.
    """

    values: Tensor
    tasks: Tensor
    requires_grad: list[bool]
    labels: list[str]
    present: list[int]
    scalars: list[Tensor] = field(default_factory=list)
    host: list[float] = field(default_factory=list)


def loss_vector(losses: Losses, task_names: Sequence[str] | None, num_tasks: int, *,
                require_grad: bool = True) -> StepLosses:
    """Check the K losses of a step and stack the present ones in task order, or raise :class:`LossError`.

    Args:
        losses: A list or tuple of K scalars, a dict keyed by task name (named heads only), or a
            1-D tensor of K elements; ``None`` marks a task absent from the step.
        task_names: The task names when the heads are named, else ``None``.
        num_tasks: K.
        require_grad: Refuse losses of which none requires grad (``False`` after the optimizer step).
    """
    if type(losses) is list or type(losses) is tuple:
        items = list(losses)
    elif isinstance(losses, Mapping):
        if task_names is None:
            raise LossError("Losses were given as a dict, but the heads are not named: pass a list of "
                            f"{num_tasks} losses in head order, or name the heads with an nn.ModuleDict.")
        missing = [name for name in task_names if name not in losses]
        unexpected = [name for name in losses if name not in task_names]
        if missing or unexpected:
            raise LossError(f"The loss dict's keys should be the task names {list(task_names)}. "
                            f"Missing: {missing}; unexpected: {unexpected}. Give None for a task absent "
                            "from this batch.")
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

    labels = task_labels(None if task_names is None else tuple(task_names), num_tasks)
    if len(items) != num_tasks:
        raise LossError(f"Expected {num_tasks} losses, one per task (head), but got {len(items)}.")
    present = [k for k, loss in enumerate(items) if loss is not None]
    if not present:
        raise LossError("Every loss is None: a step needs at least one present task.")
    scalars = []
    for k in present:
        loss = items[k]
        if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.is_floating_point():
            check_scalar(loss, f"The loss of task {labels[k]}")
            loss = loss.reshape(())
        scalars.append(loss)
    vector = torch.stack(scalars)
    requires_grad = [loss.requires_grad for loss in scalars]
    if require_grad and not any(requires_grad):
        raise LossError("None of the losses requires grad: compute them from this step's predictions, "
                        "with the wrapper in training mode and gradients enabled.")
    values = vector.detach().tolist()  # the step's one host synchronisation of the checks
    bad = [f"{labels[k]}={value:g}" for k, value in zip(present, values) if not math.isfinite(value)]
    if bad:
        raise LossError(f"Non-finite losses: {', '.join(bad)}. Nothing was back-propagated. A masked loss over "
                        "an empty mask (no labels for the task in this batch) is NaN: give None as that task's loss "
                        "to leave it out of the step. Otherwise check the predictions and targets of those tasks "
                        "(or lower the learning rate).")
    return StepLosses(vector, task_indices(tuple(present), vector.device), requires_grad, labels, present, scalars,
                      values)


@lru_cache(maxsize=64)
def task_labels(task_names: tuple[str, ...] | None, num_tasks: int) -> list[str]:
    """Every task's label for messages: its name, or its index as a string (do not mutate the list)."""
    return list(task_names) if task_names is not None else [str(k) for k in range(num_tasks)]


@lru_cache(maxsize=256)
def task_indices(present: tuple[int, ...], device: torch.device) -> Tensor:
    """The long tensor of ``present``, made once per pattern and device (the engine never writes to it), outside
    inference mode so that a pattern first seen under ``torch.inference_mode`` can index recorded tensors later."""
    with torch.inference_mode(False):
        return torch.tensor(present, device=device)


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
