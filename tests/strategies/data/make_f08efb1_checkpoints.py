"""Writes f08efb1_checkpoints.pt: the loss weightings' state_dicts as release f08efb1 saved them, and what it did next.

Run with the package at f08efb1 on the path (``git archive f08efb1 mtlzoo | tar -x -C /tmp/old`` then
``PYTHONPATH=/tmp/old python tests/strategies/data/make_f08efb1_checkpoints.py``); the test that reads it is
tests/strategies/test_weighting_checkpoints.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LOSSES = [torch.tensor([0.9, 2.0, 0.3]), torch.tensor([0.8, 1.5, 0.35]), torch.tensor([0.7, 1.6, 0.2])]
NEXT = torch.tensor([0.6, 1.4, 0.25])
CASES: dict[str, dict[str, Any]] = {
    "ls": {"weights": [1.0, 2.0, 0.5]}, "si": {}, "gls": {}, "uw": {}, "imtl_l": {}, "rlw": {"seed": 3},
    "dwa": {}, "stch": {"warmup_epochs": 1}, "gradnorm": {"alpha": 1.5}, "famo": {},
}


def history(name: str, strategy: Any) -> None:
    """Steps (and epochs) that leave every part of the state away from its initial value."""
    with torch.no_grad():
        for parameter in strategy.parameters():
            parameter.copy_(torch.tensor([0.3, -0.2, 0.1]))
    for losses in LOSSES:
        strategy.weights(losses)
        strategy.advance()
        if name == "famo":
            strategy.post_step(losses * 0.9)
        strategy.end_epoch()
    strategy.weights(LOSSES[0] * 1.1)  # a step's losses staged and committed, not yet used (FAMO, DWA)
    strategy.advance()


def main() -> None:
    import mtlzoo

    out: dict[str, Any] = {}
    for name, kwargs in CASES.items():
        strategy = mtlzoo.create(name, num_tasks=3, **kwargs)
        history(name, strategy)
        saved = {key: value.clone() if isinstance(value, torch.Tensor) else value
                 for key, value in strategy.state_dict().items()}
        weights = strategy.weights(NEXT).clone()
        strategy.advance()
        after: Any = None
        if name == "famo":
            strategy.post_step(NEXT * 0.8)
            after = torch.tensor(strategy._state["logits"], dtype=torch.float64)
        out[name] = {"kwargs": kwargs, "state_dict": saved, "weights": weights, "logits_after": after}
    torch.save(out, Path(__file__).with_name("f08efb1_checkpoints.pt"))


if __name__ == "__main__":
    main()
