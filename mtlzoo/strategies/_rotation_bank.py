"""K learnable rotations of a representation: torch's orthogonal parametrization, or a retraction.

With ``orthogonal_map`` one of torch's maps (``"matrix_exp"``, ``"cayley"``, ``"householder"``) each matrix lives under
``torch.nn.utils.parametrizations.orthogonal`` with the trivialization, so ``R_k = B_k f(A_k)``: ``B_k`` a fixed base (a
buffer), ``f`` the orthogonal map, ``A_k`` the unconstrained parameter an optimizer updates; ``R_k`` is computed once
per step under ``torch.nn.utils.parametrize.cached()``, an O(n^3) map and its backward every step.

With ``orthogonal_map="retraction"`` the matrix ``R_k`` is a buffer, used as is in the forward, and the parameter is a
tangent step ``X_k`` in the coordinates of torch's trivialization (``A_k = tril(X_k) - tril(X_k)^T``, skew-symmetric) at
the current rotation: ``R_k (I + A_k)`` to first order. Only the ``n (n - 1) / 2`` entries below the diagonal of ``X_k``
move ``A_k``, so the parameter holds just those, row by row (:func:`lower_indices`). ``X_k`` is zero at every forward,
so its gradient is the Riemannian gradient in closed form (``tril(S - S^T)``, ``S = R_k^T dL/dR_k``), and after each
optimizer step :meth:`RotationBank.retract` re-centres the chart at the new rotation, ``X_k``'s optimizer state kept: a
dynamic trivialization (Lezcano-Casado, "Trivializations for gradient-based optimization on manifolds", NeurIPS 2019),
two batched n x n products per step. The rotation objective's gradient is in closed form: :class:`RotationObjective`
(torch's maps), :class:`TangentObjective` (the retraction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from mtlzoo.errors import ShapeMismatchError

OrthogonalMap = Literal["matrix_exp", "cayley", "householder", "retraction"]
RotationInit = Literal["random", "identity"]
ORTHOGONAL_MAPS: tuple[OrthogonalMap, ...] = ("matrix_exp", "cayley", "householder", "retraction")
POLAR_TOLERANCE = 1e-5
"""Newton-Schulz stops once ``||R^T R - I||_2`` is below this, bounded by the infinity norm (float32)."""
CHECK_EVERY = 16
"""Retraction: steps between two measurements of ``R^T R - I`` (a projection when it exceeds tolerance)."""
POLAR_FALLBACK = 0.5
"""Above this bound on ``||R^T R - I||_2``, the polar factor comes from an SVD instead of Newton-Schulz."""
ROTATION_INITS: tuple[RotationInit, ...] = ("random", "identity")


def haar_rotations(count: int, size: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Tensor:
    """``count`` independent rotations drawn from the Haar (uniform) measure on SO(size): QR of a Gaussian matrix,
    the signs of R's diagonal moved into Q (Haar on O(n), Mezzadri 2007), one column flipped where det = -1."""
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


@lru_cache(maxsize=32)
def lower_indices(size: int, device: torch.device) -> Tensor:
    """The flat indices ``i * n + j`` (``i > j``) of the entries below the diagonal of an n x n matrix, row by row
    (made once per size and device, outside inference mode)."""
    with torch.inference_mode(False):
        rows, cols = torch.tril_indices(size, size, -1, device=device)
        return rows * size + cols


def skew_from_tangents(tangents: Tensor, size: int) -> Tensor:
    """``A = tril(X) - tril(X)^T`` (..., n, n) from the packed entries below the diagonal (..., n (n - 1) / 2)."""
    flat = tangents.new_zeros(*tangents.shape[:-1], size * size)
    lower = flat.index_copy_(-1, lower_indices(size, tangents.device), tangents).unflatten(-1, (size, size))
    return lower - lower.mT


def packed_lower(matrices: Tensor) -> Tensor:
    """The entries below the diagonal of (..., n, n) matrices, packed row by row (..., n (n - 1) / 2)."""
    size = matrices.shape[-1]
    return matrices.flatten(-2).index_select(-1, lower_indices(size, matrices.device))


