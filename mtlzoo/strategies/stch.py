"""Smooth Tchebycheff scalarization, with its authors' multitask recipe (warm-up, nadir vector)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from mtlzoo.roles.weighting import LossWeighting
from mtlzoo.strategies import _weighting
from mtlzoo.strategy import Paper, StrategyInfo, check_int, check_number

STCH_PAPER = Paper(
    authors=("Xi Lin", "Xiaoyuan Zhang", "Zhiyuan Yang", "Fei Liu", "Zhenkun Wang", "Qingfu Zhang"),
    title="Smooth Tchebycheff Scalarization for Multi-Objective Optimization", venue="ICML", year=2024,
    url="https://arxiv.org/abs/2402.19078",
)
TAKES = "takes the log of each loss"


def stch_total(losses: Tensor, nadir: Tensor, mu: float) -> Tensor:
    """``K mu log sum_k exp( log(L_k / n_k) / mu )``, computed stably (the largest exponent taken out)."""
    normalised = torch.log(losses / nadir) / mu
    return losses.shape[0] * mu * torch.logsumexp(normalised, dim=0)


class SmoothTchebycheff(_weighting.WidensState, LossWeighting):
    r"""Smooth Tchebycheff scalarization (STCH) with its authors' multitask recipe.

    Paper: Lin, Zhang, Yang, Liu, Wang & Zhang, *Smooth Tchebycheff Scalarization for Multi-Objective Optimization*,
    ICML 2024 (https://arxiv.org/abs/2402.19078). The scalarization ``mu log sum_k exp( lambda_k (f_k - z_k) / mu )`` is
    a smooth maximum of the objectives that tends to their Tchebycheff maximum as ``mu -> 0``. For multitask learning
    its authors' code (the ``STCH_MTL`` directory of https://github.com/Xi-L/STCH) uses equal preferences and:

    1. warm-up: for epochs ``0 .. warmup_epochs`` the model learns from ``sum_k log L_k``
       (``w_k = 1 / L_k``); during the last of them (epoch ``warmup_epochs``) the losses are
       averaged into the nadir vector ``n``;
    2. then ``total = K mu log sum_k exp( log(L_k / n_k) / mu )``, so
       ``w_k = K softmax( log(L / n) / mu )_k / L_k``: the task furthest above its nadir value,
       relative to it, gets the most weight; at equal relative losses the weights are the warm-up's.

    Call ``mtl.end_epoch()`` after each epoch; without any, STCH stays in its warm-up and warns once after
    ``reminder_steps`` steps (1000 by default). The nadir average is over the nadir epoch's backward calls, counted once
    each optimizer step is taken; a task absent from that whole epoch is not normalised (``n_k = 1``). With absent
    tasks, K is the number of present ones. A loss <= 0 raises :class:`~mtlzoo.errors.NonPositiveLossError`, naming the
    task, with the state left as it was. The nadir is kept in the losses' dtype.

    Args:
        mu: The smoothing ``mu > 0``. 1.0 as the authors' multitask code; the paper evaluates
            0.01, 0.1, 0.5 and 1 and reports no single best value.
        warmup_epochs: Epochs of ``sum_k log L_k`` before the nadir epoch (>= 0); 4 as the authors' code.

    Example:
        >>> import torch, mtlzoo
        >>> stch = mtlzoo.create("stch", num_tasks=2, warmup_epochs=0)
        >>> _ = stch.weights(torch.tensor([2.0, 4.0])); stch.advance(); stch.end_epoch()
        >>> stch.weights(torch.tensor([1.0, 4.0]))
        tensor([0.6667, 0.3333])
    """

    info = StrategyInfo(
        name="stch", aliases=("smooth_tchebycheff",),
        summary="Smooth maximum of the log-losses relative to a nadir vector, after a warm-up on their sum.",
        paper=STCH_PAPER, properties=frozenset({"permutation_invariant", "scale_linear"}), cost="backward",
        original_code="https://github.com/Xi-L/STCH",
    )
    reminder_steps: ClassVar[int] = _weighting.EPOCH_REMINDER_STEPS
    widening = ("nadir", "nadir_sums")

    def __init__(self, num_tasks: int, mu: float = 1.0, warmup_epochs: int = 4) -> None:
        super().__init__(num_tasks)
        self.mu = check_number("mu", mu, positive=True)
        self.warmup_epochs = check_int("warmup_epochs", warmup_epochs, 0)
        self.declare_state(nadir=torch.full((num_tasks,), math.nan), epoch=0, steps_in_epoch=0)
        self.declare_state(per_step="every", nadir_sums=torch.zeros(num_tasks), nadir_counts=torch.zeros(num_tasks))

    @property
    def warming_up(self) -> bool:
        """Whether the model still learns from ``sum_k log L_k`` (no nadir vector yet)."""
        return self.state.epoch <= self.warmup_epochs or not bool(torch.isfinite(self.nadir).any())

    @property
    def nadir_epoch(self) -> bool:
        """Whether this epoch's losses are averaged into the nadir vector."""
        return self.state.epoch >= self.warmup_epochs and not bool(torch.isfinite(self.nadir).any())

    @property
    def properties(self) -> frozenset[str]:
        if self.warming_up or bool((self.nadir == self.nadir[0]).all()):
            return self.info.properties
        return self.info.properties - {"permutation_invariant"}

    def scalarize(self, losses: Tensor) -> Tensor:
        tasks = self.present_tasks
        _weighting.check_positive(losses, tasks, "STCH (stch)", TAKES)
        tasks = torch.arange(losses.shape[0], device=losses.device) if tasks is None else tasks
        _weighting.widen(self, self.widening, losses.dtype)
        if self.nadir_epoch:  # this step's losses so far
            sums = self.state.nadir_sums.to(self.nadir_sums.dtype)
            self.state.nadir_sums = sums.index_add(0, tasks, losses.detach().to(sums.dtype))
            self.state.nadir_counts = self.state.nadir_counts.index_add(0, tasks,
                                                                        torch.ones_like(self.nadir_counts[tasks]))
        if self.warming_up:
            return losses.log().sum()
        nadir = self.present(self.nadir).to(losses.dtype)
        return stch_total(losses, torch.where(torch.isfinite(nadir), nadir, torch.ones_like(nadir)), self.mu)

    def on_advance(self) -> None:
        self.state.steps_in_epoch += 1
        if self.state.epoch == 0 and self.state.steps_in_epoch == self.reminder_steps:
            _weighting.remind_end_epoch("STCH (stch)", self.state.steps_in_epoch,
                                        "keeps learning from its warm-up's sum of log-losses", self)

    def end_epoch(self) -> None:
        """Count the epoch; at the end of the nadir epoch, set the nadir vector from its average losses."""
        seen = self.nadir_counts > 0
        with self.state.direct():
            if self.nadir_epoch:
                if not bool(seen.any()):
                    return  # no step in the nadir epoch: it has not happened yet
                self.state.nadir = torch.where(seen, self.nadir_sums / self.nadir_counts.clamp_min(1),
                                               torch.full_like(self.nadir, math.nan))
            self.state.epoch += 1
            self.state.steps_in_epoch = 0
