r"""GradDrop (Chen et al., NeurIPS 2020): keep, element by element, the gradients of one sign at random."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlzoo.protocol import Request
from mtlzoo.strategies._surgery import DirectionSurgery, SeededGenerator
from mtlzoo.strategy import Paper, StrategyInfo, Target


class GradDrop(DirectionSurgery):
    r"""GradDrop: per element, keep the positive or the negative task gradients, the likelier the purer.

    Paper: Chen et al., *Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
    Dropout*, NeurIPS 2020 (https://arxiv.org/abs/2010.06808), Algorithm 1, lines 10-15. Element
    by element, with the gradient positive sign purity ``P``, ``U ~ Uniform(0, 1)`` drawn once
    per element and ``l_k`` the leak of task k:

    .. math::

        P = \tfrac12 \Big(1 + \frac{\sum_k g_k}{\sum_k |g_k|}\Big),\quad
        M_k = 1[P > U]\,1[g_k > 0] + 1[P < U]\,1[g_k < 0],\quad
        d = \sum_k \big(l_k + (1 - l_k) M_k\big)\, g_k ,

    so in expectation element e receives ``sum_k (l_k + (1 - l_k) q_k) g_k`` with ``q_k = P`` for
    a positive ``g_k`` and ``1 - P`` for a negative one. Where every task's gradient is zero,
    ``d = 0`` (the paper's ratio is 0/0 there; any mask gives 0).

    The paper applies GradDrop to the activations of the last shared layer, so
    ``target="representation"`` is the default: the gradients on ``z``, one mask element per
    batch element and feature. The paper's ``f(P)`` is the identity here, and its
    multiplication of the gradients by ``sgn(z)`` (line 4, which needs the activations) is left
    out, as torchjd 0.18 also does. ``U`` comes from the strategy's own generator (seeded from
    torch's at construction or by ``seed``, saved in ``state_dict()``); for a fixed draw the
    update is permutation invariant and scales with the gradients.

    Args:
        num_tasks: K.
        target: ``"representation"`` (default) or ``"parameters"``.
        leak: ``l``: one number for every task, or K numbers in [0, 1] (1 lets a task's gradient
            through untouched; the paper's transfer-learning setting leaks the main task).
        seed: Seed of ``U``; ``None`` draws one from torch's generator.

    Example:
        >>> import torch, mtlzoo
        >>> graddrop = mtlzoo.create("graddrop", num_tasks=2, target="parameters")
        >>> graddrop.aggregate(torch.tensor([[2.0, 1.0], [3.0, -1.0]]), torch.ones(2))[0]
        tensor(5.)
    """

    info = StrategyInfo(
        name="graddrop",
        kind="surgery",
        summary="Per element, keeps the positive or the negative task gradients at random, by sign purity.",
        request=Request("representation", "gradients"),
        paper=Paper(
            authors=("Zhao Chen", "Jiquan Ngiam", "Yanping Huang", "Thang Luong", "Henrik Kretzschmar",
                     "Yuning Chai", "Dragomir Anguelov"),
            title="Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
            venue="NeurIPS",
            year=2020,
            url="https://arxiv.org/abs/2010.06808",
        ),
        stochastic=True,
        cost="representation",
        original_code="",
    )
    unchecked_settings = ("seed",)
    """A checkpoint carries the generator's state, which replaces the one ``seed`` started."""

    def __init__(self, num_tasks: int, *, target: Target | None = None, leak: float | Sequence[float] = 0.0,
                 seed: int | None = None) -> None:
        super().__init__(num_tasks, target=target)
        values = torch.as_tensor(leak, dtype=torch.float64).detach().clone()
        if values.dim() == 0:
            values = values.expand(num_tasks).clone()
        if values.shape != (num_tasks,) or not bool(((values >= 0) & (values <= 1)).all()):
            raise ValueError(f"Parameter `leak` should be a number or {num_tasks} numbers in [0, 1]. Found "
                             f"`leak = {leak!r}`.")
        self.leaks = values
        self._leaky = bool((values > 0).any())
        self.random = SeededGenerator(seed)

    def direction_for(self, grads: Tensor, losses: Tensor, tasks: Tensor, micro_batch: int) -> Tensor:
        # With g+ = max(g, 0) and g- = g - g+ (exact), S+- = sum_k g_k+-: P = S+ / (S+ - S-) (= (1 + sum_k g_k /
        # sum_k |g_k|) / 2) and d = sum_k l_k g_k + 1[P > U] sum_k (1 - l_k) g_k+ + 1[P < U] sum_k (1 - l_k) g_k-:
        # four passes over the K x n gradients, the rest on n-vectors. Where every g_k is 0, P is NaN (0/0), both
        # masks are 0, and d = 0 as with any mask.
        generator = self.random.on_device(grads.device)
        flat = grads.reshape(grads.shape[0], -1)
        positive = flat.clamp(min=0)
        negative = flat - positive
        up, down = positive.sum(0), negative.sum(0)
        purity = up / (up - down)
        draw = torch.rand(grads.shape[1:], generator=generator, device=grads.device).to(grads.dtype)  # any dtype
        draw = draw.reshape(-1)
        if self._leaky:
            leaks = self.leaks.to(grads.device)[tasks.to(grads.device)].to(grads.dtype)
            direction = leaks @ flat + (1 - leaks) @ positive * (purity > draw) + (1 - leaks) @ negative * (
                purity < draw)
        else:
            direction = up * (purity > draw) + down * (purity < draw)
        return direction.reshape(grads.shape[1:])

    def _commit(self) -> None:
        self.random.commit()

    def _drop_staged(self) -> None:
        self.random.rewind()

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.random.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.random.load(state["generator"])
