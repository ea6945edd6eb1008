"""Post-training int8 quantization: the float model becomes int8 files, each measured in the runtime that runs it.

Formats (choose with `formats`):
- ``onnx-qdq`` -> model.int8.onnx: the float model in ONNX, `quant_pre_process`ed (shape inference, folding), then
  onnxruntime `quantize_static` in QDQ format with static ranges from `calibration` training images (min/max).
  Weights are int8 (symmetric, per output channel unless per_channel=false); activations uint8 (asymmetric), which
  onnxruntime's quantize_static docs recommend for x86 CPUs: U8 activations with S8 weights. `reduce_range` (7-bit
  weights) defaults to auto: on where the quantizing CPU is x86 without VNNI, whose uint8 x int8 kernels saturate
  16-bit sums with 8-bit weights (measured on an AVX2 EPYC: a 3-epoch article CNN agreed with its Keras model on
  88.5 % of the test images with 8-bit weights, 98.2 % with 7-bit), off elsewhere, where 8 bits are exact.
  A convolution reading the RGB image gets a fourth, zero-weighted input channel (`input_channels_widened`), so
  that onnxruntime runs it on its fast int8 kernels.
  `float_layers` keeps the ONNX nodes of the named Keras layers float (`layer_nodes` finds them by name), e.g. the
  layers `compress sensitivity` finds too sensitive to int8.
- ``tflite-dynamic`` -> model.dynamic.tflite: dynamic-range quantization (int8 weights, float activations computed
  and quantized on the fly); needs no calibration data.
- ``tflite-int8`` -> model.int8.tflite: full-integer quantization calibrated on the same images, int8 inside and
  int8 at the input and output (the form integer-only accelerators and microcontrollers take); a runner
  quantizes the input with the file's input scale/zero point and dequantizes the output with its output ones.

Every file is written atomically, and its top-1 test accuracy is measured by running the file itself
(`compress.export.predict_file`: onnxruntime on CPU, or the ai-edge-litert interpreter), with its top-1 agreement
with the Keras model beside it. The input model is only read (pruning/clustering wrappers are stripped from a copy;
a QAT model is refused: `compress export` makes its int8 files from the ranges it learned).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress.errors import ConfigError, ExportError, ModelError, first_line
from compress.techniques.finetune import as_names, parse_names, require_names
from compress.techniques.base import Outcome, Technique, TechniqueConfig, option, parse_flag, require

PTQ_FORMATS = ("onnx-qdq", "tflite-dynamic", "tflite-int8")
FILE_NAMES = {
    "onnx-qdq": "model.int8.onnx",
    "tflite-dynamic": "model.dynamic.tflite",
    "tflite-int8": "model.int8.tflite",
}
ONNX_OPSET = 17
PREDICT_BATCH = 256


def _parse_formats(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parse_reduce_range(text: str) -> bool | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return parse_flag(text)
    except ValueError:
        raise ValueError(f"expected auto, true or false, got {text!r}") from None


@dataclass(frozen=True)
class PTQConfig(TechniqueConfig):
    calibration: int = option(512, "training images used to calibrate activation ranges (>= 1)", parse=int)
    formats: tuple[str, ...] = option(
        PTQ_FORMATS, f"comma list of the files to make: {', '.join(PTQ_FORMATS)}", parse=_parse_formats, metavar="LIST"
    )
    per_channel: bool = option(True, "one weight scale per output channel (else one per tensor)")
    reduce_range: bool | str = option(
        "auto",
        "7-bit onnx-qdq weights (true), 8-bit (false), or auto: true where this CPU is x86 without VNNI, whose "
        "int8 kernels saturate with 8-bit weights",
        parse=_parse_reduce_range,
        metavar="auto|true|false",
    )
    float_layers: tuple[str, ...] = option(
        (), "comma list of layers kept float in the onnx-qdq file (their ONNX nodes are not quantized; e.g. the "
        "ones `compress sensitivity` proposes)", parse=parse_names, metavar="NAMES"
    )

    def __post_init__(self):
        object.__setattr__(self, "float_layers", as_names(self.float_layers))
        super().__post_init__()

    def validate(self) -> None:
        require(
            isinstance(self.calibration, int) and not isinstance(self.calibration, bool) and self.calibration >= 1,
            f"calibration must be an integer >= 1 (training images), got {self.calibration!r}",
        )
        require(isinstance(self.formats, tuple) and len(self.formats) > 0,
                f"formats must name at least one of {', '.join(PTQ_FORMATS)}, got {self.formats!r}")
        unknown = [name for name in self.formats if name not in PTQ_FORMATS]
        require(not unknown, f"unknown format(s) {', '.join(map(repr, unknown))}; known formats: {', '.join(PTQ_FORMATS)}")
        repeated = sorted({name for name in self.formats if self.formats.count(name) > 1})
        require(not repeated, f"format(s) {', '.join(repeated)} listed more than once")
        require(isinstance(self.per_channel, bool), f"per_channel must be true or false, got {self.per_channel!r}")
        require(isinstance(self.reduce_range, bool) or self.reduce_range == "auto",
                f"reduce_range must be true, false or \"auto\", got {self.reduce_range!r}")
        require_names(self.float_layers, "float_layers")


def ptq(model, config: PTQConfig, data, *, out_dir, verbose: int = 1) -> Outcome:
    """Quantize `model` to int8 files in `out_dir`, one per format; return their sizes and measured accuracies."""
    if out_dir is None:
        raise ConfigError("ptq writes files: an output folder is needed")
    from compress import __version__
    from compress.checks import check_model_fits_data
    from compress.export.convert import record_metadata
    from compress.kerasmodel import is_qat_model, one_score_model, strip_training_wrappers
    from compress.runtimes import open_session

    out_dir = Path(out_dir)
    check_model_fits_data(model, data)
    if is_qat_model(model):
        raise ModelError("the model is quantization-aware (QAT) already; `compress export` turns it into int8 files")
    model, stripped = strip_training_wrappers(model)  # a copy without pruning/clustering wrappers; input untouched
    unknown = [name for name in config.float_layers if name not in {layer.name for layer in model.layers}]
    if unknown:
        raise ConfigError(f"float_layers names {', '.join(unknown)}, not a layer of model {model.name!r}; layers: "
                          f"{', '.join(layer.name for layer in model.layers)}")
    file_model, kind = one_score_model(model)  # a binary classifier's files give its one score, as its model did
    train_images, _ = data.normalized("train")
    calibration = train_images[: config.calibration]
    test_images, test_labels = data.normalized("test")
    keras_top1 = np.argmax(model.predict(test_images, batch_size=PREDICT_BATCH, verbose=0), axis=-1)

    stats: dict = {
        "calibration_images": int(len(calibration)),
        "per_channel": config.per_channel,
        "keras_test_accuracy": float(np.mean(keras_top1 == test_labels)),
        "test_images": int(len(test_labels)),
        "formats": {},
    }
    if stripped:
        stats["stripped_wrappers"] = stripped
    files: dict[str, Path] = {}
    failures: dict[str, ExportError | ModelError] = {}
    for name in config.formats:
        target = out_dir / FILE_NAMES[name]
        started = time.perf_counter()
        try:
            if name == "onnx-qdq":
                details = _write_onnx_qdq(file_model, calibration, config.per_channel, resolve_reduce_range(config),
                                          target, config.float_layers)
            else:
                details = _write_tflite(file_model, calibration, config.per_channel, target,
                                        full_integer=name == "tflite-int8")
        except (ExportError, ModelError) as exc:  # one converter failing leaves the other formats worth having
            failures[name] = exc
            stats.setdefault("refused_formats", {})[name] = str(exc)
            if verbose:
                print(f"ptq: {target.name} not made: {exc}", flush=True)
            continue
        record_metadata(target, {"compress_version": __version__, "technique_chain": '["ptq"]', "precision": "int8",
                                 "input_range": data.input_range,  # which pixels the file takes, for evaluate
                                 **({"binary_output": kind} if kind else {})})
        seconds = time.perf_counter() - started
        top1 = np.argmax(open_session(target).predict(test_images, PREDICT_BATCH), axis=-1)
        stats["formats"][name] = {
            "file": target.name,
            "bytes": target.stat().st_size,
            "test_accuracy": float(np.mean(top1 == test_labels)),
            "agreement_with_keras": float(np.mean(top1 == keras_top1)),
            "convert_seconds": round(seconds, 2),
            **details,
        }
        files[name] = target
        if verbose:
            entry = stats["formats"][name]
            print(f"ptq: {target.name}: {entry['bytes']:,} bytes, test accuracy {entry['test_accuracy']:.4f} "
                  f"(agrees with Keras on {entry['agreement_with_keras']:.1%})", flush=True)
    if not files:
        raise next(iter(failures.values()))
    return Outcome(model=None, stats=stats, files=files)


# ----------------------------------------------------------------------------------------------------- ONNX


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over an array of images, in batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 64):
        self._batches = iter(
            [{input_name: images[i : i + batch_size]} for i in range(0, len(images), batch_size)]
        )

    def get_next(self):
        return next(self._batches, None)


def resolve_reduce_range(config: PTQConfig) -> bool:
    from compress.measure.hardware import int8_sums_saturate

    return int8_sums_saturate() if config.reduce_range == "auto" else config.reduce_range


def _write_onnx_qdq(model, calibration: np.ndarray, per_channel: bool, reduce_range: bool, target: Path,
                    float_layers: tuple[str, ...] = ()) -> dict:
    with tempfile.TemporaryDirectory(prefix="compress-ptq-") as work:
        prepared, float_bytes = prepare_float_onnx(model, Path(work))
        nodes = layer_nodes(prepared, float_layers)
        missing = [name for name, names in nodes.items() if not names]
        if missing:
            raise ConfigError(f"float_layers: no ONNX node is named after layer(s) {', '.join(missing)}, so they "
                              "cannot be kept float")
        quantize_qdq(prepared, calibration, per_channel, reduce_range, target,
                     nodes_to_exclude=[node for names in nodes.values() for node in names])
    weights = "int8 in 7 bits (reduce_range)" if reduce_range else "int8"
    details = {"float_onnx_bytes": float_bytes, "weights": weights, "activations": "uint8", "opset": ONNX_OPSET}
    if float_layers:
        details["float_layers"] = {name: names for name, names in nodes.items()}
    return details


def prepare_float_onnx(model, work: Path) -> tuple[Path, int]:
    """(work/prepared.onnx, bytes of the float ONNX): the model converted once and `quant_pre_process`ed, ready to
    be quantized as often as needed."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work = Path(work).resolve()
    float_path, prepared_path = work / "float.onnx", work / "prepared.onnx"
    onnx.save(_float_onnx(model), float_path)
    # where symbolic shape inference gives up, onnxruntime saves its partial result to the current folder: let that
    # be the work folder, not the user's
    with contextlib.chdir(work):
        try:
            quant_pre_process(str(float_path), str(prepared_path))
        except Exception:  # shape inference / optimisation failures surface as many types
            # Its symbolic shape inference gives up on some graphs (attention's reshapes); ONNX's own inference
            # still gives the quantizer the shapes it needs.
            try:
                quant_pre_process(str(float_path), str(prepared_path), skip_symbolic_shape=True)
            except Exception as exc:
                raise ExportError(f"onnxruntime quant_pre_process failed on the float ONNX: "
                                  f"{first_line(exc)}") from exc
    return prepared_path, float_path.stat().st_size


