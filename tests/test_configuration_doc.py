"""docs/configuration.md is the config dataclasses: every key, its type and its default, nothing more.

The doc has a ``## `coordinator.toml``` and a ``## `agent.toml``` part, one ``### `[section]```
table per section, and one row per key: ``| `key` | type | `default` | meaning |``. This test
reads those tables and compares them with :class:`CoordinatorConfig` and :class:`AgentConfig`:
a key added to a dataclass without a row (or a row for a key that is gone, or a default
that changed) fails, naming the row to write. A free-form table of numbers (``[train]``,
``[strategy_options]``, ``[trainer]``) must list exactly its default entries, plus rows of
optional keys whose default is ``—``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import types
import typing

import pytest

from fedsync.coordinator.config import CoordinatorConfig
from fedsync.device_agent.config import AgentConfig

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
FILES = {"coordinator.toml": CoordinatorConfig, "agent.toml": AgentConfig}
TOML_TYPES = {str: "string", int: "integer", float: "float", bool: "boolean"}
ROW = re.compile(r"^\| `([a-z_]+)` \| ([a-z ]+) \| (`[^`]*`|unset|—) \|")
OPTIONAL = "—"  # a documented key of a free-form table that has no default


def toml_value(value: object) -> str:
    """How a default reads in TOML (``unset`` for None, which TOML cannot spell).

    >>> toml_value("sync"), toml_value(None), toml_value(True), toml_value(0.5)
    ('`"sync"`', 'unset', '`true`', '`0.5`')
    """
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def toml_type(hint: object) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    return " or ".join(TOML_TYPES.get(a, getattr(a, "__name__", str(a))) for a in args)


def expected(cls: type) -> dict[str, dict[str, tuple[str, str]] | None]:
    """section -> {key: (type, default)}; a free-form table -> {key: (type, default)} of its defaults."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if typing.get_origin(hint) is dict:
            out[f.name] = {k: (toml_type(type(v)), toml_value(v)) for k, v in f.default_factory().items()}
            continue
        section_hints = typing.get_type_hints(hint)
        out[f.name] = {g.name: (toml_type(section_hints[g.name]), toml_value(g.default))
                       for g in dataclasses.fields(hint)}
    return out


def documented(text: str) -> dict[str, dict[str, dict[str, tuple[str, str]]]]:
    """file -> section -> {key: (type, default)} as the doc's tables say."""
    out: dict[str, dict[str, dict[str, tuple[str, str]]]] = {}
    file = section = None
    for line in text.splitlines():
        if m := re.fullmatch(r"## `([a-z]+\.toml)`", line):
            file, section = m.group(1), None
            out[file] = {}
        elif m := re.fullmatch(r"### `\[([a-z_]+)\]`", line):
            assert file is not None, f"{line!r} before any '## `FILE.toml`' heading"
            section = m.group(1)
            assert section not in out[file], f"{file}: [{section}] twice"
            out[file][section] = {}
        elif (m := ROW.match(line)) and section is not None:
            key, typ, default = m.groups()
            assert key not in out[file][section], f"{file} [{section}] {key}: two rows"
            out[file][section][key] = (typ.strip(), default)
    return out


def test_the_doc_tables_are_read():
    # positive control for the parser: a known row, read back as written
    tables = documented(DOC.read_text())
    assert tables["coordinator.toml"]["round"]["mode"] == ("string", '`"sync"`')
    assert tables["agent.toml"]["data"]["index"] == ("integer", "unset")
    assert sorted(tables) == sorted(FILES)


def problems(file: str, text: str) -> list[str]:
    """Every difference between ``file``'s tables in ``text`` and its config dataclass, one line each."""
    cls = FILES[file]
    want, have = expected(cls), documented(text).get(file, {})
    out = [f"missing section: ### `[{s}]`" for s in sorted(set(want) - set(have))]
    out += [f"[{s}]: no such section in {cls.__name__}" for s in sorted(set(have) - set(want))]
    free_form = {f.name for f in dataclasses.fields(cls) if typing.get_origin(typing.get_type_hints(cls)[f.name]) is dict}
    for section in [s for s in want if s in have]:
        rows = {k: v for k, v in have[section].items() if section not in free_form or v[1] != OPTIONAL}
        for key, (typ, default) in want[section].items():
            if key not in rows:
                out.append(f"[{section}] missing row: | `{key}` | {typ} | {default} | ... |")
            elif rows[key] != (typ, default):
                out.append(f"[{section}] {key}: the doc says {rows[key]}, the code {(typ, default)}")
        out += [f"[{section}] {key}: documented, but {cls.__name__} has no such key"
                for key in sorted(set(rows) - set(want[section]))]
    return out


@pytest.mark.parametrize("file", FILES)
def test_every_key_type_and_default_is_documented_and_nothing_else(file):
    assert problems(file, DOC.read_text()) == [], f"docs/configuration.md, {file}"


def test_a_missing_row_a_changed_default_and_a_stale_key_are_each_named():
    # positive control for the comparison: the real doc, edited three ways
    text = DOC.read_text()
    row = "| `mode` | string | `\"sync\"` |"
    assert text.count(row) == 1
    edited = (text.replace(row + " ", "| `moed` | string | `\"sync\"` | ")
              .replace("| `rounds` | integer | `20` |", "| `rounds` | integer | `21` |"))
    assert problems("coordinator.toml", edited) == [
        "[round] missing row: | `mode` | string | `\"sync\"` | ... |",
        "[round] rounds: the doc says ('integer', '`21`'), the code ('integer', '`20`')",
        "[round] moed: documented, but CoordinatorConfig has no such key",
    ]
    assert problems("agent.toml", edited) == []  # the agent's part is untouched
