"""FAMO: fast adaptive multitask optimization, task logits learned from the losses' change over a step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlzoo.errors import ShapeMismatchError
from mtlzoo.roles.weighting import WeightingStrategy
from mtlzoo.strategies._weighting import check_positive
from mtlzoo.strategy import Paper, StrategyInfo

FAMO_PAPER = Paper(
    authors=("Bo Liu", "Yihao Feng", "Peter Stone", "Qiang Liu"),
    title="FAMO: Fast Adaptive Multitask Optimization",
    venue="NeurIPS",
    year=2023,
    url="https://arxiv.org/abs/2306.03792",
)
EPSILON = 1e-8
"""Added to ``L_k - b_k`` before its log, as the authors' code."""
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
TAKES = "takes the log of each loss minus its lower bound"
_ADAM_STATE = ("logits", "adam_exp_avg", "adam_exp_avg_sq", "adam_steps")
_STATE_ROWS = (*_ADAM_STATE, "losses_before")


def famo_weights(losses: list[float], logits: list[float], min_losses: list[float]) -> list[float]:
    """``w_k = z_k / (c (L_k - b_k + eps))``, ``z = softmax(logits)``, ``c = sum_j z_j / (L_j - b_j + eps)``.

    K numbers, on the host (Python floats): a dozen tensor operations of K entries cost more.
    """
    z = _softmax(logits)
    shifted = [loss - bound + EPSILON for loss, bound in zip(losses, min_losses)]
    total = sum(zk / gap for zk, gap in zip(z, shifted))
    return [zk / (gap * total) for zk, gap in zip(z, shifted)]


def logit_gradient(logits: list[float], delta: list[float]) -> list[float]:
    """``J^T delta`` for ``z = softmax(logits)``: ``z * (delta - z . delta)`` (the authors' ``autograd.grad``)."""
    z = _softmax(logits)
    mean = sum(zk * dk for zk, dk in zip(z, delta))
    return [zk * (dk - mean) for zk, dk in zip(z, delta)]


def adam_step(tasks: list[int], state: list[list[float]], grad: list[float], lr: float, gamma: float) -> None:
    """``torch.optim.Adam`` (L2 weight decay ``gamma``) on the logits of ``tasks`` only, in float64, in place.

    ``state`` is ``[logits, exp_avg, exp_avg_sq, steps]`` (K each); ``grad`` holds the gradients of ``tasks``.
    """
    logits, exp_avg, exp_avg_sq, steps = state
    beta1, beta2 = ADAM_BETAS
    for k, g in zip(tasks, grad):
        g = g + gamma * logits[k]
        steps[k] += 1
        exp_avg[k] += (g - exp_avg[k]) * (1 - beta1)
        exp_avg_sq[k] = exp_avg_sq[k] * beta2 + (1 - beta2) * g * g
        denom = math.sqrt(exp_avg_sq[k]) / math.sqrt(1 - beta2 ** steps[k]) + ADAM_EPS
        logits[k] -= lr / (1 - beta1 ** steps[k]) * exp_avg[k] / denom


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(value - top) for value in logits]
    total = sum(exps)
    return [value / total for value in exps]


def _state_view(name: str, doc: str) -> property:
    """A read-only tensor copy of one row of FAMO's host state, in ``min_losses``' dtype and on its device."""
    return property(lambda self: self._as_tensor(self._state[name]), doc=doc)


