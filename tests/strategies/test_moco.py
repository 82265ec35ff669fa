"""MoCo (Fernando et al., ICLR 2023): against the authors' code and LibMTL's, by hand, and its pull towards MGDA.

References: LibMTL's ``MoCo.backward`` (median-research-group/LibMTL, LibMTL/weighting/MoCo.py) re-implemented
below, with switches for its three departures from the first author's own ``MoCo.backward``
(heshandevaka/Trade-Off-MOL, LibMTL/LibMTL/weighting/MoCo.py, whose projection ``_projection2simplex`` is also
re-implemented): tracking ``L_k g_k / ||g_k||``, step sizes decayed as ``1 / t^σ``, a softmax for the projection.
With the three off it is the authors' code, which mtlzoo follows; MGDA's exact weights
(mtlzoo.solvers.min_norm_simplex) as the fixed point of MoCo's steps on one Jacobian with ρ = 0.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mtlzoo
from mtlzoo.solvers import min_norm_simplex


def authors_projection(y: torch.Tensor) -> torch.Tensor:
    """``_projection2simplex`` of the authors' MoCo (and of Sener & Koltun's MinNormSolver)."""
    m = len(y)
    sorted_y = torch.sort(y, descending=True)[0]
    tmpsum, tmax_f = 0.0, (torch.sum(y) - 1.0) / m
    for i in range(m - 1):
        tmpsum += sorted_y[i]
        tmax = (tmpsum - 1) / (i + 1.0)
        if tmax > sorted_y[i + 1]:
            tmax_f = tmax
            break
    return torch.max(y - tmax_f, torch.zeros(m, dtype=y.dtype))


def libmtl_moco(state: dict, grads: torch.Tensor, losses: torch.Tensor, *, beta: float, gamma: float, rho: float,
                normalize: bool = False, sigma: float = 0.0, softmax: bool = False) -> torch.Tensor:
    """One ``MoCo.backward``: LibMTL's with ``normalize``, ``sigma = 0.5`` and ``softmax``; the authors' without."""
    state["step"] += 1
    if normalize:
        grads = grads / (grads.norm(dim=1, keepdim=True) + 1e-8) * losses.view(-1, 1)
    state["y"] = state["y"] - beta / state["step"] ** sigma * (state["y"] - grads)
    y, identity = state["y"], torch.eye(len(losses), dtype=grads.dtype)
    move = state["lambd"] - gamma / state["step"] ** sigma * (y @ y.T + rho * identity) @ state["lambd"]
    state["lambd"] = torch.softmax(move, -1) if softmax else authors_projection(move)
    return y.T @ state["lambd"]


def batches(count: int, size: int = 3, width: int = 12) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(size, width, generator=generator, dtype=torch.float64)
    return [base + 0.5 * torch.randn(size, width, generator=generator, dtype=torch.float64) for _ in range(count)]


def test_equals_the_authors_code_over_steps_and_not_libmtls_departures() -> None:
    """Six steps of fresh gradients, float64, defaults β = γ = ρ = 0.1 (the authors'): the same updates and weights
    to rounding. Each of LibMTL's departures alone changes the updates (so the comparison can fail)."""
    losses = torch.tensor([0.7, 1.3, 2.1], dtype=torch.float64)
    moco = mtlzoo.create("moco", num_tasks=3)
    state = {"step": 0, "y": torch.zeros(3, 12, dtype=torch.float64), "lambd": torch.full((3,), 1 / 3,
                                                                                          dtype=torch.float64)}
    departures = [{"normalize": True}, {"sigma": 0.5}, {"softmax": True}]
    theirs = [dict(copy.deepcopy(state)) for _ in departures]
    for grads in batches(6):
        ours = moco.aggregate(grads, losses)
        moco.advance()
        torch.testing.assert_close(ours, libmtl_moco(state, grads, losses, beta=0.1, gamma=0.1, rho=0.1))
        torch.testing.assert_close(moco.weights, state["lambd"])
        torch.testing.assert_close(moco.tracked, state["y"])
        for other, options in zip(theirs, departures):
            libmtl_moco(other, grads, losses, beta=0.1, gamma=0.1, rho=0.1, **options)
    for other in theirs:
        assert float((other["y"].T @ other["lambd"] - ours).norm()) > 1e-3 * float(ours.norm())


def test_first_step_by_hand() -> None:
    """β = 0.5: Y = J / 2 = diag(1, 0.5); λ = Π(0.5 - 0.1 (0.5 + 0.05), 0.5 - 0.1 (0.125 + 0.05)) = Π(0.445, 0.4825)
    = (0.48125, 0.51875); d = Y^T λ = (0.48125, 0.259375)."""
    moco = mtlzoo.create("moco", num_tasks=2, beta=0.5)
    update = moco.aggregate(torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64), torch.ones(2).double())
    torch.testing.assert_close(update, torch.tensor([0.48125, 0.259375], dtype=torch.float64))


