"""The Jacobian of the losses on the shared parameters, from the per-task gradients on ``z``.

The K vector-Jacobian products ``(dz/dθ)^T g_k`` run as one vmapped backward, in chunks of tasks, or as a loop. The
K x n Jacobian is formed whatever the chunk, which bounds only the batched backward's working memory
(docs/reference/wrapper.md, "Memory and jacobian_chunk_size", has the measured peaks).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mtlzoo.engine.internals import CompiledGraphError, is_donated_buffer_error


@dataclass
class JacobianRoute:
    """What one wrapper's backbone taught the engine: whether vmap could not batch its backward.

    Attributes:
        vmap_failed: The error vmap gave the first time (the loop runs from then on), or ``None``.
    """

    vmap_failed: str | None = None


def parameter_jacobian(zs: Sequence[Tensor] | Tensor, grads: Sequence[Tensor] | Tensor, params: Sequence[Tensor], *,
                       batched: bool = True, retain_graph: bool = True, chunk_size: int | None = None,
                       route: JacobianRoute | None = None) -> Tensor:
    """The K x n Jacobian of the losses w.r.t. ``params``, from ``G = dL/dz`` by the chain rule.

    Row k is ``sum_r (dz_r/dθ)^T G_r[k]`` over the forwards ``r``, flattened and concatenated over
    ``params`` in order; a parameter that no task reaches gives zero columns, and a parameter that
    task k does not reach zeros in row k. The blocks of :func:`jacobian_blocks`, side by side.

    Args:
        zs: The backbone output(s) the heads' leaves were detached from.
        grads: ``G`` per output, each of shape ``(K, *z.shape)``.
        params: The shared parameters θ.
        batched: ``False`` is ``chunk_size=1``: one backward per task.
        retain_graph: Keep the backbone's graph (the step's final backward still needs it).
        chunk_size: Tasks per vmapped backward: ``1`` is the loop; ``None`` is the loop on the CPU (measured
            faster there than the batched backward) and all K at once on an accelerator.
        route: Where a vmap failure is remembered (one per wrapper); ``None`` remembers nothing.
    """
    blocks, matrix = jacobian_blocks(zs, grads, params, batched=batched, chunk_size=chunk_size, route=route)
    if matrix is not None:
        return matrix
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


def jacobian_blocks(zs: Sequence[Tensor] | Tensor, grads: Sequence[Tensor] | Tensor, params: Sequence[Tensor], *,
                    batched: bool = True, chunk_size: int | None = None, route: JacobianRoute | None = None
                    ) -> tuple[list[Tensor], Tensor | None]:
    """The Jacobian of the losses w.r.t. ``params`` as one K x numel block per parameter, and the K x n
    matrix the blocks are views of when it was filled in chunks (``None`` when the blocks are autograd's own).

    The K vector-Jacobian products run as one vmapped backward (``is_grads_batched``), or as ``ceil(K / chunk_size)`` of
    them. Where vmap cannot batch an operation of the backbone (a custom ``autograd.Function`` without a vmap rule, an
    ``.item()`` in a backward, memory), the per-task loop runs instead and is remembered in ``route``, with one warning.
    The backbone's graph is kept (the step's final backward still needs it). Arguments as :func:`parameter_jacobian`.

    In chunks, each chunk's rows are written into one K x n matrix as they come (the blocks are
    views of it), so the memory beyond the Jacobian is one chunk's rows, not a second Jacobian.
    """
    zs = [zs] if isinstance(zs, Tensor) else list(zs)
    grads = [grads] if isinstance(grads, Tensor) else list(grads)
    params = list(params)
    num_tasks = grads[0].shape[0]
    chunk = chunk_size
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"Parameter `chunk_size` should be a positive int or None. Found `chunk_size = {chunk!r}`.")
    if chunk is None:  # on the CPU the loop beat the batched backward (docs/performance.md), elsewhere batch all
        chunk = 1 if grads[0].device.type == "cpu" else num_tasks
    chunk = min(chunk, num_tasks)
    if not batched or (route is not None and route.vmap_failed is not None):
        chunk = 1
    sizes = [p.numel() for p in params]
    matrix: Tensor | None = None

    def store(first: int, rows: Sequence[Tensor | None]) -> None:
        nonlocal matrix
        if matrix is None:
            dtype = next((row.dtype for row in rows if row is not None), params[0].dtype if params else torch.float32)
            matrix = grads[0].new_zeros(num_tasks, sum(sizes), dtype=dtype)
        if rows and all(row is not None and row.dtype == matrix.dtype for row in rows):  # one copy kernel a chunk
            count = rows[0].shape[0]  # type: ignore[union-attr]
            torch.cat([row.reshape(count, -1) for row in rows], dim=1, out=matrix[first:first + count])  # type: ignore[union-attr]
            return
        offset = 0
        for row, size in zip(rows, sizes):
            if row is not None:
                matrix[first:first + row.shape[0], offset:offset + size] = row.reshape(row.shape[0], -1)
            offset += size

    for first in range(0, num_tasks, max(chunk, 1)):
        count = min(chunk, num_tasks - first)
        if count > 1:
            try:
                rows = torch.autograd.grad(zs, params, grad_outputs=[g[first:first + count] for g in grads],
                                           retain_graph=True, is_grads_batched=True, allow_unused=True)
            except (RuntimeError, NotImplementedError) as error:
                if is_donated_buffer_error(error):
                    raise _donated_buffers(error) from error
                _remember_vmap_failure(route, error)
                chunk = 1
            else:
                if count == num_tasks:
                    return _blocks(rows, params, count), None
                store(first, rows)
                continue
        for task in range(first, num_tasks if chunk == 1 else first + count):
            try:
                row = torch.autograd.grad(zs, params, grad_outputs=[g[task] for g in grads], retain_graph=True,
                                          allow_unused=True)
            except RuntimeError as error:
                if is_donated_buffer_error(error):
                    raise _donated_buffers(error) from error
                raise
            store(task, [None if g is None else g.unsqueeze(0) for g in row])
        if chunk == 1:
            break
    if matrix is None:  # no task
        matrix = grads[0].new_zeros(num_tasks, sum(sizes))
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [matrix[:, offset:offset + size] for offset, size in zip(offsets, sizes)], matrix


def _donated_buffers(error: BaseException) -> CompiledGraphError:
    return CompiledGraphError(
        "The backbone was compiled (torch.compile) with donated buffers, which allow one backward only, and the "
        "Jacobian on the shared parameters takes a backward per task before the step's own. Compile with "
        "torch._functorch.config.donated_buffer = False (set before the first compiled call), or use the "
        f"strategy's representation target (target='representation'), which back-propagates the backbone once. "
        f"({type(error).__name__}: {str(error).splitlines()[0]})")


def _remember_vmap_failure(route: JacobianRoute | None, error: BaseException) -> None:
    """Warn that vmap could not batch the backbone's backward, and send ``route`` to the loop from now on."""
    if route is not None:
        route.vmap_failed = str(error)
    warnings.warn(f"The batched (vmapped) Jacobian failed on this backbone ({type(error).__name__}: "
                  f"{str(error).splitlines()[0] if str(error) else ''}); the Jacobian is computed with one backward "
                  "per task from now on (same values, K backwards). Said once per wrapper.",
                  RuntimeWarning, stacklevel=4)


def _blocks(rows: Sequence[Tensor | None], params: Sequence[Tensor], num_tasks: int) -> list[Tensor]:
    return [row.reshape(num_tasks, -1) if row is not None else p.new_zeros(num_tasks, p.numel())
            for row, p in zip(rows, params)]
