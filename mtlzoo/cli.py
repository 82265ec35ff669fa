"""The ``mtlzoo`` command (also ``python -m mtlzoo``): ``list``, ``compare`` and ``bench``; the last two run the harness
(:mod:`mtlzoo.harness`), imported when they run."""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtlzoo.errors import ComparisonError, MTLZooError
from mtlzoo.registry import StrategyEntry, get_strategy, list_strategies


def _row(entry: StrategyEntry) -> list[str]:
    info = entry.info
    return [info.name, ", ".join(info.aliases) or "-", info.kind, info.needs,
            info.paper.citation() if info.paper else "-", str(entry.origin)]


def _modifier_rows(pattern: str) -> list[list[str]]:
    """The modifiers whose name matches ``pattern``: name, hyperparameters and defaults, summary."""
    from mtlzoo.names import normalize_pattern
    from mtlzoo.roles.modifiers import MODIFIERS
    from mtlzoo.strategy import hyperparameters

    return [[name, ", ".join(f"{key}={value!r}" for key, value in hyperparameters(cls).items() if key != "inner"),
             cls.info.summary] for name, cls in sorted(MODIFIERS.items())
            if fnmatch.fnmatchcase(name, normalize_pattern(pattern))]


def _list(args: argparse.Namespace) -> int:
    entries = list_strategies(args.pattern or "*", kind=args.kind, where=args.where)
    modifiers = [] if args.kind or args.where else _modifier_rows(args.pattern or "*")
    if args.format == "json":
        print(json.dumps([entry.to_record() for entry in entries], indent=2, ensure_ascii=False))
    elif entries or modifiers:
        from mtlzoo.harness.tables import plain_table

        header = ["name", "aliases", "kind", "needs", "paper", "origin"]
        if entries:
            print(plain_table(header, [_row(entry) for entry in entries]))
        if modifiers:
            print(("\n" if entries else "") + 'Modifiers: each wraps a Gramian aggregator by name, as "ema(mgda)".')
            print(plain_table(["modifier", "hyperparameters", "what it does"], modifiers))
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
               "own. Call mtlzoo.list_strategies() in that process to see them.")
    listing.add_argument("pattern", nargs="?", help="fnmatch pattern on names and aliases, e.g. 'roto*'")
    listing.add_argument("--kind", choices=["weighting", "surgery"], help="only this kind")
    listing.add_argument("--where", choices=["losses", "representation", "parameters"],
                         help="only strategies that read gradients there by default (losses: none)")
    listing.add_argument("--format", choices=["table", "json"], default="table", help="output format")
    listing.set_defaults(run=_list, errors=())
    _add_compare(commands)
    _add_bench(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; its exit status (2 for a usage error or a comparison that cannot run; 1, quietly, for
    a reader that stops early, ``mtlzoo list | head``, as Python's documentation recommends)."""
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
        sys.stdout.flush()
    except args.errors as error:  # the command's own errors: no traceback
        print(f"mtlzoo {args.command}: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not raise again
        return 1
    return status


# ------------------------------------------------------------------------ compare
def _compare_epilog() -> str:
    """The help's account of the default comparison, from the built-in problems' own scales."""
    from mtlzoo.harness.problems import BUILTIN_PROBLEMS

    default = [cls for cls in BUILTIN_PROBLEMS if cls.in_default]
    scales = "; ".join(f"{cls.name}: {cls.default_steps:,} steps x {cls.default_seeds} seeds (full: "
                       f"{cls.full_steps:,} x {cls.full_seeds})" for cls in BUILTIN_PROBLEMS)
    extras = ", ".join(f"{cls.name} with the {cls.extra!r} extra" for cls in default if cls.extra)
    others = ", ".join(cls.name for cls in BUILTIN_PROBLEMS if not cls.in_default)
    paragraphs = (
        "With no options: ls, the RotoGrad family and every registered strategy marked default_comparison in its "
        "metadata, on the built-in problems " + ", ".join(cls.name for cls in default) + " (" + extras +
        " only when installed; " + (others or "none") + " by --problem only), at a scale that ends in about 3 "
        "minutes on 2 CPU cores. The default cuts the number of steps and seeds, not the problems; the full "
        "scale is that of each problem's source, given by --steps and --seeds: " + scales + ". `mtlzoo compare "
        "--problem NAME --help-problem` describes a problem.",
        "Strategies and problems take options after a colon: --strategies 'ls,rotograd_norm:alpha=0.5' and "
        "--problem 'gradnorm_synthetic:num_tasks=10'. Named strategies are checked before any training, and one "
        "that cannot run on a problem is an error; with the default set or 'all' it is reported as failed.",
        "Ctrl-C keeps every finished run in --out DIR: run the same command with --resume to go on.")
    return "\n\n".join(textwrap.fill(text, 100, break_on_hyphens=False, break_long_words=False) for text in paragraphs)


def _add_compare(commands: Any) -> None:
    compare = commands.add_parser(
        "compare", help="train strategies under identical conditions and compare them",
        description="Train each strategy on each problem from the same initial weights, with the same data order "
                    "and model optimizer, then tabulate the test metrics, Δm% against ls (lower is better), mean "
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
    compare.add_argument("--data", metavar="PATH",
                         help="the folder of a benchmark's data set (nyuv2, cityscapes, celeba, qm9); nothing is "
                              "downloaded")
    compare.add_argument("--reference-from", metavar="DIR",
                         help="measure Δm%% against the single-task runs of an earlier comparison in DIR (made with "
                              "--reference single_task --out DIR) instead of training them")
    compare.add_argument("--help-problem", action="store_true",
                         help="describe the chosen problems (without --problem: list every registered one) and exit")
    compare.set_defaults(run=_compare, errors=(MTLZooError, ImportError))


def _problem_texts(args: argparse.Namespace) -> list[str] | None:
    from mtlzoo.harness.problems import list_problems
    from mtlzoo.harness.spec import split_top_level

    if not args.problem:
        return None
    texts = [text for item in args.problem for text in split_top_level(item, ",")]
    return [entry.name for entry in list_problems(available_only=True)] if texts == ["all"] else texts


def _strategy_specs(args: argparse.Namespace) -> Any:
    from mtlzoo.harness.plan import resolve_specs

    specs, named = resolve_specs(args.strategies)
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
            specs[i] = dataclasses.replace(specs[i], optimizer=kind, lr=rate)
    return specs, named


def _seeds(text: str | None) -> Any:
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ComparisonError(f"--seeds {text!r}: give a number of seeds or a comma-separated list.") from None
    return values[0] if len(values) == 1 and "," not in text else values


def _compare(args: argparse.Namespace) -> int:
    from mtlzoo.harness.comparison import compare, iter_problems
    from mtlzoo.harness.config import RUNS_DIR, RunConfig
    from mtlzoo.harness.plan import plan_all
    from mtlzoo.harness.store import save, single_task_reference

    if args.help_problem:
        print(_help_problems(_problem_texts(args)))
        return 0
    problems = list(iter_problems(_problem_texts(args), data=args.data))
    specs, named = _strategy_specs(args)
    config = RunConfig(seeds=_seeds(args.seeds), steps=args.steps, reference=args.reference,
                       reference_from=args.reference_from, conflict_every=args.conflict_every, device=args.device,
                       out=args.out, resume=args.resume, strict=named, threads=args.threads)
    config.check_out(problem.name for problem in problems)
    if config.reference_from is not None:
        for problem in problems:
            single_task_reference(config.reference_from, problem)
    plans = {problem.name: plan_all(problem, specs, reference=config.trained_reference, strict=named,
                                    device=config.device) for problem in problems}  # every check before any training
    stdout, stderr = _console(), _console(stderr=True)
    progress = _Progress(stderr, problems, plans, config)
    with progress.bar:
        try:
            results = [compare(problem, plans[problem.name], config, progress=progress) for problem in problems]
        except KeyboardInterrupt:
            progress.bar.stop()
            kept = f"; the finished runs are in {config.out / RUNS_DIR}: run the same command with --resume to go on" \
                if config.out is not None else " (use --out DIR to keep finished runs across an interruption)"
            stderr.print(f"Interrupted{kept}.")
            return 130
    if args.format == "json":
        print(json.dumps([{"problem": r.problem, "summary": r.summary()} for r in results], indent=2))
    else:
        _print_results(stdout, results)
    if config.out is not None:
        written = save(results, config.out)
        if not args.no_plots:
            try:
                from mtlzoo.harness.plots import save_plots

                written += save_plots(results, config.out)
            except ImportError as error:
                stderr.print(f"No plots: {error}")
        stderr.print(f"Wrote {', '.join(str(path) for path in written)}")
    return _failed_status(results, named)


def _print_results(console: Any, results: list[Any]) -> None:
    from mtlzoo.harness.problems import get_problem
    from mtlzoo.harness.tables import notes, result_tables

    for result in results:
        for table in result_tables(result, width=console.width):
            console.print(table)
        try:
            cls = get_problem(result.problem).cls
            literature = (cls.source, cls.literature)
        except KeyError:
            literature = None
        console.print(notes(result, literature))


def _failed_status(results: list[Any], named: bool) -> int:
    """1 when ``ls``, or with named strategies any of them (not with the default set or ``all``, where a strategy that
    cannot run on a problem is a reported result), failed every run on some problem (saying which); else 0."""
    from mtlzoo.harness.spec import BASELINE

    failed = [(result.problem, label) for result in results for label in result.failed_labels()
              if named or label == BASELINE]
    for problem, label in failed:
        print(f"mtlzoo compare: {label} failed every run on {problem} (its error is above).", file=sys.stderr)
    return 1 if failed else 0


def _console(stderr: bool = False) -> Any:
    """A rich console: the terminal's width, else ``COLUMNS``, else 100 columns (a CI log)."""
    from rich.console import Console

    console = Console(stderr=stderr)
    sized = console.is_terminal or os.environ.get("COLUMNS", "").isdigit()
    return console if sized else Console(stderr=stderr, width=100)


class _Progress:
    """A rich progress bar over every training step of the comparison, on stderr."""

    def __init__(self, console: Any, problems: list[Any], plans: dict[str, list[Any]], config: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        total = sum(len(plans[problem.name]) * len(config.seeds_for(problem)) * config.steps_for(problem)
                    for problem in problems)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                            TimeElapsedColumn(), console=console, transient=False)
        self.task = self.bar.add_task("compare", total=total)
        self.finished = 0  # the steps of the finished runs

    def __call__(self, event: Any) -> None:
        if event.kind == "run_start":
            self.bar.update(self.task, description=f"{event.problem} · {event.label} · seed {event.seed}")
        elif event.kind in ("step", "run_end"):
            self.bar.update(self.task, completed=self.finished + event.step)
        if event.kind == "run_end":
            self.finished += event.steps


def _help_problems(texts: list[str] | None) -> str:
    """Each named problem described (its settings as given, else its defaults); without names, every registered one
    in a line. Reads no data set: a benchmark is described without its folder."""
    from mtlzoo.harness.problems import get_problem, list_problems
    from mtlzoo.harness.spec import parse_spec

    if texts is None:
        lines = ["The registered problems (`mtlzoo compare --problem NAME --help-problem` describes one):"]
        for entry in list_problems():
            needs = [*(["--data PATH"] if "data" in entry.settings else []),
                     *([f"the {entry.cls.extra!r} extra"] if entry.cls.extra and not entry.available() else [])]
            lines.append(f"  {entry.name:<20} {entry.cls.summary}" + (f" [needs {', '.join(needs)}]" if needs else ""))
        return "\n".join(lines)
    return "\n".join(_describe(get_problem(name), settings) for name, settings in map(parse_spec, texts))


def _describe(entry: Any, settings: dict[str, Any]) -> str:
    cls, settings = entry.cls, {**entry.settings, **settings}
    doc = textwrap.dedent((cls.__doc__ or "").strip())
    layout = getattr(cls, "layout", "")
    return (f"{cls.name}: {cls.summary}\nsettings: {settings}\ndefault scale: {cls.default_steps} steps x "
            f"{cls.default_seeds} seeds; full: {cls.full_steps} steps x {cls.full_seeds} seeds\n\n{doc}\n"
            + (f"\nThe data folder (--data PATH) should hold:\n{layout}\n" if layout else ""))


# -------------------------------------------------------------------------- bench
MOVED = ("--vs-reference and --growth moved out of the installed package: run `python benchmarks/vs_reference.py` "
         "(add --growth for the growth with K and d) from a clone of the repository.")


def _add_bench(commands: Any) -> None:
    bench = commands.add_parser(
        "bench", help="time a training step of strategies, as a ratio to ls",
        description="Median time of a training step (after warm-up) of each strategy on a reference MLP (input 64, "
                    "backbone 64-256-256-d, K linear heads, batch 256) and a small CNN whose representation is a "
                    "(batch, d, 8, 8) map (batch 64), as a ratio to ls on the same model: a table on stdout, or JSON "
                    "with --json. The benchmark against rotograd and torchjd is benchmarks/vs_reference.py in the "
                    "repository.")
    bench.add_argument("--strategies", metavar="LIST",
                       help="comma-separated strategies (name[:key=value...], e.g. upgrad:target=representation) "
                            "or 'all' (default: the default set)")
    bench.add_argument("--tasks", type=int, default=4, metavar="K", help="number of tasks (default 4)")
    bench.add_argument("--dim", type=int, default=64, metavar="D", help="width of the representation (default 64)")
    bench.add_argument("--model", default="mlp,cnn", help="mlp, cnn or both (default: mlp,cnn)")
    bench.add_argument("--steps", type=int, default=50, metavar="N", help="timed steps per strategy (default 50)")
    bench.add_argument("--warmup", type=int, default=10, metavar="N", help="untimed steps first (default 10)")
    bench.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    bench.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's)")
    bench.add_argument("--format", choices=["table", "json"], default="table",
                       help="a readable table (default) or the report as JSON")
    bench.add_argument("--json", dest="format", action="store_const", const="json", help="the same as --format json")
    bench.add_argument("--out", metavar="FILE", help="also write the report as JSON to FILE")
    bench.add_argument("--vs-reference", "--growth", dest="moved", action="store_true", help=argparse.SUPPRESS)
    bench.set_defaults(run=_bench, errors=(MTLZooError, ValueError))


def _bench(args: argparse.Namespace) -> int:
    import torch

    if args.moved:
        print(f"mtlzoo bench: {MOVED}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from mtlzoo.harness.bench import bench, report_table

    report = bench(args.strategies, models=[m.strip() for m in args.model.split(",") if m.strip()], tasks=args.tasks,
                   dim=args.dim, device=args.device, steps=args.steps, warmup=args.warmup)
    print(json.dumps(report, indent=2) if args.format == "json" else report_table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0
