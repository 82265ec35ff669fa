"""When a strategy's running state advances: once per optimizer step that was taken.

``mtl.step(optimizer)`` steps the optimizer (through a ``GradScaler`` when given), then commits or drops what the step's
backward calls staged. A plain ``optimizer.step()`` is noticed at the wrapper's next backward, by the version counters
of the parameters it wrote, and advances the state then, with a one-time warning; no process-wide hook is installed. A
fused optimizer or an update through ``.data`` moves no version counter (docs/concepts.md, "One training step").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlzoo.engine.internals import version_sum

PLAIN_STEP_WARNING = (
    "The model's parameters changed since the last mtl.backward() without mtl.step(optimizer): a plain "
    "optimizer.step() ran. The strategy's state was advanced now, as mtl.step would have done, but a step that a "
    "GradScaler skips cannot be told apart from gradient accumulation that way, and the state advances only at the "
    "next backward. Call mtl.step(optimizer) (with scaler=... under a GradScaler) instead of optimizer.step(). "
    "Said once per wrapper.")


class StepTracker:
    """The lifecycle of one wrapper's steps: whether backward calls wait for an optimizer step, and who steps.

    Args:
        watched: The parameters an optimizer step writes after a backward of the given present tasks (one of
            them is enough: a step writes every parameter that has a gradient).
    """

    def __init__(self, watched: Callable[[Sequence[int]], Sequence[Tensor]]) -> None:
        self._list_watched = watched
        self.open = False
        self.warned_plain_step = False
        self.checked_groups = False
        self._watched: Sequence[Tensor] = ()
        self._versions = 0

    def backward_done(self, present: Sequence[int]) -> None:
        """A backward of the tasks ``present`` ran: an optimizer step is now expected."""
        self.open = True
        self._watched = self._list_watched(present)
        self._versions = version_sum(self._watched)

    def close(self) -> None:
        """The step's state was committed or dropped (``mtl.step``, or a plain step noticed)."""
        self.open = False
        self._watched = ()

    def moved(self) -> bool:
        """Whether the watched parameters were written since the last backward (an optimizer step ran)."""
        return self.open and version_sum(self._watched) != self._versions

    def stepped_outside(self) -> bool:
        """Whether a plain optimizer step ran since the last backward (call before the next backward);
        warns the first time."""
        if not self.moved():
            return False
        if not self.warned_plain_step:
            self.warned_plain_step = True
            warnings.warn(PLAIN_STEP_WARNING, RuntimeWarning, stacklevel=4)
        return True


def run_optimizers(optimizers: Sequence[torch.optim.Optimizer], scaler: Any | None) -> bool:
    """Step every optimizer (through ``scaler``); whether a step was taken (a scaler may skip it)."""
    if scaler is None:
        for optimizer in optimizers:
            optimizer.step()
        return True
    taken: list[bool] = []
    handles = [optimizer.register_step_post_hook(lambda *_: taken.append(True)) for optimizer in optimizers]
    try:
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
    finally:
        for handle in handles:
            handle.remove()
    return bool(taken)
