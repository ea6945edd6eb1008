"""compress.measure on tiny exported files: a MatMul+Relu ONNX model built by hand and a 2-layer Keras model as TFLite."""

from __future__ import annotations

import gzip
import warnings

import numpy as np
import pytest

from compress.measure import hardware, latency, sizes
from compress.runtimes import TimedCall
from compress.errors import CompressError

QUICK = {"warmup": 2, "min_repeats": 5, "min_seconds": 0.02}


def _onnx_model(path, *, weights: np.ndarray, fixed_batch: int | str | None = "batch"):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    features, units = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [fixed_batch, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [fixed_batch, units])],
        initializer=[
            numpy_helper.from_array(weights.astype(np.float32), "w"),
            numpy_helper.from_array(np.array([-1, features], dtype=np.int64), "unused_shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    weights = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    weights[:, :3] = 0.0  # 48 of 128 weights are zero
    return _onnx_model(tmp_path_factory.mktemp("onnx") / "tiny.onnx", weights=weights)


@pytest.fixture(scope="module")
def tiny_keras():
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input(shape=(8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(16, activation="relu"),
         keras.layers.Dense(4)]
    )


@pytest.fixture(scope="module")
def tiny_tflite(tiny_keras, tmp_path_factory):
    from compress.keras import tf

    folder = tmp_path_factory.mktemp("tflite")
    float_path = folder / "float.tflite"
    float_path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(tiny_keras).convert())

    converter = tf.lite.TFLiteConverter.from_keras_model(tiny_keras)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    converter.representative_dataset = lambda: ([rng.random((1, 8, 8, 1), dtype=np.float32)] for _ in range(8))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    int8_path = folder / "int8.tflite"
    with warnings.catch_warnings():  # "statistics for quantized inputs were expected": the inputs are random
        warnings.simplefilter("ignore", UserWarning)
        int8_path.write_bytes(converter.convert())
    return {"float": float_path, "int8": int8_path}


def _check_timing(result: dict, batch: int) -> None:
    assert result["median_ms"] > 0
    assert result["p95_ms"] >= result["median_ms"]
    assert result["repeats"] >= QUICK["min_repeats"]
    assert result["batch_size"] == batch
    assert result["images_per_s"] == pytest.approx(batch * 1000.0 / result["median_ms"])


def test_machine_info_without_tensorflow():
    import subprocess
    import sys

    code = "import sys, json; from compress.measure.hardware import machine_info; " \
           "info = machine_info(threads=1); print(json.dumps(info)); print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    import json

    payload, imported = out.strip().splitlines()[-2:]
    info = json.loads(payload)
    assert imported == "False"
    assert info["cpu"] and info["logical_cores"] >= 1 and info["latency_threads"] == 1
    assert set(info["instruction_sets"]) <= set(hardware.INT8_FLAGS)
    for name in ("tensorflow", "tf_keras", "tfmot", "tf2onnx", "onnx", "onnxruntime", "ai_edge_litert"):
        assert info["libraries"][name], name
    assert "CPUExecutionProvider" in info["onnxruntime_providers"]
    assert info["python"].startswith("3.")


@pytest.mark.parametrize("machine, flags, saturate", [
    ("x86_64", {"sse4_1", "avx2", "fma"}, True),
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, False),
    ("x86_64", {"avx2", "avx_vnni"}, False),
    ("aarch64", {"asimd", "asimddp"}, False),
])
def test_int8_sums_saturate_on_x86_without_vnni(monkeypatch, machine, flags, saturate):
    monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
    monkeypatch.setattr(hardware, "_cpu_model_and_flags", lambda: ("cpu", flags))
    assert hardware.int8_sums_saturate() is saturate


def test_file_size_reports_bytes_and_gzip(tmp_path):
    path = tmp_path / "zeros.bin"
    data = bytes(10_000) + np.random.default_rng(0).bytes(1000)
    path.write_bytes(data)
    size = sizes.file_size(path)
    assert size["file_bytes"] == len(data)
    assert size["gzip_bytes"] == len(gzip.compress(data, compresslevel=9, mtime=0))
    assert size["gzip_bytes"] < size["file_bytes"]
    with pytest.raises(CompressError, match="does not exist"):
        sizes.file_size(tmp_path / "missing.onnx")


def test_onnx_weight_stats_counts_weights_not_shapes(tiny_onnx):
    stats = sizes.onnx_weight_stats(tiny_onnx)
    assert stats["params"] == 16 * 8  # the int64 shape constant is not a weight
    assert stats["nonzero_params"] == 16 * 8 - 16 * 3
    assert stats["bytes_by_dtype"] == {"float32": 16 * 8 * 4, "int64": 2 * 8}
    assert stats["sparsity"] == pytest.approx(48 / 128)


