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

pytestmark = pytest.mark.filterwarnings("ignore::mtlzoo.errors.ReusedBatchWarning")
"""``aggregate(grads, losses)``: a strategy that reads several batches reuses this one (test_multibatch.py)."""

VARIANTS: dict[str, list[dict]] = {"ls": [{"weights": [1.0, 2.0, 3.0]}, {"weights": [2.0, 2.0, 2.0]}]}
"""Non-default hyperparameters under which a strategy's claims are checked too (issue 7, item 24)."""


def instances() -> list[tuple[str, dict]]:
    return [(entry.name, kwargs) for entry in mtlzoo.list_strategies()
            for kwargs in [{}, *VARIANTS.get(entry.name, [])]]


CLAIMS = [(name, kwargs, claim) for name, kwargs in instances()
          for claim in sorted(mtlzoo.create(name, num_tasks=NUM_TASKS, **required_kwargs(name), **kwargs).properties)]
MATRICES = gradient_matrices()


def fresh_aggregate(name: str, kwargs: dict | None = None) -> Aggregate:
    def aggregate(grads: torch.Tensor, task_losses: torch.Tensor) -> torch.Tensor:
        strategy = mtlzoo.create(name, num_tasks=NUM_TASKS, **required_kwargs(name), **(kwargs or {}))
        return strategy.aggregate(grads, task_losses)

    return aggregate


def test_every_property_has_a_check() -> None:
    assert set(PROPERTY_ASSERTS) == set(PROPERTIES)


def test_unknown_properties_are_refused() -> None:
    with pytest.raises(ValueError, match="properties"):
        mtlzoo.StrategyInfo(name="x", kind="weighting", needs="losses", summary="x", properties=frozenset({"fast"}))


@pytest.mark.parametrize(("name", "kwargs", "claim"), CLAIMS, ids=lambda v: str(v) if not isinstance(v, dict) else
                         ",".join(f"{k}={w}" for k, w in v.items()) or "defaults")
@pytest.mark.parametrize("matrix", sorted(MATRICES))
def test_claimed_property_holds(name: str, kwargs: dict, claim: str, matrix: str) -> None:
    aggregate = fresh_aggregate(name, kwargs)
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


def test_instance_metadata_drops_a_claim_its_settings_break() -> None:
    """Issue 6: `ls` claimed permutation invariance for weights=[1, 2, 3], where it is false."""
    unequal = mtlzoo.create("ls", num_tasks=3, weights=[1.0, 2.0, 3.0])
    assert "permutation_invariant" not in unequal.properties
    with pytest.raises(AssertionError):
        PROPERTY_ASSERTS["permutation_invariant"](fresh_aggregate("ls", {"weights": [1.0, 2.0, 3.0]}),
                                                  MATRICES["generic"], losses())
    assert "permutation_invariant" in mtlzoo.create("ls", num_tasks=3, weights=[2.0, 2.0, 2.0]).properties


def test_a_composed_strategy_derives_its_metadata() -> None:
    """Issue 6: a strategy built on another (here: its weights scaled by a constant) derives request and properties."""
    from mtlzoo.roles import WeightingStrategy
    from mtlzoo.strategy import StrategyInfo

    class Scaled(WeightingStrategy):
        info = StrategyInfo(name="test_scaled", kind="weighting", summary="an inner weighting, scaled",
                            properties=frozenset({"permutation_invariant", "scale_linear"}))

        def __init__(self, num_tasks: int, inner: str = "ls", factor: float = 2.0, **inner_kwargs: object) -> None:
            super().__init__(num_tasks)
            self.inner = mtlzoo.create(inner, num_tasks=num_tasks, **inner_kwargs)
            self.factor = factor

        @property
        def request(self):  # type: ignore[no-untyped-def]
            return self.inner.request

        @property
        def properties(self) -> frozenset[str]:
            return self.info.properties & self.inner.properties

        def weights(self, task_losses: torch.Tensor) -> torch.Tensor:
            return self.factor * self.inner.weights(task_losses)

    assert "permutation_invariant" not in Scaled(3, weights=[1.0, 2.0, 3.0]).properties
    assert Scaled(3).properties == {"permutation_invariant", "scale_linear"}
    assert Scaled(3, inner="rotograd", rotation_shape=2).request.where == "representation"
