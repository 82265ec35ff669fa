"""Maths the strategies share: norms without overflow, Gramians. Strategies never import the engine."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype strategies compute in: at least float32 (half precision is widened), float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def row_norms(matrix: Tensor) -> Tensor:
    """The Euclidean norm of each row of a (K, ...) tensor, without overflow or underflow.

    Each row is divided by its largest magnitude before squaring, so rows of size 1e30 (whose
    squares overflow float32) or 1e-30 (whose squares underflow) get their exact norms.
    """
    flat = matrix.reshape(matrix.shape[0], -1)
    scale = flat.abs().amax(dim=1, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (flat / safe).norm(dim=1) * safe.squeeze(1)


def gramian(matrix: Tensor) -> Tensor:
    """``G G^T`` of the rows of a (K, ...) tensor, K x K."""
    flat = matrix.reshape(matrix.shape[0], -1)
    return flat @ flat.T


def tiny(dtype: torch.dtype) -> float:
    """The smallest positive normal number of ``dtype``: a divisor guard that is never 0 in that dtype."""
    return torch.finfo(dtype).tiny
