"""Modifiers: a Gramian aggregator wrapped to change how its weights are used, as optax's wrappers do.

A modifier is itself a :class:`~mtlzoo.roles.GramianAggregator` that holds the aggregator it wraps
(``inner``) and transforms the weights ``c = inner.weigh(G, step)``; it composes, checkpoints and
resumes like any aggregator, and any Gramian aggregator (a plugin's too) can take it. Adding one is
a one-file matter: subclass :class:`Modifier`, declare its state, write :meth:`Modifier.modify`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from mtlzoo.errors import InvalidStrategyError
from mtlzoo.protocol import Request
from mtlzoo.roles._parts import WithParts
from mtlzoo.roles.aggregator import GramianAggregator, HostStep
from mtlzoo.strategy import StrategyInfo

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
        inner: The Gramian aggregator to modify.
    """

    info = StrategyInfo(name="modifier", summary="A Gramian aggregator whose weights are transformed.",
                        request=Request("parameters", "gramian"))
    name: ClassVar[str] = ""
    """The modifier's name in a strategy name such as ``"clip_norm(nash_mtl)"``."""

    def __init__(self, inner: GramianAggregator) -> None:
        if not isinstance(inner, GramianAggregator):
            raise InvalidStrategyError(
                f"{type(self).__name__} modifies the weights of a Gramian aggregator (one whose update is J^T c); "
                f"{type(inner).__name__} is not one, so it has no weights to modify.")
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
        inner: The Gramian aggregator.
        max_norm: ``m``, the largest norm of the update (0: no clipping).
    """

    info = StrategyInfo(name="clip_norm", summary="The wrapped aggregator's update, clipped to a largest norm.",
                        request=Request("parameters", "gramian"))
    name = "clip_norm"

    def __init__(self, inner: GramianAggregator, max_norm: float = 1.0) -> None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not (
                max_norm >= 0 and math.isfinite(max_norm)):
            raise ValueError(f"Parameter `max_norm` should be a non-negative number. Found `max_norm = {max_norm!r}`.")
        super().__init__(inner)
        self.max_norm = float(max_norm)

    def modify(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        return clipped(self.inner.weigh(gramian, step), gramian, self.max_norm)


class EveryNSteps(Modifier):
    """Recompute the wrapped aggregator's weights every ``n``-th optimizer step and reuse them in between.

    Nash-MTL's ``update_weights_every``. Running state: the optimizer step count and the last
    weights of each task (a task absent when they were computed keeps its earlier weight, 1 at first).

    Args:
        inner: The Gramian aggregator.
        n: Recompute every this many optimizer steps (1: every step, the aggregator unchanged).
    """

    info = StrategyInfo(name="every", summary="The wrapped aggregator's weights, recomputed every n steps.",
                        request=Request("parameters", "gramian"))
    name = "every"

    def __init__(self, inner: GramianAggregator, n: int = 1) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Parameter `n` should be a positive int. Found `n = {n!r}`.")
        super().__init__(inner)
        self.n = n
        self.declare_state(steps=0, weights=torch.ones(inner.num_tasks, dtype=torch.float64))

    def modify(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        if self.state.steps % self.n:
            return self.state.weights.detach().cpu().numpy().astype(np.float64)[step.tasks]
        weights = self.inner.weigh(gramian, step)
        everyone = self.state.weights.detach().cpu().clone()  # the buffer may live on an accelerator
        everyone[torch.from_numpy(step.tasks)] = torch.from_numpy(weights).to(everyone.dtype)
        self.state.weights = everyone
        return weights

    def on_advance(self) -> None:
        self.state.steps += 1


class Normalize(Modifier):
    r"""Weigh the normalised gradients, apply the weights to the raw ones: ``c = inner.weigh(D^{-1} G D^{-1})``.

    Sener & Koltun's ``gradient_normalizers`` (MGDA's ``normalization``, which uses the same function) for any
    Gramian aggregator: ``D = diag(n)`` with ``n_k = ||g_k||`` (``"l2"``), the signed loss ``L_k`` (``"loss"``)
    or ``L_k ||g_k||`` (``"loss+"``); the update is ``J^T c`` on the raw gradients, as in the authors' code.

    Args:
        inner: The Gramian aggregator.
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


MODIFIERS: dict[str, type[Modifier]] = {cls.name: cls for cls in (ClipNorm, EveryNSteps, Normalize)}


def modify(name: str, inner: GramianAggregator, **options: Any) -> Modifier:
    """Wrap ``inner`` in the modifier called ``name`` (``"clip_norm"``, ``"every"``, ``"normalize"``) with
    ``options``."""
    try:
        cls = MODIFIERS[name]
    except KeyError:
        raise KeyError(f"No modifier named {name!r}; there are {sorted(MODIFIERS)}.") from None
    return cls(inner, **options)