def layer_nodes(onnx_path: Path, layer_names) -> dict[str, list[str]]:
    """The ONNX nodes computing each Keras layer. tf2onnx names nodes after the TensorFlow op path
    (`model/conv1/BiasAdd`, and quant_pre_process keeps the prefix when it fuses: `model/dense1/MatMul/
    MatMulAddFusion`), so a node belongs to a layer whose name is one of its path's folders."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {name: [node.name for node in graph.node if name in node.name.split("/")[:-1]] for name in layer_names}


def quantize_qdq(prepared: Path, calibration: np.ndarray, per_channel: bool, reduce_range: bool, target: Path, *,
                 nodes_to_exclude=()) -> None:
    """onnxruntime `quantize_static` in QDQ form (int8 weights, uint8 activations) into `target`, atomically;
    the nodes in `nodes_to_exclude` stay float."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from compress.export.int8_rewrite import input_channels_widened
    from compress.files import atomic_path
    from compress.runtimes.onnxrt import inference_session

    reader_class = type("CalibrationReader", (_CalibrationReader, CalibrationDataReader), {})
    input_name = inference_session(prepared).get_inputs()[0].name
    with atomic_path(target) as partial:
        try:
            quantize_static(
                str(prepared),
                str(partial),
                reader_class(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(nodes_to_exclude),
            )
        except Exception as exc:  # calibration and graph-rewrite failures surface as many types
            raise ExportError(f"onnxruntime quantize_static failed: {first_line(exc)}") from exc
        quantized = onnx.load(str(partial))
        input_channels_widened(quantized.graph)  # an RGB image's int8 convolution on onnxruntime's fast kernels
        onnx.save(quantized, str(partial))


def _float_onnx(model):
    """The float model as an ONNX ModelProto, converted and named the way `compress export` does it."""
    from compress.export.convert import onnx_proto

    return onnx_proto(model, opset=ONNX_OPSET, metadata={"technique_chain": '["ptq"]', "precision": "int8"})


# --------------------------------------------------------------------------------------------------- TFLite


def _write_tflite(model, calibration: np.ndarray, per_channel: bool, target: Path, *, full_integer: bool) -> dict:
    from compress.files import atomic_path
    from compress.keras import tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if not per_channel:
        converter._experimental_disable_per_channel = True  # the converter's only switch for per-tensor weights
    if full_integer:

        def representative_dataset():
            for image in calibration:
                yield [image[None, ...]]

        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TensorFlow's deprecation notes about the converter's internals
            content = converter.convert()
    except Exception as exc:  # the converter raises ConverterError and others for unsupported ops
        raise ExportError(f"TFLite conversion failed: {first_line(exc)}") from exc
    with atomic_path(target) as partial:
        partial.write_bytes(content)
    if full_integer:
        return {"weights": "int8", "activations": "int8", "io": "int8"}
    return {"weights": "int8", "activations": "float32 (quantized on the fly)", "io": "float32"}


TECHNIQUE = Technique(
    name="ptq",
    config_class=PTQConfig,
    apply=ptq,
    summary="post-training int8 quantization to ONNX (QDQ) and TFLite files, each measured in its runtime",
)
