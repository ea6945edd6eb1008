"""Size, weight and latency measurements, taken on the exported files the way a user deploys them.

Everything here reads a file (ONNX, TFLite) and runs it with its own runtime: onnxruntime with a fixed thread
count, or the ai-edge-litert interpreter. `keras_latency` exists to put the Keras numbers beside them, labelled
as Keras, never mixed up with the exported files' numbers. Nothing here imports TensorFlow unless asked to.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from compress.errors import ConfigError, ModelError

# CPU flags that decide whether int8 kernels are fast (x86: VNNI/AMX; ARM: dot-product / i8mm).
INT8_FLAGS = (
    "sse4_1",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "neon",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
    "sve2",
)
# Display name -> distribution names to try, in order (onnxruntime may be installed as its GPU build).
LIBRARIES = {
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "tf_keras": ("tf_keras", "tf-keras"),
    "tfmot": ("tensorflow-model-optimization",),
    "tf2onnx": ("tf2onnx",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "ai_edge_litert": ("ai-edge-litert",),
    "numpy": ("numpy",),
}
DEFAULT_TIMING = {"warmup": 10, "min_repeats": 50, "min_seconds": 1.0}
DEFAULT_ROUNDS = 10  # interleaved timing: turns each file gets
ROUND_WARMUP = 2  # untimed calls at the start of each turn


# --------------------------------------------------------------------------------------------- machine


def machine_info(*, threads: int | None = None) -> dict:
    """The CPU, its int8-relevant instruction sets, OS, Python and library versions, as a JSON-ready dict.

    `threads` is the intra-op thread count the latencies were measured with; it is recorded as
    ``latency_threads`` so that every latency in a results file can be read against it.
    """
    cpu, flags = _cpu_model_and_flags()
    info = {
        "cpu": cpu,
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "instruction_sets": [flag for flag in INT8_FLAGS if flag in flags],
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "onnxruntime_providers": _onnxruntime_providers(),
        "tensorflow_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),  # how this process trained
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    if threads is not None:
        info["latency_threads"] = threads
    return info


def int8_sums_saturate() -> bool:
    """True on an x86 CPU without VNNI: there onnxruntime's uint8 x int8 kernels add pairs of products in 16 bits
    (pmaddubsw), which saturate when both weights of a pair are large (2 * 255 * 127 > 32767), so 8-bit weights
    lose accuracy that 7-bit weights (onnxruntime's reduce_range) keep. VNNI and ARM kernels add in 32 bits."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    _, flags = _cpu_model_and_flags()
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def library_versions() -> dict[str, str | None]:
    """Installed versions from package metadata (no imports); None for a library that is not installed."""
    versions = {}
    for name, distributions in LIBRARIES.items():
        versions[name] = None
        for distribution in distributions:
            try:
                versions[name] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def _cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if not model and key in ("model name", "hardware", "cpu model", "processor") and not value.strip().isdigit():
            model = value.strip()
        elif not flags and key in ("flags", "features"):  # x86 says flags, ARM says Features
            flags = set(value.split())
    return model or platform.processor() or platform.machine() or "unknown", flags


def _onnxruntime_providers() -> list[str] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return list(onnxruntime.get_available_providers())


# --------------------------------------------------------------------------------------------- size


def file_size(path: str | os.PathLike) -> dict:
    """File bytes and gzip bytes (level 9, in memory): pruned weights only shrink once compressed."""
    data = _read_file(path)
    return {"file_bytes": len(data), "gzip_bytes": len(gzip.compress(data, compresslevel=9, mtime=0))}


def onnx_weight_stats(path: str | os.PathLike) -> dict:
    """Weight elements, nonzero weight elements and stored bytes per data type of an ONNX file's constants.

    Weights are the graph's initializers and Constant nodes (subgraphs included), except int64 tensors
    (shapes, axes, indices) and the scales and zero points of Quantize/DequantizeLinear, which are
    counted apart as ``quant_params``. ``bytes_by_dtype`` (stored bytes per data type) covers every constant,
    whatever its role.
    """
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    _read_file(path, check_only=True)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors both mean "not an ONNX file"
        raise ModelError(f"cannot read ONNX file {path}: {_first_line(exc) or type(exc).__name__}") from None

    tensors, quant_names = [], set()
    for graph in _graphs(model.graph):
        tensors.extend(graph.initializer)
        for node in graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
                quant_names.update(node.input[1:])
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                        tensor = onnx.TensorProto()
                        tensor.CopyFrom(attribute.t)
                        tensor.name = node.output[0]
                        tensors.append(tensor)

    zero_points = {}
    for graph in _graphs(model.graph):
        zero_points.update(quantized_zero_points(graph))
    params = nonzero = quant_params = 0
    bytes_by_dtype: dict[str, int] = {}
    for tensor in tensors:
        array = numpy_helper.to_array(tensor)
        dtype = _dtype_name(tensor.data_type, array)
        bytes_by_dtype[dtype] = bytes_by_dtype.get(dtype, 0) + int(array.nbytes)
        if tensor.name in quant_names:
            quant_params += int(array.size)
        elif dtype != "int64":
            params += int(array.size)
            nonzero += int(array.size) - count_zeros(array, zero_points.get(tensor.name))
    return {
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": round(1.0 - nonzero / params, 6) if params else 0.0,
        "quant_params": quant_params,
        "bytes_by_dtype": dict(sorted(bytes_by_dtype.items())),
    }


def quantized_zero_points(graph) -> dict:
    """{constant name: its zero point, shaped to broadcast against it} for constants read by DequantizeLinear.

    A stored integer stands for 0.0 when it equals its zero point: 0 for int8, but 128 for the uint8 weights an
    export makes for CPUs without VNNI, so zeros are counted against the zero point, not against 0.
    """
    from onnx import numpy_helper

    constants = {tensor.name: tensor for tensor in graph.initializer}
    found = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or not set(node.input[::2]) <= set(constants):
            continue
        zero_point = numpy_helper.to_array(constants[node.input[2]])
        rank = len(constants[node.input[0]].dims)
        if zero_point.ndim == 1 and rank > 1:  # per-axis: along the node's axis (default 1)
            axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1) % rank
            zero_point = zero_point.reshape([-1 if dim == axis else 1 for dim in range(rank)])
        found[node.input[0]] = zero_point
    return found


