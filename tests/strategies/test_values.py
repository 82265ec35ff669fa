"""Pinned outputs of the gradient-surgery aggregators (torchjd's test_values.py habit).

Reference: the values mtlzoo 0.1.0 (commit 4f727cc) computed, on both of its solver paths (the Python-float
Cholesky / active-set / Newton copies up to 8 tasks and the numpy / LAPACK ones, which agreed to rounding
there), before those copies were removed (issue 18): the remaining path must keep giving them. Each method's
own correctness is checked against an independent reference in its test file; this table pins behaviour.
Tolerance: 1e-9 of the update's scale, float64 Gramians of well-conditioned (K <= 5) problems.
"""

from __future__ import annotations

import pytest
import torch

import mtlzoo


def make_rows() -> dict[str, torch.Tensor]:
    """The pinned problems, drawn from a seeded torch generator (the same numbers on every machine)."""
    generator = torch.Generator().manual_seed(0)
    cases = {}
    for size in (2, 3, 5):
        rows = torch.randn(size, 6, generator=generator, dtype=torch.float64)
        rows[1:] -= 0.8 * torch.rand(size - 1, 1, generator=generator, dtype=torch.float64) * rows[0]
        cases[f"conflicting{size}"] = rows
    scales = torch.tensor([[1.0], [2.0], [0.5], [3.0]], dtype=torch.float64)
    cases["representation4"] = torch.randn(4, 32, generator=generator, dtype=torch.float64) * scales
    return cases


ROWS = {name: rows for name, rows in make_rows().items() if name in ("conflicting3", "representation4")}

METHODS = {"mgda": ("mgda", {}), "mgda_l2": ("mgda", {"normalization": "l2"}), "upgrad": ("upgrad", {}),
           "upgrad_reg": ("upgrad", {"reg_eps": 1e-4}), "dualproj": ("dualproj", {}), "imtl_g": ("imtl_g", {}),
           "aligned_mtl": ("aligned_mtl", {}), "cagrad": ("cagrad", {}),
           "cagrad_09": ("cagrad", {"c": 0.9, "rescale": 0}), "nash_mtl": ("nash_mtl", {}),
           "nash_mtl_noclip": ("nash_mtl", {"max_norm": 0.0}), "pcgrad": ("pcgrad", {"seed": 3}),
           "gradvac": ("gradvac", {"seed": 5})}

EXPECTED = {
    "conflicting3": {
        "mgda": [0.66843400147525089, 0.049764522835195099, 0.28180147568955399],
        "mgda_l2": [0.44572336707546273, 0.084029971630098899, 0.47024666129443848],
        "upgrad": [0.96628049356219736, 0.35818974252201502, 0.52337049929417878],
        "upgrad_reg": [0.96565382205285943, 0.35827761707610389, 0.5233372122049138],
        "dualproj": [0.49255811227879531, 0.33333333333333331, 0.33333333333333331],
        "imtl_g": [0.63791268634279452, 0.06964081894866786, 0.2924464947085379],
        "aligned_mtl": [1.1401478355998993, 0.31177909563021133, 0.60368616648807594],
        "cagrad": [1.5645151989434418, 0.86206896551724121, 0.86206896551724121],
        "cagrad_09": [4.206540977376366, 1, 1.9198887676499836],
        "nash_mtl": [0.88750069573429569, 0.22729733552623946, 0.43148889638987592],
        "nash_mtl_noclip": [1.5371962967645141, 0.39369053355647371, 0.74736069144908179],
        "pcgrad": [2.7669619367167773, 1.3643482144274481, 1.5701114978825363],
        "gradvac": [2.7669619367167777, 1.3643482144274481, 1.5701114978825363],
    },
    "representation4": {
        "mgda": [0.21936793188833614, 0.056854017568383791, 0.70886838096866056, 0.014909669574619634],
        "mgda_l2": [0.35473093049167059, 0.29200941348697795, 0.12978704914412259, 0.22347260687722897],
        "upgrad": [0.52940503297104158, 0.29511628954586439, 0.25, 0.25814868005159591],
        "upgrad_reg": [0.52900599071109855, 0.29509757715639962, 0.25, 0.25814910902474325],
        "dualproj": [0.27315430038651928, 0.25, 0.25, 0.25],
        "imtl_g": [0.41989852852180182, 0.18565809686054696, 0.3090183160701766, 0.085425058547473981],
        "aligned_mtl": [0.54720843048096079, 0.27762596433150077, 0.88948900677967446, 0.14783892686127101],
        "cagrad": [1.846918442762981, 0.86206896551724133, 2.5057036133458697, 0.86206896551724133],
        "cagrad_09": [2.9518036299217387, 1, 6.4587332298577227, 1],
        "nash_mtl": [0.11008697285549709, 0.049999837320193856, 0.14558605136002548, 0.027376898532796536],
        "nash_mtl_noclip": [0.22017394571099419, 0.099999674640387712, 0.29117210272005095, 0.054753797065593073],
        "pcgrad": [2.1176201318841663, 1.1766095881044489, 1, 1.0484540536957767],
        "gradvac": [2.1176201318841663, 1.1766095881044489, 1, 1.0484540536957767],
    },
}

