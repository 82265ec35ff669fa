"""The comparison harness: identical conditions, failures recorded, resumable, checked inputs, derived values.

References: the harness's contract in issue 10 (same initialisation and data order for every
strategy, a failing strategy recorded and the others going on, finished runs kept and skipped on
resume, bad input refused before training); Δm% as Nash-MTL (Navon et al., ICML 2022) and FAMO
(Liu et al., NeurIPS 2023) define it, checked on values computed by hand; cosine similarity and
mean rank from their definitions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import mtlzoo
from mtlzoo import harness
from mtlzoo.errors import (
    ComparisonError,
    UnknownHyperparameterError,
    UnknownProblemError,
    UnknownStrategyError,
)
from mtlzoo.harness import ComparisonResults, RunConfig, RunResult, StrategySpec, compare, measure_conflicts, plan, run
from mtlzoo.harness.problems import GradNormSynthetic, Toy2D
from mtlzoo.harness.spec import split_top_level
from mtlzoo.registry import REGISTRY
from mtlzoo.strategy import StrategyInfo

SMALL_GN = {"train_size": 500, "test_size": 200, "batch_size": 50}


def _curves(result: RunResult) -> Tensor:
    return torch.tensor(result.train_losses)


# ------------------------------------------------------------------ same conditions
def test_two_runs_of_one_strategy_and_seed_are_bitwise_identical() -> None:
    """RotoGrad draws random rotations and the data is shuffled: only seeding both makes the runs equal."""
    problem = GradNormSynthetic(**SMALL_GN)
    first = run(problem, "rotograd", 3, RunConfig(steps=25, conflict_every=5))
    second = run(problem, "rotograd", 3, RunConfig(steps=25, conflict_every=5))
    other_seed = run(problem, "rotograd", 4, RunConfig(steps=25, conflict_every=5))
    assert first.ok and second.ok
    assert first.train_losses == second.train_losses
    assert first.metrics == second.metrics
    assert first.conflicts == second.conflicts
    assert first.train_losses != other_seed.train_losses  # the seed matters, so the equality above says something


def test_compare_twice_gives_the_same_results() -> None:
    problem = Toy2D()
    a = compare(problem, ["rotograd"], seeds=[1], steps=20)
    b = compare(problem, ["rotograd"], seeds=[1], steps=20)
    assert [r.train_losses for r in a.runs] == [r.train_losses for r in b.runs]
    assert [r.trace for r in a.runs] == [r.trace for r in b.runs]


IDENTITY_ROTATE_ONLY = StrategySpec("rotate_only", {"rotation_init": "identity", "normalize_losses": False}, lr=0.0)


@pytest.mark.parametrize("problem", [Toy2D(), GradNormSynthetic(**SMALL_GN)], ids=["toy2d", "gradnorm_synthetic"])
def test_mathematically_equal_strategies_give_equal_curves(problem: Any) -> None:
    """rotate_only with identity rotations that never move (lr 0) and raw losses sends sum_k g_k to the
    backbone: the same update as ls. Equal curves need the same initial weights and the same batches in
    the same order (gradnorm_synthetic shuffles its data every epoch)."""
    results = compare(problem, ["ls", IDENTITY_ROTATE_ONLY], seeds=[0, 1], steps=30)
    for seed in (0, 1):
        ls, rotate = results.run("ls", seed), results.run(IDENTITY_ROTATE_ONLY.display(), seed)
        assert ls.ok and rotate.ok, (ls.error, rotate.error)
        torch.testing.assert_close(_curves(rotate), _curves(ls), rtol=1e-5, atol=1e-6)
    # not vacuous: random rotations (still frozen) change the curves
    random = StrategySpec("rotate_only", {"normalize_losses": False}, lr=0.0)
    moved = compare(problem, [random], seeds=[0], steps=30).run(random.display(), 0)
    assert not torch.allclose(_curves(moved), _curves(results.run("ls", 0)), rtol=1e-3, atol=1e-4)


def test_every_strategy_starts_from_the_seeds_model_and_the_global_rng_is_left_alone() -> None:
    """The first recorded loss is that of the model built under torch.manual_seed(seed), on the first
    batch of the epoch drawn from a generator seeded with the seed: for ls, and for rotate_only with
    identity rotations, which draws its own random numbers (none here) after the model is built."""
    state = torch.get_rng_state()
    results = compare(GradNormSynthetic(**SMALL_GN), ["rotograd", IDENTITY_ROTATE_ONLY], seeds=[2], steps=3)
    assert torch.equal(state, torch.get_rng_state())
    problem = GradNormSynthetic(**SMALL_GN)
    torch.manual_seed(2)
    model = problem.build_model()
    x, y = next(iter(problem.epoch(torch.Generator().manual_seed(2))))
    with torch.no_grad():
        expected = [float(loss) for loss in problem.losses(model(x), y)]
    for label in ("ls", IDENTITY_ROTATE_ONLY.display()):
        assert results.run(label, 2).train_losses[0] == pytest.approx(expected, rel=1e-6)
    assert results.run("rotograd", 2).train_losses[0] != pytest.approx(expected, rel=1e-3)  # its random rotations


class TwoBatches(mtlzoo.GradientSurgery):
    """Test strategy (no paper): reads a second independent batch per step, and records both batches' losses."""

    info = StrategyInfo(name="test_two_batches", kind="surgery", summary="two batches",
                        request=mtlzoo.Request("representation", batches=2))
    seen: ClassVar[list[tuple[Tensor, Tensor]]] = []

    def compute(self, inputs: Any) -> Any:
        (extra,) = inputs.extra
        TwoBatches.seen.append((inputs.losses.clone(), extra.losses.clone()))
        return mtlzoo.Update(direction=inputs.gradients.sum(0))


