"""Composition of roles: at most one loss weighting, one aggregator and one adapter, trained as one strategy.

``compose(weighting="gradnorm", aggregator="upgrad")`` is a strategy like any other: it trains
through ``MTLWrapper``, checkpoints (each part under its role's name) and lists its roles. In a step:

- the model learns from ``sum_k w_k L_k`` with the weighting's ``w`` (all ones without one);
- the adapter transforms ``z`` per task in the forward and learns from the task gradients on ``z``;
- the aggregator combines the task gradients (of the weighted losses) into the shared update (the
  plain sum without one).

The engine computes one statistic per step: the composite asks for the richest one its parts need
on one target (gradients, else the Gramian, else the norms) and derives the others from it
(``G = J J^T``, ``||g_k|| = sqrt(G_kk)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtlzoo.errors import InvalidStrategyError
from mtlzoo.linalg import flat_rows
from mtlzoo.protocol import Request, StepInputs, Update
from mtlzoo.roles._parts import WithParts
from mtlzoo.strategy import Strategy, StrategyInfo

ROLE_NAMES: tuple[str, ...] = ("weighting", "aggregator", "adapter")
_RICHNESS = {"norms": 0, "gramian": 1, "gradients": 2}


def _part(value: Strategy | str | None, role: str, num_tasks: int | None, **options: Any) -> Strategy | None:
    """The part for ``role``: an instance as given (checked), or created by name from the registry."""
    if value is None:
        return None
    if isinstance(value, str):
        if num_tasks is None:
            raise TypeError(f"compose() creates {role}={value!r} by name: give num_tasks=K too.")
        from mtlzoo.registry import create  # the registry imports the strategies, which import this module

        value = create(value, num_tasks=num_tasks, **options)
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

    # ------------------------------------------------------------- metadata
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
        layers = {request.parameters for request in requests}
        if len(wheres) > 1 or len(layers) > 1:
            said = "; ".join(f"{type(part).__name__} reads {part.request}" for part in self.parts()
                             if part.request.needs_gradients)
            raise InvalidStrategyError(f"compose(): the parts read gradients in different places ({said}); a step "
                                       "computes one statistic on one target. Build them on the same target (e.g. "
                                       "target='representation').")
        richest = max((request.statistic for request in requests), key=_RICHNESS.__getitem__)
        return dataclasses.replace(requests[0], statistic=richest)

    @property
    def properties(self) -> frozenset[str]:
        if self.present_roles() == ("aggregator",):
            return self.aggregator.properties
        return self.info.properties

    # --------------------------------------------------------------- a step
    def adapt(self, z: Tensor, task: int) -> Tensor:
        return z if self.adapter is None else self.adapter.adapt(z, task)

    def predict(self, head: nn.Module, z: Tensor, task: int) -> Any:
        return head(z) if self.adapter is None else self.adapter.predict(head, z, task)

    def task_transform(self, task: int) -> nn.Module:
        return nn.Identity() if self.adapter is None else self.adapter.task_transform(task)

    def loss_weights(self, inputs: StepInputs) -> Tensor | None:
        return None if self.weighting is None else self.weighting.loss_weights(inputs)

    def loss_objective(self, losses: Tensor, tasks: Tensor) -> Tensor | None:
        return None if self.weighting is None else self.weighting.loss_objective(losses, tasks)

    def backbone_loss_weight(self, backbone_loss: Tensor) -> Tensor | None:
        return None if self.adapter is None else self.adapter.backbone_loss_weight(backbone_loss)

    def compute(self, inputs: StepInputs) -> Update:
        objectives: list[Tensor] = []
        combined = Update()
        for part in self.parts():
            if not part.request.needs_gradients:
                continue
            update = part.compute(_derived(inputs, part.request.statistic))
            if update.objective is not None:
                objectives.append(update.objective)
            if part is self.aggregator:
                combined = update
        objective = None
        for value in objectives:
            objective = value if objective is None else objective + value
        return Update(weights=combined.weights, direction=combined.direction, objective=objective)


def _derived(inputs: StepInputs, statistic: str) -> StepInputs:
    """``inputs`` with ``statistic`` formed from the richer one the engine computed."""
    if getattr(inputs, statistic) is not None:
        return inputs
    if statistic == "gramian":
        assert inputs.gradients is not None
        flat = flat_rows(inputs.gradients)
        return dataclasses.replace(inputs, gramian=flat @ flat.T)
    if statistic == "norms":
        if inputs.gramian is not None:
            return dataclasses.replace(inputs, norms=torch.diagonal(inputs.gramian).clamp_min(0).sqrt())
        assert inputs.gradients is not None
        return dataclasses.replace(inputs, norms=flat_rows(inputs.gradients).norm(dim=1))
    raise InvalidStrategyError(f"A part asks for {statistic!r}, which cannot be formed from what the step computed.")


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
