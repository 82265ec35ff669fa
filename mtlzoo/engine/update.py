"""The strategy's update as gradients, on ``z`` or directly on the shared parameters (:func:`shared_update`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlzoo.engine.internals import leaves_reached
from mtlzoo.errors import ShapeMismatchError
from mtlzoo.protocol import Request, Update


def shared_update(update: Update, rep: Tensor, request: Request, blocks: Sequence[Tensor] | None = None,
                  params: Sequence[Tensor] = ()) -> tuple[Tensor | None, list[Tensor] | None]:
    """The combined gradient, unscaled: ``(dz, None)`` through the representation, or ``(None, grads)``,
    one gradient per shared parameter in ``params``.

    A weighting ``c`` (or the plain sum) goes back through ``z`` as ``dz = sum_k c_k dL_k/dz``, unless the Jacobian's
    ``blocks`` (one per parameter of ``params``) are given: then each parameter gets ``J_p^T c`` directly, which saves
    the backward of ``dz`` through the backbone (give them only when they cover every leaf ``z`` depends on, see
    :func:`covers_representation`). A direction on the parameters (a flat n-vector) is split over ``params``.
    """
    if update.direction is not None:
        if request.where == "parameters":
            sizes = [p.numel() for p in params]
            if update.direction.shape != (sum(sizes),):
                raise ShapeMismatchError(f"The strategy's direction has shape {tuple(update.direction.shape)}; the "
                                         f"shared parameters have {sum(sizes)} entries.")
            return None, [piece.view_as(p) for piece, p in zip(update.direction.split(sizes), params)]
        if update.direction.shape != rep.shape[1:]:
            raise ShapeMismatchError(f"The strategy's direction has shape {tuple(update.direction.shape)}; the "
                                     f"representation gradients have shape {tuple(rep.shape[1:])}.")
        return update.direction, None
    if update.weights is not None and update.weights.shape != rep.shape[:1]:
        raise ShapeMismatchError(f"The strategy returned {tuple(update.weights.shape)} weights for "
                                 f"{rep.shape[0]} tasks.")
    if blocks is None:
        return (rep.sum(0) if update.weights is None else torch.tensordot(update.weights.to(rep.dtype), rep, dims=1)), \
            None
    if update.weights is None:
        return None, [block.sum(0).view_as(p) for block, p in zip(blocks, params)]
    weights = update.weights.to(blocks[0].dtype) if blocks else update.weights
    return None, [(weights @ block).view_as(p) for block, p in zip(blocks, params)]


def covers_representation(zs: Sequence[Tensor], params: Sequence[Tensor]) -> bool:
    """Whether the backbone outputs ``zs`` depend on no leaf tensor other than ``params``.

    Walks the graphs of ``zs`` (a few microseconds per operation). A weight tied to a head, an
    input that requires grad, or a parameter outside the backbone make it ``False``.
    """
    wanted = {id(p) for p in params}
    return all(id(leaf) in wanted for leaf in leaves_reached(zs))