def test_a_strategy_reading_two_batches_gets_a_stream_of_its_own() -> None:
    """Its first batch is everyone's (so its first loss is ls's), the second comes from another stream."""
    mtlzoo.register_strategy(TwoBatches)
    TwoBatches.seen.clear()
    try:
        results = compare(GradNormSynthetic(**SMALL_GN), ["test_two_batches"], seeds=[0], steps=4)
    finally:
        REGISTRY.unregister_plugin(mtlzoo.get_strategy("test_two_batches").origin.plugin)
    run_ = results.run("test_two_batches", 0)
    assert run_.ok, run_.error
    assert run_.train_losses[0] == results.run("ls", 0).train_losses[0]
    assert len(TwoBatches.seen) == 4
    assert all(not torch.equal(main, extra) for main, extra in TwoBatches.seen)


class Lifecycle(mtlzoo.WeightingStrategy):
    """Test strategy (no paper): equal weights; records its epoch ends and the losses it gets after each step."""

    info = StrategyInfo(name="test_lifecycle", kind="weighting", summary="records the loop's hooks")
    wants_post_step_losses = True
    log: ClassVar[list[tuple[str, Any]]] = []

    def weights(self, losses: Tensor) -> Tensor:
        Lifecycle.log.append(("before", losses.clone()))
        return torch.ones_like(losses)

    def post_step(self, losses: Tensor) -> None:
        Lifecycle.log.append(("after", losses.clone()))

    def end_epoch(self) -> None:
        Lifecycle.log.append(("epoch", None))