class _Retracted(nn.Module):
    """One rotation ``weight`` (a buffer) and its tangent step ``tangent`` (a parameter, zero between steps):
    the n (n - 1) / 2 entries of ``X`` below the diagonal, packed row by row."""

    def __init__(self, size: int, device: Any, dtype: Any) -> None:
        super().__init__()
        self.register_buffer("rotation", torch.eye(size, device=device, dtype=dtype))
        self.tangent = nn.Parameter(torch.zeros(size * (size - 1) // 2, device=device, dtype=dtype))

    @property
    def weight(self) -> Tensor:
        return self.rotation

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = state_dict.get(prefix + "tangent")
        if saved is not None and saved.dim() == 2:  # a checkpoint from before the packing: the full n x n X
            state_dict[prefix + "tangent"] = packed_lower(saved)
        super()._load_from_state_dict(state_dict, prefix, *args)


class RotationBank(nn.Module):
    """K orthogonal n x n matrices, each under torch's orthogonal parametrization or a plain retracted one.

    One module per task (``mtl[k]`` owns task k's; a batched ``matrix_exp`` would run every matrix at
    the degree its largest norm needs); the retraction's products are batched over the K.
    """

    def __init__(self, count: int, size: int, *, orthogonal_map: OrthogonalMap, init: RotationInit,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.retracted = orthogonal_map == "retraction"
        if self.retracted:
            self.matrices = nn.ModuleList(_Retracted(size, device, dtype) for _ in range(count))
        else:
            self.matrices = nn.ModuleList(_Rotation(size, orthogonal_map, device, dtype) for _ in range(count))
        if init == "random":
            reference = self._stored(0)
            self.set(haar_rotations(count, size, dtype=reference.dtype, device=reference.device))

    def _stored(self, task: int) -> Tensor:
        """Task ``task``'s stored tensor: the rotation itself (retraction) or the parametrization's original."""
        module = self.matrices[task]
        return module.rotation if self.retracted else module.parametrizations.weight.original

    @property
    def size(self) -> int:
        return self._stored(0).shape[-1]

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
        if self.retracted:
            with torch.no_grad():
                for module, value in zip(self.matrices, rotations.detach()):
                    module.rotation.copy_(value)
                    module.tangent.zero_()
            return
        for rotation, value in zip(self.matrices, rotations.detach()):
            original = rotation.parametrizations.weight.original
            # Row-major, as a state_dict loads into: the layout of the base changes matmul rounding.
            rotation.weight = value.to(device=original.device, dtype=original.dtype).contiguous()

    @torch.no_grad()
    def retract(self, check: bool) -> None:
        """After an optimizer step: ``R <- R (I + A + A^2 / 2)``, tangents back to zero (torch's maps: no-op).

        The rotations are projected (:func:`polar_project`) when ``check`` is set or the step was large: the truncation
        leaves ``M^T M - I = A^4 / 4`` (A skew-symmetric), of 2-norm at most ``||A^2||_F^2 / 4``, read from the ``A^2``
        the step forms anyway; above ``POLAR_TOLERANCE / CHECK_EVERY`` they are projected at once, so that the errors of
        the steps between two checks stay within the tolerance. (``||A||_F^4 / 4``, about n / 4 times looser for an Adam
        step, would project after every step at n = 512.)
        """
        if not self.retracted:
            return
        with torch.autocast(self.matrices[0].rotation.device.type, enabled=False):  # float32 even inside autocast
            self._retract(check)

    def _retract(self, check: bool) -> None:
        rotations = torch.stack([module.rotation for module in self.matrices])
        tangents = [module.tangent for module in self.matrices]
        lower = torch.stack(tangents).to(rotations.dtype)
        size = math.sqrt(2) * float(torch.linalg.vector_norm(lower, dim=-1).amax())  # ||A||_F
        if size == 0 and not check:  # no step (rotations left out of the optimizer): R (I + 0) = R
            torch._foreach_zero_(tangents)
            return
        truncation = 0.0
        if size != 0:
            skew = skew_from_tangents(lower, rotations.shape[-1])
            square = torch.bmm(skew, skew)
            truncation = float(torch.linalg.vector_norm(square, dim=(-2, -1)).amax()) ** 2 / 4
            rotations = torch.baddbmm(rotations, rotations, square.mul_(0.5).add_(skew))  # R + R (A + A^2 / 2)
        if check or not truncation <= POLAR_TOLERANCE / CHECK_EVERY:
            rotations = polar_project(rotations)
        for module, value in zip(self.matrices, rotations):
            module.rotation.copy_(value)
        torch._foreach_zero_(tangents)


def polar_project(matrices: Tensor, tolerance: float = POLAR_TOLERANCE) -> Tensor:
    """The orthogonal polar factors of nearly orthogonal matrices (..., n, n), batched.

    Newton-Schulz: ``X <- X (3I - G) / 2`` with ``G = X^T X``, so every eigenvalue ``e`` of ``E = G - I`` becomes ``e^2
    (3 - e) / 4``: quadratic convergence, two products per iteration, singular vectors and the determinant's sign kept.
    ``||E||_2`` is bounded by the infinity norm of ``E``; the loop stops once the bound guaranteed afterwards, ``b^2
    (3 + b) / 4``, is below ``tolerance`` (after a small optimizer step: one iteration). Above ``POLAR_FALLBACK`` (a
    huge step) the polar factor comes from an SVD, flipped to determinant +1 if the step crossed into the reflections.
    Computed in float32 at least.
    """
    dtype = matrices.dtype
    x = matrices.to(torch.promote_types(dtype, torch.float32))
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(30):
        error = x.mT @ x - eye
        bound = float(error.abs().sum(-1).amax())
        if bound <= tolerance or math.isnan(bound):  # NaN: left as is, for the caller's checks to see
            break
        if not bound < POLAR_FALLBACK:  # also NaN
            return _svd_rotation(x).to(dtype)
        x = x - 0.5 * (x @ error)
        if bound * bound * (3 + bound) / 4 <= tolerance:
            break
    return x.to(dtype)


def _svd_rotation(matrices: Tensor) -> Tensor:
    """The rotation nearest each matrix: ``U V^T`` from its SVD, the last column of U flipped where det < 0."""
    u, _, vh = torch.linalg.svd(matrices)
    signs = torch.linalg.det(u @ vh).sign()
    u = u.clone()
    u[..., :, -1] *= torch.where(signs < 0, -1.0, 1.0).to(u.dtype).unsqueeze(-1)
    return u @ vh


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
    """``R z`` on the rotated dimensions of ``z``: its trailing ``size * post_numel`` entries viewed as (n, P), the
    ``post_shape`` block of P entries apart; ``rotation`` is (n, n), or (K, n, n) for a leading K dimension of ``z``."""
    rotation = rotation.to(z.dtype)
    if post_numel == 1:  # flat: one (batch, n) x (n, n) product per matrix, with a plain matmul backward
        rows = z.reshape(-1, size) if rotation.dim() == 2 else z.reshape(rotation.shape[0], -1, size)
        return (rows @ rotation.mT).reshape(z.shape)
    if rotation.dim() == 2:
        blocks = z.reshape(-1, size, post_numel)
        rotated = torch.einsum("ij,bjp->bip", rotation, blocks)
    else:
        blocks = z.reshape(rotation.shape[0], -1, size, post_numel)
        rotated = torch.einsum("kij,kbjp->kbip", rotation, blocks)
    return rotated.reshape(z.shape)


class RotationObjective(torch.autograd.Function):
    r"""``sum_k reduce_b || R_k v_b - R_k^{sg} g_{k,b} ||^2`` with its gradient in closed form.

    The residual ``r_k = R_k (v - g_k)`` is one product per task, and the gradient is
    ``d/dR_k = 2 reduce_b r_{k,b} v_b^T`` (``R^{sg}`` stops gradients): two ``B n^2`` products per task.
    """

    @staticmethod
    def forward(ctx: Any, rotations: Tensor, reference: Tensor, blocks: Tensor, mean: bool) -> Tensor:
        # rotations (K, n, n), reference (B, n, P), blocks (K, B, n, P)
        num, batch, size, post = blocks.shape
        difference = reference.unsqueeze(0) - blocks
        if post == 1:
            residual = torch.bmm(difference.view(num, batch, size), rotations.mT)  # rows r_{k,b}^T
        else:
            residual = torch.einsum("kij,kbjp->kbip", rotations, difference)
        ctx.save_for_backward(residual, reference)
        ctx.batch_scale = 1 / batch if mean else 1.0
        return residual.pow(2).sum() * ctx.batch_scale

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        residual, reference = ctx.saved_tensors
        if residual.dim() == 3:
            grad = residual.mT @ reference.view(reference.shape[0], -1)
        else:
            grad = torch.einsum("kbip,bjp->kij", residual, reference)
        return grad * (2 * ctx.batch_scale * grad_output), None, None, None


class TangentObjective(torch.autograd.Function):
    r"""The rotation objective as a function of the tangent parameters ``X_k`` (``orthogonal_map="retraction"``).

    At ``X_k = 0`` (``R_k`` orthogonal), ``||R_k (v - g_k)||^2 = ||v - g_k||^2`` and ``dL/dA_k = R_k^T dL/dR_k = 2
    M_k``, ``M_k = reduce_b (v_b - g_{k,b}) v_b^T``: no product with ``R_k``. The gradient ``tril(2 M_k - 2 M_k^T)`` is,
    as ``v v^T`` is symmetric, ``tril(2 N_k^T - 2 N_k)`` with ``N_k = reduce_b g_{k,b} v_b^T``: one ``B n^2`` product
    per task, packed to the entries below the diagonal. The value is ``K ||v||^2 - 2 K <v, mean_k g_k> + sum_k
    ||g_k||^2``, from the norms.
    """

    @staticmethod
    def forward(ctx: Any, reference: Tensor, blocks: Tensor, norms: Tensor, mean: Tensor, batch_mean: bool,
                *tangents: Tensor) -> Tensor:
        # reference v (B, n, P), blocks g (K, B, n, P), norms ||g_k|| (K,), mean = mean_k g_k (B, n, P)
        ctx.save_for_backward(reference, blocks)
        ctx.batch_scale = 1 / blocks.shape[1] if batch_mean else 1.0
        ctx.tangent_dtype = tangents[0].dtype
        flat, average = reference.reshape(-1), mean.reshape(-1)
        value = blocks.shape[0] * (torch.dot(flat, flat) - 2 * torch.dot(flat, average)) + norms.square().sum()
        return value * ctx.batch_scale

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        reference, blocks = ctx.saved_tensors
        num, batch, size, post = blocks.shape
        weighted = reference * (2 * ctx.batch_scale * grad_output)
        if post == 1:
            products = blocks.view(num, batch, size).mT @ weighted.view(batch, size)
        else:
            products = torch.einsum("kbip,bjp->kij", blocks, weighted)
        grad = packed_lower(products.mT - products).to(ctx.tangent_dtype)
        return (None, None, None, None, None, *grad.unbind())


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
