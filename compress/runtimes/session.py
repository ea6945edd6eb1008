"""What every runtime's session offers: float32 images in, float32 outputs out, and a ready batch to time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from compress.errors import ConfigError, DataError, ModelError
from compress.kerasmodel import scores_per_class, shape_text

CPU = "CPUExecutionProvider"


class Session:
    """A loaded model file. Subclasses implement `prepare` (images -> runtime input) and `run_prepared`."""

    def __init__(self, path: Path, runtime: str, input_shape: tuple, labels: dict, binary_output: str | None = None):
        self.path = path
        self.binary_output = binary_output  # a binary classifier's one score: sigmoid or logit (scores_per_class)
        self.runtime = runtime
        self.input_shape = input_shape  # without the batch dimension; None where the file leaves a size open
        self.labels = labels  # runtime, provider, threads: what results from this session were taken with

    def prepare(self, images: np.ndarray) -> Any:
        raise NotImplementedError

    def run_prepared(self, prepared: Any) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        prepared = self.prepare(np.ascontiguousarray(batch, dtype=np.float32))
        return scores_per_class(np.asarray(self.run_prepared(prepared), dtype=np.float32), self.binary_output)

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        if batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size}")
        outputs = [self(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
        if not outputs:
            raise DataError("no images to run")
        return np.concatenate(outputs)

    def check_input_shape(self, shape) -> None:
        shape = tuple(int(dim) for dim in shape)
        if len(shape) != len(self.input_shape) or any(
            want is not None and want != got for want, got in zip(self.input_shape, shape)
        ):
            if len(shape) != len(self.input_shape):
                hint = "compress handles images of height x width x channels"
            else:
                size_differs = any(want not in (None, got) for want, got in zip(self.input_shape[:-1], shape[:-1]))
                hints = (["pass --image-size HxW to resize them"] if size_differs else []) + (
                    ["its channel count differs from the images'"] if self.input_shape[-1] not in (None, shape[-1])
                    else [])
                hint = "; ".join(hints)
            raise DataError(f"{self.path.name} takes {shape_text(self.input_shape)} images, the data has "
                            f"{shape_text(shape)}; {hint}")

    def sample_images(self, batch_size: int, seed: int = 0) -> np.ndarray:
        """Seeded random images in [0, 1) of this file's input shape (for timing, where values do not matter)."""
        if any(dim is None for dim in self.input_shape):
            raise ModelError(f"{self.path} has dynamic dimensions besides the batch: {self.input_shape}")
        return np.random.default_rng(seed).random((batch_size, *self.input_shape), dtype=np.float32)

    def timer(self, batch_size: int, seed: int = 0) -> "TimedCall":
        """A call of this file on one ready batch of `batch_size` random images, for latency measurement."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
        prepared = self.prepare(self.sample_images(batch_size, seed))
        return TimedCall(run=lambda: self.run_prepared(prepared), batch_size=batch_size, labels=dict(self.labels))


@dataclass(frozen=True)
class TimedCall:
    """A loaded file with an input batch ready: `run()` infers that batch once."""

    run: Callable[[], Any]
    batch_size: int
    labels: dict