def test_the_loop_calls_post_step_with_the_losses_after_the_step_and_end_epoch_per_epoch() -> None:
    """The step protocol's loop: post_step gets the same batch's losses re-evaluated after the optimizer
    step (FAMO), and end_epoch follows every full epoch of the problem (DWA, STCH): 20 steps per epoch here."""
    mtlzoo.register_strategy(Lifecycle)
    Lifecycle.log.clear()
    problem = GradNormSynthetic(train_size=200, test_size=100, batch_size=10)
    try:
        result = run(problem, "test_lifecycle", 0, RunConfig(steps=45, conflict_every=0))
    finally:
        REGISTRY.unregister_plugin(mtlzoo.get_strategy("test_lifecycle").origin.plugin)
    assert result.ok, result.error
    kinds = [kind for kind, _ in Lifecycle.log]
    assert kinds.count("epoch") == 2 and kinds.count("after") == kinds.count("before") == 45
    assert [i for i, kind in enumerate(kinds) if kind == "epoch"] == [40, 81]  # after steps 20 and 40
    befores = [v for kind, v in Lifecycle.log if kind == "before"]
    afters = [v for kind, v in Lifecycle.log if kind == "after"]
    torch.testing.assert_close(befores[0], torch.tensor(result.train_losses[0]))
    for k in range(44):
        assert not torch.allclose(afters[k], befores[k], rtol=1e-6, atol=0)  # re-evaluated after the step ...
        # ... on the same batch, not the next: the model is the same at step k's post-step and step k + 1's forward
        assert not torch.allclose(afters[k], befores[k + 1], rtol=1e-6, atol=0)
    # a descent step lowers the loss summed over tasks on the batch it was computed on
    assert sum(float(a.sum() < b.sum()) for a, b in zip(afters, befores)) >= 40


# ------------------------------------------------------------------ failures go on
class Exploding(mtlzoo.WeightingStrategy):
    """Test strategy (no paper): from its fifth step on, weights of 0/0 (a division by zero gone wrong)."""

    info = StrategyInfo(name="test_exploding", kind="weighting", summary="diverges")

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.declare_state(steps=0)

    def weights(self, losses: Tensor) -> Tensor:
        return torch.full_like(losses, math.nan if self.state.steps >= 4 else 1.0)

    def on_advance(self) -> None:
        self.state.steps += 1


class Raising(mtlzoo.WeightingStrategy):
    """Test strategy (no paper): raises at its fourth step."""

    info = StrategyInfo(name="test_raising", kind="weighting", summary="raises")

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.count = 0

    def weights(self, losses: Tensor) -> Tensor:
        self.count += 1
        if self.count == 4:
            raise RuntimeError("boom at step 4")
        return torch.ones_like(losses)


@pytest.fixture
def failing_strategies() -> Any:
    for cls in (Exploding, Raising):
        mtlzoo.register_strategy(cls)
    yield
    for name in ("test_exploding", "test_raising"):
        REGISTRY.unregister_plugin(mtlzoo.get_strategy(name).origin.plugin)


@pytest.mark.usefixtures("failing_strategies")
def test_a_failing_strategy_is_recorded_and_the_others_go_on() -> None:
    results = compare(GradNormSynthetic(**SMALL_GN), ["test_raising", "rotograd", "test_exploding"], seeds=[0, 1],
                      steps=40)
    assert [r.label for r in results.runs] == ["ls", "test_raising", "rotograd", "test_exploding"] * 2
    by_label = {row["strategy"]: row for row in results.summary()}
    assert by_label["test_raising"]["ok"] == 0 and "boom at step 4" in by_label["test_raising"]["error"]
    assert by_label["test_exploding"]["ok"] == 0
    assert "finite" in by_label["test_exploding"]["error"]  # NaN weights, NaN parameters, then NaN losses
    assert results.run("test_exploding", 0).steps_done == 5
    assert results.run("test_raising", 0).steps_done == len(results.run("test_raising", 0).train_losses) == 3
    assert by_label["rotograd"]["ok"] == by_label["ls"]["ok"] == 2  # the runs after a failure went on
    assert math.isfinite(by_label["rotograd"]["delta_m"])


# ------------------------------------------------------------------ bad input, before training
@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr(harness.training, "_train", refuse)


@pytest.mark.usefixtures("no_training")
def test_unknown_names_and_options_fail_before_training_with_close_names() -> None:
    with pytest.raises(UnknownStrategyError, match="Did you mean 'rotograd'"):
        compare(Toy2D(), ["ls", "rotogard"])
    with pytest.raises(UnknownProblemError, match="Did you mean 'toy2d'"):
        compare("toy2", ["ls"])
    with pytest.raises(UnknownHyperparameterError, match="Did you mean 'normalize_losses'"):
        compare(Toy2D(), ["rotograd:normalise_losses=True"])


