"""The one config loader: a TOML file per service, sections as frozen dataclasses.

Every key has a documented default (the dataclass field); a TOML file overrides
defaults and CLI flags override the file. An unknown section or key, or a
value of the wrong type, is an error that names it — a typo must not silently
fall back to a default.

Example: ``load_config(CoordinatorConfig, "coordinator.toml", {"round.rounds": 5})``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that names an unknown key or has a bad value."""


def load_config(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from defaults, then the TOML file at ``path``, then ``overrides``.

    ``overrides`` maps ``"section.key"`` to a value; ``None`` values are ignored
    (an unset CLI flag).
    """
    data: dict[str, dict[str, Any]] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    return _build(cls, data, str(path or "defaults"))


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    sections = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = get_type_hints(cls)
    kwargs = {}
    for name, body in data.items():
        if name not in sections:
            raise ConfigError(f"{where}: unknown section [{name}]; known: {sorted(sections)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        if getattr(hints[name], "__origin__", None) is dict:  # a free-form table of numbers
            default = sections[name].default_factory()  # type: ignore[misc]
            kwargs[name] = {**default, **{k: _coerce(float, v, f"{where} [{name}] {k}") for k, v in body.items()}}
            continue
        kwargs[name] = _section(hints[name], body, f"{where} [{name}]")
    return cls(**kwargs)


def _section(cls: type, body: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in body.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {sorted(names)}")
        values[key] = _coerce(hints[key], value, f"{where} {key}")
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    allowed = getattr(hint, "__args__", None) or (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t in (int, str, bool) and type(value) is t:
            return value
        if getattr(t, "__origin__", None) is dict and isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"{where}: expected {hint}, got {type(value).__name__} {value!r}")


def read_secret(path: str | None) -> str | None:
    """Read a password from a file (first line), so it never sits on a command line."""
    if path is None:
        return None
    try:
        return Path(path).read_text().splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise ConfigError(f"password_file {path}: cannot read a password: {exc}") from None


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


def credentials_from(section: BrokerSection, default_user: str | None = None):
    from fedsync.mqtt import Credentials

    return Credentials(section.username or default_user, read_secret(section.password_file),
                       section.ca_file, section.cert_file, section.key_file)
