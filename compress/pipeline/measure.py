"""Measuring a run's files: accuracy, sizes and latency of every exported file, side by side.

Each stage folder keeps its files' figures in measurements.json, keyed by the file's sha256, the data and the
measurement settings. A rerun reuses them: accuracy and sizes per file, latency only when every file's timing can
be reused, since latencies are only comparable when the files were timed in the same interleaved rounds. A changed
file, other settings or `remeasure` measure again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from compress.errors import CompressError
from compress.files import sha256_file, write_json
from compress.pipeline.recipe import BASELINE, RunRecipe
from compress.pipeline.folders import RunOptions, digest_of, jsonable, read_manifest, stage_dir
from compress.results import VariantResult

MEASUREMENTS = "measurements.json"


def measure_run(recipe: RunRecipe, options: RunOptions, data, names: list[str], stage_seconds, started) -> dict:
    """Accuracy, size and latency of every exported file (reused where unchanged), as a results.json dict."""
    from compress.measure.accuracy import evaluate_file
    from compress.measure.gpu import cuda_provider_status, gpu_info
    from compress.measure.hardware import machine_info
    from compress.measure.latency import DEFAULT_ROUNDS
    from compress.measure.sizes import file_size, onnx_weight_stats

    settings = digest_of({"data": jsonable(options.data_args), "data_fingerprint": data.fingerprint(),
                          "threads": recipe.threads, "batch_sizes": list(recipe.batch_sizes),
                          "min_seconds": recipe.min_seconds})
    variants: list[VariantResult] = []
    cached: dict[str, dict] = {}
    refused: dict[str, str] = {}
    for name in names:
        folder = stage_dir(options.out, name)
        manifest = read_manifest(folder)
        if manifest.get("refused") is not None:
            refused[name] = manifest["refused"]
        for label, reason in _stats(folder).get("refused_formats", {}).items():  # a PTQ format its converter failed
            refused[f"{name}:{label}"] = reason
        previous = {} if options.remeasure else _read_measurements(folder, settings)
        for label, entry in manifest["export"].items():
            path = folder / Path(entry["path"]).name
            variant_name = name if len(manifest["export"]) == 1 else f"{name}:{label}"
            digest = sha256_file(path)
            kept = previous.get(path.name)
            if kept is None or kept.get("sha256") != digest:
                options.log(f"measuring {variant_name} ({path.name}) ...")
                weights = onnx_weight_stats(path) if path.suffix == ".onnx" else {}
                kept = {"sha256": digest, "accuracy": evaluate_file(path, data)["accuracy"], **file_size(path),
                        "weights": weights}
            else:
                options.log(f"measured earlier: {variant_name} ({path.name}), same file and settings")
            cached[variant_name] = kept
            weights = kept["weights"]
            variants.append(VariantResult(
                name=variant_name, stage=name, chain=manifest["chain"], file=f"{name}/{path.name}",
                format=path.suffix.lstrip("."), precision=entry["precision"], accuracy=kept["accuracy"],
                file_bytes=kept["file_bytes"], gzip_bytes=kept["gzip_bytes"], params=weights.get("params"),
                nonzero_params=weights.get("nonzero_params"), parity_ok=bool(entry["parity"]["ok"]),
                parity=entry["parity"], weight_bytes_by_dtype=weights.get("bytes_by_dtype"),
                not_measured={} if weights else {key: "parameters are counted in ONNX files only"
                                                 for key in ("params", "nonzero_params")},
                extra={"macs": manifest.get("macs"), "left_alone": _left_alone(folder),
                       "input_stage": None if name == BASELINE else recipe.stage(name).input},
            ))
    cuda_ok, cuda_reason = cuda_provider_status()
    latencies = {name: kept.get("latency") for name, kept in cached.items()}
    if all(latencies.values()) and not cuda_ok:
        options.log("latency: every file is unchanged since it was timed; timings reused (--remeasure times again)")
        latency_note = "reused from an earlier run of the same files and settings"
    else:
        options.log("measuring latency of every file, side by side ...")
        latencies = _time_files({v.name: options.out / v.file for v in variants}, recipe, options, cuda_ok)
        latency_note = "measured in this run"
    for variant in variants:
        timing = latencies[variant.name]
        variant.latency = {int(batch): value for batch, value in timing["cpu"].items()}
        variant.cuda_latency = {int(batch): value for batch, value in timing.get("cuda", {}).items()}
        cached[variant.name]["latency"] = timing
    _write_measurements(options.out, names, variants, cached, settings)
    batches = list(recipe.batch_sizes)
    input_model = _input_model(options)
    notes = (_chance_warning(variants, data, options) + _small_test_split_warning(data, options)
             + [note for note in [(input_model or {}).get("class_order_warning")] if note])
    machine = {**machine_info(threads=recipe.threads), "latency_rounds": DEFAULT_ROUNDS}
    if cuda_ok:
        machine["gpu"] = gpu_info()
    return {
        "machine": machine,
        "baseline": _baseline_variant(variants),
        "data": data.describe(),
        "total_seconds": round(time.perf_counter() - started, 2),
        "batch_sizes": batches,
        "latency": latency_note,
        "stages": stage_seconds,
        "variants": [variant.to_dict(batches) for variant in variants],
        "keras_reference": _keras_reference(stage_dir(options.out, BASELINE), recipe, options, settings),
        "cuda": {"measured": cuda_ok, "reason": cuda_reason},
        "input_model": input_model,
        "refused": refused,
        "notes": notes,
    }


def _left_alone(folder: Path) -> dict:
    """The layers a stage's technique did not touch, with its reasons (from the stage's stats.json)."""
    stats = _stats(folder)
    return stats.get("left_alone") or stats.get("channels", {}).get("left_alone") or {}


def _stats(folder: Path) -> dict:
    """A stage's technique stats (its stats.json), {} where it has none."""
    try:
        return json.loads((folder / "stats.json").read_text()).get("stats", {})
    except (OSError, ValueError):
        return {}


