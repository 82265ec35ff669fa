"""Modifiers: a Gramian aggregator wrapped to change how its weights are used, as optax's wrappers do.

A modifier is itself a :class:`~mtlzoo.roles.GramianAggregator` that wraps any other (``inner``, a plugin's too) and
transforms its weights ``c = inner.weigh(G, step)``: :class:`ClipNorm`, :class:`EveryNSteps`, :class:`Normalize`,
:class:`EMA`. A new one subclasses :class:`Modifier`, declares its state and writes :meth:`Modifier.modify`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from mtlzoo.errors import InvalidStrategyError
from mtlzoo.protocol import Request
from mtlzoo.roles._parts import WithParts
from mtlzoo.roles.aggregator import Aggregator, DirectionAggregator, GramianAggregator, HostStep
from mtlzoo.roles.weighting import LossWeighting
from mtlzoo.strategy import Paper, StrategyInfo, check_int, check_number

NORMALIZERS: tuple[str, ...] = ("l2", "loss", "loss+")


def normalized(gramian: np.ndarray, losses: np.ndarray, by: str) -> np.ndarray:
    """The Gramian of ``g_k / n_k``: ``n_k = ||g_k||`` (``"l2"``), ``L_k`` (``"loss"``, signed) or ``L_k ||g_k||``
    (``"loss+"``), as the ``gradient_normalizers`` of Sener & Koltun's code; a zero normaliser counts as 1."""
    divisors = np.ones(gramian.shape[0])
    if by in ("l2", "loss+"):
        divisors = divisors * np.sqrt(np.clip(np.diag(gramian), 0.0, None))
    if by in ("loss", "loss+"):
        divisors = divisors * losses
    divisors = np.where(divisors != 0, divisors, 1.0)
    return gramian / np.outer(divisors, divisors)


def clipped(weights: np.ndarray, gramian: np.ndarray, max_norm: float) -> np.ndarray:
    """``c`` scaled so that the update ``J^T c`` has norm at most ``max_norm`` (``||J^T c||^2 = c^T G c``)."""
    if max_norm <= 0:
        return weights
    norm = math.sqrt(max(float(weights @ gramian @ weights), 0.0))
    return weights * (max_norm / norm) if norm > max_norm else weights


