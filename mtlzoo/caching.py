"""``mtlzoo.cached``: compute parametrized tensors (RotoGrad's rotations) once per step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.nn.utils import parametrize


@contextlib.contextmanager
def cached() -> Iterator[None]:
    """Within the block, every parametrized tensor (each strategy's rotations) is computed once.

    Wrap the forward and the backward of one step in it, as with ``rotograd.cached()``: the K
    rotation matrices are then computed once per step instead of once in the forward and once in
    the backward. Nested blocks are fine; the cache is cleared when the outermost one exits.

    Example:
        ```python
        with mtlzoo.cached():
            predictions = mtl(x)
            mtl.backward(losses(predictions))
        optimizer.step()
        ```
    """
    with parametrize.cached():
        yield
