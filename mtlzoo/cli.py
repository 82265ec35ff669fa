"""The ``mtlzoo`` command (also ``python -m mtlzoo``)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from mtlzoo.registry import StrategyEntry, list_strategies


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _row(entry: StrategyEntry) -> list[str]:
    info = entry.info
    return [info.name, ", ".join(info.aliases) or "-", info.kind, info.needs,
            info.paper.citation() if info.paper else "-", str(entry.origin)]


def _list(args: argparse.Namespace) -> int:
    entries = list_strategies(args.pattern or "*", kind=args.kind, where=args.where)
    if args.format == "json":
        print(json.dumps([entry.to_record() for entry in entries], indent=2, ensure_ascii=False))
    elif entries:
        print(_table([_row(entry) for entry in entries], ["name", "aliases", "kind", "needs", "paper", "origin"]))
    else:
        print("No strategy matches.", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlzoo", description="Multitask-learning strategies for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser(
        "list", help="list the registered strategies",
        description="List the built-in strategies and those of installed plugins (the `mtlzoo` entry-point group).",
        epilog="Strategies registered in your own Python process, with @mtlzoo.register_strategy or "
               "mtlzoo.registry.REGISTRY.register_plugin, are not shown: this command runs in a process of its "
               "own. Call mtlzoo.list_strategies() in that process to see them.",
    )
    listing.add_argument("pattern", nargs="?", help="fnmatch pattern on names and aliases, e.g. 'roto*'")
    listing.add_argument("--kind", choices=["weighting", "surgery"], help="only this kind")
    listing.add_argument("--where", choices=["losses", "representation", "parameters"],
                         help="only strategies that read gradients there by default (losses: none)")
    listing.add_argument("--format", choices=["table", "json"], default="table", help="output format")
    listing.set_defaults(run=_list)
    _add_compare(commands)
    _add_bench(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


# ------------------------------------------------------------------------ compare
def _compare_epilog() -> str:
    """The help's account of the default comparison, from the built-in problems' own scales."""
    from mtlzoo.problems import BUILTIN_PROBLEMS

    scales = "; ".join(f"{cls.name}: {cls.default_steps:,} steps x {cls.default_seeds} seeds (full: "
                       f"{cls.full_steps:,} x {cls.full_seeds})" for cls in BUILTIN_PROBLEMS)
    extras = ", ".join(f"{cls.name} with the {cls.extra!r} extra" for cls in BUILTIN_PROBLEMS if cls.extra)
    paragraphs = (
        "With no options: ls, the RotoGrad family and every registered strategy marked default_comparison in its "
        "metadata, on the built-in problems (" + extras + " only when installed), at a scale that ends in about 3 "
        "minutes on 2 CPU cores. The default cuts the number of steps and seeds, not the problems; the full "
        "scale is that of each problem's source, given by --steps and --seeds: " + scales + ". `mtlzoo compare "
        "--problem NAME --help-problem` describes a problem.",
        "Strategies and problems take options after a colon: --strategies 'ls,rotograd_norm:alpha=0.5' and "
        "--problem 'gradnorm_synthetic:num_tasks=10'. Named strategies are checked before any training, and one "
        "that cannot run on a problem is an error; with the default set or 'all' it is reported as failed.",
        "Ctrl-C keeps every finished run in --out DIR: run the same command with --resume to go on.",
    )
    return "\n\n".join(textwrap.fill(text, 100, break_on_hyphens=False, break_long_words=False)
                       for text in paragraphs)


def _add_compare(commands: Any) -> None:
    compare = commands.add_parser(
        "compare", help="train strategies under identical conditions and compare them",
        description="Train each strategy on each problem from the same initial weights, with the same data order "
                    "and model optimizer, then tabulate the test metrics, Δm%% against ls (lower is better), mean "
                    "rank, time per step (and its ratio to ls) and how often the task gradients conflict.",
        epilog=_compare_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_argument("--problem", action="append", metavar="NAME[:key=value...]",
                         help="problem(s), comma-separated or repeated, or 'all' (default: the default problems)")
    compare.add_argument("--strategies", metavar="LIST",
                         help="comma-separated strategies (name[:key=value...]) or 'all' (default: the default set)")
    compare.add_argument("--seeds", metavar="N|LIST", help="number of seeds, or a comma-separated list of seeds")
    compare.add_argument("--steps", type=int, metavar="N", help="optimizer steps per run (default: per problem)")
    compare.add_argument("--out", metavar="DIR",
                         help="write results.json, results.csv, PNG plots and each finished run there")
    compare.add_argument("--resume", action="store_true", help="skip the runs already finished in --out DIR")
    compare.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    compare.add_argument("--threads", type=int, default=1, metavar="N",
                         help="torch CPU threads (default 1: fastest for these small models, and steadier timings)")
    compare.add_argument("--reference", choices=["ls", "single_task"], default="ls",
                         help="what Δm%% is measured against (single_task: K more runs per seed)")
    compare.add_argument("--conflict-every", type=int, default=10, metavar="N",
                         help="steps between gradient-conflict measurements (0: none; default 10)")
    compare.add_argument("--strategy-optimizer", action="append", default=[], metavar="NAME=TYPE[:LR]",
                         help="optimizer of a strategy's own parameters, e.g. rotograd=adam:0.01 (repeatable)")
    compare.add_argument("--format", choices=["table", "json"], default="table",
                         help="table (default) or the summaries as JSON on stdout")
    compare.add_argument("--no-plots", action="store_true", help="with --out: skip the PNG plots")
    compare.add_argument("--help-problem", action="store_true", help="describe the chosen problems and exit")
    compare.set_defaults(run=_compare)


def _problem_texts(args: argparse.Namespace) -> list[str] | None:
    from mtlzoo.compare import split_top_level
    from mtlzoo.problems import list_problems

    if not args.problem:
        return None
    texts = [text for item in args.problem for text in split_top_level(item, ",")]
    if texts == ["all"]:
        return [entry.name for entry in list_problems(available_only=True)]
    return texts


def _strategy_specs(args: argparse.Namespace) -> Any:
    from mtlzoo.compare import ComparisonError, StrategySpec, default_strategies, split_top_level
    from mtlzoo.registry import get_strategy

    text = args.strategies
    if text in (None, "all", "default"):
        specs = default_strategies() if text in (None, "default") else [StrategySpec(e.name) for e in list_strategies()]
    else:
        specs = [StrategySpec.parse(item) for item in split_top_level(text, ",")]
    for item in args.strategy_optimizer:
        name, sep, recipe = item.partition("=")
        kind, _, lr = recipe.partition(":")
        if not sep or not kind:
            raise ComparisonError(f"--strategy-optimizer {item!r}: write NAME=TYPE[:LR], e.g. rotograd=adam:0.01.")
        try:
            rate = float(lr) if lr else None
        except ValueError:
            raise ComparisonError(f"--strategy-optimizer {item!r}: {lr!r} is not a learning rate.") from None
        target = get_strategy(name).name
        matched = [i for i, spec in enumerate(specs) if get_strategy(spec.name).name == target]
        if not matched:
            raise ComparisonError(f"--strategy-optimizer {item!r}: {target!r} is not among the strategies compared.")
        for i in matched:
            spec = specs[i]
            specs[i] = StrategySpec(spec.name, spec.options, kind, rate, spec.label)
    return specs, text not in (None, "all", "default")


def _seeds(text: str | None) -> Any:
    from mtlzoo.compare import ComparisonError

    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ComparisonError(f"--seeds {text!r}: give a number of seeds or a comma-separated list.") from None
    if len(values) == 1 and "," not in text:
        return values[0]
    return values


def _compare(args: argparse.Namespace) -> int:
    from mtlzoo.errors import MTLZooError

    try:
        return _run_compare(args)
    except (MTLZooError, ImportError) as error:
        print(f"mtlzoo compare: {error}", file=sys.stderr)
        return 2


def _run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mtlzoo.compare import RUNS_DIR, ComparisonError, compare, iter_problems, plan_all, save

    problems = list(iter_problems(_problem_texts(args)))
    if args.help_problem:
        for problem in problems:
            print(_describe(problem))
        return 0
    specs, named = _strategy_specs(args)
    seeds = _seeds(args.seeds)
    if args.steps is not None and args.steps < 1:
        raise ComparisonError(f"--steps should be a positive number. Found {args.steps}.")
    if args.threads is not None and args.threads < 1:
        raise ComparisonError(f"--threads should be a positive number. Found {args.threads}.")
    out = Path(args.out) if args.out else None
    if out is not None and (out / RUNS_DIR).exists() and not args.resume:
        raise ComparisonError(f"{out / RUNS_DIR} already holds runs: add --resume to keep the finished ones and run "
                              "the rest, or choose another --out folder.")
    plans = {problem.name: plan_all(problem, specs, reference=args.reference, strict=named, device=args.device)
             for problem in problems}  # every check before any training
    stdout, stderr = _console(), _console(stderr=True)
    results = []
    with _Progress(stderr, problems, plans, seeds, args.steps) as progress:
        try:
            for problem in problems:
                results.append(compare(problem, plans[problem.name], seeds=seeds, steps=args.steps,
                                       reference=args.reference, conflict_every=args.conflict_every,
                                       device=args.device, out=out, resume=args.resume, progress=progress,
                                       threads=args.threads))
        except KeyboardInterrupt:
            progress.stop()
            kept = f"; the finished runs are in {out / RUNS_DIR}: run the same command with --resume to go on" \
                if out is not None else " (use --out DIR to keep finished runs across an interruption)"
            stderr.print(f"Interrupted{kept}.")
            return 130
    if args.format == "json":
        print(json.dumps([{"problem": r.problem, "summary": r.summary()} for r in results], indent=2))
    else:
        for result in results:
            stdout.print(_result_table(result))
            if notes := _notes(result):
                stdout.print(notes)
    if out is not None:
        written = save(results, out)
        if not args.no_plots:
            try:
                from mtlzoo.plots import save_plots

                written += save_plots(results, out)
            except ImportError as error:
                stderr.print(f"No plots: {error}")
        stderr.print(f"Wrote {', '.join(str(path) for path in written)}")
    return 0


def _console(stderr: bool = False) -> Any:
    """A rich console; 140 columns when the output is not a terminal (a CI log), so tables do not wrap."""
    from rich.console import Console

    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=140)


class _Progress:
    """A rich progress bar over every training step of the comparison, on stderr."""

    def __init__(self, console: Any, problems: list[Any], plans: dict[str, list[Any]], seeds: Any,
                 steps: int | None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.total = 0
        for problem in problems:
            count = problem.default_seeds if seeds is None else (seeds if isinstance(seeds, int) else len(seeds))
            self.total += len(plans[problem.name]) * count * (steps or problem.default_steps)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                            TimeElapsedColumn(), console=console, transient=False)
        self.task = self.bar.add_task("compare", total=self.total)
        self.done_in_run = 0

    def __enter__(self) -> _Progress:
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self.bar.stop()

    def __call__(self, event: Any) -> None:
        if event.kind == "run_start":
            self.done_in_run = 0
            self.bar.update(self.task, description=f"{event.problem} · {event.label} · seed {event.seed}")
        elif event.kind == "step":
            self.bar.advance(self.task, event.step - self.done_in_run)
            self.done_in_run = event.step
        elif event.kind == "run_end":
            self.bar.advance(self.task, event.steps - (0 if event.skipped else self.done_in_run))
            self.done_in_run = 0


def _fmt(mean: float | None, std: float | None = None, digits: int = 3) -> str:
    if mean is None:
        return "-"
    text = f"{mean:.{digits}g}" if abs(mean) >= 1e-3 or mean == 0 else f"{mean:.1e}"
    return text if not std else f"{text}±{std:.1g}"


def _result_table(result: Any) -> Any:
    from rich.table import Table

    metric = result.primary
    arrow = "↑" if metric["higher_is_better"] else "↓"
    table = Table(title=f"{result.problem}: {result.steps} steps x {len(result.seeds)} seeds "
                        f"(mean ± std over seeds)", title_justify="left")
    table.add_column("strategy", style="bold", no_wrap=True)
    for task in result.task_names:
        table.add_column(f"{task} {metric['name']} {arrow}", justify="right")
    table.add_column(f"worst {arrow}", justify="right")
    if result.delta_m:
        table.add_column(f"Δm% vs {result.reference} ↓", justify="right")
    table.add_column("rank ↓", justify="right")
    table.add_column("ms/step", justify="right")
    table.add_column("x ls", justify="right")
    table.add_column("conflict", justify="right")
    table.add_column("runs", justify="right")
    for row in result.summary():
        cells = [row["strategy"]]
        cells += [_fmt(row[f"{task}/{metric['name']}"], row[f"{task}/{metric['name']}_std"])
                  for task in result.task_names]
        cells.append(_fmt(row["worst"], row["worst_std"]))
        if result.delta_m:
            cells.append(_fmt(row["delta_m"], row["delta_m_std"]))
        cells.append(_fmt(row["rank"], None, 2))
        ms = None if row["seconds_per_step"] is None else 1000 * row["seconds_per_step"]
        cells.append(_fmt(ms, None, 3))
        cells.append(_fmt(row["time_ratio"], None, 2))
        cells.append("-" if row["conflict_share"] is None else f"{100 * row['conflict_share']:.0f}%")
        status = f"{row['ok']}/{row['runs']}"
        cells.append(status if row["ok"] == row["runs"] else f"[red]{status} failed[/red]")
        table.add_row(*cells)
    return table


def _notes(result: Any) -> str:
    from mtlzoo.problems import get_problem

    lines = []
    try:
        cls = get_problem(result.problem).cls
        lines.append(f"  The literature on {cls.name} ({cls.source}): {cls.literature}.")
    except KeyError:
        pass
    for row in result.summary():
        if row["error"]:
            error = row["error"] if len(row["error"]) <= 800 else row["error"][:797] + "..."
            lines.append(f"  {row['strategy']} failed: {error}")
    lines.append("  conflict: share of measurements (every few steps) in which two task gradients on the shared "
                 "representation have a negative cosine; x ls: time per step over ls's, same comparison.")
    return "\n".join(lines)


def _describe(problem: Any) -> str:
    cls = type(problem)
    doc = (cls.__doc__ or "").strip()
    return (f"{cls.name}: {cls.summary}\nsettings: {problem.settings}\ndefault scale: {cls.default_steps} steps x "
            f"{cls.default_seeds} seeds; full: {cls.full_steps} steps x {cls.full_seeds} seeds\n\n{doc}\n")


# -------------------------------------------------------------------------- bench
def _add_bench(commands: Any) -> None:
    bench = commands.add_parser(
        "bench", help="time a training step of strategies, as a ratio to ls (or to plain training)",
        description="Median time of a training step (after warm-up) of each strategy on a reference MLP (input 64, "
                    "backbone 64-256-256-d, K linear heads, batch 256) and a small CNN whose representation is a "
                    "(batch, d, 8, 8) map (batch 64), as a ratio to ls on the same model. JSON on stdout. "
                    "With --vs-reference: mtlzoo beside rotograd 0.1.6.0, torchjd and hand-written training "
                    "(paired per-step ratios, peak memory), a table on stdout. With --growth: the ratio to plain "
                    "training as K and d grow.")
    bench.add_argument("--strategies", metavar="LIST",
                       help="comma-separated strategies (name[:key=value...], e.g. upgrad:target=representation) "
                            "or 'all' (default: the default set)")
    bench.add_argument("--tasks", type=int, default=4, metavar="K", help="number of tasks (default 4)")
    bench.add_argument("--dim", type=int, metavar="D",
                       help="width of the representation (default 64; 128 with --vs-reference)")
    bench.add_argument("--model", default="mlp,cnn", help="mlp, cnn or both (default: mlp,cnn)")
    bench.add_argument("--steps", type=int, metavar="N",
                       help="timed steps per strategy (default 50; --vs-reference 60; --growth 20)")
    bench.add_argument("--warmup", type=int, metavar="N", help="untimed steps first (default 10; 5; 2)")
    bench.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    bench.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's)")
    bench.add_argument("--out", metavar="FILE", help="also write the JSON to FILE")
    mode = bench.add_mutually_exclusive_group()
    mode.add_argument("--vs-reference", action="store_true",
                      help="mtlzoo beside rotograd 0.1.6.0 and torchjd (installs nothing: a missing package gives "
                           "'not installed' rows), as ratios to hand-written training; a table on stdout")
    mode.add_argument("--growth", action="store_true",
                      help="the ratio to plain training as K grows (--growth-tasks) and d grows (--growth-dims)")
    bench.add_argument("--sections", default="rotograd,torchjd,weighting,memory", metavar="LIST",
                       help="--vs-reference: which of rotograd, torchjd, weighting, memory (default: all)")
    bench.add_argument("--rotograd-settings", default="128x4,512x4,128x16", metavar="DxK,...",
                       help="--vs-reference: (d, K) of the rotograd section (default: 128x4,512x4,128x16)")
    bench.add_argument("--memory-setting", default="512x40", metavar="DxK",
                       help="--vs-reference: (d, K) of the memory section (default: 512x40)")
    bench.add_argument("--memory-chunk", type=int, default=8, metavar="N",
                       help="--vs-reference: jacobian_chunk_size of the chunked rows (default 8)")
    bench.add_argument("--growth-strategies", metavar="LIST",
                       help="--growth: strategies, with options as name:key=value (default: ls, uw, "
                            "upgrad:target=representation, upgrad, rotograd)")
    bench.add_argument("--growth-tasks", default="2,4,8,16,40", metavar="LIST", help="--growth: K values (at d=128)")
    bench.add_argument("--growth-dims", default="64,128,256,512,1024", metavar="LIST",
                       help="--growth: d values (at K=4)")
    bench.add_argument("--budget", type=float, metavar="SECONDS",
                       help="--vs-reference / --growth: stop timing a section (a growth setting) after this many "
                            "seconds, at 5 iterations at least (default 30; 15); 0: always --steps")
    bench.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                       help="--vs-reference / --growth: this thread's CPU time, on one torch thread (default: steady "
                            "on a loaded machine; --threads is then ignored), or wall-clock time")
    bench.add_argument("--plot", metavar="DIR", help="--growth: also write growth_tasks.png and growth_dim.png there")
    bench.set_defaults(run=_bench)


def _pairs(text: str, option: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"Option `{option}` should be DxK pairs like 128x4,512x4. Found {text!r}.")
    return [(p[0], p[1]) for p in pairs]


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"Option `{option}` should be comma-separated ints. Found {text!r}.") from None


def _print_tables(tables: list[tuple[str, list[str], list[list[str]]]]) -> None:
    for title, header, rows in tables:
        print(f"\n{title}\n{_table(rows, header)}")


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from mtlzoo.errors import MTLZooError

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    timing: dict[str, Any] = {k: v for k, v in (("steps", args.steps), ("warmup", args.warmup)) if v is not None}
    if args.vs_reference or args.growth:
        timing["clock"] = args.clock
    if args.budget is not None:
        timing["budget_s"] = args.budget or None

    def progress(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    try:
        if args.vs_reference:
            from mtlzoo import bench_reference as ref

            report = ref.vs_reference(sections=[s.strip() for s in args.sections.split(",") if s.strip()],
                                      rotograd_settings=_pairs(args.rotograd_settings, "--rotograd-settings"),
                                      dim=args.dim or 128, tasks=args.tasks,
                                      memory_setting=_pairs(args.memory_setting, "--memory-setting")[0],
                                      memory_chunk=args.memory_chunk, progress=progress, **timing)
            _print_tables(ref.report_rows(report))
        elif args.growth:
            from mtlzoo import bench_reference as ref
            from mtlzoo.compare import split_top_level

            strategies = ([s for s in split_top_level(args.growth_strategies, ",") if s.strip()]
                          if args.growth_strategies else ref.GROWTH_STRATEGIES)
            report = ref.growth(strategies, tasks=_ints(args.growth_tasks, "--growth-tasks"),
                                dims=_ints(args.growth_dims, "--growth-dims"), progress=progress, **timing)
            _print_tables(ref.growth_rows(report))
            if args.plot:
                from mtlzoo.plots import save_growth_plots

                for path in save_growth_plots(report, args.plot):
                    print(f"wrote {path}", file=sys.stderr)
        else:
            from mtlzoo.bench import bench

            report = bench(args.strategies, models=[m.strip() for m in args.model.split(",") if m.strip()],
                           tasks=args.tasks, dim=args.dim or 64, device=args.device,
                           steps=args.steps or 50, warmup=10 if args.warmup is None else args.warmup)
            print(json.dumps(report, indent=2))
    except (MTLZooError, ValueError) as error:
        print(f"mtlzoo bench: {error}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0
