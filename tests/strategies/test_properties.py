"""Every property a registered strategy claims in its metadata holds (plugins included).

Checked on the Jacobian form of ``aggregate`` (K x n gradients), each call on a fresh instance so
that running state plays no part, over the seeded matrices of ``_inputs``.
"""

from __future__ import annotations

import pytest
import torch

import mtlzoo
from mtlzoo.strategy import PROPERTIES
from tests.helpers import required_kwargs
from tests.strategies._asserts import PROPERTY_ASSERTS, Aggregate, assert_finite
from tests.strategies._inputs import NUM_TASKS, gradient_matrices, losses

CLAIMS = [(entry.name, claim) for entry in mtlzoo.list_strategies() for claim in sorted(entry.info.properties)]
MATRICES = gradient_matrices()


def fresh_aggregate(name: str) -> Aggregate:
    def aggregate(grads: torch.Tensor, task_losses: torch.Tensor) -> torch.Tensor:
        return mtlzoo.create(name, num_tasks=NUM_TASKS, **required_kwargs(name)).aggregate(grads, task_losses)

    return aggregate


def test_every_property_has_a_check() -> None:
    assert set(PROPERTY_ASSERTS) == set(PROPERTIES)


def test_unknown_properties_are_refused() -> None:
    with pytest.raises(ValueError, match="properties"):
        mtlzoo.StrategyInfo(name="x", kind="weighting", needs="losses", summary="x", properties=frozenset({"fast"}))


@pytest.mark.parametrize(("name", "claim"), CLAIMS)
@pytest.mark.parametrize("matrix", sorted(MATRICES))
def test_claimed_property_holds(name: str, claim: str, matrix: str) -> None:
    aggregate = fresh_aggregate(name)
    assert_finite(aggregate, MATRICES[matrix], losses())
    PROPERTY_ASSERTS[claim](aggregate, MATRICES[matrix], losses())


def test_the_checks_can_fail() -> None:
    """A deliberately wrong aggregate trips each check (so a passing claim means something)."""

    def first_minus_rest(grads: torch.Tensor, task_losses: torch.Tensor) -> torch.Tensor:
        return grads[0] - grads[1:].sum(0) + 1.0

    grads = MATRICES["conflicting"]
    for check in PROPERTY_ASSERTS.values():
        with pytest.raises(AssertionError):
            check(first_minus_rest, grads, losses())
