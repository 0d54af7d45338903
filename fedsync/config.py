"""The one config loader: a TOML file per service, sections as frozen dataclasses.

Theory of operation
-------------------
Every key has a documented default (the dataclass field); a TOML file overrides
defaults and CLI flags (``"section.key"`` overrides) override the file. The
loader remembers where each value came from and checks in three passes, collecting
every problem before it raises one :class:`ConfigError` that carries them all:

1. shape: an unknown section or key, or a value of the wrong type (a typo must not
   silently fall back to a default);
2. fields: the config class's :class:`Checks` table, one rule per dotted key (ranges,
   known names), then every file the config names must exist and be readable;
3. across: rules between fields (``round.quorum <= round.target``) on the built
   config; a field already reported is not reported twice.

Each problem is one line an operator can act on: the dotted field, the reason, and
where the value came from, e.g. ``round.target: must be >= 1, got 0 (coordinator.toml)``.

Example: ``load_config(CoordinatorConfig, "coordinator.toml", {"round.rounds": 5})``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar, get_type_hints

T = TypeVar("T")
COMMAND_LINE = "command line"  # where a value given by a flag came from
DEFAULT = "default"


class ConfigError(ValueError):
    """A config file or flags with one or more problems; ``problems`` holds each as a line.

    >>> ConfigError(["round.target: must be >= 1, got 0 (command line)"]).problems
    ['round.target: must be >= 1, got 0 (command line)']
    """

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


Rule = Callable[[Any], "str | None"]  # a value -> why it is wrong, or None when it is fine


@dataclass(frozen=True, slots=True)
class Checks:
    """What :func:`load_config` checks beyond types, declared by a config class as ``checks``.

    ``fields`` maps a dotted key to its :data:`Rule`; ``files`` names the keys that hold a
    path (unset is fine); ``across`` yields ``(dotted key, reason)`` for rules between fields.
    """

    fields: Mapping[str, Rule] = dataclasses.field(default_factory=dict)
    files: tuple[str, ...] = ()
    across: Callable[[Any], Iterable[tuple[str, str]]] | None = None


def at_least(low: float) -> Rule:
    """``value >= low`` (an unset value passes).

    >>> at_least(1)(0)
    'must be >= 1, got 0'
    """
    return lambda v: None if v is None or v >= low else f"must be >= {low}, got {v!r}"


def above(low: float) -> Rule:
    """``value > low`` (an unset value passes).

    >>> above(0)(-1.0)
    'must be > 0, got -1.0'
    """
    return lambda v: None if v is None or v > low else f"must be > {low}, got {v!r}"


def one_of(choices: Iterable[Any] | Callable[[], Iterable[Any]]) -> Rule:
    """``value in choices``; ``choices`` may be a function, for a registry plug-ins extend.

    >>> one_of(("sync", "async"))("asynch")
    "must be one of sync, async, got 'asynch'"
    """
    def rule(v: Any) -> str | None:
        known = list(choices() if callable(choices) else choices)
        return None if v in known else f"must be one of {', '.join(map(str, known))}, got {v!r}"
    return rule


def _broker_url(url: str) -> str | None:
    from fedsync.address import BrokerAddress

    try:
        BrokerAddress.parse(url)
    except ValueError as exc:  # BrokerAddress names the URL and what is wrong with it
        return str(exc).removeprefix("broker: ")
    return None


def _readable(path: str) -> str | None:
    # Opening is the only honest test: os.access says yes to root for every file.
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"


BROKER_FIELDS: Mapping[str, Rule] = MappingProxyType({
    "broker.url": _broker_url,
    # mosquitto fires the will after 1.5x keepalive; below a few seconds a busy Pi's paho loop
    # misses its PINGREQ and the session flaps.
    "broker.keepalive": at_least(5),
})
BROKER_FILES = ("broker.password_file", "broker.ca_file", "broker.cert_file", "broker.key_file")


def load_config(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None = None, *,
                check_files: bool = True) -> T:
    """Build ``cls`` from defaults, then the TOML file at ``path``, then ``overrides``.

    ``overrides`` maps ``"section.key"`` to a value; ``None`` values are ignored (an
    unset CLI flag). ``check_files=False`` skips the files check, for a config written
    for another host. Raises :class:`ConfigError` with every problem found.
    """
    entries: list[tuple[str, str | None, Any, str]] = []  # (section, key, value, source), later ones win
    if path is not None:
        where = str(path)
        for name, body in _read_toml(path).items():
            if isinstance(body, dict):
                entries += [(name, key, value, where) for key, value in body.items()]
            else:
                entries.append((name, None, body, where))  # a key above every [section] header
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, _, key = dotted.partition(".")
            entries.append((section, key, value, COMMAND_LINE))
    return _Loader(cls, entries).build(check_files)


def _read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None


class _Loader:
    def __init__(self, cls: type, entries: list[tuple[str, str | None, Any, str]]) -> None:
        self.cls = cls
        self.checks: Checks = getattr(cls, "checks", Checks())
        self.sections = {f.name: f for f in dataclasses.fields(cls)}
        self.hints = get_type_hints(cls)
        self.problems: list[str] = []
        self.reported: set[str] = set()
        self.origin: dict[str, str] = {}
        self.raw: dict[str, dict[str, Any]] = {}
        known = ", ".join(self.sections)
        for section, key, value, source in entries:
            if key is None and section in self.sections:
                self.problems.append(f"{section}: must be a [{section}] table, got {value!r} ({source})")
            elif key is None:
                self.problems.append(f"{section}: a key outside every [section]; sections: {known} ({source})")
            elif section not in self.sections:
                self.problems.append(f"{section}: unknown section; known: {known} ({source})")
            else:
                self.raw.setdefault(section, {})[key] = value
                self.origin[f"{section}.{key}"] = source

    def report(self, dotted: str, reason: str) -> None:
        if dotted not in self.reported:
            self.reported.add(dotted)
            self.problems.append(f"{dotted}: {reason} ({self.origin.get(dotted, DEFAULT)})")

    def build(self, check_files: bool) -> Any:
        built = {name: self._section(name) for name in self.sections}
        if check_files:
            for dotted in self.checks.files:
                section, _, key = dotted.partition(".")
                path = getattr(built[section], key)
                if path is not None and (reason := _readable(path)) is not None:
                    self.report(dotted, reason)
        cfg = self.cls(**built)
        for dotted, reason in self.checks.across(cfg) if self.checks.across else ():
            self.report(dotted, reason)
        if self.problems:
            raise ConfigError(self.problems)
        return cfg

    def _section(self, name: str) -> Any:
        body = self.raw.get(name, {})
        hint = self.hints[name]
        if getattr(hint, "__origin__", None) is dict:  # a free-form table of numbers
            values = self.sections[name].default_factory()  # type: ignore[misc]
            for key, value in body.items():
                if hint.__args__[1] is object:  # a plug-in's own table ([trainer]): its values as TOML gives them
                    values[key] = value
                elif (coerced := self._coerce(f"{name}.{key}", float, value)) is not _BAD:
                    values[key] = coerced
            return values
        fields = {f.name: f for f in dataclasses.fields(hint)}
        types = get_type_hints(hint)
        values = {}
        for key, value in body.items():
            if key not in fields:
                self.report(f"{name}.{key}", f"unknown key; known: {', '.join(fields)}")
            elif (coerced := self._coerce(f"{name}.{key}", types[key], value)) is not _BAD:
                values[key] = coerced
        for key, f in fields.items():
            rule, dotted = self.checks.fields.get(f"{name}.{key}"), f"{name}.{key}"
            value = values.get(key, f.default)
            if rule is not None and dotted not in self.reported and value is not dataclasses.MISSING:
                if (reason := rule(value)) is not None:
                    self.report(dotted, reason)
        try:
            return hint(**values)
        except ValueError:  # an invariant of the section itself (RoundPolicy's mode), reported by its rule
            pass
        try:
            return hint(**{k: v for k, v in values.items() if f"{name}.{k}" not in self.reported})
        except ValueError as exc:  # an invariant no rule covers: still a problem line, not a traceback
            self.problems.append(f"{name}: {exc} ({', '.join(sorted({self.origin[f'{name}.{k}'] for k in values}))})")
            return hint()

    def _coerce(self, dotted: str, hint: Any, value: Any) -> Any:
        allowed = getattr(hint, "__args__", None) or (hint,)
        for t in allowed:
            if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if t in (int, str, bool) and type(value) is t:
                return value
        names = " or ".join(t.__name__ for t in allowed if t is not type(None))
        self.report(dotted, f"expected {names}, got {type(value).__name__} {value!r}")
        return _BAD


_BAD = object()  # a value that failed its type check: the default stays


def read_secret(path: str | None) -> str | None:
    """Read a password from a file (first line), so it never sits on a command line."""
    if path is None:
        return None
    try:
        return Path(path).read_text().splitlines()[0].strip()
    except OSError as exc:
        raise ConfigError(f"broker.password_file: cannot read {path}: {exc.strerror}") from None
    except IndexError:
        raise ConfigError(f"broker.password_file: {path} is empty") from None


@dataclass(frozen=True, slots=True)
class BrokerSection:
    """``[broker]``: where and how to connect (shared by every service)."""

    url: str = "mqtt://127.0.0.1:1883"  # mqtt://host:port or mqtts://host:port (TLS)
    username: str | None = None  # defaults to the client id where the service has one
    password_file: str | None = None  # file whose first line is the password
    ca_file: str | None = None  # CA bundle to verify the broker (TLS)
    cert_file: str | None = None  # client certificate (optional mutual TLS)
    key_file: str | None = None
    keepalive: int = 15  # seconds; mosquitto fires the last will after ~1.5-2.3x this


@dataclass(frozen=True, slots=True)
class FederationSection:
    """``[federation]``: which federation the service belongs to (shared by every service)."""

    name: str = "demo"  # topic root is fedsync/{name}/


def credentials_from(section: BrokerSection, default_user: str | None = None):
    from fedsync.address import Credentials

    return Credentials(section.username or default_user, read_secret(section.password_file),
                       section.ca_file, section.cert_file, section.key_file)

