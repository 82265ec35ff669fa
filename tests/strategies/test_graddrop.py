"""GradDrop (Chen et al., NeurIPS 2020): the masks of Algorithm 1 (lines 10-15), and their expectation.

References: the paper's definitions of the sign purity P and the masks M_k, from which each element's
expected update follows by hand: sum_k (l_k + (1 - l_k) q_k) g_k with q_k = P for a positive g_k and
1 - P for a negative one; the authors' layer (lingvo/core/graddrop.py, its defaults: batch marginalisation,
input sign, its norm rescaling) transcribed below with the same uniform draws; issue 19's worked example.
"""

from __future__ import annotations

import pytest
import torch

import mtlzoo

MATRIX = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0], [-1.0, -2.0, 0.5, 0.0, 1.0], [0.5, 1.0, -3.0, 0.0, 2.0]],
                      dtype=torch.float64)


def expected(matrix: torch.Tensor, leak: torch.Tensor) -> torch.Tensor:
    magnitude = matrix.abs().sum(0)
    purity = torch.where(magnitude > 0, 0.5 * (1 + matrix.sum(0) / magnitude.clamp_min(1e-300)), 0.5)
    keep = torch.where(matrix > 0, purity, torch.where(matrix < 0, 1 - purity, torch.zeros_like(purity)))
    return ((leak.unsqueeze(1) + (1 - leak.unsqueeze(1)) * keep) * matrix).sum(0)


@pytest.mark.parametrize("leak", [0.0, [0.0, 0.5, 1.0]])
def test_expectation_over_many_draws(leak: float | list[float]) -> None:
    """The mean of 4000 draws is within 4 standard errors of the closed form, element by element."""
    strategy = mtlzoo.create("graddrop", num_tasks=3, target="parameters", leak=leak, seed=0,
                              rescale_norm=False)
    draws = []
    for _ in range(4000):
        draws.append(strategy.aggregate(MATRIX, torch.ones(3, dtype=torch.float64)))
        strategy.advance()
    draws = torch.stack(draws)
    leaks = torch.as_tensor(leak, dtype=torch.float64).expand(3)
    error = draws.std(0) / len(draws) ** 0.5
    assert bool(((draws.mean(0) - expected(MATRIX, leaks)).abs() <= 4 * error + 1e-12).all())


def test_each_draw_keeps_one_sign_per_element() -> None:
    """Without leak, each element is the sum of the positive or of the negative gradients; a consistent element
    (every g_k of one sign) is kept whole, and all-zero elements stay 0."""
    strategy = mtlzoo.create("graddrop", num_tasks=3, target="parameters", rescale_norm=False)
    positive, negative = MATRIX.clamp(min=0).sum(0), MATRIX.clamp(max=0).sum(0)
    for _ in range(50):
        update = strategy.aggregate(MATRIX, torch.ones(3, dtype=torch.float64))
        assert bool(((update == positive) | (update == negative)).all())
        assert update[4] == 6.0 and update[3] == 0.0
        strategy.advance()


