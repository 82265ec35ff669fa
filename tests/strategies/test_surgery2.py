"""What the single-batch aggregators of issue 21 share, checked for each of them (as test_surgery.py for issue 9's).

Training the contract tests' small regression through MTLWrapper on every target the method supports, lowering
every task's loss; the representation target moving the backbone; degenerate and non-finite input; both float dtypes
standalone; the mixed-precision loop; and each method's departure from the plain sum on a strong conflict, as its
paper says (so a method replaced by ``ls`` fails, which the last test checks). torchjd parity is in
test_surgery2_reference.py; worked examples, state and the authors' code in test_<method>.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import mtlzoo
from tests.helpers import batch, mse_losses, small_model
from tests.strategies.test_surgery import CONFLICT, may_warn, reject_ls, unit

NEW = ["config", "fairgrad", "pcd", "excess_mtl", "db_mtl"]
BOTH = [(name, target) for name in NEW for target in mtlzoo.get_strategy(name).cls.supported_targets]


def test_db_mtl_reads_the_parameters_only() -> None:
    """The paper and LibMTL average gradients on the shared parameters; on the representation the averages would mix
    different samples: refused, naming the targets it takes."""
    assert mtlzoo.get_strategy("db_mtl").cls.supported_targets == ("parameters",)
    with pytest.raises(ValueError, match="target"):
        mtlzoo.strategies.db_mtl.DualBalance(3, target="representation")
    assert [target for name, target in BOTH if name != "db_mtl"].count("representation") == 4


# ------------------------------------------------------------ the paper's departure from the plain sum
def expect_config(d: torch.Tensor, j: torch.Tensor) -> None:
    """Equal cosine with every task gradient, and the length the projections give (Liu et al., eq. 2)."""
    cosines = (j / j.norm(dim=1, keepdim=True)) @ unit(d)
    torch.testing.assert_close(cosines[0], cosines[1])
    assert float(cosines[0]) > 0
    torch.testing.assert_close(d.norm(), (j @ unit(d)).sum())


def expect_fairgrad(d: torch.Tensor, j: torch.Tensor) -> None:
    """alpha = 2, unclipped: d = K J^T w with (G w)_k = g_k . d / K = w_k^(-1/2) (Ban & Ji, eq. 4)."""
    size = j.shape[0]
    weights = torch.linalg.lstsq(j.T, d.unsqueeze(1)).solution.squeeze(1) / size
    assert bool((weights > 0).all())
    torch.testing.assert_close(j @ d / size, weights ** (-1 / 2))


def expect_pcd(d: torch.Tensor, j: torch.Tensor) -> None:
    """tau = 0.5, two tasks, a fresh moving average (s_i = 1 / ||g_i|| up to eps): the closed form of Varam &
    AlHajri's Cor. 4.6, d~ = u_1 + (tau - u_1 . u_2) u_2 when g_1 violates the constraint, rescaled to ||g_1||."""
    first, second = j[0] / j[0].norm(), j[1] / j[1].norm()
    assert float(first @ second) < 0.5  # the constraint binds
    tilde = first + (0.5 - first @ second) * second
    torch.testing.assert_close(d, tilde * j[0].norm() / tilde.norm())


def expect_db_mtl(d: torch.Tensor, j: torch.Tensor) -> None:
    """beta = 0, losses 1: every gradient rescaled to the largest norm, d = sum_k (max ||g|| / ||g_k||) g_k."""
    weights = torch.linalg.lstsq(j.T, d.unsqueeze(1)).solution.squeeze(1)
    sizes = weights * j.norm(dim=1)
    torch.testing.assert_close(sizes, torch.full_like(sizes, float(j.norm(dim=1).max())), rtol=1e-7, atol=0)


EXPECTATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "config": expect_config, "fairgrad": expect_fairgrad, "pcd": expect_pcd, "db_mtl": expect_db_mtl,
}
SETTINGS = {"fairgrad": {"alpha": 2.0, "max_norm": 0.0}, "pcd": {"tau": 0.5}, "db_mtl": {"beta": 0.0}}


