r"""SDMGrad (Xiao et al., NeurIPS 2023): a direction near the mean gradient, weights from independent batches."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from mtlzoo.protocol import Request, StepInputs, Update
from mtlzoo.solvers import from_host, project_to_simplex, to_host
from mtlzoo.strategies._projected import ProjectedWeights
from mtlzoo.strategies._weighting import check_rate
from mtlzoo.strategy import Paper, StrategyInfo, Target, check_int

SCALE_FLOOR = 1e-4
"""Added to each ``A_kk`` under the square root of the scale, as the authors' code does (raw units)."""


class SDMGrad(ProjectedWeights):
    r"""SDMGrad: stochastic direction-oriented MGDA, the weights solved on products of independent batches.

    Paper: Xiao, Ban & Ji, *Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms*,
    NeurIPS 2023 (https://arxiv.org/abs/2305.18409), Algorithm 1. Of three independent batches of the step, ``ξ`` and
    ``ξ'`` give the weights and ``ζ`` the update. With ``A = J_ξ J_{ξ'}^T`` scaled by ``s = mean_k sqrt(max(A_kk, 0) +
    1e-4)``, ``w̃ = 1/K`` (the mean gradient ``g_0``, the preferred direction) and the running weights ``w`` (``1/K``
    each at first), ``n_iter`` steps of projected SGD with momentum ``μ`` (``v`` starts at 0 each step):

    .. math::

        v \leftarrow μ v + \frac{A}{s^2}(w + λ w̃), \quad w \leftarrow Π_Δ(w - η\, v);
        \qquad d = K\, \frac{J_ζ^\top (w + λ w̃)}{1 + λ},

    that is ``d = K (g_w + λ g_0) / (1 + λ)`` on the ``ζ`` batch: ``λ = 0`` is stochastic MGDA, a large
    ``λ`` tends to the mean gradient (``ls`` up to the factor). The update is a weighting of ``J_ζ``, the
    batch the model learns from (``losses`` in ``mtl.backward(losses, more_batches=[ξ, ξ'])``).

    As the authors' code (``methods/weight_methods.py``, ``SDMGrad``): the scale ``s``, the inner SGD (learning rate 10,
    momentum 0.5, 20 steps, warm-started at the last step's ``w``), ``λ = 0.3`` of their experiments and the factor K
    "to match the sum loss". Their ``s`` adds 1e-4 to ``A_kk`` in raw units, and is undefined where ``A_kk < -1e-4`` (a
    negative diagonal, which independent batches can give): here ``A_kk`` is first clipped at 0, as LibMTL and torchjd
    do. (Their class builds the three batches' gradient matrices as one shared tensor, so their ``ξ``, ``ξ'`` and ``ζ``
    all hold the last batch's gradients; this follows their paper and their LibMTL port.) Their training scripts also
    clip the shared gradient's norm at 1, for every method alike: not part of SDMGrad, left out. torchjd 0.18's
    ``SDMGradWeighting`` gives ``(w + λ w̃) / (1 + λ)`` (no factor K) and scales by ``(mean_k sqrt(max(A_kk, 0)))^2 +
    1e-8``; LibMTL's inner learning rate is 5.

    The paper defines SDMGrad on the shared parameters. On ``target="representation"`` it reads one
    batch (``A`` is that batch's Gramian). Given fewer than three batches on the parameters, the given
    ones stand in for the others, with a :class:`~mtlzoo.errors.ReusedBatchWarning`.

    Args:
        target: ``"parameters"`` (default, the paper's) or ``"representation"`` (one batch).
        lambda_: Pull ``λ >= 0`` towards the mean gradient (0.3, as the authors' experiments).
        lr: Learning rate ``η`` of the inner SGD (10, as theirs).
        momentum: Its momentum ``μ`` in [0, 1) (0.5, as theirs).
        n_iter: Its steps per optimizer step (20, as theirs).

    Example:
        >>> import torch, mtlzoo
        >>> sdmgrad = mtlzoo.create("sdmgrad", num_tasks=2, n_iter=1, lr=0.1)
        >>> zeta, xi = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 1.0], [0.0, 1.0]])
        >>> sdmgrad.aggregate(zeta, torch.ones(2), more_batches=[xi, torch.eye(2)])
        tensor([1.8628, 1.0686])
    """

    info = StrategyInfo(
        name="sdmgrad",
        summary="Weights near the mean gradient (lambda), solved by projected SGD on independent batches' products.",
        request=Request("parameters", "gradients", batches=3),
        paper=Paper(
            authors=("Peiyao Xiao", "Hao Ban", "Kaiyi Ji"),
            title="Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms",
            venue="NeurIPS", year=2023, url="https://arxiv.org/abs/2305.18409",
        ),
        properties=frozenset({"permutation_invariant"}), cost="parameters",
        original_code="https://github.com/OptMN-Lab/sdmgrad",
    )
    batches = 3

    def __init__(self, num_tasks: int, *, target: Target | None = None, lambda_: float = 0.3, lr: float = 10.0,
                 momentum: float = 0.5, n_iter: int = 20) -> None:
        super().__init__(num_tasks, target=target)
        self.lambda_ = check_rate(lambda_, "lambda_")
        self.lr = check_rate(lr, "lr", positive=True)
        self.momentum = check_rate(momentum, "momentum", below=1.0)
        self.n_iter = check_int("n_iter", n_iter)

    def update_from(self, jacobians: list[Tensor], tasks: np.ndarray, inputs: StepInputs) -> Update:
        update, xi, xi_prime = jacobians[0], jacobians[1 % len(jacobians)], jacobians[2 % len(jacobians)]
        product = to_host(xi @ xi_prime.T)
        scale = float(np.mean(np.sqrt(np.clip(np.diag(product), 0.0, None) + SCALE_FLOOR)))
        product = product / scale**2
        size = len(tasks)
        preferred = np.full(size, self.lambda_ / size)  # λ w̃
        weights = self.previous(tasks)
        velocity = np.zeros(size)
        for _ in range(self.n_iter):
            velocity = self.momentum * velocity + product @ (weights + preferred)
            weights = project_to_simplex(weights - self.lr * velocity)
        self.keep(weights, tasks)
        return Update(weights=from_host(size * (weights + preferred) / (1 + self.lambda_), update))

