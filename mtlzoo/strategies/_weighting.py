"""What several built-in strategies share: checks of their arguments and input, the epoch hook's reminder."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from mtlzoo.errors import NonPositiveLossError, ShapeMismatchError

EPOCH_REMINDER_STEPS = 1_000
"""Optimizer steps without any ``end_epoch()`` after which DWA and STCH warn, once: longer than most epochs of
the standard benchmarks (100 to 800 steps), short enough that a forgotten call shows early."""


def check_rate(value: float, name: str, *, positive: bool = False, at_most: float | None = None,
               below: float | None = None) -> float:
    """A finite number ``>= 0`` (``> 0`` if ``positive``), ``<= at_most``, ``< below``; else a ``ValueError``."""
    fine = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and \
        (value > 0 if positive else value >= 0) and (at_most is None or value <= at_most) and \
        (below is None or value < below)
    if not fine:
        upper = at_most if below is None else below
        sign = "positive" if positive else "non-negative"
        what = f"a {sign} number" if upper is None else \
            f"a number in {'(' if positive else '['}0, {upper:g}{']' if below is None else ')'}"
        raise ValueError(f"Parameter `{name}` should be {what}. Found `{name} = {value!r}`.")
    return float(value)


def check_positive(losses: Tensor, tasks: Tensor | None, method: str, takes: str) -> None:
    """Raise :class:`~mtlzoo.errors.NonPositiveLossError` if a loss of tasks ``tasks`` (``None``: 0 to K-1) is <= 0,
    naming ``method`` (``"SI (si)"``) and what it ``takes`` (``"takes the log of each loss"``)."""
    if losses.numel() == 0 or float(losses.detach().min()) > 0:
        return
    bad = losses.detach() <= 0
    if bool(bad.any()):
        tasks = torch.arange(losses.shape[0], device=losses.device) if tasks is None else tasks.to(losses.device)
        values = losses.detach()[bad].tolist()
        found = ", ".join(f"task {task}: {value:g}" for task, value in zip(tasks[bad].tolist(), values))
        raise NonPositiveLossError(
            f"{method} {takes}, so every loss should be > 0. Found {found}. Nothing was back-propagated and the "
            "strategy's state is unchanged: add a small positive constant to that loss, or use a method that does "
            "not take its log, ratio or product (ls, uw).")


def per_task_numbers(value: Sequence[float] | Tensor, name: str, num_tasks: int, *, non_negative: bool) -> Tensor:
    """``value`` as K finite numbers (a tensor of the default dtype), or a ``ValueError`` naming the parameter."""
    what = "finite non-negative numbers" if non_negative else "finite numbers"
    message = f"Parameter `{name}` should hold {num_tasks} {what}. Found `{name} = {value!r}`."
    if isinstance(value, (str, bytes)):
        raise ValueError(message)
    try:
        values = torch.as_tensor(value, dtype=torch.get_default_dtype())
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(message) from error
    if values.shape != (num_tasks,) or not bool(torch.isfinite(values).all()) \
            or (non_negative and bool((values < 0).any())):
        raise ValueError(message)
    return values


def gradient_surrogate(parameters: Tensor, gradient: list[float]) -> Tensor:
    """``sum_k p_k g_k``, ``g`` constant: a scalar whose gradient w.r.t. ``parameters`` is ``g`` (not the
    objective's value), for an objective whose gradient has a closed form (RotoGradNorm's)."""
    return (parameters * torch.tensor(gradient, dtype=parameters.dtype, device=parameters.device)).sum()


def all_usable(owner: Any, reference: Tensor) -> bool:
    """Whether every entry of ``reference`` (a state tensor of ``owner``) is finite and non-zero; a yes is
    remembered per state generation, so that a step does not wait on the device for it."""
    version = owner.state.generation
    known = owner.__dict__.setdefault("_usable", [])  # (tensor, generation) pairs, the last four
    if any(reference is seen and number == version for seen, number in known):
        return True
    if not bool((torch.isfinite(reference) & (reference != 0)).all()):
        return False
    known[:] = [*[entry for entry in known if entry[0] is not reference][-3:], (reference, version)]
    return True


def remind_end_epoch(method: str, steps: int, consequence: str, owner: Any) -> None:
    """Warn once that ``mtl.end_epoch()`` seems never to be called (``steps`` steps without it)."""
    warnings.warn(f"{method} has taken {steps} optimizer steps and no epoch has ended: call mtl.end_epoch() at the "
                  f"end of every epoch. Until then it {consequence}, as its paper does before the first epoch ends. "
                  f"(If your epochs are longer than {steps} steps, set {type(owner).__name__}.reminder_steps to "
                  "their length.) Said once.", RuntimeWarning, stacklevel=5)


def widen(strategy: torch.nn.Module, names: Sequence[str], dtype: torch.dtype) -> None:
    """Make the float buffers ``names`` of ``strategy`` at least ``dtype`` wide, so that state that sums or
    averages float64 losses (DWA, STCH, GradNorm) is float64 though the strategy was built in float32."""
    for name in names:
        buffer = getattr(strategy, name)
        wider = torch.promote_types(buffer.dtype, dtype)
        if wider != buffer.dtype:
            setattr(strategy, name, buffer.to(wider))


class WidensState:
    """Mixin: the buffers in ``widening`` take a checkpoint's wider dtype when loaded (see :func:`widen`)."""

    widening: ClassVar[tuple[str, ...]] = ()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in self.widening:
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor):
                widen(self, (name,), saved.dtype)  # type: ignore[arg-type]
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]


class ShapedAtFirstStep:
    """Mixin: the state tensors in ``shaped_later`` (declared empty) take their shape at the first step
    (:meth:`first_shaped`), or from a checkpoint when one is loaded."""

    shaped_later: ClassVar[tuple[str, ...]] = ()
    num_tasks: int

    def first_shaped(self, name: str, rows: Tensor, what: str) -> Tensor:
        """The committed state ``name`` (K x n), made zeros like ``rows`` (K' x n) at the first step."""
        value = self.state.committed(name)  # type: ignore[attr-defined]
        shape = (self.num_tasks, rows.shape[1])
        if value.numel() == 0:
            value = torch.zeros(shape, dtype=rows.dtype, device=rows.device)
            setattr(self, name, value)  # the state's shape, set once (zeros: the declared initial value)
        if tuple(value.shape) != shape:
            raise ShapeMismatchError(f"{type(self).__name__} keeps {what} of {value.shape[1]} entries per task; this "
                                     f"step's have {shape[1]} (a different model, or a representation of another "
                                     "shape). Build a new strategy for it.")
        return value

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in self.shaped_later:
            saved, current = state_dict.get(prefix + name), getattr(self, name)
            if isinstance(saved, Tensor) and saved.shape != current.shape:
                setattr(self, name, torch.zeros(saved.shape, dtype=saved.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]
