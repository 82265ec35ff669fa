r"""ExcessMTL (He et al., ICML 2024): task weights raised by exponentiated gradient on estimated excess risks."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtlzoo.linalg import all_finite
from mtlzoo.protocol import Request, StepInputs, Update
from mtlzoo.roles import Aggregator
from mtlzoo.roles.composite import standalone
from mtlzoo.strategies._weighting import ShapedAtFirstStep, check_rate
from mtlzoo.strategy import Paper, StrategyInfo, Target, check_flag

ADAGRAD_EPS = 1e-7
"""Added to the accumulated squares under the square root, as the authors' code (an absolute constant)."""


class ExcessMTL(ShapedAtFirstStep, Aggregator):
    r"""ExcessMTL: weigh each task by how far it is from its best, estimated from its gradients' curvature.

    Paper: He et al., *Robust Multi-Task Learning with Excess Risks*, ICML 2024 (https://arxiv.org/abs/2402.02009), eqs.
    6, 7 and 9. Each task's excess risk (its loss above the best it could reach) is estimated to second order as ``E_k =
    g_k^T H_k^{-1} g_k`` with the diagonal AdaGrad curvature ``H_k = diag(sqrt(S_k + 1e-7))``, ``S_k`` the running sum
    of the squared gradient entries (including this step's); the weights take an exponentiated-gradient step on the
    excess risks relative to each task's first one, ``E_k^0``:

    .. math::

        λ_k \leftarrow \frac{K\, λ_k \exp(η\, E_k / E_k^0)}{\sum_j λ_j \exp(η\, E_j / E_j^0)},
        \qquad d = \sum_k λ_k g_k .

    As the authors' code (yifei-he/ExcessMTL, a LibMTL fork; LibMTL's ``ExcessMTL`` is the same): the weights start at 1
    and sum to K (the paper writes them on the simplex: a factor K), the first step records ``E^0`` and keeps the
    weights, the model learns from ``sum_k λ_k L_k`` (the shared part receives ``J^T λ`` and head k learns from ``λ_k
    L_k``: ``weighted_heads``). On the representation the gradients are summed over the batch first (their
    ``rep_grad``). The exponentiated step is taken in log space (``K softmax(log λ + η E/E^0)``, the same weights
    without overflow, as torchjd). A task whose first excess risk is 0 (a zero gradient) records its baseline at its
    first non-zero one, its weight unchanged until then (theirs divides by 0). torchjd 0.18's ``ExcessMTL`` starts at
    ``1/K``, already steps at its first call (with the raw ``E^0``), adds 1e-7 to ``E^0`` and may average ``E^0`` over
    warm-up steps (not offered here).

    The weights read the gradients' entries, not only their Gramian: the engine hands the gradients (on the parameters,
    the K x n Jacobian). Running state: ``S`` (``squares``, shaped at the first step like a row of the gradients, K x n
    on the parameters: memory of the size of the Jacobian), the weights ``λ`` and the baselines ``E^0``, updated once
    per optimizer step from its first micro-batch, whose weights the step's later micro-batches reuse. A task absent
    from a step keeps its weight, its squares and its baseline; the present tasks' weights keep their sum.

    Args:
        robust_step_size: ``η > 0``; 1e-2 as LibMTL's default.
        weighted_heads: Whether head k learns from ``λ_k L_k`` (the authors') or from ``L_k``.

    Example:
        >>> import torch, mtlzoo
        >>> excess = mtlzoo.create("excess_mtl", num_tasks=2, robust_step_size=1.0)
        >>> excess.aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(2))  # records E^0
        tensor([1., 2.])
        >>> excess.advance()
        >>> excess.aggregate(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.ones(2))  # task 1 lags: E/E^0 = 1.79, 0.71
        tensor([2.9873, 1.0127])
    """

    info = StrategyInfo(
        name="excess_mtl",
        summary="Exponentiated-gradient task weights on excess risks estimated with AdaGrad's curvature.",
        request=Request("parameters", "gradients"),
        paper=Paper(
            authors=("Yifei He", "Shiji Zhou", "Guojun Zhang", "Hyokun Yun", "Yi Xu", "Belinda Zeng",
                     "Trishul Chilimbi", "Han Zhao"),
            title="Robust Multi-Task Learning with Excess Risks", venue="ICML", year=2024,
            url="https://arxiv.org/abs/2402.02009",
        ),
        properties=frozenset({"permutation_invariant"}), cost="parameters",
        original_code="https://github.com/yifei-he/ExcessMTL",
    )
    statistic = "gradients"
    shaped_later = ("squares",)

    def __init__(self, num_tasks: int, *, target: Target | None = None, robust_step_size: float = 1e-2,
                 weighted_heads: bool = True) -> None:
        super().__init__(num_tasks, target=target)
        self.robust_step_size = check_rate(robust_step_size, "robust_step_size", positive=True)
        self.weighted_heads = check_flag("weighted_heads", weighted_heads)
        self.declare_state(weights=torch.ones(num_tasks, dtype=torch.float64),
                           baselines=torch.zeros(num_tasks, dtype=torch.float64), squares=torch.zeros(0))

    def task_weights(self, gradients: Tensor, tasks: Tensor) -> Tensor:
        """``λ`` of the present tasks (float64) for their finite gradients ``(K', ...)``, staging the new state."""
        if self.micro_batch != 0:  # the step's weights, set by its first micro-batch
            return self.state.weights.detach().cpu()[tasks.cpu()]
        rows = gradients.sum(1) if self.target == "representation" else gradients  # summed over the batch
        rows = rows.reshape(rows.shape[0], -1).detach()
        squares = self.first_shaped("squares", rows, "sums of squared gradients")
        index = tasks.to(squares.device)
        accumulated = squares[index] + rows**2
        risks = (rows**2 / torch.sqrt(accumulated + ADAGRAD_EPS)).sum(1).to(torch.float64).cpu()
        index = tasks.cpu()
        baselines = self.state.committed("baselines").detach().cpu()[index]
        present = self.state.committed("weights").detach().cpu()[index]
        ratios = torch.where(baselines > 0, risks / torch.where(baselines > 0, baselines, 1), 0)
        present = present.sum() * torch.softmax(torch.log(present) + self.robust_step_size * ratios, 0)
        self.state.write_rows("weights", index, present)
        self.state.write_rows("baselines", index, torch.where(baselines > 0, baselines, risks))
        self.state.write_rows("squares", tasks, accumulated)
        return present

    def compute(self, inputs: StepInputs) -> Update:
        grads = inputs.gradients
        assert grads is not None
        if not all_finite(grads):
            return Update(weights=torch.full(grads.shape[:1], math.nan, dtype=grads.dtype, device=grads.device))
        return Update(weights=self.task_weights(grads, inputs.tasks).to(device=grads.device, dtype=grads.dtype))

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Standalone: ``J^T λ`` for a (K, ...) matrix of task gradients; call :meth:`advance` after each step."""
        return standalone(self, grads, losses)
