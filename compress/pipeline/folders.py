"""The run folder's layout and bookkeeping: run options, stage folders (always inside the run folder), manifests
and the hashes that key stages and tell whether their files are still the ones they wrote."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compress.errors import ConfigError
from compress.files import sha256_file


@dataclass
class RunOptions:
    out: Path
    data_args: dict  # keyword arguments of compress.data.load_data
    model: Path | None = None  # a user's trained model replaces the baseline training
    unsafe: bool = False  # allow Lambda layers (arbitrary code) in --model and in the run folder's models
    remeasure: bool = False  # measure every file again instead of reusing the figures kept with its stage
    input_range: str = "auto"  # the pixels a --model takes (compress.checks.decide_input_range); ours take [0, 1]
    lock_stages: bool = False  # processes share the folder (compress auto): a stage runs in one, under a lock
    verbose: int = 1  # Keras progress: 0 silent, 1 bar, 2 a line per epoch
    log: Callable[[str], None] = print


def stage_dir(out: Path, name: str) -> Path:
    """The stage's folder, which must lie inside the run folder (a name is never a path of its own)."""
    folder = out / name
    if folder.resolve().parent != out.resolve():
        raise ConfigError(f"stage {name!r} would write outside the run folder {out}")
    return folder


def is_finished(folder: Path, key: str) -> bool:
    """The stage finished with this key, and every file it wrote is still the one it wrote."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("key") != key:
        return False
    hashes = manifest.get("sha256")
    if not isinstance(hashes, dict) or set(hashes) != set(manifest.get("files", [])):
        return False
    return all((folder / name).is_file() and sha256_file(folder / name) == digest for name, digest in hashes.items())


def read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def digest_of(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def jsonable(value):
    return json.loads(json.dumps(value, default=str))
