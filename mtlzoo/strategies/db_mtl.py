r"""DB-MTL (Lin et al., 2023): log losses, and gradients balanced to the largest one's magnitude."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtlzoo.protocol import Request, StepInputs
from mtlzoo.roles import DirectionAggregator
from mtlzoo.roles.composite import Composite
from mtlzoo.strategies._weighting import ShapedAtFirstStep, check_rate
from mtlzoo.strategies.si import ScaleInvariant
from mtlzoo.strategy import Paper, StrategyInfo, Target

DB_MTL_PAPER = Paper(
    authors=("Baijiong Lin", "Weisen Jiang", "Feiyang Ye", "Yu Zhang", "Pengguang Chen", "Ying-Cong Chen", "Shu Liu",
             "James T. Kwok"),
    title="Dual-Balancing for Multi-Task Learning", venue="arXiv", year=2023, url="https://arxiv.org/abs/2308.12029",
)
LOG_EPS = 1e-8
"""The authors' ``log(L + 1e-8)``."""
NORM_EPS = 1e-8
"""The authors' ``||ĝ_k|| + 1e-8`` in the balancing factors (an absolute constant)."""


def balanced(averages: Tensor, rows: Tensor) -> Tensor:
    """``sum_k max_j ||ĝ_j|| / (||ĝ_k|| + 1e-8) ĝ_k`` over the selected rows (a boolean mask) of the averages."""
    selected = averages[rows]
    norms = torch.linalg.vector_norm(selected, dim=1)
    return torch.tensordot(norms.max() / (norms + NORM_EPS), selected, dims=1)


class DualBalance(ShapedAtFirstStep, DirectionAggregator):
    r"""DB-MTL's gradient balancing: moving averages of the task gradients, each rescaled to the largest one's norm.

    Paper: Lin et al., *Dual-Balancing for Multi-Task Learning*, 2023 (https://arxiv.org/abs/2308.12029), Algorithm 1
    (the gradient-magnitude half of DB-MTL). At optimizer step ``t``, with ``β_t = β / t^σ``:

    .. math::

        \hat g_k \leftarrow β_t \hat g_k + (1 - β_t)\, g_k ,\qquad
        d = \sum_k \frac{\max_j \|\hat g_j\|}{\|\hat g_k\| + 10^{-8}}\, \hat g_k .

    As the authors' code (LibMTL's ``DB_MTL``): the averages start at 0 without a bias correction (the first step's
    update is ``(1 - β)`` times the balanced gradients), and the divisor adds 1e-8. Not a weighting of this step's
    gradients (the averages hold earlier steps'), so the update is a direction, on the shared parameters only (the
    paper's and LibMTL's: an average of gradients on the representation would mix different samples).

    Under gradient accumulation the averages take the step's summed gradient, ``ĝ_k <- β_t ĝ_k + (1 - β_t) sum_m
    g_{k,m}``, and each micro-batch gives the change of the balanced update, so that the step's accumulated ``.grad`` is
    the update for its whole batch (the authors' code has no accumulation). Running state: the averages ``ĝ``
    (``averages``, K x n, shaped at the first step), the tasks the step has seen so far and the optimizer step count; a
    task absent from a step keeps its average.

    Args:
        target: ``"parameters"`` (the only one).
        beta: ``β`` in [0, 1]; 0.9 as LibMTL's default.
        beta_sigma: ``σ >= 0``; 0 as LibMTL's default.
    """

    info = StrategyInfo(
        name="dual_balance",
        summary="Moving averages of the task gradients, each rescaled to the largest one's norm (DB-MTL's half).",
        request=Request("parameters", "gradients"), paper=DB_MTL_PAPER, cost="parameters",
        original_code="https://github.com/median-research-group/LibMTL",
    )
    supported_targets: ClassVar[tuple[Target, ...]] = ("parameters",)
    shaped_later = ("averages",)

    def __init__(self, num_tasks: int, *, target: Target | None = None, beta: float = 0.9,
                 beta_sigma: float = 0.0) -> None:
        super().__init__(num_tasks, target=target)
        self.beta = check_rate(beta, "beta", at_most=1.0)
        self.beta_sigma = check_rate(beta_sigma, "beta_sigma")
        self.declare_state(steps=0)
        self.declare_state(per_step="every", averages=torch.zeros(0), seen=torch.zeros(num_tasks, dtype=torch.bool))

    def combine(self, gradients: Tensor, inputs: StepInputs) -> Tensor:
        rows = gradients.reshape(gradients.shape[0], -1)
        committed = self.first_shaped("averages", rows, "averages of gradients")
        rate = self.beta / (self.state.steps + 1) ** self.beta_sigma
        if self.micro_batch == 0:
            averages, seen, before = committed.clone(), torch.zeros_like(self.state.seen), None
        else:  # the step so far: its averages, and the update its earlier micro-batches gave
            averages, seen = self.state.averages.clone(), self.state.seen.clone()
            before = balanced(averages, seen)
        index = inputs.tasks.to(averages.device)
        fresh = ~seen[index]
        scaled = (1 - rate) * rows.to(averages.dtype)
        averages[index] = torch.where(fresh.unsqueeze(1), rate * averages[index] + scaled, averages[index] + scaled)
        seen[index] = True
        self.state.averages, self.state.seen = averages, seen
        update = balanced(averages, seen)
        update = update if before is None else update - before
        return update.to(gradients.dtype).reshape(gradients.shape[1:])

    def on_advance(self) -> None:
        self.state.steps += 1


