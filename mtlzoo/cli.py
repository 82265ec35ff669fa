"""The ``mtlzoo`` command (also ``python -m mtlzoo``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
