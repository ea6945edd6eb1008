"""Keras -> ONNX / TFLite files, each checked against the Keras model it came from.

How each variant is exported:
- float models (baseline, pruned, clustered, distilled students): ONNX through `tf2onnx.convert.from_keras`, TFLite
  through `TFLiteConverter.from_keras_model` without optimisations; both stay float32, pruned zeros stay zero.
- QAT models (tfmot `QuantizeWrapperV2` / `QuantizeLayer`, including prune- and cluster-preserving QAT): first an
  int8 TFLite file (`Optimize.DEFAULT`, which gives full int8 with the ranges and per-channel scales training learned),
  then ONNX from that file with `tf2onnx.convert.from_tflite`: int8 weight initializers feeding DequantizeLinear
  (tf2onnx on the Keras QAT model would keep every weight float32). `int8_rewrite.use_integer_kernels` then rewrites
  that graph, without changing what it computes, so that onnxruntime fuses it into QLinearConv / QGemm, and
  `int8_rewrite.inputs_rounded_as_fake_quant` quantizes the input with the QAT model's own FakeQuant arithmetic and
  zero point (QuantizeLinear rounds values halfway between two levels, such as every [-1, 1] pixel, otherwise; where
  `data` says which pixels the model takes and QuantizeLinear rounds all of them as FakeQuant does, it stays), and
  `int8_rewrite.input_channels_widened` gives a convolution reading the RGB image a fourth, zero-weighted input
  channel, so that onnxruntime runs it on its fast int8 kernels (about twice as fast as the 3-channel fallback). With
  `int8_weights="uint8"` (auto: where this CPU is x86 without VNNI, whose uint8 x int8 kernels saturate 16-bit sums)
  the weights are stored as uint8 with zero point 128, the same numbers.
- every ONNX file: a weight with few distinct values (a clustered kernel) is stored as indices packed into bytes and a
  table of its values (`codebook.store_as_codebooks`), which onnxruntime turns back into the weight when it loads
  the file.
- `onnx-fp16`: float models only; model.onnx converted to model.fp16.onnx by `fp16.to_fp16` (float16 weights and
  arithmetic, float32 inputs and outputs), checked against the Keras model with the float16 threshold.

Every file is written atomically, checked (ONNX: `onnx.checker` with shape inference, opset >= 17, a named input with a
dynamic batch dimension, metadata naming the toolkit version, technique chain and source hash), and then run in its
own runtime on a fixed set of inputs beside the source Keras model (`parity`): the top-1 agreement and largest output
difference go to OUT/parity.json; a file below the agreement threshold is marked failed (`parity_ok` false).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from compress.errors import ConfigError, ExportError, ModelError
from compress.export.codebook import store_as_codebooks
from compress.export.convert import (DEFAULT_OPSET, MIN_OPSET, describe_onnx, onnx_proto, save_onnx, to_tflite,
                                     with_tflite_metadata)
from compress.export.fp16 import to_fp16
from compress.export.parity import (
    PARITY_SAMPLES,
    PARITY_THRESHOLDS,
    check_parity,
    parity_failure_message,
    parity_inputs,
)
from compress.files import check_output_dir, sha256_file, write_bytes, write_json
from compress.kerasmodel import (
    is_qat_model,
    keras_outputs,
    keras_weight_sparsity,
    load_model,
    model_io,
    one_score_model,
    strip_training_wrappers,
    weights_sha256,
)
from compress.measure.hardware import int8_sums_saturate

EXPORT_FORMATS = ("onnx", "tflite", "onnx-fp16")
FP16_FORMAT = "onnx-fp16"  # model.onnx's float16 copy (export/fp16.py), written after it: implies "onnx"
INT8_WEIGHT_TYPES = ("auto", "int8", "uint8")


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how to check it; validated on creation."""

    formats: tuple[str, ...] = ("onnx",)
    opset: int = DEFAULT_OPSET
    parity_samples: int = PARITY_SAMPLES
    batch_size: int = 64
    int8_weights: str = "auto"  # QAT files: int8, uint8 (zero point 128), or auto (uint8 where int8 sums saturate)

    def __post_init__(self):
        formats = (self.formats,) if isinstance(self.formats, str) else tuple(self.formats)
        if not formats:
            raise ConfigError(f"no export format given; known formats: {', '.join(EXPORT_FORMATS)}")
        unknown = [name for name in formats if name not in EXPORT_FORMATS]
        if unknown:
            raise ConfigError(f"unknown export format {unknown[0]!r}; known formats: {', '.join(EXPORT_FORMATS)}")
        if FP16_FORMAT in formats:
            formats = ("onnx", *formats)
        object.__setattr__(self, "formats", tuple(dict.fromkeys(formats)))
        if not isinstance(self.opset, int) or self.opset < MIN_OPSET:
            raise ConfigError(f"ONNX opset must be an integer >= {MIN_OPSET}, got {self.opset!r}")
        if self.parity_samples < 1:
            raise ConfigError(f"parity samples must be a positive integer, got {self.parity_samples}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {self.batch_size}")
        if self.int8_weights not in INT8_WEIGHT_TYPES:
            raise ConfigError(f"int8 weights must be one of {', '.join(INT8_WEIGHT_TYPES)}, got {self.int8_weights!r}")


