"""The statistics a strategy's request names, formed here and only here, unscaled and in at least float32.

The Gramian of the Jacobian on the shared parameters is summed per parameter, so the Jacobian is never concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mtlzoo.engine.collectives import current
from mtlzoo.engine.heads import HeadPass, representation_gradients
from mtlzoo.engine.jacobian import JacobianRoute, jacobian_blocks
from mtlzoo.engine.last_layer import LastLayerGradients, layer_norms_and_gradients
from mtlzoo.linalg import compute_dtype, gramian, row_norms
from mtlzoo.protocol import Request, StepInputs


@dataclass
class Statistics:
    """What :func:`statistics` formed that the update may reuse, unscaled.

    Attributes:
        rep: The representation gradients (K' x ...).
        blocks: The Jacobian on the shared parameters, one K' x numel block per parameter, if formed.
        last_layer: The linear last layer's per-task weight gradients, if its norms were read.
    """

    rep: Tensor
    blocks: list[Tensor] | None = None
    last_layer: LastLayerGradients | None = None


def statistics(request: Request, heads: HeadPass, shared: Sequence[Tensor], inputs: StepInputs,
               scale: Tensor | None, *, chunk_size: int | None = None,
               head_weights: Sequence[Tensor | None] = (), route: JacobianRoute | None = None) -> Statistics:
    """Fill ``inputs`` with the statistic ``request`` names, unscaled and in at least float32.

    ``shared``: the parameters the request reads on (all the backbone's, a named subset, or the last
    layer's weights). ``chunk_size`` is the number of tasks per vmapped backward of the Jacobian and
    ``route`` the wrapper's memory of a vmap failure (see :func:`~mtlzoo.engine.jacobian.parameter_jacobian`).
    ``head_weights``: per present task, the weight of the linear layer through which alone the task
    reads its leaf of ``z`` (see :func:`~mtlzoo.engine.last_layer.layer_norms`), or ``None``.

    Norms on parameters (GradNorm's layer) come from :func:`~mtlzoo.engine.last_layer.layer_norms`,
    without the Jacobian where the layer is the linear map that produces ``z``.

    Returns:
        What the update may reuse (:class:`Statistics`), unscaled.
    """
    rep = representation_gradients(heads.grads)
    dtype = compute_dtype(rep.dtype)
    rep = rep.to(dtype) if scale is None else rep.to(dtype) / scale.to(dtype)
    sync = current()  # under torch.distributed: the whole batch's statistics, the same on every rank
    if request.where == "parameters" and request.statistic == "norms":
        zs = [record.z for record in heads.records]
        norms, last = (sync.layer_norms(zs, heads.grads, shared, dtype), None) if sync.active else \
            layer_norms_and_gradients(zs, heads.grads, shared, dtype=dtype, head_weights=head_weights)
        if scale is not None:
            norms = norms / scale.to(dtype)
            last = None if last is None else LastLayerGradients(last.layer, last.weight_grads / scale.to(dtype))
        inputs.norms = norms
        return Statistics(rep, last_layer=last)
    if request.where != "parameters":
        if request.representation:
            zs = [record.z.detach().to(dtype) for record in heads.records]
            inputs.representation = sync.representation(zs[0] if len(zs) == 1 else torch.cat(zs))
        if request.statistic == "gradients":
            inputs.gradients = sync.gradients(rep)
        elif request.statistic == "gramian":
            inputs.gramian = sync.gramian(gramian(rep))
        else:
            inputs.norms = sync.norms(row_norms(rep))
        return Statistics(rep)
    zs = [record.z for record in heads.records]
    sync.check_gathered(shared)
    blocks, matrix = jacobian_blocks(zs, heads.grads, shared, chunk_size=chunk_size, route=route)
    if matrix is not None and (matrix.dtype != dtype or scale is not None):
        matrix = matrix.to(dtype) if scale is None else matrix.to(dtype) / scale.to(dtype)
        offsets = [sum(b.shape[1] for b in blocks[:i]) for i in range(len(blocks))]
        blocks = [matrix[:, offset:offset + b.shape[1]] for offset, b in zip(offsets, blocks)]
    elif matrix is None:
        blocks = [b.to(dtype) if scale is None else b.to(dtype) / scale.to(dtype) for b in blocks]
    if request.statistic == "gramian" and sync.sharded:  # the update goes back through z, not from the blocks
        inputs.gramian = sync.shard_gramian([matrix] if matrix is not None else blocks)
        return Statistics(rep, blocks=blocks)
    sync.average([matrix] if matrix is not None else blocks)
    if request.statistic == "gramian" and matrix is not None:  # the blocks are views of one K x n matrix
        inputs.gramian = matrix @ matrix.T
    elif request.statistic == "gramian":  # summed per parameter: the K x n matrix is never concatenated
        total = torch.zeros(rep.shape[0], rep.shape[0], dtype=dtype, device=rep.device)
        for block in blocks:
            total.addmm_(block, block.T)
        inputs.gramian = total
    else:  # norms on the parameters went to layer_norms above
        inputs.gradients = matrix if matrix is not None else blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)
    return Statistics(rep, blocks=blocks)
