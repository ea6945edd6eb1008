"""Float16 copies of float32 ONNX files, for GPUs: half the weight bytes, and tensor cores where the GPU has them.

The conversion is onnxruntime's own (`onnxruntime.transformers.float16`, shipped with every onnxruntime build), so
no new dependency is needed. Inputs and outputs stay float32, so a float16 file takes and returns the same arrays
as its source and is measured and checked the same way. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from compress.errors import ExportError, ModelError, first_line
from compress.files import atomic_path
from compress.measure.sizes import _dtype_name, _graphs, weight_arrays
from compress.runtimes import CPU, open_session

# Ops that mean a file is already quantized: float16 conversion would not touch its integer arithmetic.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "ConvInteger",
        "MatMulInteger",
        "MatMulNBits",
    }
)
# Stored integer types of quantized weights (int32 biases and int64 shapes are not weights on their own).
_INTEGER_WEIGHT_TYPES = ("INT4", "UINT4", "INT8", "UINT8", "INT16", "UINT16")
_HALF_TYPES = ("FLOAT16", "BFLOAT16")


def to_fp16(source_onnx_path: str | os.PathLike, target_path: str | os.PathLike) -> dict:
    """Write a float16 copy of a float32 ONNX file (float32 inputs and outputs kept, through Cast nodes).

    Refuses, as one ExportError, a file that is already quantized or already half precision: converting it again
    would measure a model nobody deploys. The copy is written under a temporary name, checked with onnx.checker,
    then renamed, so a failed conversion never leaves a file that looks finished.
    Returns path, precision, source and file bytes, weight bytes by data type before and after, and op counts
    (``cast_nodes``: the Cast nodes the conversion added or kept, each one a copy at run time).
    """
    import onnx

    source, target = Path(source_onnx_path), Path(target_path)
    if not source.is_file():
        raise ModelError(f"{source} does not exist or is not a file")
    if source.resolve() == target.resolve():
        raise ExportError(f"refusing to overwrite {source} with its float16 copy; choose another target")
    try:
        model = onnx.load(str(source))
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors both mean "not an ONNX file"
        raise ModelError(f"cannot read ONNX file {source}: {first_line(exc) or type(exc).__name__}") from exc
    _refuse_unconvertible(model, source)
    before = weight_bytes_by_dtype(model)
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError as exc:
        raise ExportError(f"onnxruntime's float16 converter is not available: {first_line(exc)}") from exc
    try:
        converted = convert_float_to_float16(model, keep_io_types=True)
        # The converter appends the Cast nodes of the inputs at the end of the graph; onnx.checker wants them first.
        OnnxModel.graph_topological_sort(converted.graph)
    except Exception as exc:  # the converter raises plain ValueError/RuntimeError for graphs it cannot handle
        raise ExportError(f"float16 conversion of {source} failed: {first_line(exc) or type(exc).__name__}") from exc
    with atomic_path(target) as partial:
        onnx.save_model(converted, str(partial))
        try:
            onnx.checker.check_model(str(partial))
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"float16 copy of {source} fails onnx.checker: {first_line(exc)}") from exc
    op_counts = Counter(node.op_type for graph in _graphs(converted.graph) for node in graph.node)
    return {
        "path": str(target),
        "source": str(source),
        "precision": "float16",
        "source_bytes": source.stat().st_size,
        "file_bytes": target.stat().st_size,
        "weight_bytes_by_dtype_before": before,
        "weight_bytes_by_dtype": weight_bytes_by_dtype(converted),
        "cast_nodes": op_counts.get("Cast", 0),
        "op_counts": dict(sorted(op_counts.items())),
    }


def weight_bytes_by_dtype(model) -> dict[str, int]:
    """Stored bytes per data type of a model's initializers (subgraphs included): what float16 halves."""
    from onnx import numpy_helper

    totals: Counter = Counter()
    for graph in _graphs(model.graph):
        for tensor in graph.initializer:
            array = numpy_helper.to_array(tensor)
            totals[_dtype_name(tensor.data_type, array)] += int(array.nbytes)
    return dict(sorted(totals.items()))


def parity(
    reference_path: str | os.PathLike,
    candidate_path: str | os.PathLike,
    *,
    batch_size: int = 64,
    seed: int = 0,
    provider: str = CPU,
) -> dict:
    """Top-1 agreement and largest absolute difference of a float16 copy against its float32 source.

    Both files get the same batch of random images (the reference Session's `sample_images`, as latency timing
    uses). The reference always runs on the CPU in float32, so that the candidate on a GPU is not compared with
    TF32 arithmetic.
    """
    reference = open_session(reference_path)
    candidate = open_session(candidate_path, provider=provider)
    images = reference.sample_images(batch_size, seed)
    expected, got = reference(images), candidate(images)
    if expected.shape != got.shape:
        raise ExportError(f"{candidate_path} returns shape {got.shape}, its source {expected.shape}")
    top1 = float(np.mean(expected.reshape(batch_size, -1).argmax(1) == got.reshape(batch_size, -1).argmax(1)))
    return {
        "top1_agreement": top1,
        "max_abs_diff": float(np.max(np.abs(expected - got))),
        "batch_size": batch_size,
        "provider": candidate.labels["provider"],
        "reference_provider": CPU,
    }


def _refuse_unconvertible(model, source: Path) -> None:
    import onnx

    names = onnx.TensorProto.DataType.Name
    for graph in _graphs(model.graph):
        quantized = sorted({node.op_type for node in graph.node} & QUANTIZED_OPS)
        if quantized:
            raise ExportError(
                f"{source} is already quantized ({', '.join(quantized)}); float16 applies to float32 files"
            )
        weights = weight_arrays(graph)
        for tensor in graph.initializer:
            if tensor.name not in weights:  # uint8 indices into a table of float weights (export/codebook.py)
                continue
            if names(tensor.data_type) in _INTEGER_WEIGHT_TYPES:
                raise ExportError(f"{source} is already quantized ({names(tensor.data_type).lower()} weight "
                                  f"{tensor.name!r}); float16 applies to float32 files")
            if names(tensor.data_type) in _HALF_TYPES:
                raise ExportError(f"{source} is already {names(tensor.data_type).lower()} (weight {tensor.name!r})")
    for value in (*model.graph.input, *model.graph.output):
        if names(value.type.tensor_type.elem_type) in _HALF_TYPES:
            raise ExportError(f"{source} is already half precision (input/output {value.name!r})")