class FAMO(WeightingStrategy):
    r"""FAMO: weights ``z = softmax(xi)`` on the log-losses, ``xi`` learned from how much each loss fell.

    Paper: Liu, Feng, Stone & Liu, *FAMO: Fast Adaptive Multitask Optimization*, NeurIPS 2023
    (https://arxiv.org/abs/2306.03792), Algorithm 2. The model learns from

    ``total = c sum_k z_k log(L_k - b_k + eps)``, so ``w_k = c z_k / (L_k - b_k + eps)``,
    ``c = ( sum_k z_k / (L_k - b_k + eps) )^-1`` (held constant),

    which moves every ``log L_k`` at the same rate when the logits are right. After the optimizer
    step, the same batch's losses are evaluated again (``mtl.step(opt, post_step_losses=lambda:
    losses(mtl(x), y))``, under ``torch.no_grad()``), and the logits take one Adam step (learning
    rate ``lr``, weight decay ``gamma``) along ``J_softmax^T delta`` with
    ``delta_k = log(L_k^before - b_k + eps) - log(L_k^after - b_k + eps)``.

    The logits are the strategy's own state, stepped only by that inner Adam, whose moments and
    step counts are state too: K numbers each, kept on the host in float64 and saved exactly in
    ``state_dict()`` (its extra state); none is among ``strategy_parameters()``, so the user's
    optimizer never steps them. ``L^before`` is the step's loss (averaged over its
    micro-batches). Without the post-step losses (``post_step_losses`` not given, the wrapper warns
    once) the logits stay at 0: plain ``sum_k log L_k`` with equal ``z``. An absent task keeps its
    logit, moments and step count; the others' softmax is taken without it. A loss at or below its
    lower bound raises :class:`~mtlzoo.errors.NonPositiveLossError`, naming the task, with the
    state left as it was.

    Args:
        num_tasks: K.
        lr: The inner Adam's learning rate, ``>= 0``. The paper uses 0.025.
        gamma: The weight decay on the logits, ``>= 0``. 1e-3, as the paper's Algorithm 2 (and LibMTL); the
            authors' code defaults to 1e-5 in its experiments' weighting class (0.01 in its stand-alone
            ``famo.py``, 1e-3 in its QM9 script).
        min_losses: The lower bounds ``b_k`` of the losses (K numbers, default zeros).

    Example:
        >>> import torch, mtlzoo
        >>> famo = mtlzoo.create("famo", num_tasks=2)
        >>> famo.weights(torch.tensor([1.0, 4.0]))
        tensor([0.8000, 0.2000])
    """

    info = StrategyInfo(
        name="famo",
        kind="weighting",
        summary="Weights on the log-losses from task logits learned by the losses' decrease over each step.",
        paper=FAMO_PAPER,
        properties=frozenset({"permutation_invariant", "scale_linear"}),
        cost="backward",
        original_code="https://github.com/Cranial-XIX/FAMO",
    )
    wants_post_step_losses = True

    def __init__(self, num_tasks: int, lr: float = 0.025, gamma: float = 1e-3,
                 min_losses: Sequence[float] | Tensor | None = None) -> None:
        super().__init__(num_tasks)
        for name, value in (("lr", lr), ("gamma", gamma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise ValueError(f"Parameter `{name}` should be a finite number >= 0. Found `{name} = {value!r}`.")
        bounds = torch.zeros(num_tasks) if min_losses is None else torch.as_tensor(min_losses,
                                                                                   dtype=torch.get_default_dtype())
        if bounds.shape != (num_tasks,) or not bool(torch.isfinite(bounds).all()):
            raise ValueError(f"Parameter `min_losses` should hold {num_tasks} finite numbers. Found `min_losses = "
                             f"{min_losses!r}`.")
        self.lr = float(lr)
        self.gamma = float(gamma)
        self.register_buffer("min_losses", bounds)
        # K numbers each, updated on the host in float64 and saved exactly by extra_state()
        self._state: dict[str, list[float]] = _initial_state(num_tasks)
        self._staged: dict[str, list[float]] = {}

    logits = _state_view("logits", "``xi``, the K task logits.")
    adam_exp_avg = _state_view("adam_exp_avg", "The inner Adam's first moments of the logits.")
    adam_exp_avg_sq = _state_view("adam_exp_avg_sq", "The inner Adam's second moments of the logits.")
    adam_steps = _state_view("adam_steps", "The inner Adam's step count of each logit (an absent task's stays).")
    losses_before = _state_view("losses_before", "This step's losses (NaN once the post-step update used them).")

    def _as_tensor(self, values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=self.min_losses.dtype, device=self.min_losses.device)

    @property
    def properties(self) -> frozenset[str]:
        logits, bounds = self._state["logits"], self.min_losses.tolist()
        if all(value == logits[0] for value in logits) and all(value == bounds[0] for value in bounds):
            return self.info.properties
        return self.info.properties - {"permutation_invariant"}

    @property
    def task_weights(self) -> Tensor:
        """``z = softmax(xi)``, the K task weights on the log-losses."""
        return torch.softmax(self.logits, dim=0)

    def weights(self, losses: Tensor) -> Tensor:
        return self.task_weights_for(losses, torch.arange(losses.shape[0], device=losses.device))

    def task_weights_for(self, losses: Tensor, tasks: Tensor) -> Tensor:
        losses = losses.detach()
        present, values = tasks.tolist(), losses.tolist()
        weights = self._weights(losses, tasks, present, values)
        staged = self._staged or {"sums": [0.0] * self.num_tasks, "counts": [0.0] * self.num_tasks}
        for k, value in zip(present, values):  # this step's losses so far, on the host
            staged["sums"][k] += value
            staged["counts"][k] += 1
        self._staged = staged
        return weights

    def _weights(self, losses: Tensor, tasks: Tensor, present: list[int], values: list[float]) -> Tensor:
        bounds, logits = self.min_losses.tolist(), self._state["logits"]
        if not all(value - bounds[k] > 0 for value, k in zip(values, present)):
            check_positive(losses - self.of_present(self.min_losses, tasks).to(losses.dtype), tasks, "FAMO (famo)",
                           TAKES)
        weights = famo_weights(values, [logits[k] for k in present], [bounds[k] for k in present])
        return torch.tensor(weights, dtype=losses.dtype, device=losses.device)

    def scalarize(self, losses: Tensor) -> Tensor:
        tasks = torch.arange(losses.shape[0], device=losses.device)
        weights = self._weights(losses.detach(), tasks, tasks.tolist(), losses.detach().tolist())
        shifted = losses - self.min_losses.to(losses.dtype) + EPSILON
        # c sum_k z_k log(L_k - b_k + eps): weights * shifted is c z, held constant
        return (weights * shifted.detach() * shifted.log()).sum()

    def _commit(self) -> None:
        if self._staged:  # a task absent from every micro-batch: NaN
            self._state["losses_before"] = [total / count if count else math.nan
                                            for total, count in zip(self._staged["sums"], self._staged["counts"])]
        self._staged = {}

    def _drop_staged(self) -> None:
        self._staged = {}

    def post_step(self, losses: Tensor) -> None:
        """One Adam step on the logits from the step's losses re-evaluated after the optimizer step.

        Args:
            losses: The K losses after the step (NaN for a task absent from it), as the wrapper passes them.
        """
        if losses.shape != (self.num_tasks,):
            raise ShapeMismatchError(f"FAMO.post_step takes the {self.num_tasks} losses after the step (NaN for an "
                                     f"absent task). Found shape {tuple(losses.shape)}.")
        after, before = losses.detach().tolist(), self._state["losses_before"]
        tasks = [k for k in range(self.num_tasks) if math.isfinite(before[k]) and math.isfinite(after[k])]
        if not tasks:
            return
        bounds = self.min_losses.tolist()
        if any(after[k] - bounds[k] <= 0 for k in tasks):
            index = torch.tensor(tasks)
            check_positive(torch.tensor(after)[index] - torch.tensor(bounds)[index], index, "FAMO (famo)", TAKES)
        delta = [math.log(before[k] - bounds[k] + EPSILON) - math.log(after[k] - bounds[k] + EPSILON) for k in tasks]
        state = [self._state[name] for name in _ADAM_STATE]
        logits = state[0]
        adam_step(tasks, state, logit_gradient([logits[k] for k in tasks], delta), self.lr, self.gamma)
        self._state["losses_before"] = [math.nan] * self.num_tasks

    def extra_state(self) -> dict[str, Any]:
        return {name: list(values) for name, values in self._state.items()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._staged = {}
        if _STATE_ROWS[0] in state:
            self._state = {name: [float(value) for value in state[name]] for name in _STATE_ROWS}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # a checkpoint from before the state moved to the host holds it as buffers
        saved = {name: state_dict.pop(prefix + name) for name in _STATE_ROWS if prefix + name in state_dict}
        super()._load_from_state_dict(state_dict, prefix, *args)
        if saved:
            self._state = {name: saved[name].double().tolist() if name in saved else self._state[name]
                           for name in _STATE_ROWS}


def _initial_state(num_tasks: int) -> dict[str, list[float]]:
    """Logits 0, Adam's moments and step counts 0, no step's losses yet."""
    return {**{name: [0.0] * num_tasks for name in _ADAM_STATE}, "losses_before": [math.nan] * num_tasks}
