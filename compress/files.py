"""Files the toolkit writes: atomically (write, then rename), into folders checked before any work, hashed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from compress.errors import ConfigError


def check_output_dir(path: str | os.PathLike) -> Path:
    """Refuse an output path that is an existing file; the folder itself is made only when results are written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path {path} is a file, not a folder")
    return path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path beside `target` (same suffix); on success it replaces `target`, else it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.stem}.{os.getpid()}.partial{target.suffix}")
    try:
        yield partial
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()


def write_json(target: str | os.PathLike, payload) -> Path:
    with atomic_path(target) as partial:
        partial.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return Path(target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    with atomic_path(target) as partial:
        partial.write_text(text, encoding="utf-8")
    return Path(target)


def write_bytes(target: str | os.PathLike, payload: bytes) -> Path:
    with atomic_path(target) as partial:
        partial.write_bytes(payload)
    return Path(target)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FileLock:
    """An exclusive lock on a file (flock) for processes that share a folder; `release` may come before the `with`
    block ends, and is then a no-op at its end."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.handle = None

    def __enter__(self) -> "FileLock":
        import fcntl

        self.handle = open(self.path, "a")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the file drops the lock
            self.handle = None
