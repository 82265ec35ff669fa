"""Random loss weighting: fresh random weights at every step, from the strategy's own generator."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlzoo.roles.weighting import LossWeighting
from mtlzoo.strategy import Paper, StrategyInfo, check_int

RLW_PAPER = Paper(
    authors=("Baijiong Lin", "Feiyang Ye", "Yu Zhang", "Ivor W. Tsang"),
    title="Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning", venue="TMLR",
    year=2022, url="https://arxiv.org/abs/2111.10603",
)


class RandomLossWeighting(LossWeighting):
    r"""Random loss weighting (RLW): ``w = softmax(eps)``, ``eps ~ N(0, I_K)`` drawn anew every optimizer step.

    Paper: Lin, Ye, Zhang & Tsang, *Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning*, TMLR 2022 (https://arxiv.org/abs/2111.10603), Algorithm 1 with its
    default distribution (normal, normalised by a softmax, so the weights are positive and sum to
    1). One draw per optimizer step: micro-batches of a step share it, and a step that a
    ``GradScaler`` skips draws the same weights again. An absent task's weight is drawn and unused.

    The draws come from the strategy's own ``torch.Generator``, whose state is in ``state_dict()``
    (a resumed run draws what the uninterrupted run would have). It is seeded from ``seed`` or,
    by default, from torch's global generator at construction (deterministic given the torch seed).

    Args:
        seed: Seed of the strategy's generator; ``None`` draws one from torch's global generator.

    Example:
        >>> import torch, mtlzoo
        >>> rlw = mtlzoo.create("rlw", num_tasks=3, seed=0)
        >>> w = rlw.weights(torch.ones(3))
        >>> bool(torch.isclose(w.sum(), torch.tensor(1.0)))
        True
    """

    info = StrategyInfo(
        name="rlw", aliases=("random", "random_loss_weighting"),
        summary="Random weights softmax(N(0, I)) drawn anew at every optimizer step.", paper=RLW_PAPER, stochastic=True,
        cost="backward", original_code="https://github.com/median-research-group/LibMTL",
    )
    unchecked_settings = ("seed",)
    """The generator's state in a checkpoint replaces whatever ``seed`` started it."""

    def __init__(self, num_tasks: int, seed: int | None = None) -> None:
        super().__init__(num_tasks)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        check_int("seed", seed, 0)
        self.declare_state(generator=_state_bytes(torch.Generator().manual_seed(seed)))

    def draw(self) -> Tensor:
        """The K weights of the current step: drawn from the committed generator state, the same until
        :meth:`advance` (which commits the generator's state after the draw)."""
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(self.state.committed("generator")), dtype=torch.uint8))
        weights = torch.softmax(torch.randn(self.num_tasks, generator=generator), dim=0)
        self.state.generator = _state_bytes(generator)
        return weights

    def scalarize(self, losses: Tensor) -> Tensor:
        return (self.present(self.draw()).to(device=losses.device, dtype=losses.dtype) * losses).sum()


def _state_bytes(generator: torch.Generator) -> bytes:
    """A generator's state as bytes (what the checkpoint holds, as before the state was declared)."""
    return bytes(generator.get_state().numpy().tobytes())
