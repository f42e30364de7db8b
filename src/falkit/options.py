"""A method's options, declared beside the method (issue 26): a strategy or FL algorithm
names a dataclass as its `options`; each field is one setting of the config section named
after the method ([fairfal], [feddyn], ...), and its valid values travel with it as field
metadata:

    @dataclass
    class BaldOptions:
        passes: int = option(20, low=1)                      # an integer >= 1
        head: str = option("query", choices=("query", "global"))

`falkit.config` derives its sections, choices and ranges from the registered methods, so
adding a method adds no line there. This module imports nothing of falkit's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

CHOICES = "falkit.choices"
RANGE = "falkit.range"


class Options:
    """An optional base of an options dataclass: `check` rejects what the fields' own
    choices and ranges cannot (a combination of settings), with a one-line ConfigError.
    `falkit.config.validate` calls it for every method's section."""

    def check(self, cfg: Any) -> None:
        """Raise falkit.errors.ConfigError for settings of this section that cannot run."""


def option(default: Any, *, choices: tuple[Any, ...] | None = None,
           low: float | None = None, high: float | None = None,
           low_in: bool = True, high_in: bool = True) -> Any:
    """A dataclass field with its default and, optionally, its valid values: `choices`, or
    a numeric range [low, high] (None: unbounded; `low_in`/`high_in`: whether the bound
    itself is valid). A float must also be finite, as every float setting."""
    meta: dict[str, Any] = {}
    if choices is not None:
        if default not in choices:
            raise ValueError(f"default {default!r} is not one of its choices {choices}")
        meta[CHOICES] = tuple(choices)
    if low is not None or high is not None:
        meta[RANGE] = (low, high, bool(low_in), bool(high_in))
    return field(default=default, metadata=meta)


def choices_of(section: str, cls: type) -> dict[str, tuple[Any, ...]]:
    """`section.field` -> its choices, for the fields of options class `cls` that have any."""
    return {f"{section}.{f.name}": f.metadata[CHOICES] for f in dataclasses.fields(cls)
            if CHOICES in f.metadata}


def ranges_of(section: str, cls: type
              ) -> list[tuple[str, float | None, float | None, bool, bool]]:
    """(`section.field`, low, high, low inclusive, high inclusive) for each bounded field."""
    return [(f"{section}.{f.name}", *f.metadata[RANGE]) for f in dataclasses.fields(cls)
            if RANGE in f.metadata]
