"""What every technique shares: a frozen, self-validating config and the outcome of applying it.

A technique module defines a `TechniqueConfig` subclass, one entry point
`name(model, config, data, *, out_dir, verbose) -> Outcome`, and `TECHNIQUE = Technique(...)` tying them together.
Technique modules import TensorFlow inside their functions, so that configs (and `compress --help`) stay light.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compress.errors import ConfigError


def option(default, help: str, *, parse: Callable[[str], Any] | None = None, metavar: str | None = None):
    """A config field with the help text the CLI shows; `parse` turns the command-line string into the value."""
    return field(default=default, metadata={"help": help, "parse": parse, "metavar": metavar})


@dataclass(frozen=True)
class TechniqueConfig:
    """Base of every technique's settings. Subclasses check their values in `validate`, raising ConfigError."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Subclasses override: raise ConfigError with one line naming the bad value and the valid range."""

    def to_dict(self) -> dict:
        """Plain JSON/TOML-ready values (tuples become lists, dicts stay dicts)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "TechniqueConfig":
        """Build from a dict (a recipe's table or a saved stats file); unknown keys are refused by name."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}; valid: {', '.join(known)}")
        converted = {}
        for name, value in values.items():
            parse = known[name].metadata.get("parse") or (parse_flag if known[name].type in ("bool", bool) else None)
            try:
                converted[name] = parse(value) if parse and isinstance(value, str) else _freeze(value)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from exc
            _check_type(name, known[name].type, converted[name])
        return cls(**converted)


_SCALAR_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_type(name: str, annotation, value) -> None:
    """Refuse a value of the wrong kind (a word where a number belongs) before validation compares it."""
    expected = _SCALAR_TYPES.get(getattr(annotation, "__name__", annotation))
    wrong_bool = isinstance(value, bool) and annotation not in ("bool", bool)
    if expected and (wrong_bool or not isinstance(value, expected)):
        raise ConfigError(f"{name} must be of type {getattr(annotation, '__name__', annotation)}, got {value!r}")


def parse_flag(text: str) -> bool:
    """'true'/'false' (and yes/no, on/off, 1/0) from a command line or a stringly typed file."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _freeze(value):
    """Lists from TOML/JSON become tuples so that frozen configs stay hashable and compare equal."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    return value


def require(condition: bool, message: str) -> None:
    """Config validation in one line: raise ConfigError(message) unless `condition`."""
    if not condition:
        raise ConfigError(message)


@dataclass
class Outcome:
    """What a technique produced: a Keras model (None when its output is only files), stats, and files it wrote."""

    model: Any
    stats: dict
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Technique:
    """A registry entry: the stage name, its config class, its entry point, and a one-line summary for --help."""

    name: str
    config_class: type[TechniqueConfig]
    apply: Callable[..., Outcome]
    summary: str
