"""A recipe (TOML) -> an ordered plan of stages -> one run directory with every variant exported and measured.

Run directory:
    OUT/recipe.toml                 the recipe as given
    OUT/baseline/                   model.keras, metrics.json, export files, manifest.json
    OUT/<stage>/                    model.keras (if the technique makes one), stats.json, export files, manifest.json
    OUT/results.json, report.md, results.csv, accuracy_vs_size.png, accuracy_vs_latency.png

A stage is finished when its manifest.json exists and records the same key: a hash of its technique, settings,
export formats, data and its input's key. The manifest is written last, after every file of the stage has been
written atomically, so an interrupted stage never looks finished; a changed stage gets a new key, and so does
everything downstream of it, since their keys include their input's key.
"""

from __future__ import annotations

import hashlib
import json
import time
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Callable

from compress.errors import ConfigError
from compress.techniques.base import TechniqueConfig

BASELINE = "baseline"
RECIPE_KEYS = {"baseline", "quick", "export", "measure", "stage"}
SECTION_KEYS = {
    "baseline": {"recipe", "epochs"},
    "quick": {"baseline_epochs", "stage_epochs"},
    "export": {"formats"},
    "measure": {"threads", "batch_sizes", "min_seconds"},
}
STAGE_KEYS = {"name", "technique", "input", "settings", "export"}
REPORTED_BATCH_SIZES = (1, 32)  # the report's latency columns; results.json always carries both keys


@dataclass(frozen=True)
class Stage:
    name: str
    technique: str
    input: str
    config: TechniqueConfig
    export_formats: tuple[str, ...]


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]  # in execution order: every input comes before the stages that read it
    baseline_recipe: str = "default"
    baseline_epochs: int = 10
    baseline_export: tuple[str, ...] = ("onnx",)  # the [export] formats, which stages inherit too
    threads: int = 1
    batch_sizes: tuple[int, ...] = (1, 32)
    min_seconds: float = 1.0  # shortest timing per file and batch size, after warm-up
    source: str = ""  # the TOML text, kept in the run directory

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)


def default_recipe_text() -> str:
    return (resources.files("compress") / "recipes" / "default.toml").read_text()


def load_recipe(path: str | Path | None = None, *, quick: bool = False) -> Recipe:
    """Read a recipe file (default: the shipped one); every problem is one ConfigError naming it."""
    if path is None:
        return parse_recipe(default_recipe_text(), quick=quick, where="default recipe")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    return parse_recipe(path.read_text(), quick=quick, where=str(path))


