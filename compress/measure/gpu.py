"""CUDA latency of ONNX files in onnxruntime-gpu, timing the model alone, with the copies to and from the GPU apart.

A CUDA timing that includes copying the batch in and the result out measures the PCIe bus as much as the model,
and a session that silently fell back to the CPU measures no GPU at all. Here the input batch is uploaded once and
the outputs stay on the GPU (I/O binding), the copies are timed separately, and a session that is not on
CUDAExecutionProvider is refused. Neither TensorFlow nor onnxruntime is imported when this module is: a GPU machine
may hold only onnxruntime-gpu, and the onnxruntime found at call time is the one reported (version and location),
so that a carried onnxruntime-gpu build is told apart from a CPU build installed elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

from compress.errors import CompressError, ConfigError, ModelError, first_line
from compress.measure.latency import DEFAULT_ROUNDS, DEFAULT_TIMING, interleaved_latency
from compress.runtimes import TimedCall, open_session
from compress.runtimes.onnxrt import inference_session

CUDA = "CUDAExecutionProvider"
DEVICE = ("cuda", 0)  # where OrtValues and bound outputs live: onnxruntime's device name and id
GPU_BATCH_SIZES = (1, 32, 256)
COPY_REPEATS = 20  # timed copies per file and batch size, after COPY_WARMUP untimed ones
COPY_WARMUP = 2
NVIDIA_SMI_TIMEOUT_S = 30
# CUDA provider options that change the numbers (TF32 matmuls, how convolution algorithms are chosen): recorded.
RECORDED_CUDA_OPTIONS = (
    "device_id",
    "use_tf32",
    "cudnn_conv_algo_search",
    "cudnn_conv_use_max_workspace",
    "prefer_nhwc",
)


def onnxruntime_build() -> dict:
    """Which onnxruntime this process imports: version, location, package (onnxruntime or onnxruntime-gpu),
    the CUDA version it was built for, and its providers; ``{"reason": ...}`` alone when it is not installed."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"reason": f"onnxruntime is not installed: {first_line(exc)}"}
    try:
        from onnxruntime.capi import build_and_package_info as build
    except ImportError:
        build = None
    return {
        "version": ort.__version__,
        "file": ort.__file__,
        "package": getattr(build, "package_name", None),
        "cuda_version": getattr(build, "cuda_version", None),
        "providers": list(ort.get_available_providers()),
    }


