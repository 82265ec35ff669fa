r"""IMTL (Liu et al., ICLR 2021): IMTL-L's learned loss scales with IMTL-G's gradient balance, as a composition."""

from __future__ import annotations

from typing import ClassVar

from mtlzoo.protocol import Request
from mtlzoo.roles.composite import Composite
from mtlzoo.strategies.imtl_g import IMTLG
from mtlzoo.strategies.imtl_l import IMTL_PAPER, IMTLL
from mtlzoo.strategy import StrategyInfo, Target


class IMTL(Composite):
    r"""IMTL: learned loss scales (IMTL-L) for the heads, equal-projection weights (IMTL-G) for the backbone.

    Paper: Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021 (https://openreview.net/forum?id=IMPnRXEWpvr),
    Algorithm 1 (the "hybrid balance"). The composition of the ``imtl_l`` weighting and the ``imtl_g`` aggregator
    (``mtlzoo.compose(weighting="imtl_l", aggregator="imtl_g")``). Each step, with learned log-scales ``s_k``:

    - every task's loss is scaled, ``L_k' = e^{s_k} L_k - s_k``: the heads learn from ``sum_k e^{s_k} L_k`` and ``s`` (a
      parameter, for your optimizer) from ``sum_k (e^{s_k} L_k - s_k)`` with the losses held constant (:class:`IMTLL`,
      held as ``weighting``);
    - the shared part receives ``sum_k a_k g_k`` with ``g_k`` the gradients of the scaled losses ``e^{s_k} L_k`` and
      ``a`` IMTL-G's equal-projection weights of them (:class:`IMTLG`, held as ``aggregator``).

    As in the paper, the gradients are taken on the shared representation by default. Standalone, ``aggregate(J,
    losses)`` scales the rows of ``J`` (gradients of the raw losses) by ``e^{s_k}`` before balancing them, as a step
    does. Checkpoints of mtlzoo 0.1.0 (``loss_scales.log_scales``) load.

    Args:
        target: ``"representation"`` (default, as the paper) or ``"parameters"``.

    Example:
        >>> import torch, mtlzoo
        >>> imtl = mtlzoo.create("imtl", num_tasks=2)
        >>> [name for name, _ in imtl.named_parameters()], imtl.kind
        (['weighting.log_scales'], 'surgery')
    """

    info = StrategyInfo(
        name="imtl",
        summary="IMTL-L's learned loss scales with IMTL-G's equal-projection gradient weights (hybrid balance).",
        request=Request("representation", "gramian"), paper=IMTL_PAPER,
        properties=frozenset({"permutation_invariant", "scale_linear"}), learnable=True, optimizer="adam", lr=1e-2,
        cost="representation", original_code="",
    )
    composes = ("weighting", "aggregator")
    renamed: ClassVar[dict[str, str]] = {"loss_scales": "weighting"}
    supported_targets = IMTLG.supported_targets
    weighting: IMTLL
    aggregator: IMTLG

    def __init__(self, num_tasks: int, *, target: Target | None = None) -> None:
        super().__init__(num_tasks, weighting=IMTLL(num_tasks), aggregator=IMTLG(num_tasks, target=target))

    @property
    def loss_scales(self) -> IMTLL:
        """The IMTL-L part (``weighting``), under its name in mtlzoo 0.1.0."""
        return self.weighting

    @property
    def target(self) -> Target:
        return self.aggregator.target

    @property
    def properties(self) -> frozenset[str]:
        return self.info.properties & (self.weighting.properties | {"scale_linear"})