class Modifier(WithParts, GramianAggregator):
    """Base of the modifiers: the wrapped aggregator's request, state and lifecycle, and a hook on its weights.

    Args:
        inner: The Gramian aggregator to modify (every modifier's first argument).
    """

    info = StrategyInfo(name="modifier", summary="A Gramian aggregator whose weights are transformed.",
                        request=Request("parameters", "gramian"))
    name: ClassVar[str] = ""
    """The modifier's name in a strategy name such as ``"clip_norm(nash_mtl)"``."""
    does: ClassVar[str] = "modifies"

    def __init__(self, inner: GramianAggregator) -> None:
        if not isinstance(inner, GramianAggregator):
            name = getattr(getattr(inner, "info", None), "name", type(inner).__name__)
            raise InvalidStrategyError(
                f"{self.name or type(self).__name__} {self.does} the weights c of an aggregator whose update is "
                "J^T c, read from the Gramian (a GramianAggregator such as mgda, upgrad, nash_mtl); "
                f"{type(inner).__name__} is not one ({name}): {_not_a_weighting(inner)}.")
        super().__init__(inner.num_tasks, target=inner.target)
        self.inner = inner

    @property
    def request(self) -> Request:
        return self.inner.request

    @property
    def properties(self) -> frozenset[str]:
        return self.inner.properties

    def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        return self.modify(gramian, step)

    def modify(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        """The weights of this step; ``self.inner.weigh(gramian, step)`` gives the wrapped aggregator's."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.hparams.items() if key != "inner")


class ClipNorm(Modifier):
    r"""Clip the update to a largest norm: ``c <- c min(1, m / ||J^T c||)`` with ``||J^T c||^2 = c^T G c``.

    Nash-MTL's authors clip every update this way (``max_norm=1.0``).

    Args:
        max_norm: ``m``, the largest norm of the update (0: no clipping).
    """

    info = StrategyInfo(name="clip_norm", summary="The wrapped aggregator's update, clipped to a largest norm.",
                        request=Request("parameters", "gramian"))
    name = "clip_norm"

    def __init__(self, inner: GramianAggregator, max_norm: float = 1.0) -> None:
        super().__init__(inner)
        self.max_norm = check_number("max_norm", max_norm)

    def modify(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        return clipped(self.inner.weigh(gramian, step), gramian, self.max_norm)


class EveryNSteps(Modifier):
    """Recompute the wrapped aggregator's weights every ``n``-th optimizer step and reuse them in between.

    Nash-MTL's ``update_weights_every``. Running state: the optimizer step count and the last
    weights of each task (a task absent when they were computed keeps its earlier weight, 1 at first).

    Args:
        n: Recompute every this many optimizer steps (1: every step, the aggregator unchanged).
    """

    info = StrategyInfo(name="every", summary="The wrapped aggregator's weights, recomputed every n steps.",
                        request=Request("parameters", "gramian"))
    name = "every"

    def __init__(self, inner: GramianAggregator, n: int = 1) -> None:
        super().__init__(inner)
        self.n = check_int("n", n)
        self.declare_state(steps=0, weights=torch.ones(inner.num_tasks, dtype=torch.float64))

    def modify(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        if self.state.steps % self.n:
            return self.state.weights.detach().cpu().numpy().astype(np.float64)[step.tasks]
        weights = self.inner.weigh(gramian, step)
        self.state.write_rows("weights", step.tasks, weights)
        return weights

    def on_advance(self) -> None:
        self.state.steps += 1


class Normalize(Modifier):
    r"""Weigh the normalised gradients, apply the weights to the raw ones: ``c = inner.weigh(D^{-1} G D^{-1})``.

    Sener & Koltun's ``gradient_normalizers`` (MGDA's ``normalization``, which uses the same function) for any
    Gramian aggregator: ``D = diag(n)`` with ``n_k = ||g_k||`` (``"l2"``), the signed loss ``L_k`` (``"loss"``)
    or ``L_k ||g_k||`` (``"loss+"``); the update is ``J^T c`` on the raw gradients, as in the authors' code.

    Args:
        by: ``"l2"``, ``"loss"`` or ``"loss+"``.
    """

    info = StrategyInfo(name="normalize", summary="The wrapped aggregator's weights of the normalised gradients.",
                        request=Request("parameters", "gramian"))
    name = "normalize"

    def __init__(self, inner: GramianAggregator, by: str = "l2") -> None:
        if by not in NORMALIZERS:
            raise ValueError(f"Parameter `by` should be one of {NORMALIZERS}. Found `by = {by!r}`.")
        super().__init__(inner)
        self.by = by

    @property
    def properties(self) -> frozenset[str]:
        return self.inner.properties - {"non_conflicting", "stationary", "linear_under_scaling"}

    def modify(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        return self.inner.weigh(normalized(gramian, step.losses, self.by), step)


CRMOGM_PAPER = Paper(
    authors=("Shiji Zhou", "Wenpeng Zhang", "Jiyan Jiang", "Wenliang Zhong", "Jinjie Gu", "Wenwu Zhu"),
    title="On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond",
    venue="NeurIPS", year=2022,
    url="https://proceedings.neurips.cc/paper_files/paper/2022/hash/f91bd64a3620aad8e70a27ad9cb3ca57-Abstract-"
        "Conference.html",
)


def _not_a_weighting(inner: object) -> str:
    """Why ``inner`` has no weights of the task gradients read from their Gramian, for a modifier's refusal."""
    if isinstance(inner, WithParts):  # a composite (a modifier is a GramianAggregator)
        return ("it is a composition of roles; smooth its aggregator part instead, e.g. "
                "compose(weighting=..., aggregator=EMA(create('upgrad', num_tasks=K)))")
    if isinstance(inner, LossWeighting):
        return "it is a loss weighting: its weights scale the losses, there are no weights of the gradients"
    if isinstance(inner, DirectionAggregator):
        return "its update is built from the gradients themselves (a direction), not as a weighting of them"
    if isinstance(inner, Aggregator):
        return "its weights are not read from the Gramian (it reads the gradients' entries)"
    return "it is not an aggregator"


