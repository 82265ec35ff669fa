"""A registry of names (:class:`NameRegistry`): what the strategy and the problem registries share."""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from mtlzoo.errors import DuplicateNameError, PluginWarning


class Registered(Protocol):
    """What a registry holds: a class, where it came from (an :class:`~mtlzoo.plugins.Origin`), its name."""

    @property
    def cls(self) -> type: ...

    @property
    def origin(self) -> Any: ...

    @property
    def name(self) -> str: ...


Entry = TypeVar("Entry", bound=Registered)


def normalize_name(name: str) -> str:
    """The lookup key of a name: lower case, ``-`` replaced by ``_``."""
    return name.strip().lower().replace("-", "_")


_CLASS_OR_DASH = re.compile(r"\[!?\]?[^\]]*\]|-")
"""A ``[...]`` character class (kept as it is) or a ``-`` outside one."""


def normalize_pattern(pattern: str) -> str:
    """An fnmatch pattern made to match normalised names: lower case, ``-`` replaced by ``_``.

    Only ``-`` outside ``[...]`` character classes is replaced, so ``"[a-m]*"`` keeps its range.
    Classes are delimited as :func:`fnmatch.translate` does (``[!...]``, a leading ``]`` is literal, an
    unclosed ``[`` is a literal character).
    """
    return _CLASS_OR_DASH.sub(lambda match: "_" if match.group() == "-" else match.group(), pattern.strip().lower())


def unknown_keywords(owner: str, what: str, unknown: Sequence[str], accepted: Sequence[str], listing: str,
                     also: Callable[[str], str] = lambda key: "") -> str:
    """The message for the keywords ``unknown`` that ``owner`` does not take: each with its close match among
    ``accepted`` (and ``also(key)``), then every ``what`` it takes (``listing``)."""
    sentences = []
    for key in unknown:
        close = difflib.get_close_matches(key, list(accepted), n=1, cutoff=0.6)
        sentences.append(f"{owner} has no {what} {key!r}." + (f" Did you mean {close[0]!r}?" if close else "")
                         + also(key))
    return " ".join(sentences) + f" Its {what}s: {listing}."


def natural_key(text: str) -> list[Any]:
    """Sorts ``"x2"`` before ``"x10"``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


class NameRegistry(Generic[Entry]):
    """Entries by normalised name and alias, in registration order, added and dropped by plugin.

    Names are case-insensitive and ``-`` equals ``_`` (:func:`normalize_name`); listing takes fnmatch
    patterns (:func:`normalize_pattern`).

    Args:
        noun: What an entry is, for messages (``"strategy"``, ``"problem"``).
        unknown_error: The ``KeyError`` subclass an unknown name raises.
        duplicate_error: The :class:`~mtlzoo.errors.DuplicateNameError` (sub)class a taken name raises.
        see_also: The sentence that ends an unknown name's message, from the registered names.
    """

    def __init__(self, noun: str, unknown_error: type[KeyError], *,
                 duplicate_error: type[DuplicateNameError] = DuplicateNameError,
                 see_also: Callable[[list[str]], str] = lambda names: "") -> None:
        self.noun = noun
        self.unknown_error = unknown_error
        self.duplicate_error = duplicate_error
        self.see_also = see_also
        self._entries: dict[str, Entry] = {}
        self._keys: dict[str, str] = {}

    def __contains__(self, name: str) -> bool:
        return normalize_name(name) in self._keys

    def holder(self, name: str) -> Entry | None:
        """The entry holding ``name`` (a name or an alias), or ``None``."""
        canonical = self._keys.get(normalize_name(name))
        return None if canonical is None else self._entries[canonical]

    def check_free(self, entry: Entry, names: Sequence[str]) -> None:
        """Raise the registry's :class:`~mtlzoo.errors.DuplicateNameError` (naming both classes and origins) if
        another entry holds one of ``names``."""
        for name in names:
            if (other := self.holder(name)) is not None:
                raise self.duplicate_error(
                    f"{self.noun.capitalize()} name {normalize_name(name)!r} of {entry.cls.__qualname__} (from "
                    f"{entry.origin}) is already taken by {other.cls.__qualname__} (from {other.origin}).")

    def add(self, entry: Entry, aliases: Sequence[str] = ()) -> None:
        """Hold ``entry`` under its name and ``aliases``, or change nothing and raise (see :meth:`check_free`)."""
        names = [entry.name, *aliases]
        self.check_free(entry, names)
        canonical = normalize_name(entry.name)
        self._entries[canonical] = entry
        for name in names:
            self._keys[normalize_name(name)] = canonical

    def add_from_plugin(self, entry: Entry, aliases: Sequence[str] = (), *, strict: bool) -> None:
        """:meth:`add`; a taken name raises only when ``strict``, else it warns (a
        :class:`~mtlzoo.errors.PluginWarning` naming both origins) and nothing is added."""
        try:
            self.add(entry, aliases)
        except DuplicateNameError as error:
            if strict:
                raise
            warnings.warn(f"{error} The {self.noun} was not registered.", PluginWarning, stacklevel=3)

    def drop_plugin(self, plugin: str) -> None:
        """Forget every entry of the plugin named ``plugin``."""
        for canonical in [c for c, entry in self._entries.items() if entry.origin.plugin == plugin]:
            del self._entries[canonical]
        self._keys = {key: c for key, c in self._keys.items() if c in self._entries}

    def get(self, name: str) -> Entry:
        """The entry called ``name`` (or one of its aliases); else the registry's ``unknown_error`` listing close
        matches (a ``TypeError`` if ``name`` is not a str)."""
        if not isinstance(name, str):
            raise TypeError(f"A {self.noun} name is a str. Found {name!r}.")
        if (entry := self.holder(name)) is None:
            close = difflib.get_close_matches(normalize_name(name), list(self._keys), n=5, cutoff=0.6)
            suggestions = list(dict.fromkeys(self._keys[key] for key in close))  # best match first
            hint = f" Did you mean {', '.join(map(repr, suggestions))}?" if suggestions else ""
            raise self.unknown_error(f"Unknown {self.noun} {name!r}.{hint} {self.see_also(list(self._entries))}"
                                     .rstrip())
        return entry

    def list(self, pattern: str | Iterable[str] = "*", *, exclude: str | Iterable[str] = (),
             aliases: Callable[[Entry], Sequence[str]] = lambda entry: (), sort: bool = False) -> list[Entry]:
        """The entries whose name or an alias matches ``pattern`` (fnmatch; case-insensitive, ``-`` matches
        ``_``) and none of ``exclude``; in registration order, or sorted naturally by name."""
        include = [normalize_pattern(p) for p in ([pattern] if isinstance(pattern, str) else pattern)]
        excluded = [normalize_pattern(p) for p in ([exclude] if isinstance(exclude, str) else exclude)]

        def matches(entry: Entry, patterns: list[str]) -> bool:
            names = [normalize_name(n) for n in (entry.name, *aliases(entry))]
            return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)

        chosen = [entry for entry in self._entries.values() if matches(entry, include) and not matches(entry, excluded)]
        return sorted(chosen, key=lambda entry: natural_key(entry.name)) if sort else chosen

    def entries(self) -> list[Entry]:
        """Every entry, in registration order."""
        return list(self._entries.values())