def test_a_modified_strategy_runs_by_name_with_its_modifiers_options() -> None:
    """``ema(mgda)`` (issue 21's modifier by name) trains like the object the registry builds for that name:
    with ``beta=0`` it is MGDA itself (the same curves), with ``beta=0.9`` it is not."""
    results = compare(Toy2D(), ["mgda", "ema(MGDA):beta=0.0", "ema(mgda):beta=0.9"], seeds=[0], steps=15,
                      conflict_every=0)
    runs = {run.label: run for run in results.runs}
    assert set(runs) == {"ls", "mgda", "ema(mgda):beta=0.0", "ema(mgda):beta=0.9"}
    assert runs["ema(mgda):beta=0.9"].strategy == "ema(mgda)"
    assert torch.equal(_curves(runs["mgda"]), _curves(runs["ema(mgda):beta=0.0"]))
    assert not torch.equal(_curves(runs["mgda"]), _curves(runs["ema(mgda):beta=0.9"]))
    with pytest.raises(UnknownStrategyError, match="Did you mean 'ema'"):
        compare(Toy2D(), ["emma(mgda)"])
    with pytest.raises(UnknownHyperparameterError):
        compare(Toy2D(), ["ema(mgda):bta=0.5"])


class Learnable(mtlzoo.WeightingStrategy):
    """Test strategy (no paper): one learnable weight per task and no optimizer recipe in its metadata."""

    info = StrategyInfo(name="test_learnable", kind="weighting", summary="learns weights", learnable=True)

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.log_w = nn.Parameter(torch.zeros(num_tasks))

    def scalarize(self, losses: Tensor) -> Tensor:
        return (self.log_w.exp() * losses).sum() - self.log_w.sum()


class NeedsValue(mtlzoo.WeightingStrategy):
    """Test strategy (no paper): a hyperparameter without a default."""

    info = StrategyInfo(name="test_needs_value", kind="weighting", summary="needs beta")

    def __init__(self, num_tasks: int, beta: float) -> None:
        super().__init__(num_tasks)

    def weights(self, losses: Tensor) -> Tensor:
        return torch.ones_like(losses)


@pytest.fixture
def demanding_strategies() -> Any:
    for cls in (Learnable, NeedsValue):
        mtlzoo.register_strategy(cls)
    yield
    for name in ("test_learnable", "test_needs_value"):
        REGISTRY.unregister_plugin(mtlzoo.get_strategy(name).origin.plugin)


@pytest.mark.usefixtures("demanding_strategies", "no_training")
def test_a_strategy_needing_what_the_problem_cannot_give_is_named_before_training() -> None:
    with pytest.raises(ComparisonError, match=r"'test_learnable'.*learnable parameters and no optimizer recipe"):
        compare(Toy2D(), ["ls", "test_learnable"])
    with pytest.raises(ComparisonError, match=r"'test_needs_value'.*beta"):
        compare(Toy2D(), ["test_needs_value"])


@pytest.mark.usefixtures("demanding_strategies")
def test_given_what_they_need_they_run_and_unnamed_they_are_recorded_as_failed() -> None:
    results = compare(Toy2D(), [StrategySpec("test_learnable", optimizer="adam", lr=0.01), "test_needs_value:beta=2"],
                      seeds=[0], steps=5)
    assert all(r.ok for r in results.runs), [r.error for r in results.runs]
    assert results.run("test_learnable@adam:0.01", 0).optimizer == ["adam", 0.01]
    lenient = compare(Toy2D(), ["test_learnable", "rotograd"], seeds=[0], steps=5, strict=False)
    failed = lenient.run("test_learnable", 0)
    assert not failed.ok and "no optimizer recipe" in failed.error and failed.steps_done == 0
    assert lenient.run("rotograd", 0).ok


