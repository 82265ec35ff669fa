"""Dynamic weight average: weights from the rate at which each task's epoch-averaged loss falls."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from mtlzoo.roles.weighting import LossWeighting
from mtlzoo.strategies import _weighting
from mtlzoo.strategy import Paper, StrategyInfo, check_number

DWA_PAPER = Paper(
    authors=("Shikun Liu", "Edward Johns", "Andrew J. Davison"), title="End-to-End Multi-Task Learning with Attention",
    venue="CVPR", year=2019, url="https://arxiv.org/abs/1803.10704",
)
TAKES = "divides each task's average loss over an epoch by the one of the epoch before"


def dwa_weights(newer: Tensor, older: Tensor, temperature: float) -> Tensor:
    """``K softmax(r / T)`` with ``r_k = newer_k / older_k`` (1 where either average is missing)."""
    usable = torch.isfinite(newer) & torch.isfinite(older)
    rates = torch.where(usable, newer / torch.where(usable, older, torch.ones_like(older)), torch.ones_like(newer))
    return newer.shape[0] * torch.softmax(rates / temperature, dim=0)


class DynamicWeightAverage(_weighting.WidensState, LossWeighting):
    r"""Dynamic weight average (DWA): ``w_k(t) = K exp(r_k(t-1) / T) / sum_j exp(r_j(t-1) / T)``.

    Paper: Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention*, CVPR 2019
    (https://arxiv.org/abs/1803.10704). ``r_k(t-1) = L_k(t-1) / L_k(t-2)`` is the ratio of task k's training loss
    averaged over each of the last two epochs, so a task whose loss falls slowly gets more weight; the weights sum to K
    and stay fixed within an epoch. For the first two epochs (no two averages yet) every weight is 1, as the paper.

    Call ``mtl.end_epoch()`` after each epoch; without any, DWA keeps equal weights and warns once after
    ``reminder_steps`` steps (1000 by default). The epoch average is over the epoch's backward calls, counted once each
    optimizer step is taken. A task absent from a whole epoch keeps its previous average (ratio 1 next time). A loss <=
    0 raises :class:`~mtlzoo.errors.NonPositiveLossError` before anything is back-propagated or summed, naming the task.
    The averages are kept in the losses' dtype.

    Args:
        temperature: ``T > 0``; a larger one makes the weights more uniform. The paper uses 2.

    Example:
        >>> import torch, mtlzoo
        >>> dwa = mtlzoo.create("dwa", num_tasks=2)
        >>> for epoch_loss in ([1.0, 1.0], [0.5, 0.9]):
        ...     _ = dwa.weights(torch.tensor(epoch_loss)); dwa.advance(); dwa.end_epoch()
        >>> dwa.weights(torch.tensor([0.4, 0.8]))
        tensor([0.9003, 1.0997])
    """

    info = StrategyInfo(
        name="dwa", aliases=("dynamic_weight_average",),
        summary="Weights from the ratio of each task's last two epoch-averaged losses (temperature T).",
        paper=DWA_PAPER, properties=frozenset({"permutation_invariant", "scale_linear"}), cost="backward",
        original_code="https://github.com/lorenmt/mtan",
    )
    reminder_steps: ClassVar[int] = _weighting.EPOCH_REMINDER_STEPS
    widening = ("loss_sums", "averages", "epoch_weights")
    per_task = ("epoch_weights",)

    def __init__(self, num_tasks: int, temperature: float = 2.0) -> None:
        super().__init__(num_tasks)
        self.temperature = check_number("temperature", temperature, positive=True)
        self.declare_state(per_step="every", loss_sums=torch.zeros(num_tasks), loss_counts=torch.zeros(num_tasks))
        self.declare_state(averages=torch.full((2, num_tasks), math.nan), epoch_weights=torch.ones(num_tasks),
                           epoch=0, steps_in_epoch=0)

    def scalarize(self, losses: Tensor) -> Tensor:
        """``sum_k w_k(t) L_k`` with this epoch's weights (constants: they do not depend on this step's losses)."""
        tasks = self.present_tasks
        _weighting.check_positive(losses, tasks, "DWA (dwa)", TAKES)
        tasks = torch.arange(losses.shape[0], device=losses.device) if tasks is None else tasks
        values = losses.detach()
        _weighting.widen(self, self.widening, values.dtype)
        sums = self.state.loss_sums.to(torch.promote_types(self.loss_sums.dtype, values.dtype))
        self.state.loss_sums = sums.index_add(0, tasks, values.to(sums.dtype))  # this step's losses so far
        self.state.loss_counts = self.state.loss_counts.index_add(0, tasks, torch.ones_like(self.loss_counts[tasks]))
        return (self.present(self.state.epoch_weights).to(losses.dtype) * losses).sum()

    def on_advance(self) -> None:
        self.state.steps_in_epoch += 1
        if self.state.epoch == 0 and self.state.steps_in_epoch == self.reminder_steps:
            _weighting.remind_end_epoch("DWA (dwa)", self.state.steps_in_epoch, "keeps equal weights", self)

    def end_epoch(self) -> None:
        """Close the epoch: its average losses join the history, and the next epoch's weights are set."""
        seen = self.loss_counts > 0
        if not bool(seen.any()):
            return
        average = torch.where(seen, self.loss_sums / self.loss_counts.clamp_min(1), self.averages[1])
        with self.state.direct():
            self.state.averages = torch.stack([self.averages[1], average])
            self.state.epoch_weights = dwa_weights(average, self.averages[0], self.temperature)
            self.state.loss_sums = torch.zeros_like(self.loss_sums)
            self.state.loss_counts = torch.zeros_like(self.loss_counts)
            self.state.epoch += 1
            self.state.steps_in_epoch = 0
