"""The collectives a step calls, as one process has them, and which run now.

The engine asks :func:`current` for its collectives. Outside a backward under ``torch.distributed`` it gets
:data:`LOCAL`, whose collectives return their input; :mod:`mtlzoo.engine.distributed` has the process
group's (``Sync``), which :func:`running` installs for a step. With them: the loss values a strategy reads,
the whole batch's under ``torch.distributed`` (:class:`SharedLosses`), else the step's own.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from mtlzoo.losses import StepLosses
from mtlzoo.protocol import Request, Update


@dataclass
class SharedLosses(StepLosses):
    """A rank's losses over the tasks present on any rank (a constant 0 where absent here), with the whole batch's.

    Attributes:
        reduced: ``(K',)`` the whole batch's loss values, detached: what the strategy reads.
        backbone: The whole batch's backbone loss, detached, or ``None`` when no rank gave one.
    """

    reduced: Tensor | None = None
    backbone: Tensor | None = None


def reduced_values(losses: StepLosses) -> Tensor:
    """The loss values a strategy reads: the whole batch's under ``torch.distributed``, else the step's own."""
    if isinstance(losses, SharedLosses) and losses.reduced is not None:
        return losses.reduced
    return losses.values.detach()


def reduced_host(losses: StepLosses) -> list[float] | None:
    """The host copy of :func:`reduced_values` where the checks already read it (one process), else ``None``."""
    if isinstance(losses, SharedLosses) and losses.reduced is not None:
        return None
    return losses.host


def reduced_backbone_loss(losses: StepLosses, backbone_loss: Tensor | None) -> Tensor | None:
    """The backbone loss a strategy reads: the whole batch's (detached) under ``torch.distributed``."""
    return losses.backbone if isinstance(losses, SharedLosses) else backbone_loss


class Local:
    """The collectives of one process: each returns its input (the engine's calls outside ``torch.distributed``)."""

    active = False
    size = 1
    sharded = False
    """Whether FSDP shards the model: the heads' gradients then reach ``.grad`` only through :meth:`through_heads`."""

    def refusals(self, count: int) -> contextlib.AbstractContextManager[None]:
        """A block of input checks that raise (see :meth:`Sync.refusals`)."""
        return contextlib.nullcontext()

    @staticmethod
    def share_size(num_tasks: int, batches: int) -> int:
        """The numbers of :meth:`Sync.share`'s collective."""
        return batches * 2 * num_tasks + 3

    def share(self, losses: StepLosses, extra: Sequence[StepLosses], backbone_loss: Tensor | None,
              heads: Callable[[int], list[Tensor]]) -> tuple[StepLosses, list[StepLosses]]:
        """The whole batch's losses (see :meth:`Sync.share`)."""
        return losses, list(extra)

    def post_step(self, values: Tensor) -> Tensor:
        """The whole batch's K losses after the optimizer step (see :meth:`Sync.post_step`)."""
        return values

    def gradients(self, rep: Tensor) -> Tensor:
        """The whole batch's representation gradients (K x B x ...) from this rank's."""
        return rep

    def representation(self, z: Tensor) -> Tensor:
        """The whole batch's representation (B x ...) from this rank's."""
        return z

    def gramian(self, gramian: Tensor) -> Tensor:
        """The whole batch's representation Gramian from this rank's."""
        return gramian

    def norms(self, norms: Tensor) -> Tensor:
        """The whole batch's representation gradient norms from this rank's."""
        return norms

    def average(self, tensors: Sequence[Tensor]) -> None:
        """Replace each tensor by the mean of the ranks' (in place): the whole batch's Jacobian."""

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank."""
        return flag

    def localize(self, update: Update, request: Request) -> Update:
        """The update as this rank applies it (a combined gradient of the whole batch's ``z`` cut to its rows)."""
        return update

    def idle_roots(self) -> tuple[list[Tensor], list[Tensor]]:
        """Parameters that get zero gradients on this rank so that DDP's reduction completes, and those zeros."""
        return [], []

    def restore(self) -> None:
        """After the step's backward: the heads of a task absent from every rank get ``.grad = None`` back."""

    def shard_gramian(self, blocks: Sequence[Tensor]) -> Tensor:
        """Under FSDP: the whole batch's Gramian from this rank's Jacobian blocks (see :meth:`Sync.shard_gramian`)."""
        raise NotImplementedError

    def check_gathered(self, params: Sequence[Tensor]) -> None:
        """Under FSDP: raise unless the shared parameters a request reads are whole (gathered) on this rank."""

    def through_heads(self, loss: Tensor, excluded: Sequence[Tensor]) -> None:
        """Under FSDP: back-propagate ``loss`` through the heads into their parameters (:meth:`Sync.through_heads`)."""


LOCAL = Local()
_CURRENT: contextvars.ContextVar[Local] = contextvars.ContextVar("mtlzoo_sync", default=LOCAL)


def current() -> Local:
    """The collectives of the backward running now (:data:`LOCAL` outside a distributed one)."""
    return _CURRENT.get()


def running(sync: Local) -> contextlib.AbstractContextManager[None]:
    """Within the block the engine's calls to :func:`current` get ``sync`` (outside any, they get :data:`LOCAL`)."""
    return contextlib.nullcontext() if sync is LOCAL and current() is LOCAL else _Running(sync)


class _Running:
    def __init__(self, sync: Local) -> None:
        self.sync = sync

    def __enter__(self) -> None:
        self.token = _CURRENT.set(self.sync)

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self.token)