def cuda_provider_status() -> tuple[bool, str]:
    """Whether the onnxruntime in use has CUDAExecutionProvider and a session really starts on it, and why not:
    the toolkit's one CUDA probe.

    The reason names the onnxruntime (version and folder) in either case. onnxruntime-gpu's CUDA and cuDNN
    libraries are preloaded first where onnxruntime can (`preload_dlls`, onnxruntime >= 1.21), so that the
    nvidia-* pip packages are found without LD_LIBRARY_PATH.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "onnxruntime is not installed"
    which = f"onnxruntime {ort.__version__} from {Path(ort.__file__).parent}"
    if CUDA not in ort.get_available_providers():
        return False, f"{which} has no {CUDA} (a CPU build; install or carry onnxruntime-gpu)"
    try:
        _on_cuda(lambda: inference_session(_tiny_onnx_bytes(), provider=CUDA))
    except CompressError as exc:
        return False, f"{which}: {exc}"
    return True, f"{which}: a session runs on {CUDA}"


def gpu_info() -> dict:
    """GPU 0's name, driver version, total memory (MiB), the GPU count and the CUDA version, from nvidia-smi.

    The CUDA version is the driver's (nvidia-smi's header), else the one onnxruntime was built for, as
    ``cuda_version_source`` says. ``{"reason": ...}`` alone where nvidia-smi is missing, fails or hangs.
    """
    rows, reason = _nvidia_smi("--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits")
    if rows is None:
        return {"reason": reason}
    gpus = [[field.strip() for field in line.split(",")] for line in rows.splitlines() if line.strip()]
    if not gpus or len(gpus[0]) != 3:
        return {"reason": f"nvidia-smi lists no GPU ({rows.strip()[:200] or 'empty output'})"}
    name, driver, memory = gpus[0]
    info = {
        "name": name,
        "driver_version": driver,
        "memory_total_mib": int(memory) if memory.isdigit() else memory,
        "count": len(gpus),
    }
    header, _ = _nvidia_smi()
    match = re.search(r"CUDA Version:\s*([0-9.]+)", header or "")
    if match:
        info.update(cuda_version=match.group(1), cuda_version_source="nvidia-smi (the driver's)")
    else:
        info.update(cuda_version=onnxruntime_build().get("cuda_version"), cuda_version_source="onnxruntime build")
    return info


def load_onnx_cuda(path: str | os.PathLike, batch_size: int, *, seed: int = 0) -> TimedCall:
    """An ONNX file on CUDAExecutionProvider with a batch of `batch_size` random images already on the GPU.

    `run()` runs the model on the bound GPU input into GPU outputs and waits for them: the model alone. The
    copies are measured apart, once here: labels ``copy_in_ms`` (the input batch host -> device),
    ``copy_out_ms`` (the outputs device -> host) and ``copy_ms`` (both), medians of `COPY_REPEATS`. The images
    are the Session's `sample_images` with the same seed, so CPU and GPU timings see the same data.
    """
    import onnxruntime as ort

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    if CUDA not in ort.get_available_providers():
        raise ConfigError(f"onnxruntime {ort.__version__} from {Path(ort.__file__).parent} has no {CUDA}")
    loaded = _on_cuda(lambda: open_session(path, provider=CUDA))
    feeds = loaded.prepare(loaded.sample_images(batch_size, seed))
    session = loaded.session
    binding = session.io_binding()
    device_inputs = {name: ort.OrtValue.ortvalue_from_numpy(value, *DEVICE) for name, value in feeds.items()}
    for name, value in device_inputs.items():
        binding.bind_ortvalue_input(name, value)
    for node in session.get_outputs():
        binding.bind_output(node.name, *DEVICE)

    def run():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    try:
        run()  # also allocates the outputs that the copy timing reads back
    except Exception as exc:  # out of GPU memory or a kernel CUDA lacks: onnxruntime's own exception types
        raise ModelError(f"{path} does not run on CUDA at batch {batch_size}: {first_line(exc)}") from exc
    cuda_options = session.get_provider_options().get(CUDA, {})
    labels = dict(
        loaded.labels,
        io_binding=True,
        cuda_options={key: cuda_options[key] for key in RECORDED_CUDA_OPTIONS if key in cuda_options},
        **_copy_times(feeds, device_inputs, binding),
    )
    return TimedCall(run=run, batch_size=batch_size, labels=labels)


def measure_gpu(
    paths: dict[str, str | os.PathLike],
    batch_sizes=GPU_BATCH_SIZES,
    min_seconds: float = DEFAULT_TIMING["min_seconds"],
    *,
    rounds: int = DEFAULT_ROUNDS,
    seed: int = 0,
) -> dict:
    """CUDA latency of every file at each batch size, the files of one batch size timed in interleaved rounds.

    Refuses (ConfigError, one line) where no CUDA session starts, rather than time the CPU under a GPU label.
    A file that cannot run at a batch size (a fixed batch dimension, out of GPU memory) gets
    ``{"not_measured": reason}`` there; the others are still timed. Returns the provider status, onnxruntime
    build, `gpu_info()`, the settings, and per file per batch (``"b1"``, ``"b32"``, ...) `interleaved_latency`'s
    figures (median_ms, p95_ms, ...) with the copy times.
    """
    if not paths:
        raise ConfigError("no files to measure on the GPU")
    if not batch_sizes or any(not isinstance(batch, int) or batch < 1 for batch in batch_sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)!r}")
    available, reason = cuda_provider_status()
    if not available:
        raise ConfigError(f"no CUDA provider: {reason}")
    files: dict[str, dict] = {name: {"path": str(path)} for name, path in paths.items()}
    for batch in batch_sizes:
        loaded = {}  # rebinding frees the previous batch size's sessions (and their GPU memory) first
        for name, path in paths.items():
            try:
                loaded[name] = load_onnx_cuda(path, batch, seed=seed)
            except CompressError as exc:
                files[name][f"b{batch}"] = {"not_measured": str(exc)}
        if loaded:
            timings = interleaved_latency(loaded, rounds=rounds, min_seconds=min_seconds)
            for name, timing in timings.items():
                files[name][f"b{batch}"] = timing
    return {
        "cuda": {"measured": True, "reason": reason},
        "onnxruntime": onnxruntime_build(),
        "gpu": gpu_info(),
        "batch_sizes": list(batch_sizes),
        "min_seconds": min_seconds,
        "rounds": rounds,
        "files": files,
    }


def _on_cuda(open_session_fn):
    """`open_session_fn()` (which opens a session on CUDA) with onnxruntime's stdout caught: onnxruntime prints
    why a CUDA session failed there (its "EP Error" line), which is added to the one-line error it raises."""
    import onnxruntime as ort

    preload_note = _preload_cuda_libraries(ort)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return open_session_fn()
    except CompressError as exc:
        said = next((line.strip() for line in printed.getvalue().splitlines() if "EP Error" in line), "")
        raise type(exc)(f"{exc}{f' ({said})' if said else ''}{preload_note}") from exc


@functools.cache
def _preload_cuda_libraries(ort) -> str:
    """Load the CUDA/cuDNN libraries of the nvidia-* pip packages once, where onnxruntime can; returns what
    `preload_dlls` printed (it prints its warnings), as a note to add to an error, or ""."""
    if not hasattr(ort, "preload_dlls"):
        return ""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            ort.preload_dlls()
        except Exception as exc:  # ctypes' OSError for a library that will not load, or anything else it meets
            return f" (preload_dlls: {first_line(exc)})"
    said = re.sub(r"\x1b\[[0-9;]*m", "", printed.getvalue()).strip()
    return f" (preload_dlls: {said.splitlines()[0]})" if said else ""


def _tiny_onnx_bytes() -> bytes:
    """A one-node ONNX model (Relu on a float vector), built in memory: what the CUDA probe starts a session on."""
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


def _copy_times(feeds: dict, device_inputs: dict, binding) -> dict:
    """Median milliseconds to copy the input batch into its GPU buffers and the outputs back to the host."""
    copy_in, copy_out, both = [], [], []
    for repeat in range(COPY_WARMUP + COPY_REPEATS):
        start = time.perf_counter_ns()
        for name, value in device_inputs.items():
            value.update_inplace(feeds[name])
        middle = time.perf_counter_ns()
        binding.copy_outputs_to_cpu()
        end = time.perf_counter_ns()
        if repeat >= COPY_WARMUP:
            copy_in.append((middle - start) / 1e6)
            copy_out.append((end - middle) / 1e6)
            both.append((end - start) / 1e6)
    return {
        "copy_in_ms": statistics.median(copy_in),
        "copy_out_ms": statistics.median(copy_out),
        "copy_ms": statistics.median(both),
        "copy_repeats": COPY_REPEATS,
    }


def _nvidia_smi(*args: str) -> tuple[str | None, str]:
    """nvidia-smi's stdout (None on failure) and why it failed: missing, timed out, or a non-zero exit."""
    try:
        result = subprocess.run(
            ["nvidia-smi", *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        return None, "nvidia-smi not found on PATH (no NVIDIA driver here)"
    except subprocess.TimeoutExpired:
        return None, f"nvidia-smi did not answer within {NVIDIA_SMI_TIMEOUT_S} s"
    except OSError as exc:
        return None, f"nvidia-smi cannot run: {first_line(exc)}"
    if result.returncode != 0:
        said = (result.stdout.strip() or result.stderr.strip()).splitlines()
        return None, f"nvidia-smi failed (exit {result.returncode}): {said[0] if said else 'no output'}"
    return result.stdout, ""
