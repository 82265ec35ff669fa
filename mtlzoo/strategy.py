"""The interface every strategy implements, and the metadata it carries.

A strategy is math over tensors: it never sees the model, only losses, gradients and (for the
RotoGrad family) the shared representation ``z``. It declares a :class:`~mtlzoo.protocol.Request`
(what it reads from a step); :class:`mtlzoo.MTLWrapper` and the engine (:mod:`mtlzoo.autograd`)
drive it through one training step::

    forward:   z = backbone(x);  y_k = strategy.predict(head_k, z, k) = head_k(strategy.adapt(z, k))
    backward:  w = strategy.loss_weights(inputs)          the model learns from sum_k w_k L_k
               inputs.<statistic> = engine(request)        per-task gradients of w_k L_k, if requested
               update = strategy.compute(inputs)           weights c or a direction; an own objective
    step:      strategy.advance()                          once per successful optimizer step

Running state (counters, reference values, moving averages) advances only in :meth:`Strategy.advance`,
once per optimizer step that was taken; a backward may *stage* values (read by the later
micro-batches of the same step) that ``advance`` commits and :meth:`Strategy.discard` drops. Used
standalone, on a matrix, a strategy is advanced by calling ``advance()`` after each step.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from mtlzoo.errors import CheckpointMismatchError, InvalidStrategyError
from mtlzoo.protocol import Request, StepInputs, Update, Where
from mtlzoo.structure import trainable_parameters

Kind = Literal["weighting", "surgery"]
Target = Literal["representation", "parameters"]

KINDS: tuple[Kind, ...] = ("weighting", "surgery")
TARGETS: tuple[Target, ...] = ("representation", "parameters")
LEGACY_NEEDS: dict[str, Request] = {
    "losses": Request(),
    "representation_grads": Request("representation"),
    "parameter_jacobian": Request("parameters"),
}
"""Shorthands accepted by ``StrategyInfo(needs=...)``."""

PROPERTIES: dict[str, str] = {
    "permutation_invariant": "permuting the tasks (gradients and losses alike) leaves the update unchanged",
    "scale_linear": "scaling every task gradient by c >= 0 scales the update by c",
    "non_conflicting": "the update has a non-negative inner product with every task gradient",
    "stationary": "the update is zero where a positive combination of the task gradients is zero (no update "
                  "improves every task)",
    "linear_under_scaling": "scaling task k's gradient by c_k > 0 gives an update linear in c (torchjd's linearity "
                            "under scaling)",
}
"""The claims a strategy may list in ``StrategyInfo.properties``; the test suite checks each claim."""

COSTS: dict[str, str] = {
    "backward": "one ordinary backward of the weighted loss, as `ls`",
    "representation": "per-task gradients on the representation z: K backwards through the heads, one through "
                      "the backbone",
    "layer": "per-task gradients on a named part of the shared parameters (GradNorm's last shared layer): K "
             "backwards through that part besides the ordinary one",
    "parameters": "per-task gradients on all shared parameters (the Jacobian, its Gramian or its norms): K "
                  "backwards through the backbone, batched, about K times an `ls` step",
}
"""The cost classes a strategy may state in ``StrategyInfo.cost``: what one step costs beyond the forward."""

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

    These are the class's defaults; an instance whose needs or properties depend on its
    hyperparameters reports its own through :attr:`Strategy.request` and :attr:`Strategy.properties`.

    Attributes:
        name: Canonical name, lower case with underscores (``"rotograd_norm"``).
        kind: ``"weighting"`` (weights the losses) or ``"surgery"`` (combines per-task gradients).
        summary: One line saying what the method does.
        request: What one step asks of the engine by default (:class:`~mtlzoo.protocol.Request`).
            ``needs`` is accepted as a shorthand: ``"losses"``, ``"representation_grads"`` or
            ``"parameter_jacobian"``; after construction ``needs`` is ``str(request)``.
        paper: The publication, or ``None`` for a baseline without one.
        aliases: Other names the strategy answers to.
        properties: Claims the method makes, from :data:`PROPERTIES`; the tests check each one.
        stochastic: Whether a step draws random numbers (it is still deterministic given the seed).
        learnable: Whether the strategy owns parameters that belong in an optimizer.
        adapts_representation: Whether ``adapt`` transforms ``z`` per task (the RotoGrad family).
        optimizer: The ``torch.optim`` class name (``"adam"``, ``"sgd"``, case-insensitive) that trains the
            strategy's own parameters by default in ``mtlzoo compare`` (a problem or a run may override it);
            ``None`` when it has none to train.
        lr: The learning rate of that optimizer.
        default_comparison: Whether ``mtlzoo compare`` runs the strategy when no strategies are named.
        cost: The cost class of one step with the default request, a key of :data:`COSTS`:
            ``"backward"`` (losses only), ``"representation"`` (gradients on ``z``), ``"layer"``
            (gradients on named shared parameters), ``"parameters"`` (gradients on all shared
            parameters). ``None`` when not stated: the docs then derive it from ``request`` and mark it
            as derived. State it in the ``info = StrategyInfo(...)`` block (``cost="parameters"``).
        original_code: URL of the authors' own implementation (a repository); ``""`` when there is
            none (a baseline, or no code was published); ``None`` when not stated. The docs'
            comparison guide shows it. State it in the ``info = StrategyInfo(...)`` block
            (``original_code="https://github.com/..."``).
        suggested: Suggested values of hyperparameters for the harness (``mtlzoo compare``, ``mtlzoo bench``), so
            that every registered strategy constructs by name alone: at least one for each hyperparameter
            without a default (GradNorm's ``alpha``); a problem or a run may override them. Frozen read-only.
    """

    name: str
    kind: Kind
    summary: str
    request: Request | None = None
    paper: Paper | None = None
    aliases: tuple[str, ...] = ()
    properties: frozenset[str] = field(default_factory=frozenset)
    stochastic: bool = False
    learnable: bool = False
    adapts_representation: bool = False
    needs: str | None = None
    optimizer: str | None = None
    lr: float | None = None
    default_comparison: bool = False
    cost: str | None = None
    original_code: str | None = None
    suggested: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Parameter `kind` should be one of {KINDS}. Found `kind = {self.kind!r}`.")
        request = self.request
        if self.needs is not None:
            if request is not None or self.needs not in LEGACY_NEEDS:
                raise ValueError(f"Parameter `needs` should be one of {tuple(LEGACY_NEEDS)}, given without "
                                 f"`request`. Found `needs = {self.needs!r}`.")
            request = LEGACY_NEEDS[self.needs]
        if request is None:
            request = Request()
        if not isinstance(request, Request):
            raise ValueError(f"Parameter `request` should be a mtlzoo.Request. Found {request!r}.")
        object.__setattr__(self, "request", request)
        object.__setattr__(self, "needs", str(request))
        unknown = sorted(set(self.properties) - set(PROPERTIES))
        if unknown:
            raise ValueError(f"Parameter `properties` should hold names from {sorted(PROPERTIES)}. Found {unknown}.")
        object.__setattr__(self, "properties", frozenset(self.properties))
        if self.cost is not None and self.cost not in COSTS:
            raise ValueError(f"Parameter `cost` should be one of {tuple(COSTS)}. Found `cost = {self.cost!r}`.")
        if self.original_code is not None and not isinstance(self.original_code, str):
            raise ValueError(f"Parameter `original_code` should be a URL, or '' for none. Found "
                             f"`original_code = {self.original_code!r}`.")
        if self.optimizer is not None and not (isinstance(self.optimizer, str) and self.optimizer.strip()):
            raise ValueError(f"Parameter `optimizer` should be a torch.optim class name. Found `optimizer = "
                             f"{self.optimizer!r}`.")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not 0 <= self.lr < float("inf")):
            raise ValueError(f"Parameter `lr` should be a finite number >= 0. Found `lr = {self.lr!r}`.")
        if not isinstance(self.suggested, Mapping) or not all(isinstance(key, str) for key in self.suggested):
            raise ValueError(f"Parameter `suggested` should map hyperparameter names to values. Found "
                             f"`suggested = {self.suggested!r}`.")
        object.__setattr__(self, "suggested", MappingProxyType(dict(self.suggested)))


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

    Subclasses set the class attribute ``info`` and implement the face of their kind
    (:class:`WeightingStrategy`, :class:`GradientSurgery`). The constructor's arguments are kept in
    :attr:`hparams` (a home that cannot collide with methods), shown by ``repr``, saved in
    ``state_dict()`` and checked when a checkpoint is loaded. Running state lives in buffers or in
    :meth:`extra_state`, so ``state_dict()`` resumes a run exactly.

    Args:
        num_tasks: K, the number of tasks (heads); the wrapper passes it.
    """

    info: ClassVar[StrategyInfo]
    unchecked_settings: ClassVar[tuple[str, ...]] = ()
    """Hyperparameters a checkpoint may hold different values of (inferred ones, such as a shape)."""

    hparams: dict[str, Any]
    micro_batch: int
    plain_attributes: ClassVar[frozenset[str]] = frozenset({"micro_batch", "step", "_staged"})
    """Per-step bookkeeping (ints, dicts): once set as plain attributes, set again past ``nn.Module.__setattr__``,
    whose checks cost more than the set itself."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Strategy:
        instance = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(instance, *args, **kwargs)
        except TypeError:
            hparams: dict[str, Any] = {}  # __init__ will raise the precise error
        else:
            bound.apply_defaults()
            hparams = {name: value for name, value in list(bound.arguments.items())[1:]
                       if name in hyperparameters(cls)}
        object.__setattr__(instance, "hparams", hparams)
        return instance

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.plain_attributes and name in self.__dict__ and not isinstance(value, nn.Module):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"Parameter `num_tasks` should be a positive int. Found `num_tasks = {num_tasks!r}`.")
        self.num_tasks = num_tasks
        self.micro_batch = 0

    # ------------------------------------------------------------- metadata
    @property
    def request(self) -> Request:
        """What this instance reads from a step (the class's ``info.request`` unless it depends on settings)."""
        return self.info.request

    @property
    def properties(self) -> frozenset[str]:
        """The properties this instance has (the class's ``info.properties`` unless settings break some)."""
        return self.info.properties

    # --------------------------------------------------------------- a step
    def adapt(self, z: Tensor, task: int) -> Tensor:
        """Transform the shared representation for task ``task`` in the forward pass (identity)."""
        return z

    def predict(self, head: nn.Module, z: Tensor, task: int) -> Any:
        """Task ``task``'s prediction from the shared representation: ``head(adapt(z, task))``.

        A strategy may compute the same function another way (RotoGrad folds its rotation into a head
        that starts with a linear layer); the gradient that reaches ``z`` is the same.
        """
        return head(self.adapt(z, task))

    def task_transform(self, task: int) -> nn.Module:
        """The module that applies :meth:`adapt` for ``task``, owned by ``mtl[task]`` (identity)."""
        return nn.Identity()

    def loss_weights(self, inputs: StepInputs) -> Tensor | None:
        """Weights ``w`` of the present tasks' losses: the model learns from ``sum_k w_k L_k``.

        Returns ``None`` for all ones. Read from the losses alone, before any gradient exists.
        """
        return None

    def loss_objective(self, losses: Tensor, tasks: Tensor) -> Tensor | None:
        """A scalar of the (detached) losses whose backward trains the strategy's own parameters."""
        return None

    def backbone_loss_weight(self, backbone_loss: Tensor) -> Tensor | None:
        """Weight of the backbone's own loss (``None``: 1). RotoGrad normalises it like the task losses."""
        return None

    def compute(self, inputs: StepInputs) -> Update:
        """Turn the statistics the engine gathered into an :class:`~mtlzoo.protocol.Update`."""
        return Update()

    # ------------------------------------------------------------ lifecycle
    def advance(self) -> None:
        """Commit what this optimizer step staged and advance the running state, once per step.

        The wrapper calls it after each optimizer step that was taken (``mtl.step(optimizer)``);
        call it yourself when you drive the strategy standalone.
        """
        self.micro_batch = 0
        self._commit()

    def discard(self) -> None:
        """Drop what the current step staged (a step that the ``GradScaler`` skipped)."""
        self.micro_batch = 0
        self._drop_staged()

    def end_epoch(self) -> None:
        """Called once at the end of every epoch (``mtl.end_epoch()``); DWA and STCH use it."""

    def post_step(self, losses: Tensor) -> None:
        """Receive the K losses of the step's batch re-evaluated after the optimizer step (FAMO).

        A task absent from the batch has NaN there. Called once per optimizer step that was taken,
        after :meth:`advance`, when the class sets ``wants_post_step_losses``.
        """

    wants_post_step_losses: ClassVar[bool] = False

    def _commit(self) -> None:
        """Subclasses: apply staged values and advance counters."""

    def _drop_staged(self) -> None:
        """Subclasses: forget staged values."""

    def check_ready(self) -> None:
        """Raise :class:`~mtlzoo.errors.NotMaterializedError` if parameters are still to be created.

        Lazily shaped strategies (RotoGrad without ``rotation_shape``) create their parameters at
        the first forward; an optimizer built before that would silently miss them.
        """

    # ------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        """Running state that is not a tensor (subclasses extend it); saved in ``state_dict()``."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def get_extra_state(self) -> dict[str, Any]:
        return {"settings": _comparable(self.hparams), "state": self.extra_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.load_extra_state(state["state"])

    def check_settings(self, state_dict: Mapping[str, Any], prefix: str = "") -> None:
        """Raise :class:`~mtlzoo.errors.CheckpointMismatchError` if the checkpoint's settings differ from this
        strategy's (``unchecked_settings`` aside, such as an inferred shape)."""
        saved = state_dict.get(prefix + "_extra_state")
        if not isinstance(saved, dict) or "settings" not in saved:
            return
        mine = _comparable(self.hparams)
        differ = [f"{name}: checkpoint {saved['settings'][name]!r}, this strategy {mine[name]!r}"
                  for name in mine if name in saved["settings"] and name not in self.unchecked_settings
                  and saved["settings"][name] != mine[name]]
        if differ:
            raise CheckpointMismatchError(
                f"The checkpoint's {type(self).__name__} was saved with other settings (" + "; ".join(differ)
                + "). Build the strategy with the checkpoint's settings; nothing was loaded.")

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        self.check_settings(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in {"num_tasks": self.num_tasks, **self.hparams}.items())


def _comparable(hparams: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters as plain Python values (tensors and tuples as lists), for saving and comparing."""

    def plain(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.tolist()
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return repr(value)

    return {name: plain(value) for name, value in hparams.items()}


class WeightingStrategy(Strategy):
    r"""A strategy that scalarises the K losses: ``total = f(L_1, ..., L_K)``.

    One definition of what the model learns, whichever path computes it: the model (backbone and
    heads) receives ``sum_k w_k dL_k/dθ`` with ``w_k = d total / d L_k`` evaluated at this step and
    held constant. For ``f = sum_k log L_k`` (SI) that is ``w_k = 1/L_k``. The strategy's own
    parameters (UW's log-variances) learn from ``total`` itself, with the losses held constant.

    Subclasses implement :meth:`scalarize` (the method's definition) and, where it has a closed
    form, :meth:`weights` (checked against autograd by the test suite); or only :meth:`weights`
    when the weights do not depend on the losses' values through ``f``.
    """

    def scalarize(self, losses: Tensor) -> Tensor:
        """The scalar ``f(L)`` this method minimises (differentiable in the losses and own parameters)."""
        if type(self).weights is WeightingStrategy.weights:
            raise NotImplementedError(f"{type(self).__name__} should implement `scalarize` or `weights`.")
        return (self.weights(losses.detach()).detach() * losses).sum()

    def weights(self, losses: Tensor) -> Tensor:
        """``w_k = d f / d L_k`` at these losses, detached (by autograd unless a subclass has a closed form)."""
        if type(self).scalarize is WeightingStrategy.scalarize:
            raise NotImplementedError(f"{type(self).__name__} should implement `scalarize` or `weights`.")
        with torch.enable_grad():
            leaf = losses.detach().requires_grad_()
            (grad,) = torch.autograd.grad(self.scalarize(leaf), leaf)
        return grad

    def combine(self, losses: Tensor) -> Tensor:
        """``sum_k w_k L_k`` with the weights held constant: the scalar whose backward trains the model."""
        return (self.weights(losses.detach()).to(losses.dtype) * losses).sum()

    def loss_weights(self, inputs: StepInputs) -> Tensor:
        return self.task_weights_for(inputs.losses, inputs.tasks)

    def task_weights_for(self, losses: Tensor, tasks: Tensor) -> Tensor:
        """The weights of the present tasks ``tasks``, from their losses.

        By default :meth:`weights` of the present losses, indexed by ``tasks`` when it returns all K
        (a weighting whose weights are per-task state rather than a function of the losses).
        """
        weights = self.weights(losses)
        if weights.shape[0] == self.num_tasks and losses.shape[0] != self.num_tasks:
            return weights[tasks]
        return weights

    def of_present(self, values: Tensor, tasks: Tensor) -> Tensor:
        """``values[tasks]``: the per-task ``values`` (K,) of the present tasks (``values`` itself when all are)."""
        return values if tasks.shape[0] == self.num_tasks else values[tasks]

    def loss_objective(self, losses: Tensor, tasks: Tensor) -> Tensor | None:
        if not trainable_parameters(self):
            return None
        return self.scalarize(losses.detach())

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Standalone: ``sum_k w_k g_k`` for K gradients (K x ...) and their losses."""
        weights = self.weights(losses.detach()).to(grads.dtype)
        return torch.tensordot(weights, grads, dims=1)


class GradientSurgery(Strategy):
    """A strategy that combines the K per-task gradients into one update direction.

    Subclasses implement :meth:`aggregate` (K x ... gradients to one gradient), or override
    :meth:`compute` for more (an own objective, staged state).

    Args:
        num_tasks: K.
        target: ``"representation"`` (gradients w.r.t. the backbone output ``z``, Sener & Koltun's
            cheap variant) or ``"parameters"`` (the Jacobian w.r.t. the shared parameters). ``None``
            takes the default from ``info.request``.
    """

    supported_targets: ClassVar[tuple[Target, ...]] = TARGETS
    statistic: ClassVar[Literal["gradients", "gramian", "norms"] | None] = None
    """The statistic the engine gives :meth:`compute` (``None``: the one ``info.request`` names)."""

    def __init__(self, num_tasks: int, *, target: Target | None = None) -> None:
        super().__init__(num_tasks)
        default: Where = self.info.request.where
        if default not in TARGETS:
            raise InvalidStrategyError(f"{type(self).__name__}.info.request is {self.info.request}; gradient "
                                       f"surgery reads gradients on one of {TARGETS}.")
        target = default if target is None else target
        if target not in self.supported_targets:
            raise ValueError(
                f"Parameter `target` should be one of {self.supported_targets} for {type(self).__name__}. "
                f"Found `target = {target!r}`."
            )
        self.target: Target = target

    @property
    def request(self) -> Request:
        return dataclasses.replace(self.info.request, where=self.target,
                                   statistic=self.statistic or self.info.request.statistic)

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Reduce K per-task gradients (K x ...) to one gradient of shape ``grads.shape[1:]``."""
        raise NotImplementedError(f"{type(self).__name__} should implement `aggregate` or `compute`.")

    def compute(self, inputs: StepInputs) -> Update:
        assert inputs.gradients is not None
        return Update(direction=self.aggregate(inputs.gradients, inputs.losses))


class GramianWeightedSurgery(GradientSurgery):
    """Surgery whose update is a weighting ``sum_k c_k g_k`` with ``c`` read from the K x K Gramian.

    Subclasses implement :meth:`gramian_weights`. MGDA, UPGrad, CAGrad, IMTL-G and Nash-MTL are of
    this form; the engine then needs only the Gramian ``G G^T`` (summed per parameter, the K x n
    Jacobian never concatenated), and applies the weights as ``J_p^T c`` on each shared parameter
    (on the representation: one ordinary backward of ``dz = sum_k c_k g_k`` through the backbone).
    """

    statistic = "gramian"

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """The K weights for this Gramian."""
        raise NotImplementedError

    def compute(self, inputs: StepInputs) -> Update:
        assert inputs.gramian is not None
        return Update(weights=self.gramian_weights(inputs.gramian, inputs.losses))

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        flat = grads.reshape(grads.shape[0], -1)
        weights = self.gramian_weights(flat @ flat.T, losses.detach())
        return torch.tensordot(weights.to(grads.dtype), grads, dims=1)
