"""What a comparison runs: a strategy named with its options (:class:`StrategySpec`), parsed from
``"name:key=value:key=value"`` (values are Python literals, else strings; a comma-separated list names several)."""

from __future__ import annotations

import ast
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mtlzoo.errors import ComparisonError
from mtlzoo.registry import list_strategies

BASELINE = "ls"
"""The strategy every comparison runs: Δm% and time ratios are measured against it."""


@dataclass(frozen=True)
class StrategySpec:
    """A strategy as one comparison runs it.

    Attributes:
        name: A registered strategy name or alias.
        options: Its hyperparameters for this run (over the problem's and the metadata's suggestions).
        optimizer: The ``torch.optim`` class name for its own parameters (over the problem's and the metadata's).
        lr: The learning rate of that optimizer (idem).
        label: The name the results use (default: the name, then the options given here).
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    optimizer: str | None = None
    lr: float | None = None
    label: str | None = None

    @classmethod
    def parse(cls, text: str) -> StrategySpec:
        """``"name"`` or ``"name:key=value:key=value"`` (see :func:`parse_spec`)."""
        return cls(*parse_spec(text))

    def display(self) -> str:
        """The label of the runs: ``label``, else the name, its options and its optimizer."""
        if self.label:
            return self.label
        text = self.name + "".join(f":{key}={value if isinstance(value, str) else repr(value)}"
                                   for key, value in self.options.items())
        if self.optimizer is not None or self.lr is not None:
            text += f"@{self.optimizer or ''}{'' if self.lr is None else f':{self.lr:g}'}"
        return text


def split_top_level(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside brackets and quotes (``"a:w=[1,2],b"`` on "," gives two parts)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal (``0.5``, ``[1, 2]``), ``true``/``false``/``none``, else the text."""
    text = text.strip()
    constants = {"true": True, "false": False, "none": None, "null": None}
    if text.lower() in constants:
        return constants[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value:..."`` into the name and its options.

    Raises:
        ComparisonError: An option without ``=``.
    """
    name, *pairs = split_top_level(text, ":")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ComparisonError(f"{text!r}: options are written name:key=value:key=value; {pair!r} has no '='.")
        options[key.strip()] = parse_value(value)
    return name.strip(), options


def default_strategies() -> list[StrategySpec]:
    """``ls`` and every registered strategy marked ``default_comparison`` in its metadata."""
    names = [entry.name for entry in list_strategies() if entry.info.default_comparison]
    return [StrategySpec(name) for name in ([BASELINE] + [n for n in names if n != BASELINE])]


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class called ``name`` (case-insensitive: ``"adam"``, ``"SGD"``).

    Raises:
        ComparisonError: No ``torch.optim`` class has that name (the message suggests close ones).
    """
    classes = {key.lower(): value for key, value in vars(torch.optim).items()
               if isinstance(value, type) and issubclass(value, torch.optim.Optimizer)
               and value is not torch.optim.Optimizer}
    try:
        return classes[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), list(classes), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ComparisonError(f"Unknown optimizer {name!r}: it should name a torch.optim class.{hint}") from None
