"""Statistics on the last shared layer, and the update applied from it down.

Where the backbone ends in a linear map ``z = h W^T + b``, the per-task gradients on it need no backward
(:func:`layer_norms`), and the step's update then reaches ``W`` as a sum over tasks (:class:`LastLayerGradients`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mtlzoo.engine.internals import LinearOutput, linear_output, nearest_parameters
from mtlzoo.engine.jacobian import parameter_jacobian
from mtlzoo.errors import ShapeMismatchError
from mtlzoo.linalg import row_norms


@dataclass
class LastLayerGradients:
    """The per-task gradients of the linear last layer ``z = h W^T + b``, kept from its norms' product.

    ``weight_grads[:, k, :]`` is ``(dL_k/dW)^T`` (m x d), unscaled: with them the step's update reaches ``W`` as a sum
    over tasks instead of another ``h^T dz`` product, and the backward continues from ``h`` (:func:`last_layer_update`).
    """

    layer: LinearOutput
    weight_grads: Tensor


def last_layer_weights(z: Tensor) -> list[Tensor]:
    """The weights of the last shared layer: the weight of the linear map that produces ``z`` where there
    is one, else :func:`last_layer_parameters`."""
    layer = linear_output(z)
    if layer is not None and layer.weight is not None and layer.weight.requires_grad:
        return [layer.weight]
    return last_layer_parameters(z)


def last_layer_parameters(z: Tensor) -> list[Tensor]:
    """The weights of the last shared layer: the trainable parameters read by the operation nearest ``z``.

    Walks the graph of ``z`` back from its last operation, breadth first, to the first one that reads
    trainable parameters directly (through a transpose or autocast's cast); of those, the ones of two
    or more dimensions (the layer's weights, as GradNorm reads ``W``), or all of them if none has.

    Raises:
        ShapeMismatchError: ``z`` depends on no trainable parameter.
    """
    params = nearest_parameters(z)
    if not params:
        raise ShapeMismatchError("The backbone output depends on no trainable parameter, so there is no last "
                                 "shared layer to read gradient norms on.")
    weights = [p for p in params if p.dim() >= 2]
    return weights or params


def layer_norms(zs: Sequence[Tensor], grads: Sequence[Tensor], params: Sequence[Tensor], *,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """The K norms ``||dL_k/dθ||`` on the parameters ``params`` of one layer, from ``G = dL/dz``.

    When ``z`` is produced by the linear map of those parameters (``z = h W^T + b``, see :func:`linear_output`),
    ``dL_k/dW = G_k^T h`` and ``dL_k/db = sum_n G_k[n]``: no backward at all, one (K d) x N x m product, or less where
    every head reads ``z`` through a narrow linear layer (see :func:`layer_norms_and_gradients`). Otherwise (a
    convolution, a layer below the last one) the rows of the Jacobian restricted to ``params``
    (:func:`parameter_jacobian`: one vmapped backward through that layer and those above it only).

    A weight that the backbone also reads before its last layer (tied weights) gets, on the linear
    route, only the gradient of its last use.

    Args:
        zs: The backbone output(s) of the step's forwards.
        grads: ``G`` per output, each ``(K, *z.shape)`` (as scaled as the losses were).
        params: The layer's parameters.
        dtype: The dtype to compute the norms in.
    """
    return layer_norms_and_gradients(zs, grads, params, dtype=dtype)[0]


def layer_norms_and_gradients(zs: Sequence[Tensor], grads: Sequence[Tensor], params: Sequence[Tensor], *,
                              dtype: torch.dtype = torch.float32, head_weights: Sequence[Tensor | None] = ()
                              ) -> tuple[Tensor, LastLayerGradients | None]:
    """:func:`layer_norms`, and the last layer's per-task weight gradients where the linear route made them
    (one forward, the weight among ``params``, everything in ``dtype``), as scaled as ``grads``.

    ``head_weights``: per task, the weight ``V_k`` (o x d) of the linear layer through which alone task k reads its leaf
    of ``z`` (a head that starts with a plain ``nn.Linear``), or ``None``. Where every task has one of the same small
    width o, ``G_k = D_k V_k`` and the weight's norms come from ``||V_k^T (D_k^T h)||``: ``K B o (d + m)`` multiply-adds
    instead of ``K B d m``, and no per-task gradients are kept.
    """
    with torch.no_grad():
        return _layer_norms(zs, grads, params, dtype, head_weights)


def _layer_norms(zs: Sequence[Tensor], grads: Sequence[Tensor], params: Sequence[Tensor], dtype: torch.dtype,
                 head_weights: Sequence[Tensor | None] = ()) -> tuple[Tensor, LastLayerGradients | None]:
    wanted = {id(p) for p in params}
    layers = [linear_output(z) for z in zs]
    if wanted and all(layer is not None for layer in layers):
        roles = {id(layer.weight): "weight" for layer in layers if layer.weight is not None}  # type: ignore[union-attr]
        roles.update({id(layer.bias): "bias" for layer in layers if layer.bias is not None})  # type: ignore[union-attr]
        same_layer = len({id(layer.weight) for layer in layers}) == 1  # type: ignore[union-attr]
        if same_layer and wanted <= set(roles):
            num_tasks = grads[0].shape[0]
            flat = [g.reshape(num_tasks, -1, g.shape[-1]).to(dtype) for g in grads]
            pieces: list[Tensor] = []  # the norms of the weight's and the bias's gradients
            kept = None
            factored = _factored_weight_norms(layers[0].input, grads[0], head_weights, dtype) \
                if len(layers) == 1 and id(layers[0].weight) in wanted else None  # type: ignore[union-attr]
            if factored is not None:
                pieces.append(factored)
            elif id(layers[0].weight) in wanted:  # type: ignore[union-attr]
                # dL_k/dW^T = h^T G_k for the K tasks as one product: h^T [G_1 ... G_K], m x (K d)
                products = [torch.mm(layer.input.to(dtype).T,  # type: ignore[union-attr]
                                     g.transpose(0, 1).reshape(g.shape[1], -1)) for g, layer in zip(flat, layers)]
                product = products[0] if len(products) == 1 else torch.stack(products).sum(0)
                per_task = product.view(product.shape[0], num_tasks, -1)
                pieces.append(row_norms(per_task, dim=1))
                layer = layers[0]
                if len(layers) == 1 and layer.input.dtype == layer.weight.dtype == dtype:  # type: ignore[union-attr]
                    kept = LastLayerGradients(layer, per_task)  # type: ignore[arg-type]
            if layers[0].bias is not None and id(layers[0].bias) in wanted:  # type: ignore[union-attr]
                bias = flat[0].sum(1) if len(flat) == 1 else torch.stack([g.sum(1) for g in flat]).sum(0)
                pieces.append(row_norms(bias))
            return (pieces[0] if len(pieces) == 1 else torch.hypot(*pieces)), kept  # hypot: no overflow
    return row_norms(parameter_jacobian(list(zs), list(grads), list(params)).to(dtype)), None


FACTORED_WIDTH = 8
"""Widest head layer (outputs o) through which :func:`layer_norms` factors the per-task gradients."""


def _factored_weight_norms(layer_input: Tensor, grads: Tensor, head_weights: Sequence[Tensor | None],
                           dtype: torch.dtype) -> Tensor | None:
    """``||G_k^T h||_F`` with ``G_k = D_k V_k`` (``grads`` (K, N, d), ``V_k`` the task's head layer, o x d).

    ``D_k = G_k V_k^T (V_k V_k^T)^-1`` (exact when task k reads its leaf through ``V_k`` alone), then
    ``||V_k^T (D_k^T h)||_F^2 = <P_k, (V_k V_k^T) P_k>`` with ``P_k = D_k^T h`` (o x m). ``None`` (the
    product route instead) unless every task has such a layer, all of one width o <= FACTORED_WIDTH,
    with ``V_k V_k^T`` well conditioned.
    """
    if not head_weights or len(head_weights) != grads.shape[0] or any(w is None for w in head_weights):
        return None
    shapes = {(tuple(w.shape), w.dtype) for w in head_weights if w is not None}
    if len(shapes) != 1:
        return None
    (width, size), weight_dtype = next(iter(shapes))
    # Another dtype than the gradients' (autocast) means the layer ran on a rounded copy of V_k.
    if width > FACTORED_WIDTH or size != grads.shape[-1] or weight_dtype != grads.dtype:
        return None
    weights = torch.stack([w.detach() for w in head_weights if w is not None]).to(dtype)  # (K, o, d)
    gram = weights @ weights.mT  # (K, o, o)
    eigenvalues = torch.linalg.eigvalsh(gram)
    low, high = torch.stack([eigenvalues[:, 0].min(), eigenvalues[:, -1].max()]).tolist()
    if not (low > 1e-6 * high and math.isfinite(high)):
        return None
    flat = grads.reshape(grads.shape[0], -1, size).to(dtype)
    factors = torch.linalg.solve(gram, (flat @ weights.mT).mT)  # D_k^T, (K, o, N)
    products = factors @ layer_input.to(dtype)  # P_k = D_k^T h, (K, o, m)
    squares = (products * (gram @ products)).sum((1, 2))
    return squares.clamp_min(0).sqrt()


def last_layer_update(last: LastLayerGradients, dz: Tensor, weights: Tensor | None
                      ) -> tuple[list[Tensor], list[Tensor]]:
    """Roots and gradients that apply ``dz = sum_k c_k G_k`` from the last layer down, without its ``h^T dz``.

    ``W`` gets ``sum_k c_k (dL_k/dW)`` from the kept per-task gradients, ``b`` gets ``sum_n dz[n]``,
    and the backward goes on from the layer's input ``h`` with ``dz W``: what a backward of ``z``
    computes, less one product. ``weights`` is ``c`` (``None``: all ones); all unscaled.
    """
    layer = last.layer
    assert layer.weight is not None
    flat = dz.reshape(-1, dz.shape[-1]).to(layer.weight.dtype)
    summed = last.weight_grads.sum(1) if weights is None else \
        torch.einsum("mkd,k->md", last.weight_grads, weights.to(last.weight_grads.dtype))
    roots, grads = [layer.weight], [summed.T]
    if layer.bias is not None and layer.bias.requires_grad:
        roots.append(layer.bias)
        grads.append(flat.sum(0))
    if layer.input.requires_grad:
        roots.append(layer.input)
        grads.append(flat @ layer.weight.detach())
    return roots, grads