def test_full_leak_is_the_plain_sum_and_leaks_are_per_task() -> None:
    strategy = mtlzoo.create("graddrop", num_tasks=3, leak=1.0)
    torch.testing.assert_close(strategy.aggregate(MATRIX, torch.ones(3, dtype=torch.float64)), MATRIX.sum(0))
    with pytest.raises(ValueError, match="Parameter `leak`"):
        mtlzoo.create("graddrop", num_tasks=3, leak=[0.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="Parameter `leak`"):
        mtlzoo.create("graddrop", num_tasks=3, leak=[0.0, 1.0])


def test_per_draw_permutation_invariant_and_scale_linear() -> None:
    """One U per element, drawn whatever the task order: the same seed gives the same update for permuted or
    scaled rows (P does not depend on either)."""
    reference = mtlzoo.create("graddrop", num_tasks=3, seed=7).aggregate(MATRIX, torch.ones(3, dtype=torch.float64))
    permuted = mtlzoo.create("graddrop", num_tasks=3, seed=7).aggregate(MATRIX[[2, 0, 1]],
                                                                          torch.ones(3, dtype=torch.float64))
    scaled = mtlzoo.create("graddrop", num_tasks=3, seed=7).aggregate(3 * MATRIX, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(permuted, reference)
    torch.testing.assert_close(scaled, 3 * reference)


def test_per_sample_variant_draws_a_mask_per_batch_element() -> None:
    """marginalize_batch=False (the per-sample variant): one purity and one U per batch element and feature."""
    strategy = mtlzoo.create("graddrop", num_tasks=2, seed=0, marginalize_batch=False, rescale_norm=False)
    assert strategy.request.where == "representation"
    grads = torch.stack([torch.ones(4, 3), -torch.ones(4, 3)])  # P = 1/2 everywhere
    update = strategy.aggregate(grads, torch.ones(2))
    assert update.shape == (4, 3) and bool(((update == 1) | (update == -1)).all())
    assert 0 < int((update == 1).sum()) < 12


def test_issue_worked_example_follows_the_authors() -> None:
    """Issue 19, item 1: K=2, batch 2, one feature, z = +1, dL1/dz = (1, -3), dL2/dz = (1, 0). The batch-summed
    signal is (-2, 1), purity 1/3: lingvo and LibMTL return (1, 0) (probability 1/3) or (1, -3); with lingvo's
    norm rescaling (the default) times ||t|| / ||(2, -3)||. The per-sample code before the fix gave (2, -3)."""
    grads = torch.tensor([[[1.0], [-3.0]], [[1.0], [0.0]]], dtype=torch.float64)
    z = torch.ones(2, 1, dtype=torch.float64)
    plain = torch.tensor([2.0, -3.0], dtype=torch.float64).norm()
    outcomes = {"positive": torch.tensor([1.0, 0.0], dtype=torch.float64),
                "negative": torch.tensor([1.0, -3.0], dtype=torch.float64)}
    counts = dict.fromkeys(outcomes, 0)
    for seed in range(300):
        raw = mtlzoo.create("graddrop", num_tasks=2, seed=seed, rescale_norm=False).aggregate(grads, torch.ones(2),
                                                                                             representation=z)
        scaled = mtlzoo.create("graddrop", num_tasks=2, seed=seed).aggregate(grads, torch.ones(2), representation=z)
        name = next(key for key, value in outcomes.items() if torch.equal(raw.flatten(), value))
        counts[name] += 1
        torch.testing.assert_close(scaled, raw * raw.norm() / plain)
    assert abs(counts["positive"] / 300 - 1 / 3) < 0.1  # about 1/3 (a binomial's 3.6 standard errors)
    assert not torch.equal(mtlzoo.create("graddrop", num_tasks=2).aggregate(grads, torch.ones(2)).flatten(),
                           torch.tensor([2.0, -3.0], dtype=torch.float64))


def lingvo_graddrop(grads: torch.Tensor, z: torch.Tensor, leak: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """lingvo's GradDrop._Gradient with its defaults (linear keep function of scale 1, input sign only, batch
    marginalised, the norm rescaling), epsilon 0, transcribed for one uniform draw per feature."""
    signals = [grad * z.sign() for grad in grads]
    signals = [signal.sum(0, keepdim=True) for signal in signals]
    positive = [(signal > 0).double() for signal in signals]
    negative = [(signal < 0).double() for signal in signals]
    prob_pos = sum(signals) / (2.0 * sum(signal.abs() for signal in signals)) + 0.5
    prob_pos = (prob_pos >= draw).double() - 0.5
    masks = [(p - n) * prob_pos >= 0 for p, n in zip(positive, negative)]
    transformed = sum(grad * (lk + (1 - lk) * mask.double()) for lk, grad, mask in zip(leak, grads, masks))
    original = grads.sum(0)
    return transformed * transformed.norm() / original.norm()


@pytest.mark.parametrize("leak", [0.0, [0.0, 0.5, 1.0]])
def test_the_defaults_are_the_authors_layer(leak: float | list[float]) -> None:
    """The same U (the stream's first draw, one per feature): mtlzoo's default equals lingvo's layer, on a batch
    of 6 with mixed-sign representations."""
    generator = torch.Generator().manual_seed(5)
    grads = torch.randn(3, 6, 4, 5, generator=generator, dtype=torch.float64)
    z = torch.randn(6, 4, 5, generator=generator, dtype=torch.float64)
    strategy = mtlzoo.create("graddrop", num_tasks=3, leak=leak, seed=11)
    ours = strategy.aggregate(grads, torch.ones(3, dtype=torch.float64), representation=z)
    draw = torch.rand(1, 4, 5, generator=torch.Generator().manual_seed(11)).double()
    leaks = torch.as_tensor(leak, dtype=torch.float64).expand(3)
    torch.testing.assert_close(ours, lingvo_graddrop(grads, z, leaks, draw))


def test_the_input_sign_comes_from_the_training_forward() -> None:
    """Through MTLWrapper, the sign of z in the backward is that of the forward it follows: the same update as
    the standalone call given that z."""
    torch.manual_seed(0)
    model = mtlzoo.HardSharing(torch.nn.Linear(4, 3), [torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)])
    mtl = mtlzoo.MTLWrapper(model, strategy=mtlzoo.create("graddrop", num_tasks=2, seed=3))
    x = torch.randn(5, 4)
    z = model.backbone(x).detach()
    assert bool((z < 0).any()) and bool((z > 0).any())
    zq = z.clone().requires_grad_()
    losses = [(model.heads[k](zq) ** 2).mean() * (k + 1) for k in range(2)]
    grads = torch.stack([torch.autograd.grad(loss, zq)[0] for loss in losses])
    expected = mtlzoo.create("graddrop", num_tasks=2, seed=3).aggregate(grads, torch.ones(2), representation=z)
    predictions = mtl(x)
    mtl.backward([(p ** 2).mean() * (k + 1) for k, p in enumerate(predictions)])
    expected_weight = torch.autograd.grad(z.new_zeros(()) + (model.backbone(x) * expected).sum(),
                                          model.backbone.weight)[0]
    torch.testing.assert_close(model.backbone.weight.grad, expected_weight)
