"""The heads' pass (:func:`head_pass`): one ``autograd.grad`` through the heads gives each task its ``g_k`` on ``z``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mtlzoo.engine.forwards import ForwardRecord
from mtlzoo.errors import BackwardOrderError, ShapeMismatchError


@dataclass
class HeadPass:
    """The result of :func:`head_pass`: per-task gradients on ``z``, the heads' parameter gradients, the losses."""

    records: list[ForwardRecord]
    grads: list[Tensor]
    head_params: list[Tensor]
    head_grads: list[Tensor]
    extra_roots: list[Tensor]
    extra_grads: list[Tensor]
    losses: Tensor | None = None


def head_pass(records: Sequence[ForwardRecord], losses: Tensor, tasks: Tensor, requires: Sequence[bool],
              head_params: Sequence[Tensor], *, labels: Sequence[str], retain_graph: bool = False) -> HeadPass:
    """Back-propagate the (weighted, possibly scaled) present losses through the heads, accumulating nothing.

    Args:
        records: The pending forwards; those that the losses reach are consumed.
        losses: The present tasks' losses, ``(K',)``, as the model should learn from them.
        tasks: Their task indices.
        requires: Per present task, whether its loss depends on anything (a constant gets a zero gradient).
        head_params: The heads' parameters.
        labels: Task labels for messages.
        retain_graph: Keep the heads' graph.

    Raises:
        BackwardOrderError: A loss that depends on something but on no pending forward of this step.
    """
    if not any(record.alive for record in records):
        raise BackwardOrderError("No training forward is waiting for a backward: call mtl(x) in training mode with "
                                 "gradients enabled, compute the losses from its predictions, then backward() once.")
    index = tasks.tolist()
    live = [(record, [record.leaves[k]() for k in index], [ref() for ref in record.extra_leaves])
            for record in records if record.alive]
    inputs: list[Tensor] = []
    for _, leaves, extras in live:
        inputs += [leaf for leaf in leaves if leaf is not None] + [leaf for leaf in extras if leaf is not None]
    params = [p for p in head_params if p.requires_grad]
    results = torch.autograd.grad(losses.sum(), [*inputs, *params], allow_unused=True, retain_graph=retain_graph) \
        if inputs or params else ()
    found = iter(results[:len(inputs)])
    reached_task = [False] * len(index)
    used, grads, extra_roots, extra_grads = [], [], [], []
    for record, leaves, extras in live:
        rows = []
        for row, leaf in enumerate(leaves):
            grad = None if leaf is None else next(found)
            reached_task[row] |= grad is not None
            rows.append(grad)
        extra = [None if leaf is None else next(found) for leaf in extras]
        if all(grad is None for grad in rows) and all(grad is None for grad in extra):
            continue
        used.append(record)
        grads.append(torch.stack([torch.zeros_like(record.z) if g is None else g for g in rows]))
        for root, grad in zip(record.extra_roots, extra):
            if grad is not None:
                extra_roots.append(root)
                extra_grads.append(grad)
    stale = [labels[k] for k, needed, reached in zip(index, requires, reached_task) if needed and not reached]
    if stale:
        raise BackwardOrderError(
            f"The losses of tasks {stale} do not depend on any training forward of this step that backward() has not "
            "consumed yet: compute each loss from the predictions of mtl(x) (in training mode, with gradients "
            "enabled) and call backward() once per forward. Nothing was back-propagated.")
    head_grads = list(results[len(inputs):])
    kept = [(p, g) for p, g in zip(params, head_grads) if g is not None]
    return HeadPass(used, grads, [p for p, _ in kept], [g for _, g in kept], extra_roots, extra_grads, losses)


def representation_gradients(grads: Sequence[Tensor]) -> Tensor:
    """The K' x ... gradients on ``z`` of all consumed forwards, concatenated along the batch dimension."""
    if len(grads) == 1:
        return grads[0]
    shapes = {tuple(g.shape[2:]) for g in grads}
    if len(shapes) != 1:
        raise ShapeMismatchError(f"One backward consumed forwards whose representations differ beyond the batch "
                                 f"dimension ({sorted(shapes)}); call backward() once per forward.")
    return torch.cat(list(grads), dim=1)


def split_batches(dz: Tensor, records: Sequence[ForwardRecord]) -> list[Tensor]:
    """Split a gradient on the concatenated representation back into one per forward."""
    if len(records) == 1:
        return [dz]
    return list(dz.split([record.z.shape[0] for record in records], dim=0))

