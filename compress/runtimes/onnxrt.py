"""The one place an onnxruntime InferenceSession is created."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.errors import ConfigError, ModelError, first_line
from compress.runtimes.session import CPU, Session

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def inference_session(path: Path | bytes, *, threads: int | None = None, provider: str = CPU, optimize: bool = True):
    """An onnxruntime session: `threads` intra-op threads (None: onnxruntime's default), one inter-op thread,
    sequential execution, every graph optimisation (none with `optimize=False`: the graph computed op by op as
    written, e.g. an int8 QDQ graph in float, without fusing it into integer kernels); refuses a provider that is
    missing or that fell back."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        raise ConfigError(f"onnxruntime provider {provider} is not available here; available: {', '.join(available)}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    what = "an in-memory model" if isinstance(path, bytes) else str(path)
    try:
        session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=options,
                                       providers=[provider])
    except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail, InvalidGraph ...: all "unusable file"
        raise ModelError(f"onnxruntime cannot load {what}: {first_line(exc)}") from exc
    if session.get_providers()[0] != provider:
        raise ConfigError(f"onnxruntime fell back from {provider} to {session.get_providers()[0]} for {what}")
    return session


class OnnxSession(Session):
    def __init__(self, path: Path, *, threads: int | None, provider: str, optimize: bool = True):
        import onnxruntime as ort

        self.session = inference_session(path, threads=threads, provider=provider, optimize=optimize)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].type not in _ORT_TYPES:
            raise ModelError(f"{path} must take one float image input; it takes "
                             + ", ".join(f"{item.name} {item.type}" for item in inputs))
        self.input_name = inputs[0].name
        self.input_dtype = _ORT_TYPES[inputs[0].type]
        shape = tuple(dim if isinstance(dim, int) and dim > 0 else None for dim in inputs[0].shape[1:])
        first = inputs[0].shape[0] if inputs[0].shape else None
        self.fixed_batch = first if isinstance(first, int) and first > 0 else None
        labels = dict(runtime=f"onnxruntime {ort.__version__}", provider=provider, threads=threads,
                      inter_op_threads=1)
        binary_output = self.session.get_modelmeta().custom_metadata_map.get("binary_output")
        super().__init__(path, "onnxruntime", shape, labels, binary_output)

    def prepare(self, images: np.ndarray) -> dict:
        if self.fixed_batch is not None and len(images) != self.fixed_batch:
            raise ModelError(f"{self.path} has a fixed batch size of {self.fixed_batch}; cannot run {len(images)}")
        return {self.input_name: images.astype(self.input_dtype, copy=False)}

    def run_prepared(self, prepared: dict) -> np.ndarray:
        return self.session.run(None, prepared)[0]