def parse_recipe(text: str, *, quick: bool = False, where: str = "recipe") -> Recipe:
    from baseline.train import RECIPES
    from compress import registry
    from compress.export import FORMATS

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from None
    _refuse_unknown(raw, RECIPE_KEYS, where)
    for section, allowed in SECTION_KEYS.items():
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        _refuse_unknown(raw.get(section, {}), allowed, f"{where} [{section}]")
    baseline = raw.get("baseline", {})
    quick_section = raw.get("quick", {})
    baseline_recipe = baseline.get("recipe", "default")
    if baseline_recipe not in RECIPES:
        raise ConfigError(f"{where}: unknown baseline recipe {baseline_recipe!r}; known: {', '.join(RECIPES)}")
    baseline_epochs = baseline.get("epochs", RECIPES[baseline_recipe].epochs)
    if quick:
        baseline_epochs = quick_section.get("baseline_epochs", baseline_epochs)
    stage_epochs_cap = quick_section.get("stage_epochs", 1) if quick else None
    default_formats = _formats(raw.get("export", {}).get("formats", ["onnx"]), FORMATS, f"{where} [export]")
    measure = raw.get("measure", {})
    threads = measure.get("threads", 1)
    batch_sizes = tuple(measure.get("batch_sizes", [1, 32]))
    min_seconds = measure.get("min_seconds", 1.0)
    if not isinstance(min_seconds, (int, float)) or min_seconds < 0:
        raise ConfigError(f"{where}: measure min_seconds must be a number >= 0, got {min_seconds!r}")
    checked = [("baseline epochs", baseline_epochs), ("measure threads", threads)]
    if stage_epochs_cap is not None:
        checked.append(("quick stage_epochs", stage_epochs_cap))
    for name, value in checked:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
    if not batch_sizes or not all(isinstance(b, int) and b >= 1 for b in batch_sizes):
        raise ConfigError(f"{where}: measure batch_sizes must be positive integers, got {list(batch_sizes)}")

    stages = {}
    for index, table in enumerate(raw.get("stage", []), start=1):
        label = f"{where} stage {index}"
        if not isinstance(table, dict):
            raise ConfigError(f"{label} must be a table")
        _refuse_unknown(table, STAGE_KEYS, label)
        for key in ("name", "technique"):
            if not isinstance(table.get(key), str) or not table[key]:
                raise ConfigError(f"{label} needs a '{key}'")
        name = table["name"]
        if name == BASELINE or name in stages:
            raise ConfigError(f"{label}: stage name {name!r} is {'reserved' if name == BASELINE else 'used twice'}")
        if not all(ch.isalnum() or ch in "-_." for ch in name):
            raise ConfigError(f"{label}: stage name {name!r} may hold only letters, digits, '-', '_' and '.'")
        technique = registry.get(table["technique"])
        settings = dict(table.get("settings", {}))
        epochs_field = technique.config_class.__dataclass_fields__.get("epochs")
        if stage_epochs_cap is not None and epochs_field is not None:
            settings["epochs"] = min(settings.get("epochs", epochs_field.default), stage_epochs_cap)
        try:
            config = technique.config_class.from_dict(settings)
        except ConfigError as exc:
            raise ConfigError(f"stage {name!r}: {exc}") from None
        formats = _formats(table.get("export", list(default_formats)), FORMATS, label)
        stages[name] = Stage(name, technique.name, table.get("input", BASELINE), config, formats)

    ordered = _execution_order(stages)
    return Recipe(
        stages=tuple(stages[name] for name in ordered),
        baseline_recipe=baseline_recipe,
        baseline_epochs=baseline_epochs,
        baseline_export=default_formats,
        threads=threads,
        batch_sizes=batch_sizes,
        min_seconds=float(min_seconds),
        source=text,
    )


def _refuse_unknown(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(allowed))}")


def _formats(value, known, where: str) -> tuple[str, ...]:
    formats = (value,) if isinstance(value, str) else tuple(value)
    unknown = [fmt for fmt in formats if fmt not in known]
    if unknown or not formats:
        raise ConfigError(f"{where}: unknown export format {unknown[:1] or formats!r}; known: {', '.join(known)}")
    return formats


def _execution_order(stages: dict[str, Stage]) -> list[str]:
    """Stages ordered so that each comes after its input; a missing input or a cycle is refused by name."""
    for stage in stages.values():
        if stage.input != BASELINE and stage.input not in stages:
            valid = ", ".join([BASELINE, *(name for name in stages if name != stage.name)])
            raise ConfigError(f"stage {stage.name!r} reads {stage.input!r}, which is no stage; valid inputs: {valid}")
    ordered: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name):] + [name]
            raise ConfigError(f"stages form a cycle: {' -> '.join(cycle)}")
        state[name] = "visiting"
        if stages[name].input != BASELINE:
            visit(stages[name].input, path + [name])
        state[name] = "done"
        ordered.append(name)

    for name in stages:
        visit(name, [])
    return ordered


# ------------------------------------------------------------------------------------------------ running


@dataclass
class RunOptions:
    out: Path
    data_args: dict  # keyword arguments of compress.data.load_data
    model: Path | None = None  # a user's trained model replaces the baseline training
    unsafe: bool = False
    verbose: int = 1  # Keras progress: 0 silent, 1 bar, 2 a line per epoch
    log: Callable[[str], None] = print


def stage_keys(recipe: Recipe, options: RunOptions, baseline_key: str) -> dict[str, str]:
    """Each stage's key: its settings, formats and data, chained to its input's key."""
    keys = {BASELINE: baseline_key}
    for stage in recipe.stages:
        keys[stage.name] = _hash(
            {
                "technique": stage.technique,
                "settings": stage.config.to_dict(),
                "export": list(stage.export_formats),
                "input": keys[stage.input],
            }
        )
    return keys