def test_onnx_weight_stats_separates_quantization_parameters(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.arange(-6, 6, dtype=np.int8).reshape(4, 3)
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=1),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        initializer=[
            numpy_helper.from_array(weights, "w_q"),
            numpy_helper.from_array(np.full(3, 0.1, dtype=np.float32), "w_scale"),
            numpy_helper.from_array(np.zeros(3, dtype=np.int8), "w_zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "qdq.onnx"))
    stats = sizes.onnx_weight_stats(tmp_path / "qdq.onnx")
    assert stats["params"] == 12 and stats["nonzero_params"] == 11 and stats["quant_params"] == 6
    assert stats["bytes_by_dtype"] == {"float32": 12, "int8": 12 + 3}


def test_onnx_weight_stats_rejects_a_non_onnx_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\xff\x00 not a protobuf" * 10)
    with pytest.raises(CompressError, match="junk.onnx"):
        sizes.onnx_weight_stats(path)


def test_measure_latency_honours_repeats_and_time():
    calls = []
    result = latency.measure_latency(calls.append, np.zeros((4, 2)), warmup=3, min_repeats=7, min_seconds=0.0)
    assert len(calls) == 3 + 7 and result["repeats"] == 7
    _check_timing(result, 4)

    import time

    result = latency.measure_latency(lambda _: time.sleep(0.002), np.zeros((1, 2)), warmup=0, min_repeats=1,
                                   min_seconds=0.03)
    assert result["repeats"] >= 5  # time, not count, ended the loop
    assert result["median_ms"] >= 2.0 and result["p95_ms"] >= result["median_ms"]
    with pytest.raises(CompressError):
        latency.measure_latency(calls.append, np.zeros((1, 2)), min_repeats=0)


def test_interleaved_latency_spreads_a_slowing_machine_over_every_file(monkeypatch):
    """Two identical files on a machine that slows down call by call: timed one after the other, the second
    looks much slower; timed in interleaved rounds, both get the same figure."""
    clock = {"ns": 0, "calls": 0}

    def call_on_a_slowing_machine():
        clock["calls"] += 1
        clock["ns"] += 1_000_000 + 10_000 * clock["calls"]

    monkeypatch.setattr(latency, "time", type("FakeTime", (), {"perf_counter_ns": staticmethod(lambda: clock["ns"])}))
    files = {name: TimedCall(call_on_a_slowing_machine, 1, {"runtime": "fake"}) for name in ("a", "b")}
    settings = dict(warmup=0, min_repeats=100, min_seconds=0.0)

    one_after_the_other = latency.interleaved_latency(files, rounds=1, **settings)
    assert one_after_the_other["b"]["median_ms"] > 1.5 * one_after_the_other["a"]["median_ms"]

    interleaved = latency.interleaved_latency(files, rounds=10, **settings)
    assert interleaved["b"]["median_ms"] == pytest.approx(interleaved["a"]["median_ms"], rel=0.02)
    for result in interleaved.values():
        assert result["repeats"] == 100 and result["rounds"] == 10 and result["runtime"] == "fake"
    with pytest.raises(CompressError, match="rounds"):
        latency.interleaved_latency(files, rounds=0, **settings)


def test_interleaved_latency_of_real_files(tiny_onnx, tiny_tflite):
    files = {"onnx": latency.timed_file(tiny_onnx, 1), "tflite": latency.timed_file(tiny_tflite["int8"], 1)}
    results = latency.interleaved_latency(files, rounds=3, **QUICK)
    for result in results.values():
        _check_timing(result, 1)
    assert results["onnx"]["provider"] == "CPUExecutionProvider" and results["tflite"]["runtime"].startswith("ai-edge")


@pytest.mark.parametrize("batch", [1, 32])
def test_onnx_latency(tiny_onnx, batch):
    result = latency.file_latency(tiny_onnx, batch, threads=1, **QUICK)
    _check_timing(result, batch)
    assert result["threads"] == 1 and result["provider"] == "CPUExecutionProvider"
    assert result["runtime"].startswith("onnxruntime ")


def test_onnx_latency_refuses_a_fixed_other_batch_and_a_missing_provider(tmp_path):
    path = _onnx_model(tmp_path / "fixed.onnx", weights=np.ones((4, 2), np.float32), fixed_batch=1)
    _check_timing(latency.file_latency(path, 1, **QUICK), 1)
    with pytest.raises(CompressError, match="fixed batch size of 1"):
        latency.file_latency(path, 32, **QUICK)
    with pytest.raises(CompressError, match="NoSuchExecutionProvider"):
        latency.file_latency(path, 1, provider="NoSuchExecutionProvider", **QUICK)


@pytest.mark.parametrize("kind", ["float", "int8"])
@pytest.mark.parametrize("batch", [1, 32])
def test_tflite_latency(tiny_tflite, kind, batch):
    from ai_edge_litert.interpreter import Interpreter

    detail = Interpreter(model_path=str(tiny_tflite[kind])).get_input_details()[0]
    assert detail["dtype"] == (np.int8 if kind == "int8" else np.float32)
    result = latency.file_latency(tiny_tflite[kind], batch, threads=1, **QUICK)
    _check_timing(result, batch)
    assert result["threads"] == 1 and result["runtime"].startswith("ai-edge-litert")


def test_keras_latency_labels_predict_and_tf_function(tiny_keras):
    result = latency.keras_latency(tiny_keras, 2, **QUICK)
    assert result["predict"]["label"] == "Keras model.predict(x, verbose=0)"
    assert result["tf_function"]["label"] == "tf.function(model) call"
    for key in ("predict", "tf_function"):
        _check_timing(result[key], 2)


def test_cuda_provider_status_gives_a_reason():
    from compress.measure.gpu import cuda_provider_status

    available, reason = cuda_provider_status()
    assert isinstance(available, bool) and reason
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert not available and "no CUDAExecutionProvider" in reason
