"""The `mtlzoo` command."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch

import mtlzoo
from mtlzoo.cli import main


def test_list_prints_a_table_of_every_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "aliases", "kind", "needs", "paper", "origin"]
    rows = {line.split()[0]: line for line in lines[2:lines.index("")]}
    assert set(rows) == {entry.name for entry in mtlzoo.list_strategies()}
    assert "Javaloy & Valera, ICLR 2022" in rows["rotograd"] and "built-in" in rows["rotograd"]
    assert "rotateonly" in rows["rotate_only"]


def test_list_shows_the_modifiers_after_the_strategies(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21: the modifiers (ema among them) are listed, with their hyperparameters; a pattern selects them too, and
    a filter on kind or place (which only strategies have) leaves them out."""
    from mtlzoo.roles.modifiers import MODIFIERS

    assert main(["list"]) == 0
    text = capsys.readouterr().out
    listed = text[text.index("Modifiers:"):].splitlines()[3:]
    assert [line.split()[0] for line in listed] == sorted(MODIFIERS)
    assert any(line.split()[:2] == ["ema", "beta=0.9"] for line in listed)
    main(["list", "em*"])
    text = capsys.readouterr().out
    assert "\nema " in text and "clip_norm" not in text
    main(["list", "--kind", "weighting"])
    assert "Modifiers:" not in capsys.readouterr().out


def test_list_json_has_one_record_per_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records] == [e.name for e in mtlzoo.list_strategies()]
    by_name = {r["name"]: r for r in records}
    assert by_name["rotograd_norm"]["aliases"] == ["rotogradnorm"]
    assert by_name["rotograd_norm"]["required"] == ["alpha"]
    assert by_name["rotograd_norm"]["suggested"] == by_name["gradnorm"]["suggested"] == {"alpha": 1.5}
    assert by_name["rotograd"]["kind"] == "surgery"
    assert by_name["rotograd"]["needs"] == mtlzoo.get_strategy("rotograd").info.needs != by_name["ls"]["needs"]
    assert by_name["ls"]["origin"] == "built-in" and not by_name["ls"]["adapts_representation"]
    assert by_name["rotograd"]["adapts_representation"] and by_name["rotograd"]["learnable"]
    assert by_name["rotograd"]["paper"]["year"] == 2022


def test_list_filters(capsys: pytest.CaptureFixture[str]) -> None:
    main(["list", "roto*", "--format", "json"])
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["rotograd", "rotograd_norm"]
    main(["list", "--kind", "weighting", "--format", "json"])
    assert all(r["kind"] == "weighting" for r in json.loads(capsys.readouterr().out))
    main(["list", "--where", "representation", "--format", "json"])
    found = json.loads(capsys.readouterr().out)
    assert {"rotograd", "rotate_only"} <= {r["name"] for r in found}
    assert all(r["request"]["where"] == "representation" for r in found)


