"""The machine a measurement was taken on: CPU model and its int8-relevant instruction sets, and library versions
(whether onnxruntime runs on CUDA here is measure/gpu.py's `cuda_provider_status`). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path


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