def _input_model(options: RunOptions) -> dict | None:
    """Which Keras wrote the user's model and how its translation to tf_keras held up (None: compress trained it)."""
    try:
        return json.loads((stage_dir(options.out, BASELINE) / "metrics.json").read_text()).get("input_model")
    except (OSError, ValueError):
        return None


def _chance_warning(variants: list[VariantResult], data, options: RunOptions) -> list[str]:
    """A baseline near chance accuracy most often means the model was fed pixels in the wrong range: say so."""
    from compress.checks import near_chance_note

    baseline = next(v for v in variants if v.name == _baseline_variant(variants))
    note = None if baseline.accuracy is None else near_chance_note("the baseline", baseline.accuracy, data)
    if note is None:
        return []
    options.log(f"warning: {note}")
    return [note]


def _small_test_split_warning(data, options: RunOptions) -> list[str]:
    """With fewer than 100 test images one image is more than the 1-point budget the summary judges by: say so."""
    images = len(data.split("test")[1])
    if images >= 100:
        return []
    note = (f"the test split holds {images} images, so one image is {100 / images:.2g} points of accuracy: "
            "'within 1 point' means no image lost, and differences of a few images are noise")
    options.log(f"warning: {note}")
    return [note]


def _time_files(paths: dict[str, Path], recipe: RunRecipe, options: RunOptions, cuda_ok: bool) -> dict[str, dict]:
    """CPU latency of every file at each batch size; CUDA latency of the ONNX files where a GPU can run them, at
    the recipe's batch sizes and `GPU_BATCH_SIZES`, the model alone (I/O binding, `load_onnx_cuda`).

    The files of one batch size are timed in interleaved rounds, so that the ratios between them hold on a
    machine whose speed drifts.
    """
    from compress.measure.gpu import GPU_BATCH_SIZES, load_onnx_cuda
    from compress.measure.latency import DEFAULT_ROUNDS, interleaved_latency, timed_file

    timings: dict[str, dict] = {name: {"cpu": {}, "cuda": {}} for name in paths}
    for batch in recipe.batch_sizes:
        options.log(f"    batch {batch}: {len(paths)} files in {DEFAULT_ROUNDS} interleaved rounds ...")
        cpu = interleaved_latency({name: timed_file(path, batch, threads=recipe.threads)
                                   for name, path in paths.items()}, min_seconds=recipe.min_seconds)
        for name in paths:
            timings[name]["cpu"][str(batch)] = cpu[name]
    onnx_names = [name for name, path in paths.items() if path.suffix == ".onnx"]
    if cuda_ok and onnx_names:
        for batch in sorted({*recipe.batch_sizes, *GPU_BATCH_SIZES}):
            options.log(f"    CUDA batch {batch}: {len(onnx_names)} ONNX files, interleaved ...")
            loaded = {}
            for name in onnx_names:
                try:
                    loaded[name] = load_onnx_cuda(paths[name], batch)
                except CompressError as exc:  # out of GPU memory, a fixed batch size: the others are still timed
                    options.log(f"    {name}: not timed on CUDA at batch {batch}: {exc}")
            for name, timing in interleaved_latency(loaded, min_seconds=recipe.min_seconds).items():
                timings[name]["cuda"][str(batch)] = timing
    return timings


def _read_measurements(folder: Path, settings: str) -> dict:
    try:
        kept = json.loads((folder / MEASUREMENTS).read_text())
    except (OSError, ValueError):
        return {}
    return kept.get("files", {}) if isinstance(kept, dict) and kept.get("settings") == settings else {}


def _write_measurements(out: Path, names: list[str], variants: list[VariantResult], cached: dict, settings: str):
    for name in names:
        files = {Path(v.file).name: cached[v.name] for v in variants if v.stage == name}
        write_json(stage_dir(out, name) / MEASUREMENTS, {"settings": settings, "files": files})


def _baseline_variant(variants: list[VariantResult]) -> str:
    """The variant the others are compared with: the baseline's ONNX file where it has one."""
    own = [variant for variant in variants if variant.stage == BASELINE]
    return next((variant.name for variant in own if variant.format == "onnx"), own[0].name)


def _keras_reference(folder: Path, recipe: RunRecipe, options: RunOptions, settings: str) -> dict:
    """The float baseline served the article's way (Keras predict) and as a tf.function, for reference; kept in
    the baseline's folder and reused while the model and the settings are the same."""
    from compress.kerasmodel import load_model
    from compress.measure.latency import keras_latency

    path, kept_path = folder / "model.keras", folder / "keras_reference.json"
    key = digest_of({"model": sha256_file(path), "settings": settings})
    try:
        kept = json.loads(kept_path.read_text())
    except (OSError, ValueError):
        kept = None
    if not options.remeasure and isinstance(kept, dict) and kept.get("key") == key:
        return kept["reference"]
    options.log("timing the baseline in Keras, for reference ...")
    model = load_model(path, unsafe=options.unsafe)
    reference = {f"b{batch}": keras_latency(model, batch, min_seconds=recipe.min_seconds)
                 for batch in recipe.batch_sizes}
    write_json(kept_path, {"key": key, "reference": reference})
    return reference