def baseline_key(recipe: Recipe, options: RunOptions) -> str:
    from compress import __version__

    if options.model is not None:
        source = {"model_sha256": _file_sha256(options.model)}
    else:
        source = {"recipe": recipe.baseline_recipe, "epochs": recipe.baseline_epochs}
    return _hash({"baseline": source, "export": list(recipe.baseline_export), "data": _jsonable(options.data_args),
                  "compress": __version__})


def is_finished(stage_dir: Path, key: str) -> bool:
    manifest_path = stage_dir / "manifest.json"
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return False
    files = manifest.get("files", {})
    return manifest.get("key") == key and all((stage_dir / name).is_file() for name in files)


def describe_plan(recipe: Recipe, options: RunOptions) -> list[str]:
    """The resolved plan, one line per stage, saying which would run and which are finished."""
    keys = stage_keys(recipe, options, baseline_key(recipe, options))
    lines = []
    source = f"model {options.model}" if options.model else f"train ({recipe.baseline_recipe}, {recipe.baseline_epochs} epochs)"
    state = "finished, would skip" if is_finished(options.out / BASELINE, keys[BASELINE]) else "would run"
    lines.append(f"baseline: {source} [{state}]")
    for stage in recipe.stages:
        state = "finished, would skip" if is_finished(options.out / stage.name, keys[stage.name]) else "would run"
        settings = ", ".join(f"{k}={v}" for k, v in stage.config.to_dict().items())
        lines.append(
            f"{stage.name}: {stage.technique} <- {stage.input}; export {','.join(stage.export_formats)}; "
            f"{settings} [{state}]"
        )
    lines.append(f"measure: accuracy on the test split, size, latency at batch {list(recipe.batch_sizes)} "
                 f"with {recipe.threads} thread(s)")
    return lines


def run(recipe: Recipe, options: RunOptions) -> dict:
    """Run every stage not yet finished, then measure every variant and write results.json and the report."""
    from compress.data import load_data
    from compress.io import atomic_path, check_output_dir, write_json
    from compress.report import write_report

    started = time.perf_counter()
    out = check_output_dir(options.out)
    data = load_data(**options.data_args)
    if options.model is not None:
        from compress.io import load_model

        load_model(options.model, unsafe=options.unsafe)  # refuse a bad model before any work is done
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "recipe.toml") as partial:
        partial.write_text(recipe.source)
    keys = stage_keys(recipe, options, baseline_key(recipe, options))
    names = [BASELINE, *(stage.name for stage in recipe.stages)]
    stage_seconds = []
    chains: dict[str, list[str]] = {BASELINE: []}
    for position, name in enumerate(names, start=1):
        stage = None if name == BASELINE else recipe.stage(name)
        chains[name] = [] if stage is None else [*chains[stage.input], stage.technique]
        stage_dir = out / name
        what = "baseline" if stage is None else f"{stage.technique} <- {stage.input}"
        if is_finished(stage_dir, keys[name]):
            options.log(f"[{position}/{len(names)}] {name} ({what}): finished earlier with the same settings, skipped")
            stage_seconds.append({"name": name, "seconds": 0.0, "skipped": True})
            continue
        options.log(f"[{position}/{len(names)}] {name} ({what}) ...")
        stage_started = time.perf_counter()
        for leftover in stage_dir.glob(".*.partial*"):  # temporary files of a run killed mid-write
            leftover.unlink()
        if stage is None:
            manifest = _run_baseline(recipe, options, data, stage_dir)
        else:
            manifest = _run_stage(stage, options, data, out, chains[name])
        seconds = time.perf_counter() - stage_started
        manifest.update(key=keys[name], seconds=round(seconds, 2), finished=_now(), chain=chains[name])
        write_json(stage_dir / "manifest.json", manifest)  # last: only now does the stage count as finished
        stage_seconds.append({"name": name, "seconds": round(seconds, 2), "skipped": False})
        options.log(f"    done in {seconds:.1f} s (total {time.perf_counter() - started:.0f} s)")

    results = measure_run(recipe, options, data, names, stage_seconds, started)
    write_json(out / "results.json", results)
    written = write_report(results, out)
    options.log(f"wrote {', '.join(str(path) for path in [out / 'results.json', *written])}")
    return results


