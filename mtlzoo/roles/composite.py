"""Composition of roles: at most one loss weighting, one aggregator and one adapter, trained as one strategy.

``compose(weighting="gradnorm", aggregator="upgrad")`` is a strategy like any other: it trains
through ``MTLWrapper``, checkpoints (each part under its role's name) and lists its roles. In a step:

- the model learns from ``sum_k w_k L_k`` with the weighting's ``w`` (all ones without one), times
  the adapter's own loss scales if it has any (RotoGrad's ``normalize_losses``);
- the adapter transforms ``z`` per task and learns from the task gradients as they reach ``z``;
- the aggregator combines the task gradients (of the weighted losses) into the shared update (the
  plain sum without one).

The engine computes one statistic per step, the richest one the parts need (gradients, else the
Gramian, else the norms); the others are derived from it (``G = J J^T``, ``||g_k|| = sqrt(G_kk)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtlzoo.errors import CheckpointMismatchError, InvalidStrategyError
from mtlzoo.linalg import compute_dtype, gramian, gramian_norms, row_norms
from mtlzoo.protocol import Request, StepInputs, Update
from mtlzoo.roles._parts import WithParts
from mtlzoo.roles.aggregator import check_gradients
from mtlzoo.strategy import Strategy, StrategyInfo

ROLE_NAMES: tuple[str, ...] = ("weighting", "aggregator", "adapter")
_RICHNESS = {"norms": 0, "gramian": 1, "gradients": 2}


def _part(value: Strategy | str | None, role: str, num_tasks: int | None, **options: Any) -> Strategy | None:
    """The part for ``role``: an instance as given (checked), or created by name from the registry; a composite
    that holds that role alone stands for its part (``adapter="rotate_only"`` is RotoGrad's rotations)."""
    if value is None:
        return None
    if isinstance(value, str):
        if num_tasks is None:
            raise TypeError(f"compose() creates {role}={value!r} by name: give num_tasks=K too.")
        from mtlzoo.registry import create, get_strategy  # the registry imports the strategies, which import this

        suggested = dict(get_strategy(value).info.suggested)  # as the harness builds a strategy by name alone
        value = create(value, num_tasks=num_tasks, **{**suggested, **options})
    if isinstance(value, Composite) and value.present_roles() == (role,):
        value = getattr(value, role)
    if not isinstance(value, Strategy):
        raise TypeError(f"compose(): `{role}` should be a strategy name or instance. Found {type(value).__name__}.")
    if value.role != role:
        plays = value.role or ", ".join(value.roles()) or "no public role"
        raise InvalidStrategyError(f"compose(): `{role}` should play the {role} role; {type(value).__name__} "
                                   f"({value.info.name}) plays {plays}.")
    return value


class Composite(WithParts):
    """A strategy made of a loss weighting, an aggregator and an adapter (each optional), see the module.

    Args:
        num_tasks: K (taken from the parts when they are instances).
        weighting: A :class:`~mtlzoo.roles.LossWeighting` or its registered name.
        aggregator: A :class:`~mtlzoo.roles.Aggregator` or its registered name; by name next to an
            adapter it is created on the representation target.
        adapter: A :class:`~mtlzoo.roles.Adapter` or its registered name.
    """

    info = StrategyInfo(name="compose", summary="A loss weighting, an aggregator and an adapter as one strategy.")
    composes: ClassVar[tuple[str, ...]] = ()
    """The roles a built-in composite class always holds (for its listing); an ad-hoc one reports its parts."""
    renamed: ClassVar[dict[str, str]] = {}
    """Former names of the parts in checkpoints of mtlzoo 0.1.0 (IMTL's ``loss_scales`` is its weighting)."""

    @classmethod
    def roles(cls) -> tuple[str, ...]:
        return cls.composes

    def __init__(self, num_tasks: int, *, weighting: Strategy | str | None = None,
                 aggregator: Strategy | str | None = None, adapter: Strategy | str | None = None) -> None:
        super().__init__(num_tasks)
        self.weighting = _part(weighting, "weighting", num_tasks)
        self.adapter = _part(adapter, "adapter", num_tasks)
        options = {"target": "representation"} if self.adapter is not None and isinstance(aggregator, str) else {}
        self.aggregator = _part(aggregator, "aggregator", num_tasks, **options)
        for part in self.parts():
            if part.num_tasks != num_tasks:
                raise ValueError(f"compose(): {type(part).__name__} was built for {part.num_tasks} tasks, the "
                                 f"composite for {num_tasks}.")
        self._request = self._joint_request()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ROLE_NAMES and value is None:
            object.__setattr__(self, name, None)  # an absent role: not a submodule
        else:
            super().__setattr__(name, value)

    def present_roles(self) -> tuple[str, ...]:
        """The roles this instance holds."""
        return tuple(role for role in ROLE_NAMES if getattr(self, role) is not None)

    @property
    def kind(self) -> str:
        return "surgery" if {"aggregator", "adapter"} & set(self.present_roles()) else "weighting"

    @property
    def request(self) -> Request:
        return self._request

    def _joint_request(self) -> Request:
        requests = [part.request for part in self.parts() if part.request.needs_gradients]
        if not requests:
            return Request()
        wheres = {request.where for request in requests}
        layers = {(request.parameters, request.layer) for request in requests}
        if len(wheres) > 1 or len(layers) > 1:
            said = "; ".join(f"{type(part).__name__} reads {part.request}" for part in self.parts()
                             if part.request.needs_gradients)
            raise InvalidStrategyError(f"compose(): the parts read gradients in different places ({said}); a step "
                                       "computes one statistic on one target. Build them on the same target (e.g. "
                                       "target='representation'; GradNorm reads all shared parameters with "
                                       "layer='all').")
        richest = max((request.statistic for request in requests), key=_RICHNESS.__getitem__)
        return dataclasses.replace(requests[0], statistic=richest)

    @property
    def properties(self) -> frozenset[str]:
        if self.present_roles() == ("aggregator",):
            return self.aggregator.properties
        return self.info.properties

    def adapt(self, z: Tensor, task: int) -> Tensor:
        return z if self.adapter is None else self.adapter.adapt(z, task)

    def predict(self, head: nn.Module, z: Tensor, task: int) -> Any:
        return head(z) if self.adapter is None else self.adapter.predict(head, z, task)

    def task_transform(self, task: int) -> nn.Module:
        return nn.Identity() if self.adapter is None else self.adapter.task_transform(task)

    def loss_weights(self, inputs: StepInputs) -> Tensor | None:
        weights = None if self.weighting is None else self.weighting.loss_weights(inputs)
        scales = None if self.adapter is None else self.adapter.loss_weights(inputs)
        if scales is None:
            return weights
        return scales if weights is None else weights * scales.to(weights.dtype)

    def scalarization(self, losses: Tensor, tasks: Tensor) -> Tensor | None:
        if self.weighting is None or self.adapter is not None or self.aggregator is not None:
            return None
        return self.weighting.scalarization(losses, tasks)

    def loss_objective(self, losses: Tensor, tasks: Tensor) -> Tensor | None:
        return None if self.weighting is None else self.weighting.loss_objective(losses, tasks)

    def backbone_loss_weight(self, backbone_loss: Tensor) -> Tensor | None:
        return None if self.adapter is None else self.adapter.backbone_loss_weight(backbone_loss)

    def compute(self, inputs: StepInputs) -> Update:
        readers = [part for part in self.parts() if part.request.needs_gradients]
        for part in readers:  # every statistic a part reads, formed once (the rotations reuse the norms)
            inputs = _derived(inputs, part.request.statistic)
        updates = {part: part.compute(inputs) for part in readers}
        combined = updates.get(self.aggregator, Update())
        objectives = [update.objective for update in updates.values() if update.objective is not None]
        objective = sum(objectives[1:], objectives[0]) if objectives else None
        return Update(weights=combined.weights, direction=combined.direction, objective=objective)

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Standalone: the shared update for K task gradients (K x ...) of the losses ``losses`` (see
        :func:`standalone`); state staged here is committed by :meth:`advance`."""
        return standalone(self, grads, losses)

    def extra_repr(self) -> str:
        if type(self).__init__ is not Composite.__init__:  # a built-in composite: its own hyperparameters
            return super().extra_repr()
        return f"num_tasks={self.num_tasks}"  # the parts are shown as submodules

    def check_settings(self, state_dict: Any, prefix: str = "") -> None:
        self._single_module_layout(state_dict, prefix)  # refuses a tensor no part holds, before any loading
        super().check_settings(state_dict, prefix)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        moves = self._single_module_layout(state_dict, prefix)
        for key, targets in moves.items():  # torch's copy of the caller's dict
            value = state_dict.pop(key)
            for target in targets:
                state_dict[target] = value
        if moves:
            saved = state_dict.get(prefix + "_extra_state")
            values = saved.get("state", {}) if isinstance(saved, dict) else {}
            for role, part in self._strategy_parts().items():
                key = f"{prefix}{role}._extra_state"
                if key not in state_dict:
                    state_dict[key] = {"state": {field: values[field] for field in part.state.plain_values()
                                                 if field in values}}
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _strategy_parts(self) -> dict[str, Strategy]:
        return {name: part for name, part in self.named_children() if isinstance(part, Strategy)}

    def _single_module_layout(self, state_dict: Any, prefix: str) -> dict[str, list[str]]:
        """Where the tensors of a checkpoint of mtlzoo 0.1.0 (the built-in composites as single modules) go.

        Each tensor at the top (``initial_losses``, ``bank.*``) or under a former name (``renamed``) goes
        to every part that holds a tensor or module of that name. Empty for a checkpoint in the parts'
        layout; a tensor no part holds raises :class:`~mtlzoo.errors.CheckpointMismatchError`.
        """
        parts = self._strategy_parts()
        moves: dict[str, list[str]] = {}
        for key in state_dict:
            name = key[len(prefix):]
            head, dot, rest = name.partition(".")
            if not key.startswith(prefix) or head in parts or name == "_extra_state":
                continue
            if head in self.renamed:
                targets = [self.renamed[head] + dot + rest]
            else:
                targets = [f"{role}.{name}" for role, part in parts.items() if _registers(part, head)]
            if not targets:
                raise CheckpointMismatchError(
                    f"The checkpoint holds {name!r} under {prefix or 'the strategy'}, which {type(self).__name__} "
                    "has no place for: it was not written by this strategy (nor by its mtlzoo 0.1.0 layout). "
                    "Nothing was loaded.")
            moves[key] = [prefix + target for target in targets]
        return moves


def _derived(inputs: StepInputs, statistic: str) -> StepInputs:
    """``inputs`` with ``statistic`` formed from the richer one the engine computed."""
    if getattr(inputs, statistic) is not None:
        return inputs
    if statistic == "gramian":
        return dataclasses.replace(inputs, gramian=gramian(inputs.gradients))  # type: ignore[arg-type]
    if statistic == "norms":
        norms = gramian_norms(inputs.gramian) if inputs.gramian is not None else row_norms(inputs.gradients)
        return dataclasses.replace(inputs, norms=norms)  # type: ignore[arg-type]
    raise InvalidStrategyError(f"A part asks for {statistic!r}, which cannot be formed from what the step computed.")


def standalone(strategy: Strategy, grads: Tensor, losses: Tensor) -> Tensor:
    """A step of ``strategy`` on K given task gradients (K x ...) of the losses ``losses``.

    As in a step: the rows are scaled by the loss weights ``w`` (where the strategy has any), the strategy reads them,
    the objective of its own parameters is back-propagated (their ``.grad``), and the update is its direction, or its
    weights' combination (the plain sum without either). Computed in at least float32, returned in ``grads``' dtype.
    """
    check_gradients(grads, losses, strategy)
    wide = grads.to(compute_dtype(grads.dtype))
    tasks = torch.arange(grads.shape[0], device=grads.device)
    inputs = StepInputs(losses.detach().to(wide.dtype), tasks, strategy.num_tasks, micro_batch=strategy.micro_batch)
    weights = strategy.loss_weights(inputs)
    if weights is not None:
        wide = wide * weights.to(wide.dtype).view(-1, *[1] * (wide.dim() - 1))
    inputs.gradients = wide
    update = strategy.compute(inputs)
    if update.objective is not None and update.objective.requires_grad:
        update.objective.backward()
    strategy.count_backward()
    if update.direction is not None:
        return update.direction.to(grads.dtype)
    if update.weights is None:
        return wide.sum(0).to(grads.dtype)
    return torch.tensordot(update.weights.to(wide.dtype), wide, dims=1).to(grads.dtype)


def compose(weighting: Strategy | str | None = None, aggregator: Strategy | str | None = None,
            adapter: Strategy | str | None = None, *, num_tasks: int | None = None) -> Composite:
    """A strategy made of at most one loss weighting, one aggregator and one adapter.

    Args:
        weighting: A loss weighting (instance or registered name), e.g. ``"uw"``, ``"gradnorm"``.
        aggregator: An aggregator, e.g. ``"upgrad"``, ``"mgda"``.
        adapter: An adapter of the representation, e.g. RotoGrad's rotations.
        num_tasks: K; needed when a part is given by name (instances carry their own).

    Example:
        >>> import mtlzoo
        >>> strategy = mtlzoo.compose(weighting="uw", aggregator="upgrad", num_tasks=3)
        >>> strategy.present_roles(), strategy.kind
        (('weighting', 'aggregator'), 'surgery')
    """
    given = [part for part in (weighting, aggregator, adapter) if isinstance(part, Strategy)]
    if num_tasks is None:
        if not given:
            raise TypeError("compose() needs num_tasks=K when every part is given by name.")
        num_tasks = given[0].num_tasks
    if weighting is None and aggregator is None and adapter is None:
        raise TypeError("compose() needs at least one of weighting=, aggregator=, adapter=.")
    return Composite(num_tasks, weighting=weighting, aggregator=aggregator, adapter=adapter)


def _registers(module: nn.Module, name: str) -> bool:
    """Whether ``module`` registers a parameter, buffer or submodule ``name`` itself (one registered as ``None``, as
    a lazily shaped part is, included): ``nn.Module.__getattr__`` looks there and only there."""
    try:
        nn.Module.__getattr__(module, name)
    except AttributeError:
        return False
    return True
