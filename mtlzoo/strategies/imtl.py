r"""IMTL (Liu et al., ICLR 2021): IMTL-L's learned loss scales with IMTL-G's gradient balance, the full method."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlzoo.protocol import Request, StepInputs
from mtlzoo.strategies.imtl_g import IMTL_PAPER, IMTLG
from mtlzoo.strategies.imtl_l import IMTLL
from mtlzoo.strategy import StrategyInfo, Target


class IMTL(IMTLG):
    r"""IMTL: learned loss scales (IMTL-L) for the heads, equal-projection weights (IMTL-G) for the backbone.

    Paper: Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021
    (https://openreview.net/forum?id=IMPnRXEWpvr), Algorithm 1 (the "hybrid balance"). Each step,
    with learned log-scales ``s_k``:

    - every task's loss is scaled, ``L_k' = e^{s_k} L_k - s_k``: the heads learn from
      ``sum_k e^{s_k} L_k`` and ``s`` (a parameter, for your optimizer) from
      ``sum_k (e^{s_k} L_k - s_k)`` with the losses held constant (IMTL-L, the ``imtl_l``
      strategy's implementation, held here as :attr:`loss_scales`);
    - the shared part receives ``sum_k a_k g_k`` with ``g_k`` the gradients of the scaled losses
      ``e^{s_k} L_k`` and ``a`` IMTL-G's equal-projection weights of them (:class:`IMTLG`).

    As in the paper, the gradients are taken on the shared representation by default. Standalone,
    ``aggregate(J, losses)`` scales the rows of ``J`` (gradients of the raw losses) by ``e^{s_k}``
    before balancing them, as a step does.

    Args:
        num_tasks: K.
        target: ``"representation"`` (default, as the paper) or ``"parameters"``.

    Example:
        >>> import torch, mtlzoo
        >>> imtl = mtlzoo.create("imtl", num_tasks=2)
        >>> [name for name, _ in imtl.named_parameters()]
        ['loss_scales.log_scales']
    """

    info = StrategyInfo(
        name="imtl",
        kind="surgery",
        summary="IMTL-L's learned loss scales with IMTL-G's equal-projection gradient weights (hybrid balance).",
        request=Request("representation", "gramian"),
        paper=IMTL_PAPER,
        properties=frozenset({"permutation_invariant", "scale_linear"}),
        learnable=True,
        optimizer="adam",
        lr=1e-2,
        cost="representation",
        original_code="",
    )

    def __init__(self, num_tasks: int, *, target: Target | None = None) -> None:
        super().__init__(num_tasks, target=target)
        self.loss_scales = IMTLL(num_tasks)

    @property
    def properties(self) -> frozenset[str]:
        return self.info.properties & (self.loss_scales.properties | {"scale_linear"})

    def loss_weights(self, inputs: StepInputs) -> Tensor | None:
        return self.loss_scales.loss_weights(inputs)

    def loss_objective(self, losses: Tensor, tasks: Tensor) -> Tensor | None:
        return self.loss_scales.loss_objective(losses, tasks)

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        tasks = torch.arange(grads.shape[0], device=grads.device)
        scales = self.loss_scales.task_weights_for(losses.detach(), tasks).to(grads.dtype)
        return super().aggregate(grads * scales.view(-1, *[1] * (grads.dim() - 1)), losses)
