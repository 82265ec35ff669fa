"""Maths the strategies share: norms without overflow, Gramians. Strategies never import the engine."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype strategies compute in: at least float32 (half precision is widened), float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def widened(tensor: Tensor) -> Tensor:
    """``tensor`` in :func:`compute_dtype` (the losses a strategy reads: float64 kept, half precision widened)."""
    return tensor.to(compute_dtype(tensor.dtype))


_SAFE_NORMS = (1e-15, 3e18)
"""Norms from sums of float32 squares inside this range lost nothing to overflow or underflow: the sum
is between 1e-30 and 9e36 < float32's max (an entry's square is below that too), and entries under
1e-19.5, whose squares flush to 0, add under 1e-39 each to a sum of at least 1e-30."""

_SMALL = 4096
"""Below this many entries the float64 sum costs less than checking the float32 one."""


def row_norms(matrix: Tensor, dim: int = 0) -> Tensor:
    """The Euclidean norm of each row (each index of ``dim``) of a tensor, exact for rows of size 1e30 or 1e-30.

    On the CPU the squares are summed in the input's precision (at least float32) and a norm outside :data:`_SAFE_NORMS`
    (or of a zero row) is summed again in float64, whose range holds the square of any float32; elsewhere the float64
    sum is the only one (no host synchronisation). A float64 row is divided by its largest magnitude before squaring.
    """
    if dim != 0:
        matrix = matrix.movedim(dim, 0)
    if not matrix.is_floating_point() or matrix.dtype == torch.float64 or matrix.device.type == "mps":
        flat = matrix.reshape(matrix.shape[0], -1)
        scale = flat.abs().amax(dim=1, keepdim=True)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return (flat / safe).norm(dim=1) * safe.squeeze(1)
    flat = matrix.reshape(matrix.shape[0], -1) if matrix.is_contiguous() or dim == 0 else None
    if matrix.device.type == "cpu" and matrix.shape[0] > 0 and matrix.numel() > _SMALL:
        if flat is not None:
            norms = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32)
        else:  # a moved dimension: square and sum in place of a copy
            norms = matrix.float().square().sum(tuple(range(1, matrix.dim()))).sqrt_()
        low, high = _SAFE_NORMS
        if all(low <= value <= high for value in norms.tolist()):  # NaN fails too
            return norms if norms.dtype == matrix.dtype else norms.to(matrix.dtype)
    if flat is None:
        flat = matrix.reshape(matrix.shape[0], -1)
    return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64).to(matrix.dtype)


def gramian(matrix: Tensor) -> Tensor:
    """``G G^T`` of the rows of a (K, ...) tensor, K x K."""
    flat = matrix.reshape(matrix.shape[0], -1)
    return flat @ flat.T


def tiny(dtype: torch.dtype) -> float:
    """The smallest positive normal number of ``dtype``: a divisor guard that is never 0 in that dtype."""
    return torch.finfo(dtype).tiny


def flat_rows(matrix: Tensor) -> Tensor:
    """A (K, ...) tensor as a (K, n) matrix, one flattened row per task."""
    return matrix.reshape(matrix.shape[0], -1)


def gramian_norms(gramian: Tensor) -> Tensor:
    """The row norms ``||g_k|| = sqrt(G_kk)`` read from a Gramian (negative rounding clamped to 0)."""
    return gramian.diagonal().clamp_min(0).sqrt()


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of every tensor is finite (one host synchronisation): a sum, cheaper than ``isfinite``,
    then the exact element-wise check only where the sum is not finite (a NaN, an inf, or an overflow)."""
    if not tensors:
        return True
    total = tensors[0].sum() if len(tensors) == 1 else torch.stack([t.sum(dtype=torch.float32) for t in tensors]).sum()
    if math.isfinite(total.item()):
        return True
    return all(bool(t.isfinite().all()) for t in tensors)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on ``device_type`` (a no-op context when it is not on)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        enabled = True
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()