def test_its_weights_settle_at_mgdas_and_its_tracking_at_the_gradients() -> None:
    """On a fixed Jacobian with ρ = 0, Y -> J geometrically and λ -> MGDA's minimum-norm weights (ls keeps 1/K):
    stochastic MGDA with its bias corrected."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(3, 8, generator=generator, dtype=torch.float64) * torch.tensor([[1.0], [2.0], [4.0]],
                                                                                       dtype=torch.float64)
    gramian = matrix @ matrix.T
    moco = mtlzoo.create("moco", num_tasks=3, beta=0.5, gamma=1 / float(torch.linalg.eigvalsh(gramian).max()),
                         rho=0.0)
    for _ in range(3000):
        update = moco.aggregate(matrix, torch.ones(3, dtype=torch.float64))
        moco.advance()
    torch.testing.assert_close(moco.tracked, matrix)
    expected = min_norm_simplex(gramian)
    torch.testing.assert_close(moco.weights, expected, rtol=0, atol=1e-8)
    torch.testing.assert_close(update, expected @ matrix, rtol=0, atol=1e-7)
    assert float((expected - 1 / 3).abs().max()) > 0.1


def test_an_absent_task_keeps_its_tracked_row_and_weight() -> None:
    moco = mtlzoo.create("moco", num_tasks=3)
    grads = batches(1)[0]
    moco.aggregate(grads, torch.ones(3, dtype=torch.float64))
    moco.advance()
    before = (moco.tracked.clone(), moco.weights.clone())
    inputs = mtlzoo.StepInputs(torch.ones(2, dtype=torch.float64), torch.tensor([0, 2]), 3, gradients=grads[[0, 2]])
    moco.compute(inputs)
    moco.advance()
    assert torch.equal(moco.tracked[1], before[0][1]) and float(moco.weights[1]) == float(before[1][1])
    torch.testing.assert_close(moco.tracked[[0, 2]], 0.9 * before[0][[0, 2]] + 0.1 * grads[[0, 2]])


def test_a_checkpoint_loads_into_a_fresh_strategy_whose_tracking_is_not_shaped_yet() -> None:
    moco = mtlzoo.create("moco", num_tasks=3)
    moco.aggregate(batches(1)[0], torch.ones(3, dtype=torch.float64))
    moco.advance()
    fresh = mtlzoo.create("moco", num_tasks=3)
    assert fresh.tracked.shape == (0,)
    fresh.load_state_dict(moco.state_dict())
    assert torch.equal(fresh.tracked, moco.tracked) and fresh.tracked.dtype == torch.float64


def test_the_representation_target_is_refused() -> None:
    with pytest.raises(ValueError, match="`target` should be one of \\('parameters',\\)"):
        mtlzoo.create("moco", num_tasks=2, target="representation")


@pytest.mark.parametrize(("option", "value"), [("beta", 0.0), ("beta", 1.5), ("gamma", 0.0), ("rho", -1.0)])
def test_settings_are_checked(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"Parameter `{option}` should be"):
        mtlzoo.create("moco", num_tasks=2, **{option: value})
