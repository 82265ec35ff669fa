"""RLW, random loss weighting (Lin et al., TMLR 2022): softmax of a normal draw, from the strategy's generator."""

from __future__ import annotations

import copy

import pytest
import torch

import mtlzoo
from mtlzoo.strategies.rlw import RandomLossWeighting
from tests.strategies import _regression


@pytest.mark.reference
def test_same_draws_as_torchjd_random() -> None:
    """Against torchjd 0.18's Random (softmax of randn from torch's global generator): seeded alike, the same
    weights draw after draw, one draw per optimizer step."""
    scalarization = pytest.importorskip("torchjd.scalarization")
    rlw = RandomLossWeighting(4, seed=123)
    torch.manual_seed(123)
    reference = scalarization.Random()
    for _ in range(5):
        leaf = torch.ones(4, requires_grad=True)
        (expected,) = torch.autograd.grad(reference(leaf), leaf)
        torch.testing.assert_close(rlw.weights(torch.ones(4)), expected)
        rlw.advance()


def test_the_distribution_is_the_papers() -> None:
    """Positive weights summing to 1, each of mean 1/K over many draws, as softmax of N(0, I) (for K = 3 the
    mean of each weight is 1/3 by symmetry; its spread is about 0.2)."""
    rlw = RandomLossWeighting(3, seed=0)
    draws = []
    for _ in range(4000):
        draws.append(rlw.weights(torch.ones(3)))
        rlw.advance()
    draws = torch.stack(draws)
    assert bool((draws > 0).all())
    torch.testing.assert_close(draws.sum(1), torch.ones(4000))
    torch.testing.assert_close(draws.mean(0), torch.full((3,), 1 / 3), atol=0.01, rtol=0)
    assert 0.15 < float(draws.std(0).mean()) < 0.25


def test_one_draw_per_step_a_skipped_step_draws_again_and_a_checkpoint_resumes_the_sequence() -> None:
    rlw = RandomLossWeighting(3, seed=7)
    first = rlw.weights(torch.ones(3))
    torch.testing.assert_close(rlw.weights(torch.ones(2), torch.tensor([0, 2])), first[[0, 2]])  # same step
    rlw.discard()
    torch.testing.assert_close(rlw.weights(torch.ones(3)), first)  # the skipped step's draw comes again
    rlw.advance()
    checkpoint = copy.deepcopy(rlw.state_dict())
    expected = []
    for _ in range(3):
        expected.append(rlw.weights(torch.ones(3)))
        rlw.advance()
    resumed = RandomLossWeighting(3, seed=99)
    resumed.load_state_dict(checkpoint)
    for weights in expected:
        torch.testing.assert_close(resumed.weights(torch.ones(3)), weights)
        resumed.advance()


def test_deterministic_given_the_torch_seed_and_apart_from_the_global_generator() -> None:
    torch.manual_seed(5)
    a = mtlzoo.create("rlw", num_tasks=3)
    torch.manual_seed(5)
    b = mtlzoo.create("rlw", num_tasks=3)
    state = torch.get_rng_state()
    torch.testing.assert_close(a.weights(torch.ones(3)), b.weights(torch.ones(3)))
    assert torch.equal(state, torch.get_rng_state())


def test_on_the_regression_the_weights_change_every_step() -> None:
    """The issue's direction for RLW: a fresh draw at every step (no two steps alike), each on the simplex."""
    weights = torch.stack(_regression.trained("rlw").weights)
    torch.testing.assert_close(weights.sum(1), torch.ones(weights.shape[0]))
    assert bool((weights[1:] != weights[:-1]).any(1).all())
    assert float(weights.std(0).min()) > 0.1
