"""Dynamic weight average: weights from the rate at which each task's epoch-averaged loss falls."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from mtlzoo.roles.weighting import WeightingStrategy
from mtlzoo.strategies import _weighting
from mtlzoo.strategy import Paper, StrategyInfo

DWA_PAPER = Paper(
    authors=("Shikun Liu", "Edward Johns", "Andrew J. Davison"),
    title="End-to-End Multi-Task Learning with Attention",
    venue="CVPR",
    year=2019,
    url="https://arxiv.org/abs/1803.10704",
)
TAKES = "divides each task's average loss over an epoch by the one of the epoch before"


def dwa_weights(newer: Tensor, older: Tensor, temperature: float) -> Tensor:
    """``K softmax(r / T)`` with ``r_k = newer_k / older_k`` (1 where either average is missing)."""
    usable = torch.isfinite(newer) & torch.isfinite(older)
    rates = torch.where(usable, newer / torch.where(usable, older, torch.ones_like(older)), torch.ones_like(newer))
    return newer.shape[0] * torch.softmax(rates / temperature, dim=0)


class DynamicWeightAverage(WeightingStrategy):
    r"""Dynamic weight average (DWA): ``w_k(t) = K exp(r_k(t-1) / T) / sum_j exp(r_j(t-1) / T)``.

    Paper: Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention*, CVPR 2019
    (https://arxiv.org/abs/1803.10704). ``r_k(t-1) = L_k(t-1) / L_k(t-2)`` is the ratio of task k's
    training loss averaged over each of the last two epochs, so a task whose loss falls slowly gets
    more weight; the weights sum to K and stay fixed within an epoch. For the first two epochs
    (no two averages yet) every weight is 1, as the paper.

    Epochs are told by the protocol's hook: call ``mtl.end_epoch()`` after each epoch. The epoch
    average is over the epoch's backward calls (micro-batches included), counted once each
    optimizer step is taken. A task absent from a whole epoch keeps its previous average (ratio 1
    next time). Without any ``end_epoch()``, DWA keeps equal weights and warns once after
    ``mtlzoo.strategies._weighting.EPOCH_REMINDER_STEPS`` steps. An epoch average <= 0 raises
    :class:`~mtlzoo.errors.NonPositiveLossError` at ``end_epoch()``, naming the task, with the
    state left as it was.

    Args:
        num_tasks: K.
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
        name="dwa",
        aliases=("dynamic_weight_average",),
        kind="weighting",
        summary="Weights from the ratio of each task's last two epoch-averaged losses (temperature T).",
        paper=DWA_PAPER,
        properties=frozenset({"permutation_invariant", "scale_linear"}),
        cost="backward",
        original_code="https://github.com/lorenmt/mtan",
    )
    reminder_steps: ClassVar[int] = _weighting.EPOCH_REMINDER_STEPS

    def __init__(self, num_tasks: int, temperature: float = 2.0) -> None:
        super().__init__(num_tasks)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
                or math.isinf(temperature):
            raise ValueError(f"Parameter `temperature` should be a finite positive number. Found `temperature = "
                             f"{temperature!r}`.")
        self.temperature = float(temperature)
        self.register_buffer("loss_sums", torch.zeros(num_tasks))
        self.register_buffer("loss_counts", torch.zeros(num_tasks))
        self.register_buffer("averages", torch.full((2, num_tasks), math.nan))
        self.register_buffer("epoch_weights", torch.ones(num_tasks))
        self.epoch = 0
        self.steps_in_epoch = 0
        self._staged: dict[str, Tensor | None] = {}

    @property
    def properties(self) -> frozenset[str]:
        if bool((self.epoch_weights == self.epoch_weights[0]).all()):
            return self.info.properties
        return self.info.properties - {"permutation_invariant"}

    def weights(self, losses: Tensor) -> Tensor:
        return self.task_weights_for(losses, torch.arange(losses.shape[0], device=losses.device))

    def task_weights_for(self, losses: Tensor, tasks: Tensor) -> Tensor:
        self._staged = _stage_losses(self._staged, losses.detach().to(self.loss_sums.dtype), tasks,
                                               self.num_tasks)
        return self.of_present(self.epoch_weights, tasks).to(losses.dtype)

    def _commit(self) -> None:
        if self._staged:
            sums, counts = self._staged["sums"], self._staged["counts"]
            assert sums is not None
            self.loss_sums += sums
            self.loss_counts += 1 if counts is None else counts
        self._staged = {}
        self.steps_in_epoch += 1
        if self.epoch == 0 and self.steps_in_epoch == self.reminder_steps:
            _weighting.remind_end_epoch("DWA (dwa)", self.steps_in_epoch, "keeps equal weights")

    def _drop_staged(self) -> None:
        self._staged = {}

    def end_epoch(self) -> None:
        """Close the epoch: its average losses join the history, and the next epoch's weights are set."""
        seen = self.loss_counts > 0
        if not bool(seen.any()):
            return
        average = torch.where(seen, self.loss_sums / self.loss_counts.clamp_min(1), self.averages[1])
        tasks = torch.arange(self.num_tasks, device=average.device)[seen]
        _weighting.check_positive(average[seen], tasks, "DWA (dwa)", TAKES)
        self.averages = torch.stack([self.averages[1], average])
        self.epoch_weights = dwa_weights(self.averages[1], self.averages[0], self.temperature)
        self.loss_sums.zero_()
        self.loss_counts.zero_()
        self.epoch += 1
        self.steps_in_epoch = 0

    def extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "steps_in_epoch": self.steps_in_epoch}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.steps_in_epoch = int(state["steps_in_epoch"])
        self._staged = {}


def _stage_losses(staged: dict[str, Tensor | None], values: Tensor, tasks: Tensor, num_tasks: int
                 ) -> dict[str, Tensor | None]:
    """This optimizer step's losses so far, per task: ``{"sums": (K,), "counts": (K,) or None}``.

    ``staged`` is what the step's earlier micro-batches staged (``{}`` at its first). A first
    micro-batch of every task is kept as it is, ``counts`` ``None`` (one each): no copies.
    """
    if not staged and tasks.shape[0] == num_tasks:
        return {"sums": values, "counts": None}
    if staged:
        sums, counts = staged["sums"], staged["counts"]
        assert sums is not None
        counts = torch.ones_like(sums) if counts is None else counts
    else:
        sums, counts = values.new_zeros(num_tasks), values.new_zeros(num_tasks)
    return {"sums": sums.index_add(0, tasks, values), "counts": counts.index_add(0, tasks, torch.ones_like(values))}
