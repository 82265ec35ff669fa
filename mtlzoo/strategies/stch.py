"""Smooth Tchebycheff scalarization, with its authors' multitask recipe (warm-up, nadir vector)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from mtlzoo.roles.weighting import WeightingStrategy
from mtlzoo.strategies import _weighting
from mtlzoo.strategy import Paper, StrategyInfo

STCH_PAPER = Paper(
    authors=("Xi Lin", "Xiaoyuan Zhang", "Zhiyuan Yang", "Fei Liu", "Zhenkun Wang", "Qingfu Zhang"),
    title="Smooth Tchebycheff Scalarization for Multi-Objective Optimization",
    venue="ICML",
    year=2024,
    url="https://arxiv.org/abs/2402.19078",
)
TAKES = "takes the log of each loss"


def stch_total(losses: Tensor, nadir: Tensor, mu: float) -> Tensor:
    """``K mu log sum_k exp( log(L_k / n_k) / mu )``, computed stably (the largest exponent taken out)."""
    normalised = torch.log(losses / nadir) / mu
    return losses.shape[0] * mu * torch.logsumexp(normalised, dim=0)


def stch_weights(losses: Tensor, nadir: Tensor, mu: float) -> Tensor:
    """``d stch_total / d L_k = K softmax( log(L / n) / mu )_k / L_k``."""
    return losses.shape[0] * torch.softmax(torch.log(losses / nadir) / mu, dim=0) / losses


class SmoothTchebycheff(WeightingStrategy):
    r"""Smooth Tchebycheff scalarization (STCH) with its authors' multitask recipe.

    Paper: Lin, Zhang, Yang, Liu, Wang & Zhang, *Smooth Tchebycheff Scalarization for
    Multi-Objective Optimization*, ICML 2024 (https://arxiv.org/abs/2402.19078). The scalarization
    ``mu log sum_k exp( lambda_k (f_k - z_k) / mu )`` is a smooth maximum of the objectives that
    tends to their Tchebycheff maximum as ``mu -> 0``. For multitask learning its authors' code
    (the ``STCH_MTL`` directory of https://github.com/Xi-L/STCH) uses equal preferences and:

    1. warm-up: for epochs ``0 .. warmup_epochs`` the model learns from ``sum_k log L_k``
       (``w_k = 1 / L_k``); during the last of them (epoch ``warmup_epochs``) the losses are
       averaged into the nadir vector ``n``;
    2. then ``total = K mu log sum_k exp( log(L_k / n_k) / mu )``, so
       ``w_k = K softmax( log(L / n) / mu )_k / L_k``: the task furthest above its nadir value,
       relative to it, gets the most weight; at equal relative losses the weights are the warm-up's.

    Epochs are told by the protocol's hook: call ``mtl.end_epoch()`` after each epoch. Without any,
    STCH stays in its warm-up and warns once after
    ``mtlzoo.strategies._weighting.EPOCH_REMINDER_STEPS`` steps. The nadir average is over the
    nadir epoch's backward calls (micro-batches included), counted once each optimizer step is
    taken; a task absent from that whole epoch is not normalised (``n_k = 1``). With absent tasks,
    K is the number of present ones. A loss <= 0 raises :class:`~mtlzoo.errors.NonPositiveLossError`,
    naming the task, with the state left as it was.

    Args:
        num_tasks: K.
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
        name="stch",
        aliases=("smooth_tchebycheff",),
        kind="weighting",
        summary="Smooth maximum of the log-losses relative to a nadir vector, after a warm-up on their sum.",
        paper=STCH_PAPER,
        properties=frozenset({"permutation_invariant", "scale_linear"}),
        cost="backward",
        original_code="https://github.com/Xi-L/STCH",
    )
    reminder_steps: ClassVar[int] = _weighting.EPOCH_REMINDER_STEPS

    def __init__(self, num_tasks: int, mu: float = 1.0, warmup_epochs: int = 4) -> None:
        super().__init__(num_tasks)
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not mu > 0 or math.isinf(mu):
            raise ValueError(f"Parameter `mu` should be a finite positive number. Found `mu = {mu!r}`.")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"Parameter `warmup_epochs` should be a non-negative int. Found `warmup_epochs = "
                             f"{warmup_epochs!r}`.")
        self.mu = float(mu)
        self.warmup_epochs = warmup_epochs
        self.register_buffer("nadir", torch.full((num_tasks,), math.nan))
        self.register_buffer("nadir_sums", torch.zeros(num_tasks))
        self.register_buffer("nadir_counts", torch.zeros(num_tasks))
        self.epoch = 0
        self.steps_in_epoch = 0
        self._staged: dict[str, Tensor] = {}

    @property
    def warming_up(self) -> bool:
        """Whether the model still learns from ``sum_k log L_k`` (no nadir vector yet)."""
        return self.epoch <= self.warmup_epochs or not bool(torch.isfinite(self.nadir).any())

    @property
    def properties(self) -> frozenset[str]:
        if self.warming_up or bool((self.nadir == self.nadir[0]).all()):
            return self.info.properties
        return self.info.properties - {"permutation_invariant"}

    def _nadir(self, tasks: Tensor, dtype: torch.dtype) -> Tensor:
        nadir = self.nadir[tasks].to(dtype)
        return torch.where(torch.isfinite(nadir), nadir, torch.ones_like(nadir))

    def scalarize(self, losses: Tensor) -> Tensor:
        tasks = torch.arange(losses.shape[0], device=losses.device)
        _weighting.check_positive(losses, tasks, "STCH (stch)", TAKES)
        if self.warming_up:
            return losses.log().sum()
        return stch_total(losses, self._nadir(tasks, losses.dtype), self.mu)

    def weights(self, losses: Tensor) -> Tensor:
        return self.task_weights_for(losses, torch.arange(losses.shape[0], device=losses.device))

    def task_weights_for(self, losses: Tensor, tasks: Tensor) -> Tensor:
        losses = losses.detach()
        _weighting.check_positive(losses, tasks, "STCH (stch)", TAKES)
        if self.epoch >= self.warmup_epochs and not bool(torch.isfinite(self.nadir).any()):
            sums = self._staged.get("sums", torch.zeros_like(self.nadir_sums))
            counts = self._staged.get("counts", torch.zeros_like(self.nadir_counts))
            self._staged = {"sums": sums.index_add(0, tasks, losses.to(sums.dtype)),
                            "counts": counts.index_add(0, tasks, torch.ones_like(losses, dtype=counts.dtype))}
        if self.warming_up:
            return 1 / losses
        return stch_weights(losses, self._nadir(tasks, losses.dtype), self.mu)

    def _commit(self) -> None:
        if self._staged:
            self.nadir_sums += self._staged["sums"]
            self.nadir_counts += self._staged["counts"]
        self._staged = {}
        self.steps_in_epoch += 1
        if self.epoch == 0 and self.steps_in_epoch == self.reminder_steps:
            _weighting.remind_end_epoch("STCH (stch)", self.steps_in_epoch,
                                        "keeps learning from its warm-up's sum of log-losses")

    def _drop_staged(self) -> None:
        self._staged = {}

    def end_epoch(self) -> None:
        """Count the epoch; at the end of the nadir epoch, set the nadir vector from its average losses."""
        seen = self.nadir_counts > 0
        if self.epoch >= self.warmup_epochs and not bool(torch.isfinite(self.nadir).any()):
            if not bool(seen.any()):
                return  # no step in the nadir epoch: it has not happened yet
            self.nadir = torch.where(seen, self.nadir_sums / self.nadir_counts.clamp_min(1),
                                     torch.full_like(self.nadir, math.nan))
        self.epoch += 1
        self.steps_in_epoch = 0

    def extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "steps_in_epoch": self.steps_in_epoch}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.steps_in_epoch = int(state["steps_in_epoch"])
        self._staged = {}