def test_list_help_says_in_process_registrations_are_not_shown(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 7, item 21: `mtlzoo list` runs in a process of its own; its help says what it cannot show."""
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "entry-point group" in text
    assert "@mtlzoo.register_strategy" in text and "are not shown" in text and "mtlzoo.list_strategies()" in text


def test_python_dash_m_runs_the_same_command() -> None:
    result = subprocess.run([sys.executable, "-m", "mtlzoo", "list", "--format", "json"], check=True,
                            capture_output=True, text=True)
    assert {"ls", "rotograd"} <= {r["name"] for r in json.loads(result.stdout)}


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as error:
        main(["frobnicate"])
    assert error.value.code == 2


# ----------------------------------------------------------------------- compare
def _compare(tmp_path: Any, *extra: str) -> list[str]:
    return ["compare", "--problem", "toy2d", "--strategies", "rotograd", "--steps", "12", "--seeds", "2",
            "--out", str(tmp_path), *extra]


def test_compare_prints_a_table_per_problem_and_writes_results_and_plots(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 10: a readable table per problem (one row per strategy, ls added) and --out's files."""
    pytest.importorskip("matplotlib")
    assert main(_compare(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "toy2d: 12 steps x 2 seeds" in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    tables = len([line for line in out.splitlines() if line.startswith("toy2d: 12 steps x 2 seeds")])
    assert [row.split("│")[1].strip() for row in rows] == ["ls", "rotograd"] * tables  # each part of a wide table
    assert sum("2/2" in row for row in rows) == 2
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["results.csv", "results.json", "runs", "toy2d_losses.png", "toy2d_pareto.png",
                     "toy2d_trajectories.png"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert [row["strategy"] for row in data["problems"][0]["summary"]] == ["ls", "rotograd"]


def test_compare_json_format(capsys: pytest.CaptureFixture[str]) -> None:
    """Options after a colon reach the problem and the strategy; ls is its own reference (Δm% 0, time ratio 1)."""
    args = ["compare", "--problem", "gradnorm_synthetic:train_size=300:test_size=100", "--strategies",
            "rotograd_norm:alpha=0.5", "--steps", "6", "--seeds", "0,3", "--format", "json"]
    assert main(args) == 0
    (problem,) = json.loads(capsys.readouterr().out)
    assert problem["problem"] == "gradnorm_synthetic"
    labels = [row["strategy"] for row in problem["summary"]]
    assert labels == ["ls", "rotograd_norm:alpha=0.5"]
    assert all(row["ok"] == 2 for row in problem["summary"])
    assert problem["summary"][0]["delta_m"] == 0 and problem["summary"][0]["time_ratio"] == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--strategies", "ls,rotogard"], "Did you mean 'rotograd'"),
    (["--problem", "toy3d"], "Did you mean 'toy2d'"),
    (["--strategies", "rotograd:normalise_losses=true"], "Did you mean 'normalize_losses'"),
    (["--strategy-optimizer", "rotograd=adma:0.1", "--strategies", "rotograd"], "Unknown optimizer 'adma'"),
    (["--seeds", "two"], "--seeds"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "cannot be used here"),
    (["--device", "gpu"], "cannot be used here"),
])
def test_compare_refuses_bad_input_before_training(args: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 10: bad names and options fail before any training (training is replaced by a failure) with close names."""
    from mtlzoo.harness import training

    monkeypatch.setattr(training, "_train", lambda *a, **k: pytest.fail("training started"))
    assert main(["compare", *args]) == 2
    assert message in capsys.readouterr().err


def test_an_interrupted_compare_keeps_finished_runs_and_resumes(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C (KeyboardInterrupt) in the third run: two runs are kept; --resume trains only the other two."""
    from mtlzoo.harness import training

    real_train = training._train
    calls: list[str] = []

    def interrupted(problem: Any, plan: Any, seed: int, *args: Any) -> None:
        calls.append(f"{plan.label}/{seed}")
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_train(problem, plan, seed, *args)

    monkeypatch.setattr(training, "_train", interrupted)
    assert main(_compare(tmp_path, "--no-plots")) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and str(tmp_path / "runs") in err
    assert len(list((tmp_path / "runs" / "toy2d").glob("*.json"))) == 2
    assert main(_compare(tmp_path, "--no-plots")) == 2  # refuses to mix with earlier runs without --resume
    assert "--resume" in capsys.readouterr().err
    calls.clear()
    assert main(_compare(tmp_path, "--no-plots", "--resume")) == 0
    assert calls == ["ls/1", "rotograd/1"]
    assert "2/2" in capsys.readouterr().out


def test_compare_help_problem_describes_the_source(capsys: pytest.CaptureFixture[str]) -> None:
    """Each problem documents its source (GradNorm, ICML 2018, section 4) and its full scale."""
    assert main(["compare", "--problem", "gradnorm_synthetic", "--help-problem"]) == 0
    out = capsys.readouterr().out
    assert "Chen, Badrinarayanan, Lee & Rabinovich" in out and "full: 25000 steps" in out


def test_compare_help_states_what_the_default_cuts(capsys: pytest.CaptureFixture[str]) -> None:
    """The help's account of the default scale is generated from the problems, so it cannot drift from them."""
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    from mtlzoo.harness.problems import BUILTIN_PROBLEMS

    for cls in BUILTIN_PROBLEMS:
        assert f"{cls.name}: {cls.default_steps:,} steps x {cls.default_seeds} seeds" in text
        assert f"full: {cls.full_steps:,} x {cls.full_seeds}" in text


# ------------------------------------------------------------------------- bench
def test_bench_reports_ratios_to_ls_on_both_models(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 10: median step time per strategy and model, and its ratio to ls's median on the same model."""
    args = ["bench", "--strategies", "rotograd", "--tasks", "3", "--dim", "8", "--steps", "6", "--warmup", "1",
            "--threads", "1", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["tasks"] == 3 and report["settings"]["batch_sizes"] == {"mlp": 256, "cnn": 64}
    records = {(r["model"], r["strategy"]): r for r in report["results"]}
    assert set(records) == {("mlp", "ls"), ("mlp", "rotograd"), ("cnn", "ls"), ("cnn", "rotograd")}
    assert all(r["status"] == "ok" and r["steps"] == 6 and r["median_s"] > 0 for r in records.values())
    assert records[("mlp", "ls")]["ratio_to_ls"] == 1.0
    ratio = records[("cnn", "rotograd")]["ratio_to_ls"]
    assert ratio == pytest.approx(records[("cnn", "rotograd")]["median_s"] / records[("cnn", "ls")]["median_s"])


def test_bench_takes_strategy_options(capsys: pytest.CaptureFixture[str]) -> None:
    """A strategy with options is timed as given (the representation variant of a surgery), under its spec,
    and an alias resolves to the registered name."""
    args = ["bench", "--strategies", "upgrad:target=representation,rotateonly", "--model", "mlp", "--tasks", "2",
            "--dim", "8", "--steps", "2", "--warmup", "1", "--threads", "1", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["strategies"] == ["ls", "upgrad:target=representation", "rotate_only"]
    assert all(r["status"] == "ok" for r in report["results"])
    assert main([*args[:2], "upgrad:target=nowhere", *args[3:]]) == 0  # the options reach the strategy
    failed = [r for r in json.loads(capsys.readouterr().out)["results"] if r["strategy"] != "ls"]
    assert failed[0]["status"] == "failed" and "target" in failed[0]["error"]


def test_bench_models_have_the_stated_shapes() -> None:
    """MLP: 64-256-256-d with K linear heads; CNN: a (batch, d, 8, 8) representation."""
    import torch

    from mtlzoo.harness.bench import reference_batch, reference_model

    mlp = reference_model("mlp", 3, 16)
    widths = [(m.in_features, m.out_features) for m in mlp.backbone if isinstance(m, torch.nn.Linear)]
    assert widths == [(64, 256), (256, 256), (256, 16)] and len(mlp.heads) == 3
    cnn = reference_model("cnn", 2, 16)
    x, targets = reference_batch("cnn", 2, 5, torch.Generator().manual_seed(0))
    assert cnn.backbone(x).shape == (5, 16, 8, 8)
    assert [tuple(p.shape) for p in cnn(x)] == [tuple(t.shape) for t in targets] == [(5, 1, 8, 8)] * 2


def test_bench_unknown_strategy_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown names fail with close matches, as in the registry (timm's habit)."""
    assert main(["bench", "--strategies", "rotogradd"]) == 2
    assert "Did you mean 'rotograd'" in capsys.readouterr().err


# ------------------------------------------------------- small things a new user hit (issue 19, items 21 and 24)
def test_compare_help_prints_delta_m_without_a_doubled_percent(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse expands `%%` in an option's help but prints a raw description as written."""
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "Δm%%" not in out and out.count("Δm%") >= 2


def test_list_into_a_closed_pipe_exits_quietly() -> None:
    """`mtlzoo list | head`: the reader is gone before the table is written; no BrokenPipeError traceback."""
    process = subprocess.Popen([sys.executable, "-m", "mtlzoo", "list"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the only reader closes its end, as `head` does after its lines
    error = process.stderr.read().decode()
    assert process.wait() == 1
    assert "Traceback" not in error and "BrokenPipeError" not in error


class AlwaysFailing(mtlzoo.WeightingStrategy):
    info = mtlzoo.StrategyInfo(name="test_always_failing", kind="weighting", needs="losses", summary="raises")

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


@pytest.fixture
def always_failing() -> Any:
    mtlzoo.register_strategy(AlwaysFailing)
    yield
    mtlzoo.registry.REGISTRY.unregister_plugin(mtlzoo.get_strategy("test_always_failing").origin.plugin)


@pytest.mark.usefixtures("always_failing")
def test_compare_exits_non_zero_when_a_named_strategy_failed_every_run(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "--problem", "toy2d", "--steps", "3", "--seeds", "2", "--conflict-every", "0"]
    assert main([*args, "--strategies", "test_always_failing"]) == 1
    captured = capsys.readouterr()
    assert "test_always_failing failed every run on toy2d" in captured.err and "boom" in captured.out
    assert main([*args, "--strategies", "upgrad"]) == 0


def test_compare_omits_an_empty_literature_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    """A problem whose `literature` is empty gets no "The literature on NAME (a newcomer): ." line."""
    from dataclasses import dataclass
    from typing import ClassVar

    from mtlzoo.harness.problems import Toy2D, register_problem

    @dataclass(frozen=True)
    class Newcomer(Toy2D):
        name: ClassVar[str] = "test_newcomer"
        source: ClassVar[str] = "a newcomer"
        literature: ClassVar[str] = ""

    register_problem(Newcomer)
    try:
        assert main(["compare", "--problem", "test_newcomer", "--strategies", "ls", "--steps", "2", "--seeds", "1",
                     "--conflict-every", "0"]) == 0
    finally:
        mtlzoo.registry.REGISTRY.unregister_plugin(f"{Newcomer.__module__}:{Newcomer.__qualname__}[problem]")
    out = capsys.readouterr().out
    assert "The literature on" not in out and ": ." not in out
    assert main(["compare", "--problem", "toy2d", "--strategies", "ls", "--steps", "2", "--seeds", "1"]) == 0
    assert "The literature on toy2d (Javaloy & Valera" in capsys.readouterr().out  # a non-empty one still shows


@pytest.mark.parametrize("columns", [80, 100])
def test_compare_tables_fit_the_terminal_without_cutting_numbers(
        columns: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """At 80 and 100 columns every line fits and no number is shortened to `0.9…`: wide tables are split."""
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["compare", "--problem", "toy2d", "--strategies", "upgrad,rotograd,rotograd_norm", "--steps", "4",
                 "--seeds", "2", "--conflict-every", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tables = [line for line in lines if not line.startswith("  ")]  # the notes below wrap as prose
    assert max(len(line) for line in tables) <= columns
    assert "…" not in "\n".join(lines)
    assert sum(line.startswith("│ rotograd_norm ") for line in lines) >= 1


def test_bench_prints_a_readable_table_and_json_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--strategies", "uw", "--model", "mlp", "--tasks", "2", "--dim", "8", "--steps", "2",
            "--warmup", "1", "--threads", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    header = next(line for line in text.splitlines() if line.startswith("strategy"))
    assert header.split() == ["strategy", "ms/step", "p25", "p75", "x", "ls", "status"]
    assert any(line.startswith("uw ") and line.rstrip().endswith("ok") for line in text.splitlines())
    for option in (["--json"], ["--format", "json"]):
        assert main([*args, *option]) == 0
        assert [r["strategy"] for r in json.loads(capsys.readouterr().out)["results"]] == ["ls", "uw"]
