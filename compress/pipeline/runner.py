"""A RunRecipe -> one run folder with every variant exported, measured and reported.

Run folder:
    OUT/recipe.toml                 the recipe as given
    OUT/baseline/                   model.keras, metrics.json, export files, manifest.json
    OUT/<stage>/                    model.keras (if the technique makes one), stats.json, export files, manifest.json,
                                    measurements.json (the files' measured figures, reused by a rerun)
    OUT/results.json, report.md, results.csv, accuracy_vs_size.png, accuracy_vs_latency.png

A stage is finished when its manifest.json records the same key (a hash of its technique, settings, export formats,
data and its input's key) and every file it lists still has the sha256 recorded there. The manifest is written last,
after every file of the stage has been written atomically, so an interrupted stage never looks finished; a changed
stage gets a new key, and so does everything downstream of it, since their keys include their input's key. A file
changed since (by hand, or by anything else) makes its stage run again. Models are loaded in Keras' safe mode,
those of the run folder too, unless the run was started with `unsafe`.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from compress.errors import ConfigError, ExportError, ModelError
from compress.files import FileLock, atomic_path, check_output_dir, sha256_file, write_json
from compress.pipeline.folders import RunOptions, digest_of, is_finished, jsonable, read_manifest, stage_dir
from compress.pipeline.recipe import BASELINE, RunRecipe, Stage


def stage_keys(recipe: RunRecipe, options: RunOptions, baseline_key: str) -> dict[str, str]:
    """Each stage's key: its settings, formats and data, chained to its input's key."""
    keys = {BASELINE: baseline_key}
    for stage in recipe.stages:
        keys[stage.name] = digest_of(
            {
                "technique": stage.technique,
                "settings": stage.config.to_dict(),
                "export": list(stage.export_formats),
                "input": keys[stage.input],
            }
        )
    return keys


def baseline_key(recipe: RunRecipe, options: RunOptions, data_fingerprint: str) -> str:
    """The baseline's key, which every stage's chains to: where it comes from, the data's arguments and contents
    (`Dataset.fingerprint`: the same folder with other images is other data), the input range and our version."""
    from compress import __version__

    if options.model is not None:
        source = {"model_sha256": sha256_file(options.model)}
    else:
        source = {"recipe": recipe.baseline_recipe, "epochs": recipe.baseline_epochs}
    return digest_of({"baseline": source, "export": list(recipe.baseline_export), "data": jsonable(options.data_args),
                      "data_fingerprint": data_fingerprint, "input_range": options.input_range,
                      "compress": __version__})


LAYER_SETTINGS = ("layers", "layer_sparsity", "float_layers")  # settings that name layers of the stage's input


def check_named_layers(recipe: RunRecipe, model) -> None:
    """Refuse, before any work, a stage on the baseline whose settings name a layer the model does not have."""
    names = {layer.name for layer in model.layers}
    for stage in recipe.stages:
        if stage.input != BASELINE:
            continue
        settings = stage.config.to_dict()
        named = [name for key in LAYER_SETTINGS for name in (settings.get(key) or ())]
        unknown = [name for name in named if name not in names]
        if unknown:
            raise ConfigError(f"stage {stage.name!r} names layer(s) {', '.join(unknown[:4])}, which model "
                              f"{model.name!r} does not have; its layers: {', '.join(layer.name for layer in model.layers[:12])}")


def describe_plan(recipe: RunRecipe, options: RunOptions) -> list[str]:
    """The resolved plan, one line per stage, saying which would run and which are finished."""
    from compress.data import load_data

    keys = stage_keys(recipe, options, baseline_key(recipe, options,
                                                   load_data(**options.data_args, log=options.log).fingerprint()))
    lines = []
    source = (f"model {options.model}" if options.model
              else f"train ({recipe.baseline_recipe}, {recipe.baseline_epochs} epochs)")
    state = "finished, would skip" if is_finished(stage_dir(options.out, BASELINE), keys[BASELINE]) else "would run"
    lines.append(f"baseline: {source} [{state}]")
    for stage in recipe.stages:
        finished = is_finished(stage_dir(options.out, stage.name), keys[stage.name])
        settings = ", ".join(f"{k}={v}" for k, v in stage.config.to_dict().items())
        lines.append(
            f"{stage.name}: {stage.technique} <- {stage.input}; export {','.join(stage.export_formats)}; "
            f"{settings} [{'finished, would skip' if finished else 'would run'}]"
        )
    lines.append(f"measure: accuracy on the test split, size, latency at batch {list(recipe.batch_sizes)} "
                 f"with {recipe.threads} thread(s)")
    return lines


def run(recipe: RunRecipe, options: RunOptions) -> dict:
    """Run every stage not yet finished, then measure every variant and write results.json and the report."""
    from compress.pipeline.measure import measure_run
    from compress.report import write_report

    started = time.perf_counter()
    data, stage_seconds = run_stages(recipe, options, started)
    names = [BASELINE, *(stage.name for stage in recipe.stages)]
    results = measure_run(recipe, options, data, names, stage_seconds, started)
    out = options.out
    write_json(out / "results.json", results)
    written = write_report(results, out)
    options.log(f"wrote {', '.join(str(path) for path in [out / 'results.json', *written])}")
    return results


def run_stages(recipe: RunRecipe, options: RunOptions, started: float | None = None) -> tuple[object, list[dict]]:
    """Run every stage not yet finished, measuring nothing: (the data, each stage's seconds).

    `compress auto` runs each trial's chain through this, into one stage folder that trials share.
    """
    from compress.checks import (check_batch_memory, check_model_fits_data, check_writable, class_order_note,
                                 decide_input_range, matched_to_data)
    from compress.data import load_data
    from compress.kerasmodel import load_model_with_source, translation_note

    started = time.perf_counter() if started is None else started
    out = check_output_dir(options.out)
    check_writable(out)
    for name in (BASELINE, *(stage.name for stage in recipe.stages)):
        stage_dir(out, name)
    data = load_data(**options.data_args, log=options.log)
    for note in data.notes:
        options.log(f"data: {note}")
    check_batch_memory(data.input_shape, recipe.batch_sizes)
    source = model = None
    if options.model is not None:  # refuse a model that cannot work with this data before any work is done
        model, source = load_model_with_source(options.model, unsafe=options.unsafe,
                                               sample_images=data.normalized("test")[0][:256])
        if translation_note(source):
            options.log(translation_note(source))
        model, data = matched_to_data(model, data, options.log)
        data = data.with_input_range(decide_input_range(model, options.input_range, options.log, data))
        check_model_fits_data(model, data, batch_sizes=recipe.batch_sizes, log=options.log)
        check_named_layers(recipe, model)
        if (note := class_order_note(model, data)) is not None:
            options.log(f"warning: {note}")
            source["class_order_warning"] = note  # for the report
    elif options.input_range not in ("auto", "unit"):
        raise ConfigError("--input-range applies to a --model; the baseline compress trains takes [0, 1] pixels")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "recipe.toml") as partial:
        partial.write_text(recipe.source)
    keys = stage_keys(recipe, options, baseline_key(recipe, options, data.fingerprint()))
    names = [BASELINE, *(stage.name for stage in recipe.stages)]
    stage_seconds = []
    chains: dict[str, list[str]] = {BASELINE: []}
    refused: dict[str, str] = {}
    for position, name in enumerate(names, start=1):
        stage = None if name == BASELINE else recipe.stage(name)
        chains[name] = [] if stage is None else [*chains[stage.input], stage.technique]
        folder = stage_dir(out, name)
        what = "baseline" if stage is None else f"{stage.technique} <- {stage.input}"
        with FileLock(out / f".{name}.lock") if options.lock_stages else contextlib.nullcontext():
            if is_finished(folder, keys[name]):
                options.log(f"[{position}/{len(names)}] {name} ({what}): finished earlier with the same settings, "
                            "skipped")
                # the seconds it took when it ran, so that a resumed run still tells what the whole run cost
                stage_seconds.append({"name": name, "seconds": read_manifest(folder).get("seconds"), "skipped": True})
                if (reason := read_manifest(folder).get("refused")) is not None:
                    refused[name] = reason
                continue
            options.log(f"[{position}/{len(names)}] {name} ({what}) ...")
            stage_started = time.perf_counter()
            for leftover in folder.glob(".*.partial*"):  # temporary files of a run killed mid-write
                leftover.unlink()
            (folder / "manifest.json").unlink(missing_ok=True)  # a stage being redone is not finished
            if stage is None:
                manifest = _run_baseline(recipe, options, data, folder, model, source)
            else:
                try:
                    if stage.input in refused:
                        raise ModelError(f"its input stage {stage.input} was refused")
                    manifest = _run_stage(stage, options, data, out, chains[name])
                except (ModelError, ExportError) as exc:  # the technique cannot handle this model: say why, go on
                    refused[name] = str(exc)
                    options.log(f"    refused: {exc}")
                    shutil.rmtree(folder, ignore_errors=True)  # whatever the stage wrote before it was refused
                    folder.mkdir(parents=True)
                    manifest = {"technique": stage.technique, "input": stage.input, "files": [], "export": {},
                                "refused": str(exc)}
            seconds = time.perf_counter() - stage_started
            manifest.update(key=keys[name], seconds=round(seconds, 2), finished=_now(), chain=chains[name],
                            sha256={file: sha256_file(folder / file) for file in manifest["files"]})
            write_json(folder / "manifest.json", manifest)  # last: only now does the stage count as finished
            stage_seconds.append({"name": name, "seconds": round(seconds, 2), "skipped": False})
            options.log(f"    done in {seconds:.1f} s (total {time.perf_counter() - started:.0f} s)")
    return data, stage_seconds


def _run_baseline(recipe: RunRecipe, options: RunOptions, data, folder: Path, model, source: dict | None) -> dict:
    """The user's model (already loaded and checked) or the article's CNN trained here, saved and exported."""
    from compress.kerasmodel import save_model

    if model is not None:
        stats = {"source": str(options.model), "input_model": source, "params": int(model.count_params())}
    else:
        from baseline.train import TrainConfig, train_baseline

        config = TrainConfig(recipe=recipe.baseline_recipe, epochs=recipe.baseline_epochs, seed=data.seed)
        model, stats = train_baseline(data, config, verbose=options.verbose)
    save_model(model, folder / "model.keras")
    write_json(folder / "metrics.json", stats)
    exported = _export(model, folder, recipe.baseline_export, data, [])
    return {"technique": None, "input": None, "files": _file_names(folder, exported), "export": exported,
            "macs": _macs(model)}


def _run_stage(stage: Stage, options: RunOptions, data, out: Path, chain: list[str]) -> dict:
    from compress import registry
    from compress.kerasmodel import load_model, save_model

    technique = registry.get(stage.technique)
    folder = stage_dir(out, stage.name)
    model = load_model(stage_dir(out, stage.input) / "model.keras", unsafe=options.unsafe)
    outcome = technique.apply(model, stage.config, data, out_dir=folder, verbose=options.verbose)
    variants = {}
    if outcome.model is not None:
        save_model(outcome.model, folder / "model.keras")
        variants = _export(outcome.model, folder, stage.export_formats, data, chain)
    for label, path in outcome.files.items():
        variants[label] = _check_file(Path(path), model, data)
    write_json(folder / "stats.json", {"technique": stage.technique, "input": stage.input,
                                       "config": stage.config.to_dict(), "stats": outcome.stats})
    return {"technique": stage.technique, "input": stage.input, "settings": stage.config.to_dict(),
            "files": _file_names(folder, variants), "export": variants,
            "macs": _macs(outcome.model if outcome.model is not None else model)}


def _macs(model) -> int | None:
    """Multiply-adds of one image through the model: a latency proxy that does not depend on the machine."""
    from compress.errors import ModelError
    from compress.kerasmodel import count_macs

    try:
        return count_macs(model)
    except ModelError:  # a layer of unknown shape: the figure is left out, not guessed
        return None


def _export(model, folder: Path, formats, data, chain) -> dict:
    """Export a Keras model; one entry per file: its path, precision and parity result."""
    from compress.export.exporter import export_model

    result = export_model(model, folder, formats=formats, data=data, chain=chain)
    parity = result["parity"]["files"]
    return {
        fmt: {"path": entry["path"], "precision": entry["precision"], "parity": parity[Path(entry["path"]).name]}
        for fmt, entry in result["files"].items()
    }


def _check_file(path: Path, source_model, data) -> dict:
    """Parity of an int8 file a technique wrote itself (PTQ), against the quantized model it holds."""
    from compress.export.parity import check_quantized_file, parity_inputs
    from compress.kerasmodel import keras_outputs

    inputs, labels, _ = parity_inputs(source_model.input_shape[1:], data)
    parity = check_quantized_file(path, inputs, keras_outputs(source_model, inputs), labels=labels)
    return {"path": str(path), "precision": "int8", "parity": parity}


def _file_names(folder: Path, variants: dict) -> list[str]:
    names = [Path(entry["path"]).name for entry in variants.values()]
    return sorted({*names, *(p.name for p in folder.glob("*.keras") if not p.name.startswith("."))})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
