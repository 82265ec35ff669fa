"""The interface every strategy implements, and the metadata it carries.

A strategy is math over tensors: it never sees the model, only losses, gradients and (for the
RotoGrad family) the shared representation ``z``. :class:`mtlzoo.MTLWrapper` drives it through one
training step::

    forward:   z = backbone(x);  z_k = strategy.adapt(z, k);  y_k = head_k(z_k)
    backward:  L, L_b = strategy.prepare(L, L_b)
               needs "losses":               strategy.combine(L).backward()
               needs "representation_grads": G = [dL_k/dz]_k (K x z.shape);  z.backward(strategy.aggregate(G, L))
               needs "parameter_jacobian":   J = [dL_k/dθ]_k (K x n);  θ.grad += strategy.aggregate(J, L)

A strategy's own learnable parameters (rotations, task weights) get their gradients from its own
auxiliary objective inside ``combine``/``aggregate``, never from the task losses.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from mtlzoo.errors import InvalidStrategyError

Kind = Literal["weighting", "surgery"]
Needs = Literal["losses", "representation_grads", "parameter_jacobian"]
Target = Literal["representation", "parameters"]

KINDS: tuple[Kind, ...] = ("weighting", "surgery")
NEEDS: tuple[Needs, ...] = ("losses", "representation_grads", "parameter_jacobian")
NEEDS_BY_TARGET: dict[Target, Needs] = {
    "representation": "representation_grads",
    "parameters": "parameter_jacobian",
}

PROPERTIES: dict[str, str] = {
    "permutation_invariant": "permuting the tasks (gradients and losses alike) leaves the update unchanged",
    "scale_linear": "scaling every task gradient by c >= 0 scales the update by c",
    "non_conflicting": "the update has a non-negative inner product with every task gradient",
}
"""The claims a strategy may list in ``StrategyInfo.properties``; the test suite checks each claim."""

REQUIRED = inspect.Parameter.empty
"""Marks a hyperparameter without a default in :func:`hyperparameters`."""


@dataclass(frozen=True)
class Paper:
    """The publication a strategy comes from."""

    authors: tuple[str, ...]
    title: str
    venue: str
    year: int
    url: str

    def citation(self) -> str:
        """Short form such as ``"Javaloy & Valera, ICLR 2022"``."""
        surnames = [author.split()[-1] for author in self.authors]
        who = " & ".join(surnames) if len(surnames) <= 2 else f"{surnames[0]} et al."
        return f"{who}, {self.venue} {self.year}"


@dataclass(frozen=True)
class StrategyInfo:
    """What a strategy is, as the registry, ``mtlzoo list``, the docs and the harness read it.

    Attributes:
        name: Canonical name, lower case with underscores (``"rotograd_norm"``).
        kind: ``"weighting"`` (combines losses) or ``"surgery"`` (combines per-task gradients).
        needs: What one step asks of autograd by default: ``"losses"`` (one ordinary backward),
            ``"representation_grads"`` (K gradients w.r.t. the backbone output) or
            ``"parameter_jacobian"`` (the K x n Jacobian w.r.t. the shared parameters).
        summary: One line saying what the method does.
        paper: The publication, or ``None`` for a baseline without one.
        aliases: Other names the strategy answers to.
        properties: Claims the method makes, from :data:`PROPERTIES`; the tests check each one.
        stochastic: Whether a step draws random numbers (it is still deterministic given the seed).
        learnable: Whether the strategy owns parameters that belong in an optimizer.
        adapts_representation: Whether ``adapt`` transforms ``z`` per task (the RotoGrad family).
    """

    name: str
    kind: Kind
    needs: Needs
    summary: str
    paper: Paper | None = None
    aliases: tuple[str, ...] = ()
    properties: frozenset[str] = field(default_factory=frozenset)
    stochastic: bool = False
    learnable: bool = False
    adapts_representation: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Parameter `kind` should be one of {KINDS}. Found `kind = {self.kind!r}`.")
        if self.needs not in NEEDS:
            raise ValueError(f"Parameter `needs` should be one of {NEEDS}. Found `needs = {self.needs!r}`.")
        unknown = sorted(set(self.properties) - set(PROPERTIES))
        if unknown:
            raise ValueError(f"Parameter `properties` should hold names from {sorted(PROPERTIES)}. Found {unknown}.")


def hyperparameters(cls: type[Strategy]) -> dict[str, Any]:
    """The constructor arguments of a strategy class and their defaults (``REQUIRED`` if none).

    ``num_tasks`` is left out: the wrapper supplies it.
    """
    signature = inspect.signature(cls.__init__)
    return {
        name: param.default
        for name, param in signature.parameters.items()
        if name not in ("self", "num_tasks")
        and param.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


class Strategy(nn.Module):
    """Base class of every multitask-learning strategy.

    Subclasses set the class attribute ``info`` and implement ``combine`` (weighting) or
    ``aggregate`` (surgery). Every hyperparameter is stored under its argument name, so ``repr``
    and checkpoints show it. Running state (step counters, initial losses) lives in buffers or in
    ``get_extra_state``, so ``state_dict()`` resumes a run exactly.

    Args:
        num_tasks: K, the number of tasks (heads); the wrapper passes it.
    """

    info: ClassVar[StrategyInfo]

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"Parameter `num_tasks` should be a positive int. Found `num_tasks = {num_tasks!r}`.")
        self.num_tasks = num_tasks

    @property
    def needs(self) -> Needs:
        """What this instance asks of the wrapper for one step (see :class:`StrategyInfo`)."""
        return self.info.needs

    def prepare(self, losses: Tensor, backbone_loss: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Rescale the K losses before anything back-propagates (identity by default).

        The heads learn from what this returns, and so does everything after it in the step.
        """
        return losses, backbone_loss

    def adapt(self, z: Tensor, task: int) -> Tensor:
        """Transform the shared representation for task ``task`` in the forward pass (identity)."""
        return z

    def combine(self, losses: Tensor) -> Tensor:
        """Reduce the K prepared losses to the scalar that is back-propagated (``needs="losses"``)."""
        raise NotImplementedError(f"{type(self).__name__} does not combine losses; it needs {self.needs!r}.")

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Reduce K per-task gradients (K x ...) to one gradient of shape ``grads.shape[1:]``."""
        raise NotImplementedError(f"{type(self).__name__} does not aggregate gradients; it needs {self.needs!r}.")

    def check_ready(self) -> None:
        """Raise :class:`~mtlzoo.errors.NotMaterializedError` if parameters are still to be created.

        Lazily shaped strategies (RotoGrad without ``rotation_shape``) create their parameters at
        the first forward; an optimizer built before that would silently miss them.
        """

    def extra_repr(self) -> str:
        names = ["num_tasks", *hyperparameters(type(self))]
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in names if hasattr(self, name))


class WeightingStrategy(Strategy):
    """A strategy that weights the K losses: ``total = sum_k w_k L_k``.

    Subclasses implement :meth:`weights`. Applied to gradients, the same weights give
    ``sum_k w_k g_k``, so a weighting runs unchanged on either gradient path as well.
    """

    def weights(self, losses: Tensor) -> Tensor:
        """The K weights for these losses."""
        raise NotImplementedError

    def combine(self, losses: Tensor) -> Tensor:
        return (self.weights(losses) * losses).sum()

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        weights = self.weights(losses.detach()).detach().to(grads.dtype)
        return torch.tensordot(weights, grads, dims=1)


class GradientSurgery(Strategy):
    """A strategy that combines the K per-task gradients into one update direction.

    Args:
        num_tasks: K.
        target: ``"representation"`` (gradients w.r.t. the backbone output ``z``) or
            ``"parameters"`` (the Jacobian w.r.t. the shared parameters). ``None`` takes the
            default from ``info.needs``.
    """

    supported_targets: ClassVar[tuple[Target, ...]] = ("representation", "parameters")

    def __init__(self, num_tasks: int, *, target: Target | None = None) -> None:
        super().__init__(num_tasks)
        defaults = [t for t, needs in NEEDS_BY_TARGET.items() if needs == self.info.needs]
        if not defaults:
            raise InvalidStrategyError(f"{type(self).__name__}.info.needs is {self.info.needs!r}; gradient surgery "
                                       f"needs one of {tuple(NEEDS_BY_TARGET.values())}.")
        target = defaults[0] if target is None else target
        if target not in self.supported_targets:
            raise ValueError(
                f"Parameter `target` should be one of {self.supported_targets} for {type(self).__name__}. "
                f"Found `target = {target!r}`."
            )
        self.target: Target = target

    @property
    def needs(self) -> Needs:
        return NEEDS_BY_TARGET[self.target]


class GramianWeightedSurgery(GradientSurgery):
    """Surgery that only needs the K x K Gramian ``G = J J^T`` of the task gradients.

    Subclasses implement :meth:`gramian_weights`; the update is ``sum_k w_k g_k``. MGDA, PCGrad,
    UPGrad, CAGrad and IMTL-G are of this form.
    """

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """The K weights for this Gramian."""
        raise NotImplementedError

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        flat = grads.reshape(grads.shape[0], -1)
        weights = self.gramian_weights(flat @ flat.T, losses.detach())
        return torch.tensordot(weights.to(grads.dtype), grads, dims=1)