def export_model(
    model_or_path,
    out_dir: str | os.PathLike,
    *,
    formats: Sequence[str] = ("onnx",),
    data=None,
    chain: Sequence[str] | None = None,
    source_hash: str | None = None,
    unsafe: bool = False,
    opset: int = DEFAULT_OPSET,
    parity_samples: int = PARITY_SAMPLES,
    int8_weights: str = "auto",
    strict: bool = False,
) -> dict:
    """Export a Keras model (object or .keras path) to OUT/model.onnx, OUT/model.tflite and/or OUT/model.fp16.onnx
    and check parity.

    `data` (a compress Dataset) supplies the parity inputs (its first `parity_samples` test images) and adds accuracy
    on them; without it, deterministic uniform-random images are used. `chain` names the techniques that made the
    model (default: ["qat"] for a QAT model, else []); `source_hash` overrides the sha256 recorded for the source
    (default: of the .keras file, or of the weights for an in-memory model). `int8_weights` is how a QAT model's ONNX
    file stores its weights: int8, uint8 (zero point 128; the same values), or auto: uint8 where this CPU is x86
    without VNNI, whose onnxruntime kernels saturate on int8 weights (`compress.measure.hardware.int8_sums_saturate`).

    Returns a JSON-ready dict (also written to OUT/export.json) with one entry per file under "files" and the overall
    "parity_ok"; the parity details also go to OUT/parity.json. A failed parity check is reported, not raised, unless
    `strict` (then ExportError).
    """
    from compress import __version__
    from compress.data import pixel_values
    from compress.keras import versions

    config = ExportConfig(formats=tuple(formats) if not isinstance(formats, str) else (formats,), opset=opset,
                          parity_samples=parity_samples, int8_weights=int8_weights)
    out = check_output_dir(out_dir)
    model, source = _resolve_source(model_or_path, unsafe=unsafe, source_hash=source_hash)
    model, stripped = strip_training_wrappers(model)
    input_name, input_shape, _ = model_io(model)
    quantized = is_qat_model(model)
    if quantized and FP16_FORMAT in config.formats:
        raise ExportError(f"{FP16_FORMAT} is for float models; {source['name']} is a QAT (int8) model")
    precision = "int8" if quantized else "float32"
    chain = list(chain) if chain is not None else (["qat"] if quantized else [])
    if not all(isinstance(step, str) and step for step in chain):
        raise ConfigError(f"technique chain must be a list of names, got {chain!r}")

    inputs, labels, inputs_description = parity_inputs(input_shape, data, config.parity_samples)
    reference = keras_outputs(model, inputs, config.batch_size)
    file_model, kind = one_score_model(model)  # a binary classifier's files give its one score, as its model did
    keras_sparsity = keras_weight_sparsity(model)

    metadata = {
        "compress_version": __version__,
        "technique_chain": json.dumps(chain),
        "source_name": source["name"],
        "source_sha256": source["sha256"],
        "source_sha256_of": source["sha256_of"],
        "precision": precision,
        "input_range": data.input_range if data is not None else "unit",
        "library_versions": json.dumps(versions()),
        **({"binary_output": kind} if kind else {}),  # how a reader turns the one score into two (scores_per_class)
    }
    tflite_bytes = to_tflite(file_model, int8=quantized) if (quantized or "tflite" in config.formats) else None

    files: dict[str, dict] = {}
    parity_files: dict[str, dict] = {}
    for fmt in config.formats:
        target = out / ("model.fp16.onnx" if fmt == FP16_FORMAT else f"model.{fmt}")
        file_precision = "float16" if fmt == FP16_FORMAT else precision
        if fmt == FP16_FORMAT:
            conversion = to_fp16(out / "model.onnx", target)
            entry = {"converter": "onnxruntime float16 converter from model.onnx",
                     **{key: conversion[key] for key in ("cast_nodes", "weight_bytes_by_dtype")}}
        elif fmt == "onnx":
            unsigned = quantized and _unsigned_weights_wanted(config.int8_weights)
            proto = onnx_proto(file_model, opset=config.opset, metadata=metadata,
                               int8_tflite=tflite_bytes if quantized else None, unsigned_weights=unsigned,
                               input_values=pixel_values(data.input_range) if data is not None else None)
            codebook_weights = store_as_codebooks(proto.graph)
            save_onnx(proto, target)
            entry = describe_onnx(proto)
            entry["codebook_weights"] = codebook_weights
            entry["converter"] = "tf2onnx from int8 TFLite" if quantized else "tf2onnx from Keras"
            if quantized:
                entry["int8_weights"] = "uint8, zero point 128" if unsigned else "int8"
        else:
            write_bytes(target, with_tflite_metadata(tflite_bytes, metadata))
            entry = {"converter": "TFLiteConverter (Optimize.DEFAULT)" if quantized else "TFLiteConverter"}
        entry = {
            "format": fmt,
            "path": str(target),
            "precision": file_precision,
            "bytes": target.stat().st_size,
            "sha256": sha256_file(target),
            **entry,
        }
        if fmt == "onnx":
            entry["weight_zero_fraction"] = {"keras": keras_sparsity, "onnx": entry.pop("weight_zero_fraction")}
        files[fmt] = entry
        parity_files[target.name] = check_parity(
            target, inputs, reference, precision=file_precision, labels=labels, batch_size=config.batch_size
        )

    parity_ok = all(item["ok"] for item in parity_files.values())
    parity = {
        "parity_ok": parity_ok,
        "reference": f"Keras model {source['name']}" + (" (QAT, fake-quantized)" if quantized else ""),
        "inputs": inputs_description,
        "thresholds": PARITY_THRESHOLDS,
        "files": parity_files,
    }
    write_json(out / "parity.json", parity)
    result = {
        "compress_version": __version__,
        "source": source,
        "chain": chain,
        "quantized": quantized,
        "precision": precision,
        "stripped_wrappers": stripped,
        "input": {"name": input_name, "shape": [None, *input_shape]},
        "files": files,
        "parity_ok": parity_ok,
        "parity": parity,
    }
    write_json(out / "export.json", result)
    if strict and not parity_ok:
        raise ExportError(parity_failure_message(result, out / "parity.json"))
    return result


def _unsigned_weights_wanted(int8_weights: str) -> bool:
    return int8_sums_saturate() if int8_weights == "auto" else int8_weights == "uint8"


def _resolve_source(model_or_path, *, unsafe: bool, source_hash: str | None):
    """(Keras model, source description with its sha256) from a model object or a .keras path."""
    from compress.keras import keras

    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        model = load_model(path, unsafe=unsafe)
        sha, of = sha256_file(path), "file"
        name = path.name
    elif isinstance(model_or_path, keras.Model):
        model = model_or_path
        sha, of = weights_sha256(model), "weights"
        name = model.name
    else:
        raise ModelError(
            f"expected a tf_keras model or a .keras path, got {type(model_or_path).__module__}."
            f"{type(model_or_path).__name__} (build models with `from compress.keras import keras`)"
        )
    if source_hash is not None:
        sha, of = str(source_hash), "given"
    return model, {"name": name, "sha256": sha, "sha256_of": of}
