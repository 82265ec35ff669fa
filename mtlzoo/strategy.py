"""The interface every strategy implements, and the metadata it carries.

A strategy is math over tensors: it never sees the model, only losses, gradients and (for the RotoGrad family) the
shared representation ``z``. It declares a :class:`~mtlzoo.protocol.Request` (what it reads from a step);
:class:`mtlzoo.MTLWrapper` and the engine (:mod:`mtlzoo.engine`) drive it through one training step::

    forward:   z = backbone(x);  y_k = strategy.predict(head_k, z, k) = head_k(strategy.adapt(z, k))
    backward:  w = strategy.loss_weights(inputs)          the model learns from sum_k w_k L_k
               inputs.<statistic> = engine(request)        per-task gradients of w_k L_k, if requested
               update = strategy.compute(inputs)           weights c or a direction; an own objective
    step:      strategy.advance()                          once per optimizer step taken
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal, NoReturn

from torch import Tensor, nn

from mtlzoo.errors import CheckpointMismatchError, InvalidStrategyError
from mtlzoo.protocol import Request, StepInputs, Update
from mtlzoo.state import PerStep, RunningState

Kind = Literal["weighting", "surgery"]
Target = Literal["representation", "parameters"]

KINDS: tuple[Kind, ...] = ("weighting", "surgery")
TARGETS: tuple[Target, ...] = ("representation", "parameters")
LEGACY_NEEDS: dict[str, Request] = {"losses": Request(), "representation_grads": Request("representation"),
                                    "parameter_jacobian": Request("parameters")}
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


def _refuse(name: str, should: str, value: Any) -> NoReturn:
    raise ValueError(f"Parameter `{name}` should be {should}. Found `{name} = {value!r}`.")


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an int ``>= minimum`` (0 or 1), else a ``ValueError`` naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _refuse(name, "a positive int" if minimum == 1 else "a non-negative int", value)
    return value


def check_number(name: str, value: Any, *, positive: bool = False) -> float:
    """``value`` as a float if it is a finite number ``>= 0`` (``> 0`` if ``positive``), else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (value > 0 if positive else value >= 0):
        _refuse(name, "a finite positive number" if positive else "a finite number >= 0", value)
    return float(value)


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a ``ValueError`` naming the parameter."""
    if not isinstance(value, bool):
        _refuse(name, "True or False", value)
    return value


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
    hyperparameters reports its own (:attr:`Strategy.request`, :attr:`Strategy.properties`).

    Attributes:
        name: Canonical name, lower case with underscores (``"rotograd_norm"``).
        kind: Derived (leave it out): ``"weighting"`` for a loss weighting alone, ``"surgery"`` where
            an aggregator or an adapter is present. A class that states it must state the derived value.
        roles: Derived too: the roles the class plays, among ``"weighting"``, ``"aggregator"``, ``"adapter"``.
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
        optimizer: The ``torch.optim`` class name (``"adam"``, case-insensitive) that trains the strategy's
            own parameters in ``mtlzoo compare`` by default; ``None`` when it has none to train.
        lr: The learning rate of that optimizer.
        default_comparison: Whether ``mtlzoo compare`` runs the strategy when no strategies are named.
        cost: The cost class of one step with the default request, a key of :data:`COSTS`; ``None`` when
            not stated (the docs then derive it from ``request`` and mark it so).
        original_code: URL of the authors' own implementation; ``""`` when there is none; ``None`` when not stated.
        suggested: Hyperparameter values for the harness, so that every registered strategy constructs by
            name alone: at least one for each hyperparameter without a default (GradNorm's ``alpha``).
    """

    name: str
    kind: Kind | None = None
    summary: str = ""
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
    roles: tuple[str, ...] = ()
    suggested: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.summary:
            raise ValueError(f"Parameter `summary` should be one line saying what {self.name!r} does.")
        if self.kind is not None and self.kind not in KINDS:
            _refuse("kind", f"one of {KINDS}", self.kind)
        request = self.request
        if self.needs is not None:
            if request is not None or self.needs not in LEGACY_NEEDS:
                _refuse("needs", f"one of {tuple(LEGACY_NEEDS)}, given without `request`", self.needs)
            request = LEGACY_NEEDS[self.needs]
        request = Request() if request is None else request
        if not isinstance(request, Request):
            raise ValueError(f"Parameter `request` should be a mtlzoo.Request. Found {request!r}.")
        unknown = sorted(set(self.properties) - set(PROPERTIES))
        if unknown:
            raise ValueError(f"Parameter `properties` should hold names from {sorted(PROPERTIES)}. Found {unknown}.")
        if self.cost is not None and self.cost not in COSTS:
            _refuse("cost", f"one of {tuple(COSTS)}", self.cost)
        if self.original_code is not None and not isinstance(self.original_code, str):
            _refuse("original_code", "a URL, or '' for none", self.original_code)
        if self.optimizer is not None and not (isinstance(self.optimizer, str) and self.optimizer.strip()):
            _refuse("optimizer", "a torch.optim class name", self.optimizer)
        if self.lr is not None:
            check_number("lr", self.lr)
        if not isinstance(self.suggested, Mapping) or not all(isinstance(key, str) for key in self.suggested):
            _refuse("suggested", "a mapping of hyperparameter names to values", self.suggested)
        for name, value in (("request", request), ("needs", str(request)), ("properties", frozenset(self.properties)),
                            ("suggested", MappingProxyType(dict(self.suggested)))):
            object.__setattr__(self, name, value)


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

    Subclasses set the class attribute ``info`` and derive from the role they play
    (:class:`~mtlzoo.roles.LossWeighting`, :class:`~mtlzoo.roles.GramianAggregator`,
    :class:`~mtlzoo.roles.DirectionAggregator`, :class:`~mtlzoo.roles.Adapter`), or compose roles
    (:func:`mtlzoo.compose`). The constructor's arguments are kept in :attr:`hparams`, shown by
    ``repr``, saved in ``state_dict()`` and checked when a checkpoint is loaded. Running state is
    declared with :meth:`declare_state` and read and written through :attr:`state`.

    Args:
        num_tasks: K, the number of tasks (heads); the wrapper passes it.
    """

    info: ClassVar[StrategyInfo]
    role: ClassVar[str | None] = None
    """The public role the class plays (``"weighting"``, ``"aggregator"``, ``"adapter"``), set by the role bases."""
    unchecked_settings: ClassVar[tuple[str, ...]] = ()
    """Hyperparameters a checkpoint may hold different values of (inferred ones, such as a shape)."""

    hparams: dict[str, Any]
    state: RunningState
    per_task: ClassVar[tuple[str, ...]] = ()
    """Per-task tensors (attribute names, ``None`` allowed) whose unequal entries break ``permutation_invariant``."""
    weighted_heads: bool = False
    """Whether head k learns from ``c_k w_k L_k`` (``c`` the aggregator's weights: MGDA's and Nash-MTL's authors
    back-propagate ``sum_k c_k L_k``) rather than from ``w_k L_k`` (the default)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        info = cls.__dict__.get("info")
        if isinstance(info, StrategyInfo):
            roles = cls.roles()
            kind: Kind = "surgery" if {"aggregator", "adapter"} & set(roles) else "weighting"
            if info.kind is not None and info.kind != kind:
                raise InvalidStrategyError(f"{cls.__name__}.info states kind={info.kind!r}, but the roles it plays "
                                           f"({', '.join(roles) or 'none'}) make it {kind!r}: leave `kind` out of "
                                           "its StrategyInfo, it is derived.")
            cls.info = dataclasses.replace(info, kind=kind, roles=roles, needs=None)

    @classmethod
    def roles(cls) -> tuple[str, ...]:
        """The roles instances of this class play (a composite: those of its parts, see ``Composite``)."""
        return (cls.role,) if cls.role else ()

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

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = check_int("num_tasks", num_tasks)
        self._set_micro_batch(0)
        self.state = RunningState(self)

    @property
    def micro_batch(self) -> int:
        """The index of the current backward within the optimizer step (0 before its first): the base counts it."""
        return self.__dict__.get("_micro_batch", 0)

    @micro_batch.setter
    def micro_batch(self, value: int) -> None:
        self._set_micro_batch(value)

    def _set_micro_batch(self, value: int) -> None:
        self.__dict__["_micro_batch"] = value  # past nn.Module.__setattr__: counted at every backward

    def count_backward(self) -> None:
        """Count one backward of the current optimizer step (the engine calls it, and a standalone ``aggregate``)."""
        self._set_micro_batch(self.micro_batch + 1)

    @property
    def request(self) -> Request:
        """What this instance reads from a step (the class's ``info.request`` unless it depends on settings)."""
        return self.info.request

    @property
    def properties(self) -> frozenset[str]:
        """The properties this instance has: the class's ``info.properties``, less ``permutation_invariant``
        where a tensor of :attr:`per_task` holds unequal entries."""
        for values in (getattr(self, name) for name in self.per_task):
            if values is not None and bool((values != values.reshape(-1)[0]).any()):
                return self.info.properties - {"permutation_invariant"}
        return self.info.properties

    def adapt(self, z: Tensor, task: int) -> Tensor:
        """Transform the shared representation for task ``task`` in the forward pass (identity)."""
        return z

    def predict(self, head: nn.Module, z: Tensor, task: int) -> Any:
        """Task ``task``'s prediction, ``head(adapt(z, task))`` (or the same function computed another way)."""
        return head(self.adapt(z, task))

    def task_transform(self, task: int) -> nn.Module:
        """The module that applies :meth:`adapt` for ``task``, owned by ``mtl[task]`` (identity)."""
        return nn.Identity()

    def loss_weights(self, inputs: StepInputs) -> Tensor | None:
        """Weights ``w`` of the present tasks' losses, read from the losses alone (``None``: all ones): the model
        learns from ``sum_k w_k L_k``."""
        return None

    def loss_objective(self, losses: Tensor, tasks: Tensor) -> Tensor | None:
        """A scalar of the (detached) losses whose backward trains the strategy's own parameters."""
        return None

    def scalarization(self, losses: Tensor, tasks: Tensor) -> Tensor | None:
        """For a strategy that reads the losses only: the scalar ``f(L)`` whose one backward trains the model
        (with ``w_k = d f / d L_k``) and the strategy's own parameters at once; ``None`` (the default): the engine
        back-propagates ``sum_k w_k L_k`` (:meth:`loss_weights`) and :meth:`loss_objective` instead.
        ``losses`` are the present tasks' (of indices ``tasks``), attached to the graph, in at least float32."""
        return None

    def backbone_loss_weight(self, backbone_loss: Tensor) -> Tensor | None:
        """Weight of the backbone's own loss (``None``: 1). RotoGrad normalises it like the task losses."""
        return None

    def compute(self, inputs: StepInputs) -> Update:
        """Turn the statistics the engine gathered into an :class:`~mtlzoo.protocol.Update`."""
        return Update()

    def _apply(self, fn: Any, recurse: bool = True) -> Strategy:
        """``module.to(...)`` and friends, which move the running state but never narrow it below its declared dtype."""
        state = self.__dict__.get("state")
        if not isinstance(state, RunningState):  # before Strategy.__init__ made it
            return super()._apply(fn, recurse)
        with state.widths_kept():
            return super()._apply(fn, recurse)

    def declare_state(self, per_step: PerStep = "first", **fields: Any) -> None:
        """Declare running state fields and their initial values (see :mod:`mtlzoo.state`).

        Tensors become buffers of that name; other values (ints, floats, lists, bytes) are saved in the extra state.
        Read and write them as ``self.state.name``: inside a step a write is staged, and committed by :meth:`advance`.

        Args:
            per_step: ``"first"``: the step's first micro-batch sets the value, later ones read it
                (their writes are ignored); ``"every"``: every micro-batch may write.
            **fields: Name and initial value of each field.
        """
        for name, initial in fields.items():
            self.state.declare(name, initial, per_step)

    def advance(self) -> None:
        """Commit what this optimizer step staged and advance the running state, once per step taken.

        ``mtl.step(optimizer)`` calls it; call it yourself when you drive the strategy standalone.
        """
        self._set_micro_batch(0)
        self.state.commit()
        if type(self).on_advance is not Strategy.on_advance:
            with self.state.direct():
                self.on_advance()

    def on_advance(self) -> None:
        """Subclasses: the maths of a step boundary (a counter, a retraction); writes here are committed."""

    def discard(self) -> None:
        """Drop what the current step staged (a step that the ``GradScaler`` skipped)."""
        self._set_micro_batch(0)
        self.state.drop()

    def end_epoch(self) -> None:
        """Called once at the end of every epoch (``mtl.end_epoch()``); DWA and STCH use it."""

    def post_step(self, losses: Tensor) -> None:
        """Receive the K losses of the step's batch re-evaluated after the optimizer step (NaN for an absent
        task), after :meth:`advance`, when the class sets ``wants_post_step_losses`` (FAMO)."""

    wants_post_step_losses: ClassVar[bool] = False

    def check_ready(self) -> None:
        """Raise :class:`~mtlzoo.errors.NotMaterializedError` if parameters are still to be created (RotoGrad
        without ``rotation_shape`` creates them at the first forward: an optimizer built before would miss them)."""

    def get_extra_state(self) -> dict[str, Any]:
        saved: dict[str, Any] = {"settings": plain(self.hparams), "state": self.state.plain_values()}
        if self.micro_batch or self.state.staged:  # saved between the micro-batches of a step
            saved["staged"] = self.state.staged
            saved["micro_batch"] = self.micro_batch
        return saved

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.state.load_plain_values(state["state"])
        self.state.load_staged(state.get("staged", {}))
        self.micro_batch = int(state.get("micro_batch", 0))

    def check_settings(self, state_dict: Mapping[str, Any], prefix: str = "") -> None:
        """Raise :class:`~mtlzoo.errors.CheckpointMismatchError` if the checkpoint's settings differ from this
        strategy's (``unchecked_settings`` aside, such as an inferred shape), its parts' included."""
        saved = state_dict.get(prefix + "_extra_state")
        if isinstance(saved, dict) and "settings" in saved:
            mine = plain(self.hparams)
            differ = [f"{name}: checkpoint {saved['settings'][name]!r}, this strategy {mine[name]!r}"
                      for name in mine if name in saved["settings"] and name not in self.unchecked_settings
                      and saved["settings"][name] != mine[name]]
            if differ:
                raise CheckpointMismatchError(
                    f"The checkpoint's {type(self).__name__} was saved with other settings (" + "; ".join(differ)
                    + "). Build the strategy with the checkpoint's settings; nothing was loaded.")
        for name, child in self.named_children():
            if isinstance(child, Strategy):
                child.check_settings(state_dict, f"{prefix}{name}.")

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        self.check_settings(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.state.touch()  # buffers are loaded in place

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in {"num_tasks": self.num_tasks, **self.hparams}.items())


def plain(value: Any) -> Any:
    """``value`` as plain, JSON-ready Python values (tensors and tuples as lists, a strategy as its name and
    settings, anything else as its ``repr``), for saving, comparing and listing."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Strategy):
        return {"strategy": value.info.name, **plain(value.hparams)}
    return repr(value)
