"""The one registry: stage name -> Technique (config class + entry point). The CLI and recipes both use it."""

from __future__ import annotations

import importlib

from compress.errors import ConfigError
from compress.techniques.base import Technique

# Modules are imported on first use; each defines TECHNIQUE. Order is the order --help lists them.
_MODULES = {
    "prune": "compress.techniques.prune",
    "qat": "compress.techniques.qat",
    "ptq": "compress.techniques.ptq",
    "distill": "compress.techniques.distill",
    "cluster": "compress.techniques.cluster",
}


def names() -> list[str]:
    return list(_MODULES)


def get(name: str) -> Technique:
    """The technique registered as `name`; an unknown name is refused with the list of known ones."""
    if name not in _MODULES:
        raise ConfigError(f"unknown technique {name!r}; known techniques: {', '.join(_MODULES)}")
    technique = importlib.import_module(_MODULES[name]).TECHNIQUE
    assert technique.name == name, f"{_MODULES[name]} registers {technique.name!r}, not {name!r}"
    return technique

