"""The parity check every exported file passes: run it in its own runtime beside the Keras model it came from."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from compress.errors import ConfigError, DataError, ExportError, ModelError, first_line
from compress.kerasmodel import shape_text
from compress.runtimes import open_session

PARITY_SAMPLES = 1000  # enough that the agreement of a correct int8 file is known to about half a point
PARITY_SEED = 0
# Top-1 agreement an exported file needs with its source on the parity inputs. An int8 file is compared with the
# float model it was quantized from, so near-tied predictions flip; files broken by saturating int8 kernels agree
# far less (benchmarks/cifar10 and the README give the figures).
# An int8 file that a quantizer made from a float model (PTQ) is compared instead with the quantized model it holds,
# run the reference way ("int8-ptq"): integer kernels round as that does, so a correct file agrees almost everywhere;
# kernels whose sums saturate (uint8 x int8 on x86 without VNNI) do not. How far quantizing moved it from the float
# model is quantization error, shown by the file's own accuracy, and its agreement with that model is recorded beside
# it: on a model with small margins (one trained briefly) it can be far below 96 %.
PARITY_THRESHOLDS = {"float32": 0.99, "float16": 0.99, "int8": 0.96, "int8-ptq": 0.98}
# Integer kernels need not round as the reference run does: on a PTQ MobileNetV2, LiteRT's optimised kernels differ
# from its reference kernels by one level in 0.2 % of the first block's projection outputs, and through 50 layers a
# model with small margins answers otherwise on 3 % of the images, as close to the float model as the reference run
# (97.3 % vs 97.2 % top-1 agreement). Below "int8-ptq", such a file passes with the float-comparison threshold
# ("int8") when it agrees with the float model no less than the reference run does, within sampling noise.
ROUNDING_NOISE = 0.005
REFERENCE_RUNS = {
    ".onnx": "the file's QDQ graph computed op by op in float (onnxruntime, no graph optimisations)",
    ".tflite": "the file run on LiteRT's reference kernels",
}


def parity_inputs(input_shape, data=None, count: int = PARITY_SAMPLES):
    """(images, labels or None, description): the first `count` test images of `data`, else seeded uniform noise."""
    input_shape = tuple(int(dim) for dim in input_shape)
    if data is not None:
        images, labels = data.normalized("test")
        if tuple(images.shape[1:]) != input_shape:
            raise DataError(
                f"the model takes {shape_text(input_shape)} images but {data.source} has "
                f"{shape_text(images.shape[1:])}; pass --image-size to resize them"
            )
        images, labels = images[:count], labels[:count]
        return images, labels, {"source": f"{data.source} test split, first {len(images)} images", "count": len(images)}
    images = np.random.default_rng(PARITY_SEED).random((count, *input_shape), dtype=np.float32)
    return images, None, {"source": f"uniform random images in [0, 1], seed {PARITY_SEED}", "count": count}


def check_parity(
    path: str | os.PathLike,
    inputs: np.ndarray,
    reference: np.ndarray,
    *,
    precision: str = "float32",
    labels: np.ndarray | None = None,
    batch_size: int = 64,
    source: np.ndarray | None = None,
) -> dict:
    """Run the file at `path` on `inputs` in its runtime and compare with `reference` outputs (top-1 and max |diff|);
    with `source`, the outputs of the model the file was made from when that is not the reference, the top-1
    agreement with it too."""
    if precision not in PARITY_THRESHOLDS:
        raise ConfigError(f"unknown precision {precision!r}; known: {', '.join(PARITY_THRESHOLDS)}")
    session = open_session(path)
    outputs = session.predict(inputs, batch_size)
    reference = np.asarray(reference, dtype=np.float32)
    if outputs.shape != reference.shape:
        raise ExportError(f"{path} outputs shape {outputs.shape[1:]}, the source model {reference.shape[1:]}")
    finite = bool(np.isfinite(outputs).all())
    agreeing, ties = top1_agreeing(outputs, reference)
    agreement = float(np.mean(agreeing)) if len(outputs) else 0.0
    threshold = PARITY_THRESHOLDS[precision]
    result = {
        "runtime": session.runtime,
        "precision": precision,
        "samples": int(len(inputs)),
        "top1_agreement": agreement,
        "max_abs_diff": float(np.max(np.abs(outputs - reference))) if finite and len(outputs) else float("nan"),
        "threshold": threshold,
        "ok": finite and agreement >= threshold,
        "top1_ties": ties,
    }
    if not finite:
        result["max_abs_diff"] = None
        result["note"] = "the exported file produced NaN or infinite outputs"
    if source is not None:
        result["source_top1_agreement"] = float(np.mean(top1_agreeing(outputs, np.asarray(source))[0]))
    if labels is not None:
        result["accuracy"] = float(np.mean(outputs.argmax(-1) == labels))
        result["reference_accuracy"] = float(np.mean(reference.argmax(-1) == labels))
    return result


def top1_agreeing(outputs: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, int]:
    """(per row: the reference's top class is the file's top class, how many rows agree only through a tie).

    An int8 file's outputs are levels: a softmax output in steps of 1/256 ties classes whose probabilities differ by
    less than a step (many models, many classes), and argmax then takes the first of them. Where the reference's
    answer is among the file's tied top classes, the file gives that answer at its resolution: it agrees."""
    rows = np.arange(len(outputs))
    answers = reference.argmax(-1)
    agreeing = outputs[rows, answers] >= outputs.max(-1)
    return agreeing, int(np.count_nonzero(agreeing & (outputs.argmax(-1) != answers)))