def test_optimizer_recipe_order_run_over_problem_over_metadata() -> None:
    toy, synthetic = Toy2D(), GradNormSynthetic(**SMALL_GN)
    assert plan(toy, "rotograd").optimizer == ("adam", 0.05)  # the toy's recipe
    info = mtlzoo.get_strategy("rotograd").info
    assert plan(synthetic, "rotograd").optimizer == (info.optimizer, info.lr) == ("adam", 1e-4)  # the metadata's
    assert plan(toy, StrategySpec("rotograd", lr=0.2)).optimizer == ("adam", 0.2)  # the run's
    assert plan(toy, StrategySpec("rotograd", optimizer="sgd")).optimizer == ("sgd", 0.05)
    assert plan(toy, "ls").optimizer is None
    with pytest.raises(ComparisonError, match=r"Did you mean .*'adam'"):
        plan(toy, StrategySpec("rotograd", optimizer="adma"))


def test_strategy_info_comparison_fields() -> None:
    """Defaults keep existing StrategyInfo(...) calls valid; bad values are refused."""
    info = StrategyInfo(name="x", kind="weighting", summary="s")
    assert (info.optimizer, info.lr, info.default_comparison) == (None, None, False)
    with pytest.raises(ValueError, match="`lr`"):
        StrategyInfo(name="x", kind="weighting", summary="s", lr=-1.0)
    with pytest.raises(ValueError, match="`optimizer`"):
        StrategyInfo(name="x", kind="weighting", summary="s", optimizer="")
    defaults = {entry.name for entry in mtlzoo.list_strategies() if entry.info.default_comparison}
    assert {"ls", "rotate_only", "rotograd", "rotograd_norm"} <= defaults


def test_spec_parsing() -> None:
    assert harness.parse_spec("rotograd_norm:alpha=0.5:normalize_losses=true") == (
        "rotograd_norm", {"alpha": 0.5, "normalize_losses": True})
    assert split_top_level("ls:weights=[1, 2],rotograd", ",") == ["ls:weights=[1, 2]", "rotograd"]
    assert harness.parse_spec("x:mode=fast") == ("x", {"mode": "fast"})
    with pytest.raises(ComparisonError, match="has no '='"):
        harness.parse_spec("ls:weights")


# ------------------------------------------------------------------ resume
def test_an_interrupted_comparison_keeps_finished_runs_and_resume_skips_them(tmp_path: Any) -> None:
    problem = GradNormSynthetic(**SMALL_GN)
    strategies = ["rotograd", "rotate_only"]
    started: list[tuple[str, int]] = []

    def interrupt_at_the_fourth_run(event: harness.ProgressEvent) -> None:
        if event.kind == "run_start":
            started.append((event.label, event.seed))
            if len(started) == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compare(problem, strategies, seeds=2, steps=15, out=tmp_path, progress=interrupt_at_the_fourth_run)
    files = sorted(p.name for p in (tmp_path / "runs" / "gradnorm_synthetic").glob("*.json"))
    assert files == ["ls__seed0.json", "rotate_only__seed0.json", "rotograd__seed0.json"]

    with pytest.raises(ComparisonError, match="resume"):
        compare(problem, strategies, seeds=2, steps=15, out=tmp_path)

    events: list[harness.ProgressEvent] = []
    resumed = compare(problem, strategies, seeds=2, steps=15, out=tmp_path, resume=True, progress=events.append)
    trained = [(e.label, e.seed) for e in events if e.kind == "run_start"]
    assert trained == [("ls", 1), ("rotograd", 1), ("rotate_only", 1)]
    assert sum(e.skipped for e in events if e.kind == "run_end") == 3
    fresh = compare(problem, strategies, seeds=2, steps=15)
    assert [r.train_losses for r in resumed.runs] == [r.train_losses for r in fresh.runs]
    assert [r.metrics for r in resumed.runs] == [r.metrics for r in fresh.runs]

    # other settings are another run: with --resume it is trained again, not taken from the folder
    events.clear()
    compare(problem, strategies, seeds=2, steps=16, out=tmp_path, resume=True, progress=events.append)
    assert sum(e.kind == "run_start" for e in events) == 6