def _run_baseline(recipe: Recipe, options: RunOptions, data, stage_dir: Path) -> dict:
    from compress.io import load_model, save_model, write_json

    if options.model is not None:
        model = load_model(options.model, unsafe=options.unsafe)
        stats = {"source": str(options.model), "params": int(model.count_params())}
    else:
        from baseline.train import TrainConfig, train_baseline

        config = TrainConfig(recipe=recipe.baseline_recipe, epochs=recipe.baseline_epochs, seed=data.seed)
        model, stats = train_baseline(data, config, verbose=options.verbose)
    save_model(model, stage_dir / "model.keras")
    write_json(stage_dir / "metrics.json", stats)
    exported = _export(model, stage_dir, recipe.baseline_export, data, [])
    return {"technique": None, "input": None, "files": _file_names(stage_dir, exported), "export": exported}


def _run_stage(stage: Stage, options: RunOptions, data, out: Path, chain: list[str]) -> dict:
    from compress import registry
    from compress.io import load_model, save_model, write_json

    technique = registry.get(stage.technique)
    stage_dir = out / stage.name
    source_path = out / stage.input / "model.keras"
    model = load_model(source_path, unsafe=True)  # written by this run, so trusted
    outcome = technique.apply(model, stage.config, data, out_dir=stage_dir, verbose=options.verbose)
    variants = {}
    if outcome.model is not None:
        save_model(outcome.model, stage_dir / "model.keras")
        variants = _export(outcome.model, stage_dir, stage.export_formats, data, chain)
    for label, path in outcome.files.items():
        variants[label] = _check_file(Path(path), model, data, label)
    write_json(stage_dir / "stats.json", {"technique": stage.technique, "input": stage.input,
                                          "config": stage.config.to_dict(), "stats": outcome.stats})
    return {"technique": stage.technique, "input": stage.input, "settings": stage.config.to_dict(),
            "files": _file_names(stage_dir, variants), "export": variants}


def _export(model, stage_dir: Path, formats, data, chain) -> dict:
    """Export a Keras model; one entry per file: its path, precision and parity result."""
    from compress.export import export_model

    result = export_model(model, stage_dir, formats=formats, data=data, chain=chain)
    parity = result["parity"]["files"]
    return {
        fmt: {"path": entry["path"], "precision": entry["precision"], "parity": parity[Path(entry["path"]).name]}
        for fmt, entry in result["files"].items()
    }


def _check_file(path: Path, source_model, data, label: str) -> dict:
    """Parity of a file a technique wrote itself (PTQ) against the Keras model it came from."""
    from compress.export import check_parity, keras_outputs, parity_inputs

    inputs, labels, _ = parity_inputs(source_model.input_shape[1:], data)
    precision = "int8"
    parity = check_parity(path, inputs, keras_outputs(source_model, inputs, 64), precision=precision, labels=labels)
    return {"path": str(path), "precision": precision, "parity": parity}


def _file_names(stage_dir: Path, variants: dict) -> list[str]:
    names = [Path(entry["path"]).name for entry in variants.values()]
    return sorted({*names, *(p.name for p in stage_dir.glob("*.keras") if not p.name.startswith("."))})


