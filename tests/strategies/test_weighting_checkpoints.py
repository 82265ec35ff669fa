"""Checkpoints of the loss weightings written by release f08efb1 (before the state was declared) load and resume.

The data file holds each strategy's state_dict as f08efb1 saved it after a few steps and epochs, the weights f08efb1
gave at the next step and, for FAMO, its logits after the next post-step update (made by
data/make_f08efb1_checkpoints.py under that release's code).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mtlzoo

DATA = torch.load(Path(__file__).with_name("data") / "f08efb1_checkpoints.pt", weights_only=False)
NEXT = torch.tensor([0.6, 1.4, 0.25])


@pytest.mark.parametrize("name", sorted(DATA))
def test_a_checkpoint_of_f08efb1_loads_and_gives_the_same_next_step(name: str) -> None:
    case = DATA[name]
    strategy = mtlzoo.create(name, num_tasks=3, **case["kwargs"])
    strategy.load_state_dict(case["state_dict"])
    torch.testing.assert_close(strategy.weights(NEXT), case["weights"], rtol=1e-6, atol=1e-7)
    if name == "famo":  # f08efb1 kept the logits and Adam's moments on the host in float64: they load exactly
        strategy.advance()
        strategy.post_step(NEXT * 0.8)
        assert strategy.logits.dtype == torch.float64
        # the same float64 Adam step (0.025 in size) to rounding: torch's lerp and f08efb1's host loop differ in ulps
        torch.testing.assert_close(strategy.logits, case["logits_after"], rtol=0, atol=1e-13)


def test_the_checkpoints_are_not_at_the_initial_state() -> None:
    """The history left each stateful strategy's state away from its initial values (so loading means something)."""
    for name in ("dwa", "stch", "gradnorm", "famo", "rlw", "uw", "imtl_l"):
        case = DATA[name]
        fresh = mtlzoo.create(name, num_tasks=3, **case["kwargs"])
        assert not torch.allclose(fresh.weights(NEXT), case["weights"]), name
