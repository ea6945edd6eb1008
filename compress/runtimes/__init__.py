"""One way to run a model file: `open_session(path)` gives a Session for .onnx (onnxruntime), .tflite (LiteRT) or
.keras (Keras) files, used alike by the parity check, `compress evaluate`, accuracy and latency measurement.

A Session takes float32 images in the toolkit's input range and returns float32 outputs; what a runtime needs in
between (an int8 TFLite input quantized with the file's own scale, a float16 ONNX input) happens in `prepare`, once,
so that latency can time `run_prepared` on a ready batch.
"""

from __future__ import annotations

import os
from pathlib import Path

from compress.errors import ConfigError, ModelError
from compress.runtimes.session import CPU, Session, TimedCall

RUNTIMES = {".onnx": "onnxruntime", ".tflite": "litert", ".keras": "keras", ".h5": "keras"}
__all__ = ["CPU", "RUNTIMES", "Session", "TimedCall", "open_session"]


def open_session(path: str | os.PathLike, *, threads: int | None = None, provider: str = CPU,
                 unsafe: bool = False, reference: bool = False) -> Session:
    """Load a .onnx, .tflite, .keras or .h5 file in its runtime; any load failure is a one-line ModelError.

    `threads` is the intra-op thread count (None: the runtime's default); `provider` the onnxruntime provider.
    `reference` runs the file the plain way instead of the fast one: onnxruntime without graph optimisations (a QDQ
    graph computed op by op in float, not fused into integer kernels), LiteRT with its reference kernels.
    """
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path} is a folder (a SavedModel?); compress reads .onnx, .tflite, .keras and .h5 files: "
                         "load it in Keras and save it with model.save('model.keras')")
    runtime = RUNTIMES.get(path.suffix.lower())
    if runtime is None:
        raise ModelError(f"{path} is not a .onnx, .tflite, .keras or .h5 file")
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    if runtime == "onnxruntime":
        from compress.runtimes.onnxrt import OnnxSession

        return OnnxSession(path, threads=threads, provider=provider, optimize=not reference)
    if runtime == "litert":
        from compress.runtimes.litert import LiteRTSession

        return LiteRTSession(path, threads=threads, reference_kernels=reference)
    from compress.runtimes.kerasrt import KerasSession

    return KerasSession(path, unsafe=unsafe)
