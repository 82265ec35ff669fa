"""FAMO: fast adaptive multitask optimization, task logits learned from the losses' change over a step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlzoo.errors import ShapeMismatchError
from mtlzoo.roles.weighting import LossWeighting
from mtlzoo.strategies._weighting import WidensState, check_positive, per_task_numbers, widen
from mtlzoo.strategy import Paper, StrategyInfo, check_number

FAMO_PAPER = Paper(
    authors=("Bo Liu", "Yihao Feng", "Peter Stone", "Qiang Liu"), title="FAMO: Fast Adaptive Multitask Optimization",
    venue="NeurIPS", year=2023, url="https://arxiv.org/abs/2306.03792",
)
EPSILON = 1e-8
"""Added to ``L_k - b_k`` before its log, as the authors' code."""
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
TAKES = "takes the log of each loss minus its lower bound"
_MOMENTS = ("exp_avg", "exp_avg_sq")
_FORMER_ROWS = ("adam_exp_avg", "adam_exp_avg_sq", "adam_steps")
"""The inner Adam's state as checkpoints before 0.x held it: K numbers each (extra state, or buffers)."""


class FAMO(WidensState, LossWeighting):
    r"""FAMO: weights ``z = softmax(xi)`` on the log-losses, ``xi`` learned from how much each loss fell.

    Paper: Liu, Feng, Stone & Liu, *FAMO: Fast Adaptive Multitask Optimization*, NeurIPS 2023
    (https://arxiv.org/abs/2306.03792), Algorithm 2. The model learns from

    ``total = c sum_k z_k log(L_k - b_k + eps)``, so ``w_k = c z_k / (L_k - b_k + eps)``,
    ``c = ( sum_k z_k / (L_k - b_k + eps) )^-1`` (held constant),

    which moves every ``log L_k`` at the same rate when the logits are right. After the optimizer
    step the same batch's losses are evaluated again (``mtl.step(opt, post_step_losses=lambda:
    losses(mtl(x), y))``) and the logits take one Adam step (``lr``, weight decay ``gamma``) along
    ``J_softmax^T delta``, ``delta_k = log(L_k^before - b_k + eps) - log(L_k^after - b_k + eps)``.

    The logits (the buffer ``logits``, in the losses' dtype, at least float32) are stepped only by that inner
    ``torch.optim.Adam`` (on the host), whose state is declared state too, saved in ``state_dict()``; the user's
    optimizer never steps them. ``L^before`` is the step's loss (averaged over its micro-batches). Without the post-step
    losses (the wrapper warns once) the logits stay at 0: plain ``sum_k log L_k``. An absent task keeps its logit and
    moments; the others' softmax is taken without it. A loss at or below its lower bound raises
    :class:`~mtlzoo.errors.NonPositiveLossError`, naming the task, with the state left as it was.

    Args:
        lr: The inner Adam's learning rate, ``>= 0``. The paper uses 0.025.
        gamma: The weight decay on the logits, ``>= 0``. 1e-3, as the paper's Algorithm 2 (and LibMTL); the
            authors' code uses 1e-5 in its experiments (0.01 in its stand-alone ``famo.py``, 1e-3 for QM9).
        min_losses: The lower bounds ``b_k`` of the losses (K numbers, default zeros).

    Example:
        >>> import torch, mtlzoo
        >>> famo = mtlzoo.create("famo", num_tasks=2)
        >>> famo.weights(torch.tensor([1.0, 4.0]))
        tensor([0.8000, 0.2000])
    """

    info = StrategyInfo(
        name="famo",
        summary="Weights on the log-losses from task logits learned by the losses' decrease over each step.",
        paper=FAMO_PAPER, properties=frozenset({"permutation_invariant", "scale_linear"}), cost="backward",
        original_code="https://github.com/Cranial-XIX/FAMO",
    )
    wants_post_step_losses = True
    widening = ("logits",)
    per_task = ("logits", "min_losses")

    def __init__(self, num_tasks: int, lr: float = 0.025, gamma: float = 1e-3,
                 min_losses: Sequence[float] | Tensor | None = None) -> None:
        super().__init__(num_tasks)
        bounds = torch.zeros(num_tasks) if min_losses is None else per_task_numbers(min_losses, "min_losses", num_tasks,
                                                                                    non_negative=False)
        self.lr = check_number("lr", lr)
        self.gamma = check_number("gamma", gamma)
        self.register_buffer("min_losses", bounds)
        # logits: the inner Adam's parameter; inner: its state (step, exp_avg, exp_avg_sq as host floats);
        # losses_before: the last step's K losses; step_losses: this step's sums and counts over its micro-batches
        self.declare_state(logits=torch.zeros(num_tasks), inner={}, losses_before=None)
        self.declare_state(per_step="every", step_losses=None)

    @property
    def task_weights(self) -> Tensor:
        """``z = softmax(xi)``, the K task weights on the log-losses."""
        return torch.softmax(self.logits, dim=0)

    def scalarize(self, losses: Tensor) -> Tensor:
        """``c sum_k z_k log(L_k - b_k + eps)``, ``c = ( sum_k z_k / (L_k - b_k + eps) )^-1`` held constant."""
        tasks = self.present_tasks
        gaps = losses - self.present(self.min_losses).to(losses.dtype)
        check_positive(gaps, tasks, "FAMO (famo)", TAKES)
        self._stage_losses(losses.detach(), tasks)
        widen(self, self.widening, losses.dtype)
        z = torch.softmax(self.present(self.logits).to(device=losses.device, dtype=losses.dtype), dim=0)
        shifted = gaps + EPSILON
        c = 1 / (z / shifted.detach()).sum()
        return c.detach() * (z * shifted.log()).sum()

    def _stage_losses(self, losses: Tensor, tasks: Tensor | None) -> None:
        """Add this micro-batch's losses to the step's sums and counts (K host floats each)."""
        sums, counts = self.state.step_losses or ([0.0] * self.num_tasks, [0.0] * self.num_tasks)
        sums, counts = list(sums), list(counts)
        for k, value in zip(range(self.num_tasks) if tasks is None else tasks.tolist(), losses.tolist()):
            sums[k] += value
            counts[k] += 1
        self.state.step_losses = (sums, counts)

    def on_advance(self) -> None:
        if self.state.step_losses is not None:  # a task absent from every micro-batch: NaN
            sums, counts = self.state.step_losses
            self.state.losses_before = [total / count if count else math.nan for total, count in zip(sums, counts)]
            self.state.step_losses = None

    def post_step(self, losses: Tensor) -> None:
        """One step of the inner Adam on the logits from the step's losses re-evaluated after the optimizer step.

        Args:
            losses: The K losses after the step (NaN for a task absent from it), as the wrapper passes them.
        """
        if losses.shape != (self.num_tasks,):
            raise ShapeMismatchError(f"FAMO.post_step takes the {self.num_tasks} losses after the step (NaN for an "
                                     f"absent task). Found shape {tuple(losses.shape)}.")
        before = self.state.losses_before
        if before is None:
            return
        widen(self, self.widening, losses.dtype)
        dtype = self.logits.dtype  # the losses' dtype, at least float32 (the authors': the model's)
        after, bounds = losses.detach().tolist(), self.min_losses.tolist()  # K numbers: on the host
        present = [k for k in range(self.num_tasks) if math.isfinite(before[k]) and math.isfinite(after[k])]
        if not present:
            return
        if any(after[k] - bounds[k] <= 0 for k in present):
            check_positive(torch.tensor([after[k] - bounds[k] for k in present]), torch.tensor(present),
                           "FAMO (famo)", TAKES)
        delta = [math.log(before[k] - bounds[k] + EPSILON) - math.log(after[k] - bounds[k] + EPSILON) for k in present]
        logits = self.logits.detach().cpu().clone()
        z = torch.softmax(logits[present].double(), dim=0).tolist()  # the present tasks' softmax
        mean = sum(zk * dk for zk, dk in zip(z, delta))
        gradient = [0.0] * self.num_tasks  # d(z . delta)/dlogits = z (delta - z . delta), the authors' autograd.grad
        for k, zk, dk in zip(present, z, delta):
            gradient[k] = zk * (dk - mean)
        logits.grad = torch.tensor(gradient, dtype=dtype)
        everyone = len(present) == self.num_tasks
        absent = None if everyone else torch.tensor([k not in present for k in range(self.num_tasks)])
        inner = torch.optim.Adam([logits], lr=self.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=self.gamma)
        if self.state.inner:  # its state, from the declared one (host floats)
            saved = self.state.inner
            inner.state[logits] = {"step": torch.tensor(float(saved["step"])),
                                   **{name: torch.tensor(saved[name], dtype=dtype) for name in _MOMENTS}}
        kept = None if everyone else (logits.clone(), {k: v.clone() for k, v in inner.state[logits].items()})
        inner.step()
        state = inner.state[logits]
        if kept is not None:  # an absent task's logit and moments are left as they were
            logits[absent] = kept[0][absent]
            for name in _MOMENTS:
                state[name][absent] = kept[1][name][absent] if name in kept[1] else 0
        with self.state.direct():
            self.state.logits = logits.detach()
            self.state.inner = {"step": float(state["step"]), **{name: state[name].tolist() for name in _MOMENTS}}
            self.state.losses_before = None

    @property
    def adam_exp_avg(self) -> Tensor:
        """The inner Adam's first moments of the logits (0 before its first step)."""
        return torch.tensor(self.state.inner.get("exp_avg", [0.0] * self.num_tasks), dtype=self.logits.dtype)

    @property
    def adam_exp_avg_sq(self) -> Tensor:
        """The inner Adam's second moments of the logits."""
        return torch.tensor(self.state.inner.get("exp_avg_sq", [0.0] * self.num_tasks), dtype=self.logits.dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        former = _former_state(state_dict, prefix)
        if former is not None:  # a checkpoint from before the state was declared: rows of K numbers
            logits = former["logits"]  # a buffer, or host floats (float64)
            logits = logits if isinstance(logits, Tensor) else torch.tensor(logits, dtype=torch.float64)
            state_dict[prefix + "logits"] = logits
            for name in (*_FORMER_ROWS, "losses_before"):
                state_dict.pop(prefix + name, None)
            mean, square, steps = (torch.as_tensor(former[name], dtype=torch.float64).tolist() for name in _FORMER_ROWS)
            inner = {"step": max(steps), "exp_avg": mean, "exp_avg_sq": square} if max(steps) > 0 else {}
            before = former.get("losses_before")
            extra = state_dict.get(prefix + "_extra_state", {})
            state_dict[prefix + "_extra_state"] = {**extra, "state": {
                **extra.get("state", {}), "inner": inner,
                "losses_before": None if before is None else torch.as_tensor(before, dtype=torch.float64).tolist()}}
        super()._load_from_state_dict(state_dict, prefix, *args)


def _former_state(state_dict: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    """FAMO's state as a checkpoint of an earlier release holds it (buffers, or lists in the extra state), or None."""
    if prefix + "adam_steps" in state_dict:
        return {name: state_dict[prefix + name] for name in ("logits", *_FORMER_ROWS, "losses_before")
                if prefix + name in state_dict}
    extra = state_dict.get(prefix + "_extra_state")
    if isinstance(extra, dict) and "adam_steps" in extra.get("state", {}):
        state = dict(extra["state"])
        state_dict[prefix + "_extra_state"] = {**extra, "state": {}}
        return state
    return None
