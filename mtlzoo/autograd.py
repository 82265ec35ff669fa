"""The engine: the only module that asks autograd for per-task gradients.

The wrapper feeds every head its own detached copy ("leaf") of the backbone output ``z``, so a
single backward of ``sum_k L_k`` gives the heads their own gradients and leaves
``dL_k/dz`` on leaf ``k``, for all K tasks at once. From there:

- :func:`representation_grads` stacks them into ``G`` (K x z.shape);
- :func:`parameter_jacobian` pulls ``G`` back through the backbone in one batched (vmap)
  vector-Jacobian product, giving the K x n Jacobian of the losses w.r.t. the shared parameters,
  with a loop over tasks as fallback for operations vmap cannot batch;
- :func:`accumulate_grads` writes an aggregated n-vector into the parameters' ``.grad``.

A cross-task loss (one that reads two heads' predictions) makes leaf ``k`` carry the gradient of
every loss that reads head ``k``, not of ``L_k`` alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor


def representation_grads(losses: Tensor, leaves: Sequence[Tensor], *, retain_graph: bool = False) -> Tensor:
    """Back-propagate the K losses through the heads and return ``G[k] = dL_k/dz``.

    The heads' parameters receive their own gradients (accumulated into ``.grad``). A task whose
    loss does not reach its leaf gets a zero gradient.

    Args:
        losses: The K losses (1-D tensor).
        leaves: The K detached copies of ``z`` that the heads were fed.
        retain_graph: Keep the heads' graph for another backward.

    Returns:
        Tensor of shape ``(K, *z.shape)``.
    """
    for leaf in leaves:
        leaf.grad = None
    torch.autograd.backward(losses.sum(), retain_graph=retain_graph)
    return torch.stack([torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves])


def parameter_jacobian(z: Tensor, grads: Tensor, params: Sequence[Tensor], *, batched: bool = True) -> Tensor:
    """The K x n Jacobian of the losses w.r.t. ``params``, from ``G = dL/dz`` by the chain rule.

    Row k is ``(dz/dθ)^T G[k]``, flattened and concatenated over ``params`` in order. The backbone's
    graph is retained (it is freed with ``z``).

    Args:
        z: The backbone output the heads' leaves were detached from.
        grads: ``G``, shape ``(K, *z.shape)``.
        params: The shared parameters θ.
        batched: Use one vmap'ed backward (``is_grads_batched``); ``False`` loops over tasks.
            If vmap cannot batch an operation of the backbone, the loop runs instead, with a warning.
    """
    params = list(params)
    if batched:
        try:
            rows = torch.autograd.grad(z, params, grad_outputs=grads, retain_graph=True,
                                       is_grads_batched=True, allow_unused=True)
        except RuntimeError as error:
            warnings.warn(f"Batched Jacobian failed ({error}); falling back to one backward per task.",
                          RuntimeWarning, stacklevel=2)
        else:
            return _flatten_rows(rows, params, grads.shape[0])
    per_task = [
        torch.autograd.grad(z, params, grad_outputs=grad, retain_graph=True, allow_unused=True) for grad in grads
    ]
    rows = [None if all(g is None for g in col) else torch.stack(
        [torch.zeros_like(p) if g is None else g for g in col]) for col, p in zip(zip(*per_task), params)]
    return _flatten_rows(rows, params, grads.shape[0])


def _flatten_rows(rows: Sequence[Tensor | None], params: Sequence[Tensor], num_tasks: int) -> Tensor:
    return torch.cat([
        row.reshape(num_tasks, -1) if row is not None else p.new_zeros(num_tasks, p.numel())
        for row, p in zip(rows, params)
    ], dim=1)


def accumulate_grads(params: Sequence[Tensor], vector: Tensor) -> None:
    """Add the slices of a flat n-vector to the ``.grad`` of each parameter, in order."""
    expected = sum(param.numel() for param in params)
    if vector.shape != (expected,):
        raise ValueError(f"Expected a flat gradient of {expected} elements. Found shape {tuple(vector.shape)}.")
    offset = 0
    for param in params:
        piece = vector[offset:offset + param.numel()].view_as(param)
        offset += param.numel()
        if param.grad is None:
            param.grad = piece.detach().clone()
        else:
            param.grad.add_(piece)