class EMA(Modifier):
    r"""Smooth the wrapped aggregator's weights across optimizer steps: ``c_t = β c_{t-1} + (1 - β) ĉ_t``.

    The weight averaging of Zhou et al., *On the Convergence of Stochastic Multi-Objective Gradient Manipulation and
    Beyond*, NeurIPS 2022 (CR-MOGM; torchjd's ``CRMOGMWeighting``), which makes stochastic gradient manipulation
    converge: ``ĉ_t = inner.weigh(G_t)``, the update ``J^T c_t``; ``β = 0`` is the wrapped aggregator itself. Each
    task's first weight is taken as it comes (``c_1 = ĉ_1``, torchjd's default); a task absent from a step keeps its
    smoothed weight. The paper schedules ``β`` towards 1 as the learning rate decays: set ``ema.beta`` between steps.
    Only a :class:`~mtlzoo.roles.GramianAggregator` has such weights; any other ``inner`` is refused, saying why.

    Running state: the smoothed ``weights`` and which tasks have had one (``seen``); every
    micro-batch of a step smooths against the weights the step started with.

    Args:
        beta: ``β`` in [0, 1] (1 keeps the first weights for ever); 0.9 as torchjd's default.

    Example:
        >>> import torch, mtlzoo
        >>> ema = mtlzoo.create("ema(mgda)", num_tasks=2, beta=0.5)
        >>> ema.aggregate(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.ones(2)); ema.advance()
        tensor([0.5000, 0.5000])
        >>> ema.aggregate(torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.ones(2))  # MGDA's own weights: 0.9, 0.1
        tensor([0.7000, 0.9000])
    """

    info = StrategyInfo(name="ema", summary="The wrapped aggregator's weights, smoothed across optimizer steps.",
                        request=Request("parameters", "gramian"), paper=CRMOGM_PAPER)
    name = "ema"
    does = "smooths"

    def __init__(self, inner: GramianAggregator, beta: float = 0.9) -> None:
        super().__init__(inner)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
            raise ValueError(f"Parameter `beta` should be a number in [0, 1]. Found `beta = {beta!r}`.")
        self.beta = float(beta)
        self.declare_state(weights=torch.zeros(inner.num_tasks, dtype=torch.float64),
                           seen=torch.zeros(inner.num_tasks, dtype=torch.bool))

    @property
    def properties(self) -> frozenset[str]:
        if self.beta == 0:
            return self.inner.properties
        return self.inner.properties - {"non_conflicting", "stationary", "linear_under_scaling"}

    def modify(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        fresh = self.inner.weigh(gramian, step)
        previous = self.state.committed("weights").detach().cpu().numpy()[step.tasks]
        seen = self.state.committed("seen").detach().cpu().numpy()[step.tasks]
        smoothed = np.where(seen, self.beta * previous + (1 - self.beta) * fresh, fresh)
        self.state.write_rows("weights", step.tasks, smoothed)
        self.state.write_rows("seen", step.tasks, True)
        return smoothed


MODIFIERS: dict[str, type[Modifier]] = {cls.name: cls for cls in (ClipNorm, EveryNSteps, Normalize, EMA)}


def modify(name: str, inner: GramianAggregator, **options: Any) -> Modifier:
    """Wrap ``inner`` in the modifier called ``name`` (``"clip_norm"``, ``"every"``, ``"normalize"``, ``"ema"``)
    with ``options``."""
    try:
        cls = MODIFIERS[name]
    except KeyError:
        raise KeyError(f"No modifier named {name!r}; there are {sorted(MODIFIERS)}.") from None
    return cls(inner, **options)
