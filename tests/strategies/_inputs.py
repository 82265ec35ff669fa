"""Seeded K x n gradient matrices and loss vectors on which strategy properties are checked."""

from __future__ import annotations

import torch

NUM_TASKS = 3


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gradient_matrices() -> dict[str, torch.Tensor]:
    """Named (K, n) matrices: generic, conflicting, zero, rank-deficient and widely scaled."""
    generic = torch.randn(NUM_TASKS, 7, generator=_generator(0))
    direction = torch.randn(7, generator=_generator(1))
    return {
        "generic": generic,
        "conflicting": torch.stack([direction, -0.5 * direction, torch.randn(7, generator=_generator(2))]),
        "zero": torch.zeros(NUM_TASKS, 7),
        "rank_one": torch.outer(torch.tensor([1.0, 2.0, 0.5]), direction),
        "tiny": 1e-6 * generic,
        "huge": 1e6 * generic,
    }


def losses() -> torch.Tensor:
    return torch.tensor([0.7, 1.3, 2.1])