def measure_run(recipe: Recipe, options: RunOptions, data, names: list[str], stage_seconds, started) -> dict:
    """Accuracy, size and latency of every exported file, measured now and side by side."""
    from compress import bench
    from compress.export import evaluate_file

    variants = []
    for name in names:
        manifest = json.loads((options.out / name / "manifest.json").read_text())
        for label, entry in manifest["export"].items():
            path = Path(entry["path"])
            variant_name = name if len(manifest["export"]) == 1 else f"{name}:{label}"
            options.log(f"measuring {variant_name} ({path.name}) ...")
            sizes = bench.file_size(path)
            weights = bench.onnx_weight_stats(path) if path.suffix == ".onnx" else {}
            not_measured = {} if weights else {key: "parameters are counted in ONNX files only"
                                                for key in ("params", "nonzero_params")}
            variants.append(
                {
                    "name": variant_name,
                    "stage": name,
                    "chain": manifest["chain"],
                    "file": str(path.relative_to(options.out)),
                    "format": path.suffix.lstrip("."),
                    "precision": entry["precision"],
                    "accuracy": evaluate_file(path, data)["accuracy"],
                    "file_bytes": sizes["file_bytes"],
                    "gzip_bytes": sizes["gzip_bytes"],
                    "params": weights.get("params"),
                    "nonzero_params": weights.get("nonzero_params"),
                    "weight_bytes_by_dtype": weights.get("bytes_by_dtype"),
                    "parity_ok": bool(entry["parity"]["ok"]),
                    "parity": entry["parity"],
                    "not_measured": not_measured,
                }
            )
    options.log("measuring latency of every file, side by side ...")
    cuda = _measure_latencies(variants, recipe, options)
    return {
        "machine": {**bench.machine_info(threads=recipe.threads), "latency_rounds": bench.DEFAULT_ROUNDS},
        "baseline": _baseline_variant(variants),
        "data": data.describe(),
        "total_seconds": round(time.perf_counter() - started, 2),
        "stages": stage_seconds,
        "variants": variants,
        "keras_reference": _keras_reference(options.out / BASELINE / "model.keras", recipe),
        "cuda": cuda,
    }


def _baseline_variant(variants: list[dict]) -> str:
    """The variant the others are compared with: the baseline's ONNX file where it has one."""
    own = [variant for variant in variants if variant["stage"] == BASELINE]
    return next((variant["name"] for variant in own if variant["format"] == "onnx"), own[0]["name"])


def _measure_latencies(variants: list[dict], recipe: Recipe, options: RunOptions) -> dict:
    """CPU latency of every file at each batch size; CUDA latency of the ONNX files where a GPU can run them.

    The files of one batch size are timed in interleaved rounds, so that the ratios between them hold on a
    machine whose speed drifts.
    """
    from compress import bench

    cuda_ok, cuda_reason = bench.cuda_available()
    for variant in variants:
        for batch in REPORTED_BATCH_SIZES:
            if batch not in recipe.batch_sizes:
                variant[f"latency_ms_b{batch}"] = None
                variant.setdefault("not_measured", {})[f"latency_ms_b{batch}"] = "batch size not in the recipe's [measure]"
    paths = {variant["name"]: options.out / variant["file"] for variant in variants}
    onnx_names = [name for name, path in paths.items() if path.suffix == ".onnx"]
    for batch in recipe.batch_sizes:
        options.log(f"    batch {batch}: {len(paths)} files in {bench.DEFAULT_ROUNDS} interleaved rounds ...")
        cpu = bench.interleaved_latency(
            {name: bench.load_onnx(path, batch, threads=recipe.threads) if path.suffix == ".onnx"
             else bench.load_tflite(path, batch, recipe.threads) for name, path in paths.items()},
            min_seconds=recipe.min_seconds,
        )
        gpu = {}
        if cuda_ok and onnx_names:
            gpu = bench.interleaved_latency(
                {name: bench.load_onnx(paths[name], batch, provider="CUDAExecutionProvider") for name in onnx_names},
                min_seconds=recipe.min_seconds,
            )
        for variant in variants:
            timing = cpu[variant["name"]]
            variant[f"latency_ms_b{batch}"] = timing["median_ms"]
            variant[f"latency_p95_ms_b{batch}"] = timing["p95_ms"]
            variant[f"images_per_s_b{batch}"] = timing["images_per_s"]
            if variant["name"] in gpu:
                variant[f"latency_cuda_ms_b{batch}"] = gpu[variant["name"]]["median_ms"]
    return {"measured": cuda_ok, "reason": cuda_reason}


def _keras_reference(model_path: Path, recipe: Recipe) -> dict:
    """The float baseline served the article's way (Keras predict) and as a tf.function, for reference."""
    from compress import bench
    from compress.io import load_model

    model = load_model(model_path, unsafe=True)
    return {f"b{batch}": bench.keras_latency(model, batch, min_seconds=recipe.min_seconds) for batch in recipe.batch_sizes}


def _hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
