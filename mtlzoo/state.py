"""Declared running state: what a strategy carries from one optimizer step to the next.

A strategy declares each field once, with its initial value (:meth:`mtlzoo.Strategy.declare_state`). Inside a step a
write is *staged* (a read gives the staged value, else the committed one); ``per_step="first"`` (the default) keeps the
step's first micro-batch's write, ``"every"`` takes each; taking the optimizer step commits the staged values
(``Strategy.advance``), a ``GradScaler``'s skip drops them (``Strategy.discard``). ``state_dict()`` saves the committed
values (and, between micro-batches, the staged ones). The rules in full: docs/plugins.md, "Running state".

Writes made in ``Strategy.on_advance`` (counters, a retraction) or inside
``with strategy.state.direct():`` (a user's assignment, loading) go straight to the committed value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

PerStep = Literal["first", "every"]
PER_STEP: tuple[PerStep, ...] = ("first", "every")


@dataclass(frozen=True)
class Field:
    """One declared field: whether it is a tensor (a buffer) and which micro-batches may write it."""

    name: str
    is_tensor: bool
    per_step: PerStep
    dtype: torch.dtype | None = None
    """A tensor field's declared dtype: ``module.to(dtype)`` may widen its buffer but reads and writes never go below
    it (float64 state stays float64 in a float32 model; float32 state follows a float64 model)."""

    def widest(self, dtype: torch.dtype) -> torch.dtype:
        """``dtype``, or the declared dtype where that is wider."""
        return dtype if self.dtype is None else torch.promote_types(self.dtype, dtype)


class RunningState:
    """The running state of one strategy, ``strategy.state``: attribute access reads and writes its fields.

    Committed tensors are the owner's buffers. :attr:`generation` counts the changes of the committed
    state (commits, direct writes, loads): a method may cache what it derives from its state under it.
    """

    __slots__ = ("_committed", "_direct", "_fields", "_owner", "_staged", "generation")

    def __init__(self, owner: nn.Module) -> None:
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_fields", {})
        object.__setattr__(self, "_committed", {})
        object.__setattr__(self, "_staged", {})
        object.__setattr__(self, "_direct", 0)
        object.__setattr__(self, "generation", 0)

    def __getstate__(self) -> dict[str, Any]:
        return {name: object.__getattribute__(self, name) for name in self.__slots__}

    def __setstate__(self, saved: dict[str, Any]) -> None:
        for name, value in saved.items():
            object.__setattr__(self, name, value)

    def declare(self, name: str, initial: Any, per_step: PerStep = "first") -> None:
        if per_step not in PER_STEP:
            raise ValueError(f"Parameter `per_step` should be one of {PER_STEP}. Found `per_step = {per_step!r}`.")
        if not name.isidentifier() or name.startswith("_") or hasattr(type(self), name):
            raise ValueError(f"A state field needs a public identifier as its name. Found {name!r}.")
        if name in self._fields:
            raise ValueError(f"The state field {name!r} is declared twice.")
        is_tensor = isinstance(initial, Tensor)
        self._fields[name] = Field(name, is_tensor, per_step, initial.dtype if is_tensor else None)
        if is_tensor:
            self._owner.register_buffer(name, initial)
        else:
            self._committed[name] = initial

    @property
    def fields(self) -> list[str]:
        """The declared fields' names, in declaration order."""
        return list(self._fields)

    @property
    def staged(self) -> dict[str, Any]:
        """What the current step has staged so far (empty between steps)."""
        return dict(self._staged)

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        if name not in fields:
            raise AttributeError(f"{type(self._owner).__name__} declares no state field {name!r} "
                                 f"(it has {sorted(fields)}).")
        staged = object.__getattribute__(self, "_staged")
        if name in staged:
            return staged[name]
        return self.committed(name)

    @contextmanager
    def widths_kept(self) -> Iterator[None]:
        """Within the block the owner's buffers may be cast (``module.to(dtype)``); afterwards a field cast below its
        declared dtype is put back from its value before the cast, on the new device, so no digit is lost."""
        before = {name: getattr(self._owner, name) for name, field in self._fields.items()
                  if field.is_tensor and field.dtype is not None}
        yield
        for name, value in before.items():
            now = getattr(self._owner, name)
            wanted = self._fields[name].widest(now.dtype)
            if now.dtype != wanted:
                setattr(self._owner, name, value.to(device=now.device, dtype=wanted))

    def committed(self, name: str) -> Any:
        """The committed value of field ``name`` (what ``state_dict()`` saves)."""
        field = self._fields[name]
        if field.is_tensor:
            value = getattr(self._owner, name)
            return value.to(field.widest(value.dtype))
        return self._committed[name]

    def __setattr__(self, name: str, value: Any) -> None:
        field = self._fields.get(name)
        if field is None:
            raise AttributeError(f"{type(self._owner).__name__} declares no state field {name!r}: declare it in "
                                 f"__init__ with self.declare_state({name}=initial_value).")
        if self._direct:
            self._write(field, value)
        elif field.per_step == "every" or self._owner.micro_batch == 0:
            self._staged[name] = value

    def write_rows(self, name: str, tasks: Tensor | np.ndarray, rows: Tensor | np.ndarray | float) -> Tensor:
        """Write ``rows`` as the entries ``tasks`` (the present tasks') of the tensor field ``name``, the others as
        they stand (staged, else committed), and return the value written: a copy, made on ``rows``' device (the
        host for numpy) in the wider of the two dtypes, so that the committed buffer is never changed in place."""
        rows = torch.as_tensor(rows)
        current = getattr(self, name).detach()
        value = current.to(rows.device, torch.promote_types(current.dtype, rows.dtype), copy=True)
        value[torch.as_tensor(tasks, device=rows.device)] = rows.to(value.dtype)
        setattr(self, name, value)
        return value

    def touch(self) -> None:
        """Count a change of the committed state (a cache keyed on :attr:`generation` is then stale)."""
        object.__setattr__(self, "generation", self.generation + 1)

    def _write(self, field: Field, value: Any) -> None:
        self.touch()
        if field.is_tensor:
            current = getattr(self._owner, field.name)
            value = torch.as_tensor(value)
            if isinstance(current, Tensor):
                value = value.detach().to(device=current.device, dtype=field.widest(current.dtype))
            setattr(self._owner, field.name, value)
        else:
            self._committed[field.name] = value

    def commit(self) -> None:
        """Make the staged values the committed ones."""
        staged = self._staged
        if not staged:
            return
        object.__setattr__(self, "_staged", {})
        for name, value in staged.items():
            self._write(self._fields[name], value)

    def drop(self) -> None:
        """Forget the staged values."""
        object.__setattr__(self, "_staged", {})

    @contextmanager
    def direct(self) -> Iterator[RunningState]:
        """A context in which writes go to the committed values (``on_advance``, loading)."""
        object.__setattr__(self, "_direct", self._direct + 1)
        try:
            yield self
        finally:
            object.__setattr__(self, "_direct", self._direct - 1)

    def plain_values(self) -> dict[str, Any]:
        """The committed values of the fields that are not tensors (saved in the extra state)."""
        return dict(self._committed)

    def load_plain_values(self, values: dict[str, Any]) -> None:
        self.touch()
        for name in self._committed:
            if name in values:
                self._committed[name] = values[name]
        object.__setattr__(self, "_staged", {})

    def load_staged(self, staged: dict[str, Any]) -> None:
        unknown = sorted(set(staged) - set(self._fields))
        if unknown:
            raise KeyError(f"The checkpoint stages state fields {unknown} that {type(self._owner).__name__} does not "
                           "declare.")
        object.__setattr__(self, "_staged", dict(staged))

