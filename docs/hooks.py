"""MkDocs hook: the reference pages generated from the code before every build, so that
they cannot drift from it (issue 29):

* docs/reference/cli.md: every `falkit` command and flag, from the argparse parser;
* docs/reference/config.md: every config key with its default, valid values and meaning,
  from the config dataclasses (their field metadata and the comment beside each field),
  the core sections and every registered method's options section;
* docs/reference/flower.md: the run-config keys of falkit's Flower App, from the App's own
  `[tool.flwr.app.config]` (`falkit.flower.common.app_config_toml`).

Both files are written before MkDocs reads the docs (and are not in git).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import tokenize
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent


def on_pre_build(config: Any) -> None:  # noqa: ARG001 - the MkDocs hook's signature
    ref = DOCS / "reference"
    ref.mkdir(exist_ok=True)
    _write(ref / "cli.md", cli_page())
    _write(ref / "config.md", config_page())
    _write(ref / "flower.md", flower_page())


def _write(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")  # unchanged: no rebuild loop in `serve`


# -- the command line ---------------------------------------------------------------------
def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if a.option_strings:
            name = ", ".join(f"`{o}`" for o in a.option_strings)
            if a.nargs != 0:
                name += f" `{a.metavar or a.dest.upper()}`"
        else:
            name = f"`{a.metavar or a.dest}`" + (" ..." if a.nargs in ("*", "+") else "")
        default = ("" if a.default in (None, argparse.SUPPRESS, False) or a.nargs == 0
                   else f"`{a.default}`")
        choices = f" (one of {', '.join(f'`{c}`' for c in a.choices)})" if a.choices else ""
        rows.append(f"| {name} | {default} | {_cell((a.help or '') % vars(a) if a.help else '')}"
                    f"{choices} |")
    return rows


def cli_page() -> str:
    from falkit.cli import build_parser

    parser = build_parser()
    out = ["# Command line", "",
           "Generated from falkit's argparse parser (`falkit.cli.build_parser`) at every "
           "build of these pages. Every command also takes `-h`/`--help`. Configuration "
           "overrides (`key=value`, see [the config keys](config.md)) may come before or "
           "after the flags.", "", "```text", parser.format_usage().strip(), "```", ""]
    out += _flags(parser) + [""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    for name, sp in sub.choices.items():
        out += [f"## `falkit {name}`", "", _cell(helps.get(name, "")), "", "```text",
                sp.format_usage().strip(), "```", ""]
        out += _flags(sp) + [""]
        inner = [a for a in sp._actions if isinstance(a, argparse._SubParsersAction)]
        for sub2 in inner:
            helps2 = {c.dest: c.help for c in sub2._choices_actions}
            for name2, sp2 in sub2.choices.items():
                out += [f"### `falkit {name} {name2}`", "", _cell(helps2.get(name2, "")), "",
                        "```text", sp2.format_usage().strip(), "```", ""]
                out += _flags(sp2) + [""]
    return "\n".join(out)


# -- the config keys ----------------------------------------------------------------------
@functools.cache
def _parsed(path: str) -> tuple[list[str], dict[int, str], ast.Module]:
    """A source file's lines, its same-line comments by line number, and its syntax tree
    (each file once: config.py holds eight sections)."""
    source = Path(path).read_text(encoding="utf-8")
    lines = source.splitlines()
    trailing = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1].split("#")[0].strip()}
    return lines, trailing, ast.parse(source)


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment beside it (same line) or the comment lines right above."""
    lines, trailing, tree = _parsed(inspect.getsourcefile(cls) or "")
    node = next(n for n in ast.walk(tree)
                if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    out = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            above, k = [], stmt.lineno - 2
            while k >= 0 and lines[k].strip().startswith("#"):
                above.insert(0, lines[k].strip().lstrip("#").strip())
                k -= 1
            text = " ".join([*above, trailing.get(stmt.lineno, "")]).strip()
            out[stmt.target.id] = text
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
    else:
        return ""
    if v is None:
        return "`none`"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    return f'`"{v}"`' if isinstance(v, str) else f"`{v!r}`"


def _valid(key: str, choices: dict[str, tuple], ranges: dict[str, tuple]) -> str:
    if key in choices:
        return ", ".join(f"`{c}`" for c in choices[key])
    if key in ranges:
        lo, hi, lo_in, hi_in = ranges[key]
        parts = []
        if lo is not None:
            parts.append(f"{'≥' if lo_in else '>'} {lo:g}")
        if hi is not None:
            parts.append(f"{'≤' if hi_in else '<'} {hi:g}")
        return " and ".join(parts)
    return ""


def _section(title: str, prefix: str, cls: type, choices: dict, ranges: dict,
             level: str = "##", skip: frozenset[str] = frozenset()) -> list[str]:
    """A table of `cls`'s fields but those in `skip` (the top level's own sections)."""
    notes = _comments(cls)
    out = [f"{level} `{title}`", ""]
    out += ["| key | default | valid | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        key = f"{prefix}{f.name}"
        out.append(f"| `{key}` | {_default(f)} | {_valid(key, choices, ranges)} | "
                   f"{_cell(notes.get(f.name, ''))} |")
    return out + [""]


def config_page() -> str:
    from falkit import config as config_mod
    from falkit import registry

    registry.load()
    choices = config_mod.choices()
    ranges = {r[0]: r[1:] for r in config_mod.ranges()}
    core = {f.name: f for f in dataclasses.fields(config_mod.Config)}
    sections = [n for n, f in core.items() if f.default_factory is not dataclasses.MISSING]
    out = ["# Config keys", "",
           "Generated from the config dataclasses (`falkit.config`) and every registered "
           "method's options (`falkit.options`) at every build of these pages. A key is set "
           "in a TOML file (`[section]` then `key = value`) or on the command line as "
           "`section.key=value`; `falkit config` prints every key of a resolved config. "
           "*valid*: the choices or the range the config checks (others are checked where "
           "they are used, e.g. a dataset or strategy name against the registry).", ""]
    out += _section("top level", "", config_mod.Config, choices, ranges,
                    skip=frozenset(sections))
    for name in sections:
        cls = type(core[name].default_factory())  # type: ignore[misc]
        out += _section(f"[{name}]", f"{name}.", cls, choices, ranges)
    out += ["## Method options", "",
            "Each strategy or FL algorithm with options has a section of its own, named "
            "after it, declared beside the method (its `options` dataclass).", ""]
    for name, cls in sorted(registry.option_sections().items()):
        out += _section(f"[{name}]", f"{name}.", cls, choices, ranges, "###")
    return "\n".join(out)


# -- the Flower App's run config ----------------------------------------------------------
def flower_page() -> str:
    import warnings

    with warnings.catch_warnings():  # flwr's typer on a newer click: not ours to show
        warnings.simplefilter("ignore", DeprecationWarning)
        from falkit.flower.common import app_config_toml

    own, _, _ = app_config_toml(methods=False).partition("# every falkit setting")
    return "\n".join([
        "# Flower run config", "",
        "Generated from falkit's Flower App (`falkit.flower.common.app_config_toml`, the "
        "`[tool.flwr.app.config]` of the App's pyproject.toml) at every build of these "
        "pages. `flwr run --run-config \"k=v k=v\"` (or a TOML file) sets these keys; "
        "`falkit config --flower \"k=v k=v\"` checks a value before it is submitted.", "",
        "## The App's own keys and the conveniences", "", "```toml", own.rstrip(), "```", "",
        "## Every falkit setting", "",
        "Every [config key](config.md) is a run-config key of the same dotted name "
        "(`fl.rounds`, `strategy`, `partition.alpha`, `fairfal.kappa`, ...), `\"\"` meaning "
        "falkit's default; these win over `config`, `preset` and `overrides`.", ""])
