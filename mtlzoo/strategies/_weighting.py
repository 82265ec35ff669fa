"""What the loss-weighting strategies share: the domain check on the losses and the epoch hook's reminder."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from mtlzoo.errors import NonPositiveLossError

EPOCH_REMINDER_STEPS = 10_000
"""Optimizer steps without any ``end_epoch()`` after which a per-epoch method (DWA, STCH) warns, once."""


def check_positive(losses: Tensor, tasks: Tensor | None, method: str, takes: str) -> None:
    """Raise :class:`~mtlzoo.errors.NonPositiveLossError` if a loss is <= 0 (one host synchronisation).

    Args:
        losses: The present tasks' losses.
        tasks: Their task indices (``None``: 0 to K-1).
        method: The method's name, for the message (``"SI (si)"``).
        takes: What the method does with the losses, for the message (``"takes the log of each loss"``).
    """
    if losses.numel() == 0 or float(losses.detach().min()) > 0:
        return
    bad = losses.detach() <= 0
    if bool(bad.any()):
        tasks = torch.arange(losses.shape[0], device=losses.device) if tasks is None else tasks
        values = losses.detach()[bad].tolist()
        found = ", ".join(f"task {task}: {value:g}" for task, value in zip(tasks[bad].tolist(), values))
        raise NonPositiveLossError(
            f"{method} {takes}, so every loss should be > 0. Found {found}. Nothing was back-propagated and the "
            "strategy's state is unchanged: add a small positive constant to that loss, or use a method that does "
            "not take its log, ratio or product (ls, uw).")


def gradient_surrogate(parameters: Tensor, gradient: list[float]) -> Tensor:
    """``sum_k p_k g_k`` with ``g`` held constant: a scalar whose gradient w.r.t. ``parameters`` is ``g``.

    For an objective whose gradient has a closed form over K numbers, computed on the host: two
    operations in the step's graph instead of a dozen (its value is not the objective's).
    """
    return (parameters * torch.tensor(gradient, dtype=parameters.dtype, device=parameters.device)).sum()


def remind_end_epoch(method: str, steps: int, consequence: str) -> None:
    """Warn once that ``mtl.end_epoch()`` seems never to be called (``steps`` steps without it)."""
    warnings.warn(f"{method} has taken {steps} optimizer steps and no epoch has ended: call mtl.end_epoch() at the "
                  f"end of every epoch. Until then it {consequence}, as its paper does before the first epoch ends. "
                  "Said once.", RuntimeWarning, stacklevel=4)