@pytest.mark.parametrize("name", sorted(EXPECTATIONS))
def test_on_a_strong_conflict_the_update_departs_from_the_sum_as_the_paper_says(name: str) -> None:
    update = mtlzoo.create(name, num_tasks=2, **SETTINGS.get(name, {})).aggregate(
        CONFLICT, torch.ones(2, dtype=torch.float64))
    EXPECTATIONS[name](update, CONFLICT)
    for plain in (CONFLICT.mean(0), CONFLICT.sum(0)):  # what ls gives, up to its scale
        assert float((unit(update) - unit(plain)).norm()) > 1e-3


def test_excess_mtl_leaves_the_sum_once_a_task_lags() -> None:
    """ExcessMTL's first step is the plain sum (the authors record E^0 then). At the second, the same rows doubled:
    every entry's E / E^0 = (g^2 / sqrt(5 g^2 / 4)) / ((g / 2)^2 / sqrt(g^2 / 4)) = 4 / sqrt(5) (up to the 1e-7), the
    same for both tasks, so the weights stay 1 and the update is the sum. At the third, task 2's row doubled again: its
    ratio is the larger, and lambda = 2 softmax(eta (r_2 + r_3)) with the ratios computed by hand from the rows."""
    eta = 1.0
    strategy = mtlzoo.create("excess_mtl", num_tasks=2, robust_step_size=eta)
    ones = torch.ones(2, dtype=torch.float64)
    steps = [CONFLICT / 2, CONFLICT, CONFLICT * torch.tensor([[1.0], [2.0]], dtype=torch.float64)]
    updates = []
    for rows in steps:
        updates.append(strategy.aggregate(rows, ones))
        strategy.advance()
    torch.testing.assert_close(updates[0], steps[0].sum(0))
    squares = torch.cumsum(torch.stack(steps) ** 2, 0)
    risks = (torch.stack(steps) ** 2 / torch.sqrt(squares + 1e-7)).sum(2)  # (step, task)
    ratios = risks[1:] / risks[0]
    logits = eta * ratios.sum(0)
    expected = 2 * torch.softmax(logits, 0)
    torch.testing.assert_close(strategy.weights, expected)
    assert float(expected[1]) > float(expected[0]) + 0.1
    torch.testing.assert_close(ratios[0], torch.full((2,), 4 / math.sqrt(5), dtype=torch.float64))
    torch.testing.assert_close(updates[1], steps[1].sum(0))
    assert float((unit(updates[2]) - unit(steps[2].sum(0))).norm()) > 1e-3


def test_the_conflict_expectations_fail_for_ls() -> None:
    reject_ls(EXPECTATIONS)


def test_each_trains_otherwise_than_ls() -> None:
    """Through MTLWrapper, from the same initial model and data: after 10 steps every method's backbone differs from
    ls's by more than 1% (relative), where the same method run twice agrees bit for bit."""
    def backbone_after(name: str) -> torch.Tensor:
        torch.manual_seed(0)
        mtl = mtlzoo.MTLWrapper(small_model(), name)
        optimizer = torch.optim.SGD(mtl.parameters(), lr=0.05)
        for step in range(10):
            x, targets = batch(len(mtl), size=32, seed=step % 5)
            optimizer.zero_grad()
            with may_warn(name):
                mtl.backward(mse_losses(mtl(x), targets))
            mtl.step(optimizer)
        return torch.cat([p.detach().flatten() for p in mtl.backbone.parameters()])

    plain = backbone_after("ls")
    torch.manual_seed(0)
    start = torch.cat([p.detach().flatten() for p in small_model().backbone.parameters()])
    for name in NEW:
        trained = backbone_after(name)
        assert torch.equal(trained, backbone_after(name))
        moved = float((plain - start).norm())
        assert float((trained - plain).norm()) > 0.01 * moved, name
        assert math.isfinite(float(trained.norm()))