def count_zeros(array: np.ndarray, zero_point: np.ndarray | None = None) -> int:
    """Elements of `array` that stand for 0.0: equal to `zero_point` (quantized) or to 0 (anything else)."""
    return int(np.count_nonzero(array == (0 if zero_point is None else zero_point)))


def _graphs(graph):
    """The graph and every subgraph held in node attributes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g.node or attribute.g.initializer:
                yield from _graphs(attribute.g)
            for sub in attribute.graphs:
                yield from _graphs(sub)


def _dtype_name(data_type: int, array: np.ndarray) -> str:
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(data_type).lower() or array.dtype.name


def _read_file(path, *, check_only: bool = False) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} does not exist or is not a file")
    return b"" if check_only else path.read_bytes()


# --------------------------------------------------------------------------------------------- latency


def measure_latency(
    run_callable: Callable[[Any], Any],
    inputs: Any,
    *,
    warmup: int = DEFAULT_TIMING["warmup"],
    min_repeats: int = DEFAULT_TIMING["min_repeats"],
    min_seconds: float = DEFAULT_TIMING["min_seconds"],
    batch_size: int | None = None,
) -> dict:
    """Call `run_callable(inputs)` `warmup` times, then time calls until both `min_repeats` and `min_seconds`.

    Returns median_ms, p95_ms, mean_ms, min_ms, images_per_s (batch / median), repeats, warmup and batch_size.
    The batch size is taken from `inputs` (an array, or a dict/list of arrays) unless given.
    """
    _check_timing_settings(warmup, min_repeats, min_seconds)
    batch = batch_size if batch_size is not None else _batch_of(inputs)
    for _ in range(warmup):
        run_callable(inputs)
    times_ns = _time_calls(lambda: run_callable(inputs), min_repeats, min_seconds)
    return _timing_summary(times_ns, batch, warmup)


@dataclass(frozen=True)
class LoadedFile:
    """An exported file loaded in its runtime with an input batch ready: `run()` infers that batch once."""

    run: Callable[[], Any]
    batch_size: int
    labels: dict  # runtime, provider, threads: what the timing was taken with


def interleaved_latency(
    files: dict[str, LoadedFile],
    *,
    rounds: int = DEFAULT_ROUNDS,
    warmup: int = DEFAULT_TIMING["warmup"],
    min_repeats: int = DEFAULT_TIMING["min_repeats"],
    min_seconds: float = DEFAULT_TIMING["min_seconds"],
) -> dict[str, dict]:
    """Time several loaded files in turns, so that a drift in the machine's speed falls on all of them alike.

    Each of `rounds` rounds times every file for 1/rounds of `min_repeats` calls and of `min_seconds` (after
    `ROUND_WARMUP` untimed calls, since the files before it took the caches), starting one file later each
    round. Per file: `measure_latency`'s figures over all its timed calls, plus `rounds` and its labels.
    """
    _check_timing_settings(warmup, min_repeats, min_seconds)
    if not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds!r}")
    for loaded in files.values():
        for _ in range(warmup):
            loaded.run()
    names = list(files)
    times_ns: dict[str, list[int]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            for _ in range(ROUND_WARMUP):
                files[name].run()
            times_ns[name] += _time_calls(files[name].run, -(-min_repeats // rounds), min_seconds / rounds)
    return {
        name: {**_timing_summary(times_ns[name], files[name].batch_size, warmup), "rounds": rounds,
               **files[name].labels}
        for name in names
    }


def _check_timing_settings(warmup: int, min_repeats: int, min_seconds: float) -> None:
    if warmup < 0 or min_repeats < 1 or min_seconds < 0:
        raise ConfigError(
            f"latency settings out of range: warmup {warmup} (>= 0), min_repeats {min_repeats} (>= 1), "
            f"min_seconds {min_seconds} (>= 0)"
        )


def _time_calls(run: Callable[[], Any], min_repeats: int, min_seconds: float) -> list[int]:
    """Nanoseconds of each call of `run()`, calling until both `min_repeats` calls and `min_seconds` are spent."""
    times_ns: list[int] = []
    budget_ns = min_seconds * 1e9
    spent_ns = 0
    while len(times_ns) < min_repeats or spent_ns < budget_ns:
        start = time.perf_counter_ns()
        run()
        elapsed = time.perf_counter_ns() - start
        times_ns.append(elapsed)
        spent_ns += elapsed
    return times_ns


def _timing_summary(times_ns: list[int], batch: int, warmup: int) -> dict:
    times_ms = np.array(times_ns, dtype=np.float64) / 1e6
    median = float(statistics.median(times_ms))
    median = max(median, 1e-6)  # a timer resolution of 0 must not divide by zero below
    return {
        "median_ms": median,
        "p95_ms": max(float(np.percentile(times_ms, 95)), median),
        "mean_ms": float(times_ms.mean()),
        "min_ms": float(times_ms.min()),
        "images_per_s": batch * 1000.0 / median,
        "repeats": len(times_ns),
        "warmup": warmup,
        "batch_size": batch,
    }


def _batch_of(inputs) -> int:
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()), None)
    elif isinstance(inputs, (list, tuple)):
        inputs = inputs[0] if inputs else None
    shape = getattr(inputs, "shape", None)
    if not shape:
        raise ConfigError("cannot tell the batch size from the inputs; pass batch_size")
    return int(shape[0])


def _random_input(shape, dtype, rng: np.random.Generator) -> np.ndarray:
    """Images-like data: floats in [0, 1) (the toolkit's models take normalised images), integers over their range."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.random(shape, dtype=np.float32).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -128), min(info.max, 255) + 1, size=shape, dtype=dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raise ModelError(f"cannot make sample input of type {dtype}")


def onnx_latency(
    path: str | os.PathLike,
    batch_size: int,
    *,
    threads: int = 1,
    provider: str = "CPUExecutionProvider",
    seed: int = 0,
    **timing,
) -> dict:
    """Latency of an ONNX file in onnxruntime (see `load_onnx`); `timing` passes warmup / min_repeats /
    min_seconds to `measure_latency`. The result records runtime, provider, threads and batch size beside the times.
    """
    return _latency_of(load_onnx(path, batch_size, threads=threads, provider=provider, seed=seed), **timing)


def _latency_of(loaded: LoadedFile, **timing) -> dict:
    return {**measure_latency(lambda _: loaded.run(), None, batch_size=loaded.batch_size, **timing), **loaded.labels}


def load_onnx(
    path: str | os.PathLike,
    batch_size: int,
    *,
    threads: int = 1,
    provider: str = "CPUExecutionProvider",
    seed: int = 0,
) -> LoadedFile:
    """An ONNX file in onnxruntime: `threads` intra-op threads, 1 inter-op, sequential execution, with a batch of
    `batch_size` random images; the input shape is read from the model (its batch dimension dynamic or equal).
    """
    import onnxruntime as ort

    path = Path(path)
    _read_file(path, check_only=True)
    _check_threads(threads, batch_size)
    if provider not in ort.get_available_providers():
        available = ", ".join(ort.get_available_providers())
        raise ConfigError(f"onnxruntime provider {provider} is not available here; available: {available}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=[provider])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types for an unusable file
        raise ModelError(f"onnxruntime cannot load {path}: {_first_line(exc) or type(exc).__name__}") from None
    if session.get_providers()[0] != provider:
        raise ConfigError(f"onnxruntime fell back from {provider} to {session.get_providers()[0]} for {path}")

    rng = np.random.default_rng(seed)
    feeds = {}
    for node in session.get_inputs():
        shape = _concrete_shape(node.shape, batch_size, f"{path} input {node.name!r}")
        feeds[node.name] = _random_input(shape, _ORT_TYPES.get(node.type, np.float32), rng)
    output_names = [node.name for node in session.get_outputs()]
    return LoadedFile(
        run=lambda: session.run(output_names, feeds),
        batch_size=batch_size,
        labels=dict(runtime=f"onnxruntime {ort.__version__}", provider=provider, threads=threads, inter_op_threads=1),
    )


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def _concrete_shape(shape, batch_size: int, what: str) -> list[int]:
    if not shape:
        raise ModelError(f"{what} has no batch dimension (shape {list(shape)})")
    first, rest = shape[0], list(shape[1:])
    if isinstance(first, int) and first > 0 and first != batch_size:
        raise ModelError(f"{what} has a fixed batch size of {first}; cannot measure batch {batch_size}")
    if any(not isinstance(dim, int) or dim <= 0 for dim in rest):
        raise ModelError(f"{what} has dynamic dimensions besides the batch: {list(shape)}")
    return [batch_size, *rest]


def _check_threads(threads: int, batch_size: int) -> None:
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")


def tflite_latency(path: str | os.PathLike, batch_size: int, threads: int = 1, *, seed: int = 0, **timing) -> dict:
    """Latency of a TFLite file in the ai-edge-litert interpreter (see `load_tflite`); `timing` as in
    `onnx_latency`."""
    return _latency_of(load_tflite(path, batch_size, threads, seed=seed), **timing)


def load_tflite(path: str | os.PathLike, batch_size: int, threads: int = 1, *, seed: int = 0) -> LoadedFile:
    """A TFLite file in the ai-edge-litert interpreter with `threads` threads, its input resized to `batch_size`.

    An int8/uint8 input is fed quantised images (float [0, 1) through the input's scale and zero point). Each
    run sets the input, invokes, and reads the outputs.
    """
    from ai_edge_litert.interpreter import Interpreter

    path = Path(path)
    _read_file(path, check_only=True)
    _check_threads(threads, batch_size)
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        inputs = interpreter.get_input_details()
        for detail in inputs:
            shape = list(detail["shape"])
            if shape and shape[0] != batch_size:
                interpreter.resize_tensor_input(detail["index"], [batch_size, *shape[1:]])
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"the TFLite interpreter cannot load {path}: {_first_line(exc)}") from None

    rng = np.random.default_rng(seed)
    feeds = []
    for detail in interpreter.get_input_details():
        shape = [int(dim) for dim in detail["shape"]]
        dtype = np.dtype(detail["dtype"])
        scale, zero_point = detail.get("quantization", (0.0, 0))
        if np.issubdtype(dtype, np.integer) and scale:
            info = np.iinfo(dtype)
            images = rng.random(shape, dtype=np.float32)
            sample = np.clip(np.round(images / scale + zero_point), info.min, info.max).astype(dtype)
        else:
            sample = _random_input(shape, dtype, rng)
        feeds.append((detail["index"], sample))
    outputs = [detail["index"] for detail in interpreter.get_output_details()]

    def run():
        for index, value in feeds:
            interpreter.set_tensor(index, value)
        interpreter.invoke()
        return [interpreter.get_tensor(index) for index in outputs]

    labels = dict(runtime=f"ai-edge-litert {library_versions()['ai_edge_litert']}", provider="cpu", threads=threads)
    return LoadedFile(run=run, batch_size=batch_size, labels=labels)


def keras_latency(model, batch_size: int, *, seed: int = 0, **timing) -> dict:
    """Keras-side reference latencies, labelled: `model.predict(x, verbose=0)` and a `tf.function(model)` call.

    These are not the exported files' numbers: predict (as the article serves the model) pays Keras' per-call
    overhead; the tf.function call is the graph alone. TensorFlow's own thread pools are used as configured
    (0 means "all cores"), and recorded.
    """
    from compress.keras import tf

    _check_threads(1, batch_size)
    input_shape = model.input_shape
    if isinstance(input_shape, list):
        raise ModelError("keras_latency handles single-input models only")
    shape = [batch_size, *input_shape[1:]]
    if any(dim is None for dim in shape):
        raise ModelError(f"model input has dynamic dimensions besides the batch: {input_shape}")
    x = np.random.default_rng(seed).random(shape, dtype=np.float32)
    threads = {
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
    }

    predict = measure_latency(lambda v: model.predict(v, batch_size=batch_size, verbose=0), x, **timing)
    predict.update(label="Keras model.predict(x, verbose=0)", runtime=f"tf_keras {library_versions()['tf_keras']}")
    graph = tf.function(model)
    x_tensor = tf.constant(x)
    # .numpy() makes the call wait for the result and hand back an array, as predict does.
    call = measure_latency(lambda v: graph(v, training=False).numpy(), x_tensor, batch_size=batch_size, **timing)
    call.update(label="tf.function(model) call", runtime=f"tensorflow {tf.__version__}")
    for entry in (predict, call):
        entry["threads"] = threads
    return {"predict": predict, "tf_function": call, "batch_size": batch_size}


# --------------------------------------------------------------------------------------------- CUDA


def cuda_available() -> tuple[bool, str]:
    """Whether onnxruntime can run on CUDA here: the provider is built in and a session really starts on it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "onnxruntime not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "onnxruntime-gpu not installed (no CUDAExecutionProvider in this onnxruntime build)"
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(
            _tiny_onnx_bytes(), sess_options=options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
    except Exception as exc:  # a missing CUDA/cuDNN library or driver surfaces as a plain RuntimeError
        return False, f"no CUDA device: {_first_line(exc) or type(exc).__name__}"
    if "CUDAExecutionProvider" not in session.get_providers():
        return False, "no CUDA device (onnxruntime fell back to the CPU)"
    return True, "CUDAExecutionProvider session created"


def _tiny_onnx_bytes() -> bytes:
    """A one-node ONNX model (Relu on a float vector), built in memory."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