NASH_GENERATOR = torch.Generator().manual_seed(4)
NASH_STEPS = [torch.randn(3, 5, generator=NASH_GENERATOR, dtype=torch.float64) for _ in range(5)]
NASH_EXPECTED = {  # (update_weights_every, max_norm): the weights of 5 consecutive steps
    (1, 1.0): [
        [0.15344328869554691, 0.48942283707982986, 0.564555195999634],
        [1.0657334480981804, 1.1492860167504075, 0.36357166701067378],
        [0.21156891367541295, 0.19887344939856089, 0.28982409521675284],
        [0.41910601063421521, 1.0209069711667416, 0.73518486411596273],
        [0.31524933357598722, 0.31901222936115786, 0.47571663950805204],
    ],
    (1, 0.0): [
        [0.26577157210114644, 0.84770522020677042, 0.97783828314837185],
        [1.8459044793824877, 1.99062177338718, 0.62972459943823988],
        [0.3664481077879691, 0.34445891863478567, 0.50199005817309594],
        [0.725912904175955, 1.768262743862032, 1.2733775376044547],
        [0.54602786280583915, 0.55254538948934151, 0.82396538963387422],
    ],
    (2, 1.0): [
        [0.15344328869554691, 0.48942283707982986, 0.564555195999634],
        [0.14232705112846344, 0.45396649738912659, 0.52365585868713982],
        [0.21156891367541295, 0.19887344939856089, 0.28982409521675284],
        [0.36644810438156128, 0.34445890784263611, 0.50199007987976074],
        [0.3152493335759185, 0.31901222936119161, 0.47571663950810572],
    ],
    (2, 0.0): [
        [0.26577157210114644, 0.84770522020677042, 0.97783828314837185],
        [0.26577156782150269, 0.84770524501800537, 0.97783827781677246],
        [0.3664481077879691, 0.34445891863478567, 0.50199005817309594],
        [0.36644810438156128, 0.34445890784263611, 0.50199007987976074],
        [0.54602786280563165, 0.55254538948931042, 0.82396538963383359],
    ],
}


@pytest.mark.parametrize("case", sorted(ROWS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_weights_are_the_pinned_ones(case: str, method: str) -> None:
    rows = ROWS[case]
    name, kwargs = METHODS[method]
    size = rows.shape[0]
    weights = mtlzoo.create(name, num_tasks=size, **kwargs).gramian_weights(rows @ rows.T,
                                                                          torch.ones(size, dtype=torch.float64))
    expected = torch.tensor(EXPECTED[case][method], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-9 * max(float(expected.abs().max()), 1.0))


@pytest.mark.parametrize(("every", "max_norm"), sorted(NASH_EXPECTED))
def test_nash_mtl_steps_are_the_pinned_ones(every: int, max_norm: float) -> None:
    """Five optimizer steps: the warm starts, the reuse between recomputations (the previous release reused the
    float32-rounded weights, hence 1e-7) and the clipping."""
    strategy = mtlzoo.create("nash_mtl", num_tasks=3, update_weights_every=every, max_norm=max_norm)
    for rows, expected in zip(NASH_STEPS, NASH_EXPECTED[(every, max_norm)]):
        matrix = rows
        weights = strategy.gramian_weights(matrix @ matrix.T, torch.ones(3, dtype=torch.float64))
        torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-7, atol=1e-9)
        strategy.advance()
