"""RotoGrad's ``orthogonal_map="retraction"`` trains like the trivializations (issue 12's condition for a default).

Run with ``python -m pytest -m bench -s -n0 tests/bench/test_rotograd_equivalence.py`` (about 15 minutes on
2 CPU cores); the same figures come from

    MAPS=rotograd:orthogonal_map=cayley,rotograd:orthogonal_map=retraction
    mtlzoo compare --problem toy2d --strategies "$MAPS,rotograd:orthogonal_map=matrix_exp" --seeds 8
    mtlzoo compare --problem gradnorm_synthetic --strategies "$MAPS" --seeds 8

Reference: each problem's own recipe (toy2d: the authors' example, Adam at 0.05 on the rotations;
gradnorm_synthetic: GradNorm's section 4), 8 seeds at the problems' default steps. The condition: every
task's mean final loss with ``retraction`` lies within the seed-to-seed spread (one standard deviation
over the seeds, the larger of the two maps') of the mean with ``cayley`` (the previous default) and of the
mean with ``matrix_exp`` (the original package's chart) where it runs.
"""

from __future__ import annotations

import statistics

import pytest

from mtlzoo.compare import compare

pytestmark = pytest.mark.bench
SEEDS = 8
CASES = {
    "toy2d": ("cayley", "matrix_exp", "retraction"),
    "gradnorm_synthetic": ("cayley", "retraction"),
}
METRIC = {"toy2d": "loss", "gradnorm_synthetic": "mse"}


@pytest.mark.parametrize("problem", sorted(CASES))
def test_retraction_trains_within_the_seed_spread_of_the_trivializations(problem: str) -> None:
    labels = [f"rotograd:orthogonal_map={name}" for name in CASES[problem]]
    results = compare(problem, labels, seeds=SEEDS)
    finals: dict[str, dict[str, list[float]]] = {}
    for label in labels:
        runs = results.runs_of(label)
        assert len(runs) == SEEDS and all(run.status == "ok" for run in runs), label
        tasks = sorted(runs[0].metrics)
        finals[label] = {task: [run.metrics[task][METRIC[problem]] for run in runs] for task in tasks}
    print(f"\n{problem}: final {METRIC[problem]} per task, mean ± std over {SEEDS} seeds")
    for label, per_task in finals.items():
        print(f"  {label:<36} " + "  ".join(
            f"{task} {statistics.mean(v):.4g} ± {statistics.stdev(v):.2g}" for task, v in per_task.items()))
    ours = finals["rotograd:orthogonal_map=retraction"]
    for label in labels[:-1]:
        for task, values in finals[label].items():
            spread = max(statistics.stdev(values), statistics.stdev(ours[task]))
            gap = abs(statistics.mean(values) - statistics.mean(ours[task]))
            assert gap <= spread, f"{problem}, {task}: retraction vs {label}: gap {gap:.3g} > spread {spread:.3g}"