# ------------------------------------------------------------------ derived values
def _result(label: str, seed: int, metrics: dict[str, float], seconds: float = 0.01, cosines: Any = None,
            status: str = "ok") -> RunResult:
    return RunResult("p", {}, label, label, {}, None, seed, 10, status=status,
                     metrics={task: {"m": value} for task, value in metrics.items()}, seconds_per_step=seconds,
                     conflicts={"steps": [0, 1], "cosines": cosines or [[0.5], [0.5]]})


def _results(higher: bool, runs: list[RunResult], reference: str = "ls") -> ComparisonResults:
    problem = {"name": "p", "settings": {}, "task_names": ["a", "b"], "delta_m": True,
               "metrics": [{"name": "m", "higher_is_better": higher}]}
    labels = list(dict.fromkeys(r.label for r in runs if r.role == "strategy"))
    return ComparisonResults(problem, runs, labels, reference, steps=10, seeds=sorted({r.seed for r in runs}))


def test_delta_m_by_hand() -> None:
    """Δm% = (100/K) sum_k (-1)^{h_k} (M_k - M_ls,k) / M_ls,k.

    Lower is better: ls (0.5, 2.0), x (0.25, 2.5): 50 * (-0.5 + 0.25) = -12.5.
    Higher is better: ls (0.8, 0.9), x (0.88, 0.9): 50 * -(0.08 / 0.8) = -5.
    """
    lower = _results(False, [_result("ls", 0, {"a": 0.5, "b": 2.0}), _result("x", 0, {"a": 0.25, "b": 2.5})])
    assert lower.delta_m_of(lower.run("x", 0)) == pytest.approx(-12.5)
    assert lower.delta_m_of(lower.run("ls", 0)) == 0
    higher = _results(True, [_result("ls", 0, {"a": 0.8, "b": 0.9}), _result("x", 0, {"a": 0.88, "b": 0.9})])
    assert higher.delta_m_of(higher.run("x", 0)) == pytest.approx(-5.0)
    single = _results(False, [
        _result("ls", 0, {"a": 0.5, "b": 2.0}),
        RunResult("p", {}, "single_task[a]", "ls", {}, None, 0, 10, role="reference", task="a",
                  metrics={"a": {"m": 0.4}, "b": {"m": 9.0}}),
        RunResult("p", {}, "single_task[b]", "ls", {}, None, 0, 10, role="reference", task="b",
                  metrics={"a": {"m": 9.0}, "b": {"m": 1.0}}),
    ], reference="single_task")
    # against single-task training: 50 * ((0.5 - 0.4) / 0.4 + (2.0 - 1.0) / 1.0) = 62.5
    assert single.delta_m_of(single.run("ls", 0)) == pytest.approx(62.5)