class DBMTL(Composite):
    r"""DB-MTL: every loss through a log (loss-scale balance), the gradients rescaled to the largest one's magnitude.

    Paper: Lin et al., *Dual-Balancing for Multi-Task Learning*, 2023
    (https://arxiv.org/abs/2308.12029), Algorithm 1. The composition of two roles:

    - the loss weighting ``sum_k log(L_k + 1e-8)`` (:class:`~mtlzoo.strategies.si.ScaleInvariant` with the authors'
      ``eps=1e-8``): the model learns from ``sum_k L_k / (L_k + 1e-8)``, so each head from the gradient of its log loss;
    - the aggregator :class:`DualBalance` on the gradients ``g_k`` of the log losses: moving
      averages ``ĝ_k`` (rate ``β_t = β / t^σ``), each rescaled to the largest one's norm,

    .. math::

        d = \sum_k \frac{\max_j \|\hat g_j\|}{\|\hat g_k\| + 10^{-8}}\, \hat g_k ,\qquad
        \hat g_k \leftarrow β_t \hat g_k + (1 - β_t) \nabla \log(L_k + 10^{-8}) .

    As the authors' code (LibMTL's ``DB_MTL``, which its authors wrote), on the shared parameters
    only; see :class:`DualBalance` for the averages' start and the constant in the divisor.
    Every loss must be above ``-1e-8`` (:class:`~mtlzoo.errors.NonPositiveLossError` otherwise).

    Args:
        beta: ``β`` in [0, 1]; 0.9 as LibMTL's default.
        beta_sigma: ``σ >= 0``; 0 as LibMTL's default.

    Example:
        >>> import torch, mtlzoo
        >>> db_mtl = mtlzoo.create("db_mtl", num_tasks=2, beta=0.0)
        >>> db_mtl.aggregate(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 0.25]))  # (2, 0), (0, 4)
        tensor([4., 4.])
    """

    info = StrategyInfo(
        name="db_mtl",
        summary="Log losses, and moving-average task gradients rescaled to the largest one's norm (dual balance).",
        request=Request("parameters", "gradients"), paper=DB_MTL_PAPER, properties=frozenset({"permutation_invariant"}),
        cost="parameters",
        original_code="https://github.com/median-research-group/LibMTL/blob/main/LibMTL/weighting/DB_MTL.py",
    )
    composes = ("weighting", "aggregator")
    supported_targets: ClassVar[tuple[Target, ...]] = DualBalance.supported_targets
    weighting: ScaleInvariant
    aggregator: DualBalance

    def __init__(self, num_tasks: int, *, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        super().__init__(num_tasks, weighting=ScaleInvariant(num_tasks, eps=LOG_EPS),
                         aggregator=DualBalance(num_tasks, beta=beta, beta_sigma=beta_sigma))

    @property
    def target(self) -> Target:
        return self.aggregator.target