def check_quantized_file(path, inputs: np.ndarray, source: np.ndarray, *, labels: np.ndarray | None = None,
                         batch_size: int = 64) -> dict:
    """Parity of an int8 file that a quantizer made from a float model whose outputs on `inputs` are `source`: the
    file as its runtime deploys it against the same file run the reference way (see `open_session`)."""
    try:
        reference = open_session(path, reference=True).predict(inputs, batch_size)
    except ModelError as exc:  # e.g. an op LiteRT's reference kernels lack: the file fails, the stage's others stand
        return {"runtime": open_session(path).runtime, "precision": "int8-ptq", "samples": 0, "top1_agreement": None,
                "max_abs_diff": None, "threshold": PARITY_THRESHOLDS["int8-ptq"], "ok": False,
                "reference": REFERENCE_RUNS[Path(path).suffix], "note": f"not comparable: {first_line(exc)}"}
    result = check_parity(path, inputs, reference, precision="int8-ptq", labels=labels, batch_size=batch_size,
                          source=source)
    result["reference"] = REFERENCE_RUNS[Path(path).suffix]
    result["reference_source_top1_agreement"] = float(np.mean(top1_agreeing(reference, np.asarray(source))[0]))
    file_to_float, reference_to_float = result["source_top1_agreement"], result["reference_source_top1_agreement"]
    if (not result["ok"] and result["max_abs_diff"] is not None
            and result["top1_agreement"] >= PARITY_THRESHOLDS["int8"]
            and file_to_float >= reference_to_float - ROUNDING_NOISE):
        result["ok"] = True
        result["note"] = (f"agrees with the reference run on {result['top1_agreement']:.1%} of the images: its kernels "
                          f"round otherwise, and it is as close to the float model as the reference run "
                          f"({file_to_float:.1%} vs {reference_to_float:.1%} top-1 agreement)")
    return result


def parity_failure_message(result: dict, parity_path) -> str:
    bad = [(name, item) for name, item in result["parity"]["files"].items() if not item["ok"]]
    parts = [f"{name}: top-1 agreement {item['top1_agreement']:.2%} < {item['threshold']:.0%}" for name, item in bad]
    return f"parity check failed ({'; '.join(parts)}); files kept for inspection, see {parity_path}"
