"""K learnable rotations of a representation, on torch's own orthogonal parametrization.

The matrices live in one (K, n, n) parameter under ``torch.nn.utils.parametrizations.orthogonal``
with the trivialization, so ``R_k = B_k f(A_k)``: ``B_k`` a fixed base (a buffer), ``f`` the
orthogonal map, ``A_k`` the unconstrained parameter an optimizer updates. All K matrices are
computed in one batched call, once per step under ``torch.nn.utils.parametrize.cached()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from mtlzoo.errors import ShapeMismatchError

OrthogonalMap = Literal["matrix_exp", "cayley", "householder"]
RotationInit = Literal["random", "identity"]
ORTHOGONAL_MAPS: tuple[OrthogonalMap, ...] = ("matrix_exp", "cayley", "householder")
ROTATION_INITS: tuple[RotationInit, ...] = ("random", "identity")


def haar_rotations(count: int, size: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Tensor:
    """``count`` independent rotations drawn from the Haar (uniform) measure on SO(size).

    QR of a Gaussian matrix with the signs of R's diagonal moved into Q is Haar on O(n)
    (Mezzadri, 2007); flipping one column where the determinant is -1 maps it onto SO(n).
    """
    gaussian = torch.randn(count, size, size, dtype=dtype, device=device, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(r.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)
    # slogdet, as det's product of n pivots underflows for large n (tested at n = 512).
    signs = torch.stack([torch.linalg.slogdet(matrix).sign for matrix in q])
    q[..., :, 0] *= signs.unsqueeze(-1)
    return q.contiguous()


class _Rotation(nn.Module):
    """One orthogonal n x n matrix ``weight`` under torch's orthogonal parametrization."""

    def __init__(self, size: int, orthogonal_map: OrthogonalMap, device: Any, dtype: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(size, device=device, dtype=dtype))
        parametrizations.orthogonal(self, "weight", orthogonal_map=orthogonal_map)


class RotationBank(nn.Module):
    """K orthogonal n x n matrices, each parametrized by torch's orthogonal parametrization.

    One parametrization per task rather than one over a (K, n, n) batch: a batched ``matrix_exp``
    runs every matrix at the degree its largest norm needs (``pytest -m bench`` measures the maps).
    """

    def __init__(self, count: int, size: int, *, orthogonal_map: OrthogonalMap, init: RotationInit,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.matrices = nn.ModuleList(_Rotation(size, orthogonal_map, device, dtype) for _ in range(count))
        if init == "random":
            reference = self.matrices[0].parametrizations.weight.original
            self.set(haar_rotations(count, size, dtype=reference.dtype, device=reference.device))

    @property
    def size(self) -> int:
        return self.matrices[0].parametrizations.weight.original.shape[-1]

    def matrix(self, task: int) -> Tensor:
        """R_task (computed once per step inside ``torch.nn.utils.parametrize.cached()``)."""
        return self.matrices[task].weight

    @property
    def weight(self) -> Tensor:
        """All K matrices stacked, (K, n, n)."""
        return torch.stack([rotation.weight for rotation in self.matrices])

    def set(self, rotations: Tensor) -> None:
        """Set the K matrices (through the parametrization's right inverse)."""
        expected = (len(self.matrices), self.size, self.size)
        if tuple(rotations.shape) != expected:
            raise ShapeMismatchError(f"Rotations should have shape {expected} (K, n, n). "
                                     f"Found {tuple(rotations.shape)}.")
        check_orthogonal(rotations)
        for rotation, value in zip(self.matrices, rotations.detach()):
            original = rotation.parametrizations.weight.original
            # Row-major, as a state_dict loads into: the layout of the base changes matmul rounding.
            rotation.weight = value.to(device=original.device, dtype=original.dtype).contiguous()


def check_orthogonal(rotations: Tensor, tolerance: float = 1e-4) -> None:
    """Raise ``ValueError`` unless every matrix in the batch is a rotation: ``R^T R = I`` and ``det R = +1``."""
    rotations = rotations.detach()
    eye = torch.eye(rotations.shape[-1], dtype=rotations.dtype, device=rotations.device)
    error = (rotations.mT @ rotations - eye).abs().amax()
    if not bool(error <= tolerance):
        raise ValueError(f"Rotations should be orthogonal matrices (R^T R = I); the largest deviation is "
                         f"{float(error):.3g}.")
    reflections = [k for k, matrix in enumerate(rotations) if torch.linalg.slogdet(matrix).sign < 0]
    if reflections:
        raise ValueError(f"Rotations should have determinant +1; matrices {reflections} are reflections "
                         "(det = -1). Flip the sign of one column of each to make it a rotation.")


def rotate(z: Tensor, rotation: Tensor, size: int, post_numel: int) -> Tensor:
    """``R z`` on the rotated dimensions of ``z``, viewed as (..., n, P); P trailing entries stay apart.

    Args:
        z: A tensor whose trailing dimensions hold n * P entries: the rotated block, then the
            ``post_shape`` block of P entries.
        rotation: (n, n), or (K, n, n) to rotate a leading K dimension of ``z`` task by task.
        size: n.
        post_numel: P.
    """
    rotation = rotation.to(z.dtype)
    if rotation.dim() == 2:
        blocks = z.reshape(-1, size, post_numel)
        rotated = torch.einsum("ij,bjp->bip", rotation, blocks)
    else:
        blocks = z.reshape(rotation.shape[0], -1, size, post_numel)
        rotated = torch.einsum("kij,kbjp->kbip", rotation, blocks)
    return rotated.reshape(z.shape)


def as_shape(value: int | Sequence[int], name: str, *, allow_empty: bool) -> tuple[int, ...]:
    """A shape argument as a tuple of positive ints, or ``ValueError`` naming the parameter."""
    shape = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        shape = tuple(int(d) for d in shape)
        valid = all(d > 0 for d in shape) and (allow_empty or len(shape) > 0)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        kind = "a positive int or a sequence of them" + ("" if allow_empty else " (at least one)")
        raise ValueError(f"Parameter `{name}` should be {kind}. Found `{name} = {value!r}`.")
    return shape