def test_ranks_times_conflicts_and_summary_by_hand() -> None:
    runs = [
        _result("ls", 0, {"a": 1.0, "b": 1.0}, seconds=0.010, cosines=[[0.5], [-0.2], [0.1], [0.3]]),
        _result("x", 0, {"a": 0.5, "b": 2.0}, seconds=0.030, cosines=[[-0.5], [-0.5]]),
        _result("y", 0, {"a": 1.0, "b": 0.5}, seconds=0.020),
        _result("ls", 1, {"a": 1.0, "b": 1.0}, seconds=0.010),
        _result("x", 1, {}, status="failed"),
        _result("y", 1, {"a": 2.0, "b": 2.0}, seconds=0.040),
    ]
    results = _results(False, runs)
    # seed 0, task a: x 1st, ls and y tie for 2nd-3rd (2.5 each); task b: y 1st, ls 2nd, x 3rd
    assert results.mean_ranks(0) == {"ls": pytest.approx(2.25), "x": pytest.approx(2.0), "y": pytest.approx(1.75)}
    assert results.mean_ranks(1) == {"ls": 1.0, "y": 2.0}  # the failed run is not ranked
    assert results.time_ratio_of(results.run("x", 0)) == pytest.approx(3.0)
    assert ComparisonResults.conflict_share(results.run("ls", 0)) == 0.25
    assert ComparisonResults.mean_cosine(results.run("ls", 0)) == pytest.approx(0.175)
    rows = {row["strategy"]: row for row in results.summary()}
    assert rows["x"]["ok"] == 1 and rows["x"]["runs"] == 2
    assert rows["y"]["a/m"] == pytest.approx(1.5) and rows["y"]["a/m_std"] == pytest.approx(math.sqrt(0.5))
    assert rows["y"]["time_ratio"] == pytest.approx(3.0)  # mean of 2.0 and 4.0
    assert rows["y"]["worst"] == pytest.approx(1.5)  # mean of max(1.0, 0.5) and max(2.0, 2.0)
    records = results.to_records()
    assert len(records) == 6 and records[1]["a/m"] == 0.5 and records[4]["status"] == "failed"
    again = ComparisonResults.from_dict(json.loads(json.dumps(results.to_dict())))
    assert again.summary() == results.summary()


def test_conflicts_are_cosines_of_the_task_gradients_on_the_representation() -> None:
    """Losses (z - a)^2 and (z + a)^2 at z = 0 have gradients -2a and 2a (cosine -1); (z - a)^2 with
    (z - b)^2, a ⟂ b, have orthogonal gradients (cosine 0)."""

    @dataclass(frozen=True)
    class Quadratic(Toy2D):
        targets: tuple[tuple[float, float], ...] = ((1.0, 0.0), (-1.0, 0.0))
        name: ClassVar[str] = "test_quadratic"

        def losses(self, predictions: Any, targets: Any) -> list[Tensor]:
            return [((z - torch.tensor(t)) ** 2).sum(-1).mean() for z, t in zip(predictions, self.targets)]

    backbone = nn.Linear(2, 2)
    nn.init.zeros_(backbone.weight)
    nn.init.zeros_(backbone.bias)
    mtl = mtlzoo.MTLWrapper(mtlzoo.HardSharing(backbone, [nn.Identity(), nn.Identity()]), "ls")
    x = torch.zeros(4, 2)
    cosines = measure_conflicts(mtl, Quadratic(), x, None)
    torch.testing.assert_close(cosines, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    cosines = measure_conflicts(mtl, Quadratic(targets=((1.0, 0.0), (0.0, 1.0))), x, None)
    torch.testing.assert_close(cosines, torch.eye(2))
    assert all(p.grad is None for p in mtl.parameters())  # a measurement, not a training step


def test_single_task_reference_runs_one_model_per_task() -> None:
    results = compare(GradNormSynthetic(**SMALL_GN), ["rotograd"], seeds=[0], steps=10, reference="single_task")
    references = [r for r in results.runs if r.role == "reference"]
    assert [r.label for r in references] == ["single_task[task0]", "single_task[task1]"]
    assert [r.options["weights"] for r in references] == [[1.0, 0.0], [0.0, 1.0]]
    assert results.labels == ["ls", "rotograd"]
    ls = results.run("ls", 0)
    expected = 50 * sum((ls.metrics[t]["mse"] - r.metrics[t]["mse"]) / r.metrics[t]["mse"]
                        for t, r in zip(["task0", "task1"], references))
    assert results.delta_m_of(ls) == pytest.approx(expected)


def test_save_and_load_round_trip(tmp_path: Any) -> None:
    results = compare(Toy2D(), ["rotograd"], seeds=[0], steps=5)
    paths = harness.save([results], tmp_path)
    assert [p.name for p in paths] == ["results.json", "results.csv"]
    (loaded,) = harness.load(tmp_path)
    assert loaded.summary() == results.summary()
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + len(results.runs) and lines[0].startswith("problem,strategy")
