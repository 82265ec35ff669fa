"""When a strategy's running state advances: once per optimizer step that was taken.

``mtl.step(optimizer)`` steps the optimizer (through a ``GradScaler`` when given) and then commits
or drops what the step's backward calls staged. A plain ``optimizer.step()`` over the wrapper's
parameters is caught by a process-wide optimizer hook: the state still advances, and a one-time
warning names the call to use instead.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_OPEN: weakref.WeakSet[StepTracker] = weakref.WeakSet()
_HOOK: Any = None


def _on_any_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for tracker in list(_OPEN):
        tracker.optimizer_stepped(optimizer)


class StepTracker:
    """The lifecycle of one wrapper's steps: micro-batches since the last optimizer step, and who steps."""

    def __init__(self, owner: nn.Module, commit: str) -> None:
        self._owner = weakref.ref(owner)
        self._commit = commit
        self.open = False
        self.inside_step = False
        self.warned_plain_step = False
        self.checked_groups = False

    def backward_done(self) -> None:
        global _HOOK
        self.open = True
        _OPEN.add(self)
        if _HOOK is None:
            _HOOK = register_optimizer_step_post_hook(_on_any_optimizer_step)

    def close(self) -> None:
        self.open = False
        _OPEN.discard(self)

    def optimizer_stepped(self, optimizer: torch.optim.Optimizer) -> None:
        owner = self._owner()
        if self.inside_step or not self.open or owner is None:
            return
        mine = {id(p) for p in owner.parameters()}
        if not any(id(p) in mine for group in optimizer.param_groups for p in group["params"]):
            return
        if not self.warned_plain_step:
            self.warned_plain_step = True
            warnings.warn("optimizer.step() ran over the wrapper's parameters outside mtl.step(optimizer): the "
                          "strategy's state was advanced anyway, but a step that a GradScaler skips cannot be told "
                          "apart from gradient accumulation that way. Call mtl.step(optimizer, scaler=...) instead.",
                          RuntimeWarning, stacklevel=4)
        getattr(owner, self._commit)()


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
