"""The training forwards a backward consumes: one record per forward, held as handles.

A training forward of a strategy that reads gradients feeds every head its own detached copy ("leaf") of the backbone
output ``z``; its :class:`ForwardRecord` keeps ``z`` and weak references to the leaves. A forward of a strategy that
reads only the losses feeds the heads ``z + m``, with ``m`` a zero scalar leaf (a *marker*) that the heads' graph holds;
its :class:`MarkedForward` keeps ``m`` weakly. Either way a backward can tell, before anything reaches ``.grad``,
whether the losses come from this wrapper's forwards and whether those were already back-propagated.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class ForwardRecord:
    """What one training forward leaves for a backward: ``z``, the heads' leaves, the backbone's extras.

    The leaves are held weakly: once the predictions (and so the heads' graph) are gone, the
    record is dead and the backbone's graph is freed with it.
    """

    z: Tensor
    leaves: list[weakref.ref[Tensor]]
    extra_roots: list[Tensor] = field(default_factory=list)
    extra_leaves: list[weakref.ref[Tensor]] = field(default_factory=list)

    @classmethod
    def create(cls, z: Tensor, leaves: Sequence[Tensor], extra_roots: Sequence[Tensor] = (),
               extra_leaves: Sequence[Tensor] = ()) -> ForwardRecord:
        return cls(z, [weakref.ref(leaf) for leaf in leaves], list(extra_roots),
                   [weakref.ref(leaf) for leaf in extra_leaves])

    @property
    def alive(self) -> bool:
        return any(ref() is not None for ref in self.leaves)


@dataclass
class MarkedForward:
    """What one training forward of a losses-only strategy leaves: the marker its heads read, held weakly."""

    marker: weakref.ref[Tensor]

    @classmethod
    def create(cls, marker: Tensor) -> MarkedForward:
        return cls(weakref.ref(marker))

    @property
    def alive(self) -> bool:
        return self.marker() is not None


def mark(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(z + m, m)``: ``z`` as the heads of a losses-only forward read it, and the marker ``m`` (a zero leaf)."""
    marker = torch.zeros((), dtype=z.dtype, device=z.device, requires_grad=True)
    return z + marker, marker


class PendingForwards:
    """The training forwards not yet consumed by a backward: handles, not a single slot.

    Copies (``copy.deepcopy`` of the wrapper) and pickles start empty: a forward belongs to the
    graph it built, which a copy does not share.
    """

    def __init__(self) -> None:
        self.records: list[ForwardRecord | MarkedForward] = []
        self.unmarked = False
        """A losses-only forward since the last backward whose representation could not be marked (not a
        floating-point tensor): the next backward cannot check where its losses come from, and does not."""

    def add(self, record: ForwardRecord | MarkedForward) -> None:
        self.records = [r for r in self.records if r.alive]
        self.records.append(record)

    def remove(self, records: Sequence[ForwardRecord | MarkedForward]) -> None:
        ids = {id(r) for r in records}
        self.records = [r for r in self.records if id(r) not in ids and r.alive]

    def __len__(self) -> int:
        return len(self.records)

    def __deepcopy__(self, memo: dict) -> PendingForwards:
        return PendingForwards()

    def __getstate__(self) -> dict:
        return {"records": [], "unmarked": False}

