"""Float16 copies and the CUDA timing path, without a GPU: conversion and parity run on onnxruntime's CPU provider,
the CUDA path's refusals are checked on a CPU-only onnxruntime, and its I/O-binding code runs with the CPU standing
in for the GPU device."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def _tiny_float_model(path: Path, *, batch="N") -> Path:
    """Conv(3->16)+Relu+GlobalAveragePool+Flatten+Gemm(16->10), float32, on 8x8 RGB images (NCHW)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "W": rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3,
        "B": rng.standard_normal(16).astype(np.float32) * 0.1,
        "G": rng.standard_normal((10, 16)).astype(np.float32) * 0.3,
        "C": rng.standard_normal(10).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "G", "C"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _tiny_qdq_model(path: Path) -> Path:
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul with an int8 weight dequantized on the fly."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    initializers = [
        numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
        numpy_helper.from_array(np.arange(12, dtype=np.int8).reshape(4, 3), "Wq"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["Wq", "scale", "zero"], ["W"]),
        helper.make_node("MatMul", ["xd", "W"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def cpu_only(monkeypatch):
    """onnxruntime as a CPU build reports itself, whatever is installed."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])


@pytest.fixture
def cpu_as_device(monkeypatch):
    """Run compress.measure.gpu's I/O-binding path with the CPU provider and CPU memory standing in for CUDA."""
    from compress.measure import gpu

    monkeypatch.setattr(gpu, "CUDA", "CPUExecutionProvider")
    monkeypatch.setattr(gpu, "DEVICE", ("cpu", 0))


def test_importing_gpu_and_fp16_imports_neither_onnxruntime_nor_tensorflow():
    code = "import sys, compress.measure.gpu, compress.export.fp16; print(sorted({'onnxruntime', 'tensorflow'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.stdout.strip() == "[]"


def test_fp16_keeps_float32_io_halves_weights_and_keeps_parity(tmp_path):
    import onnx
    import onnxruntime as ort

    from compress.export import fp16

    source = _tiny_float_model(tmp_path / "tiny.onnx")
    result = fp16.to_fp16(source, tmp_path / "out" / "tiny.fp16.onnx")

    assert result["precision"] == "float16"
    assert result["cast_nodes"] == 2  # one for the input, one for the output
    assert set(result["weight_bytes_by_dtype"]) == {"float16"}
    assert result["weight_bytes_by_dtype"]["float16"] * 2 == result["weight_bytes_by_dtype_before"]["float32"]
    assert result["file_bytes"] < 0.7 * result["source_bytes"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["tiny.fp16.onnx"]  # no partial file left
    model = onnx.load(result["path"])
    float32 = onnx.TensorProto.FLOAT
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [float32, float32]

    x = np.random.default_rng(1).random((16, 3, 8, 8), dtype=np.float32)
    expected = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(result["path"], providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.float32
    assert np.array_equal(expected.argmax(1), got.argmax(1))
    assert np.max(np.abs(expected - got)) < 1e-2

    parity = fp16.parity(source, result["path"], batch_size=16)
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] < 1e-2


def test_fp16_refuses_quantized_and_half_files(tmp_path):
    from compress.export import fp16
    from compress.errors import ExportError

    with pytest.raises(ExportError, match="already quantized .*QuantizeLinear") as refused:
        fp16.to_fp16(_tiny_qdq_model(tmp_path / "qdq.onnx"), tmp_path / "qdq.fp16.onnx")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "qdq.fp16.onnx").exists()

    half = fp16.to_fp16(_tiny_float_model(tmp_path / "tiny.onnx"), tmp_path / "tiny.fp16.onnx")["path"]
    with pytest.raises(ExportError, match="already float16"):
        fp16.to_fp16(half, tmp_path / "again.onnx")


def test_cuda_provider_status_is_false_on_a_cpu_build_and_names_it(cpu_only):
    import onnxruntime

    from compress.measure import gpu

    available, reason = gpu.cuda_provider_status()
    assert available is False
    assert "CUDAExecutionProvider" in reason and onnxruntime.__version__ in reason
    assert str(Path(onnxruntime.__file__).parent) in reason


def test_measure_gpu_and_the_script_refuse_in_one_line_without_cuda(cpu_only, tmp_path, capsys):
    from compress.measure import gpu
    from compress.errors import ConfigError

    source = _tiny_float_model(tmp_path / "tiny.onnx")
    with pytest.raises(ConfigError, match="^no CUDA provider: .*CUDAExecutionProvider") as refused:
        gpu.measure_gpu({"tiny": source}, batch_sizes=(1,))
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="has no CUDAExecutionProvider"):
        gpu.load_onnx_cuda(source, 1)

    script = _script()
    assert script.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA provider" in err
    assert not (tmp_path / "out").exists()


def test_gpu_info_says_why_without_nvidia_smi(monkeypatch, tmp_path):
    from compress.measure import gpu

    monkeypatch.setenv("PATH", str(tmp_path))
    assert set(gpu.gpu_info()) == {"reason"} and "nvidia-smi" in gpu.gpu_info()["reason"]

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: could not communicate with the driver'\nexit 9\n")
    fake.chmod(0o755)
    assert "exit 9" in gpu.gpu_info()["reason"]

    fake.write_text('#!/bin/sh\nif [ -n "$1" ]; then echo "NVIDIA H200, 570.86.15, 143771"; '
                    'else echo "| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8 |"; fi\n')
    assert gpu.gpu_info() == {"name": "NVIDIA H200", "driver_version": "570.86.15", "memory_total_mib": 143771,
                              "count": 1, "cuda_version": "12.8", "cuda_version_source": "nvidia-smi (the driver's)"}


def test_io_bound_timing_path_runs_with_the_cpu_as_device(cpu_as_device, tmp_path):
    from compress.measure import gpu

    paths = {"tiny": _tiny_float_model(tmp_path / "tiny.onnx"),
             "fixed": _tiny_float_model(tmp_path / "fixed.onnx", batch=1)}
    report = gpu.measure_gpu(paths, batch_sizes=(1, 4), min_seconds=0.0, rounds=2)

    assert report["cuda"]["measured"] is True and report["batch_sizes"] == [1, 4]
    for batch in (1, 4):
        timing = report["files"]["tiny"][f"b{batch}"]
        assert timing["batch_size"] == batch and timing["io_binding"] is True
        assert 0 < timing["median_ms"] <= timing["p95_ms"]
        assert timing["copy_ms"] > 0 and timing["copy_repeats"] == gpu.COPY_REPEATS
    assert report["files"]["fixed"]["b1"]["median_ms"] > 0
    assert "fixed batch size of 1" in report["files"]["fixed"]["b4"]["not_measured"]
    json.dumps(report)  # JSON-ready


def test_script_writes_json_and_table_with_fp16_copies(cpu_as_device, tmp_path):
    run = tmp_path / "run"
    (run / "variants").mkdir(parents=True)
    _tiny_float_model(run / "variants" / "baseline.onnx")
    _tiny_qdq_model(run / "variants" / "ptq.onnx")
    results = json.loads((REPO / "tests" / "fixtures" / "results.json").read_text())
    template = results["variants"][0]
    results["variants"] = [{**template, "name": "baseline", "file": "variants/baseline.onnx"},
                           {**template, "name": "ptq:int8", "file": "variants/ptq.onnx"}]
    (run / "results.json").write_text(json.dumps(results))
    out = tmp_path / "out"

    args = [str(run), "--out", str(out), "--batch-sizes", "1,2", "--cpu-batch-sizes", "1", "--min-seconds", "0"]
    assert _script().main(args) == 0

    report = json.loads((out / "gpu_latency.json").read_text())
    assert list(report["files"]) == ["baseline", "baseline-fp16", "ptq:int8"]
    half = report["files"]["baseline-fp16"]
    assert half["parity"]["cpu"]["top1_agreement"] == 1.0 and half["parity"]["cuda"]["max_abs_diff"] < 1e-2
    assert set(half["cuda"]) == {"b1", "b2"} and set(half["cpu"]) == {"b1"}
    assert "already quantized" in report["files"]["ptq:int8"]["fp16"]["skipped"]
    assert (out / "fp16" / "baseline.fp16.onnx").is_file()
    table = (out / "gpu_latency.md").read_text()
    assert "| baseline-fp16 | float16 |" in table and "No float16 copy:" in table


def test_export_writes_a_parity_checked_fp16_file_of_half_the_size(tmp_path):
    from compress.export.exporter import export_model
    from compress.keras import keras

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(16, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(10)])
    result = export_model(model, tmp_path, formats=("onnx", "onnx-fp16"), parity_samples=64)

    assert list(result["files"]) == ["onnx", "onnx-fp16"] and result["parity_ok"]
    half, full = result["files"]["onnx-fp16"], result["files"]["onnx"]
    assert half["path"] == str(tmp_path / "model.fp16.onnx") and half["precision"] == "float16"
    assert 0.4 < half["bytes"] / full["bytes"] < 0.6
    parity = result["parity"]["files"]["model.fp16.onnx"]
    assert parity["ok"] and parity["threshold"] == 0.99 and parity["precision"] == "float16"


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("measure_gpu_latency", REPO / "scripts" / "measure_gpu_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
