"""A recipe (TOML) -> a RunRecipe: ordered stages with validated configs, export formats and measurement settings.

Every problem is one ConfigError naming it: unknown keys, techniques or settings, a stage reading a stage that does
not exist, cycles, unsafe stage names, numbers out of range.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from baseline.train import MAX_EPOCHS
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
MAX_STAGES = 200
MAX_STAGE_NAME = 64
MAX_THREADS = 256
MAX_MIN_SECONDS = 60.0  # per file and batch size; every file is timed at every batch size
MAX_BATCH = 1024
MAX_BATCH_SIZES = 8
MAX_TIMING_SECONDS = 3600


@dataclass(frozen=True)
class Stage:
    name: str
    technique: str
    input: str
    config: TechniqueConfig
    export_formats: tuple[str, ...]


@dataclass(frozen=True)
class RunRecipe:
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


def load_recipe(path: str | Path | None = None, *, quick: bool = False, unsupported: str | None = None) -> RunRecipe:
    """Read a recipe file (default: the shipped one); every problem is one ConfigError naming it."""
    if path is None:
        return parse_recipe(default_recipe_text(), quick=quick, unsupported=unsupported, where="default recipe")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    return parse_recipe(path.read_text(), quick=quick, unsupported=unsupported, where=str(path))


def parse_recipe(text: str, *, quick: bool = False, unsupported: str | None = None,
                 where: str = "recipe") -> RunRecipe:
    """The recipe in `text`; `quick` caps every stage's epochs at the [quick] table's; `unsupported` is the
    setting of every stage with that setting (QAT's) that does not set it itself."""
    from baseline.train import TRAINING_RECIPES
    from compress import registry
    from compress.export.exporter import EXPORT_FORMATS

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from exc
    _refuse_unknown(raw, RECIPE_KEYS, where)
    for section, allowed in SECTION_KEYS.items():
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        _refuse_unknown(raw.get(section, {}), allowed, f"{where} [{section}]")
    baseline = raw.get("baseline", {})
    quick_section = raw.get("quick", {})
    baseline_recipe = baseline.get("recipe", "default")
    if baseline_recipe not in TRAINING_RECIPES:
        raise ConfigError(f"{where}: unknown baseline recipe {baseline_recipe!r}; known: {', '.join(TRAINING_RECIPES)}")
    baseline_epochs = baseline.get("epochs", TRAINING_RECIPES[baseline_recipe].epochs)
    if quick:
        baseline_epochs = quick_section.get("baseline_epochs", baseline_epochs)
    stage_epochs_cap = quick_section.get("stage_epochs", 1) if quick else None
    default_formats = _formats(raw.get("export", {}).get("formats", ["onnx"]), EXPORT_FORMATS, f"{where} [export]")
    measure = raw.get("measure", {})
    threads = measure.get("threads", 1)
    batch_sizes = measure.get("batch_sizes", [1, 32])
    min_seconds = measure.get("min_seconds", 1.0)
    if not isinstance(min_seconds, (int, float)) or isinstance(min_seconds, bool) or not 0 <= min_seconds <= MAX_MIN_SECONDS:
        raise ConfigError(f"{where}: measure min_seconds must be a number from 0 to {MAX_MIN_SECONDS}, got {min_seconds!r}")
    checked = [("baseline epochs", baseline_epochs, MAX_EPOCHS), ("measure threads", threads, MAX_THREADS)]
    if stage_epochs_cap is not None:
        checked.append(("quick stage_epochs", stage_epochs_cap, MAX_EPOCHS))
    for name, value, limit in checked:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise ConfigError(f"{where}: {name} must be an integer from 1 to {limit}, got {value!r}")
    if (not isinstance(batch_sizes, list) or not batch_sizes or len(batch_sizes) > MAX_BATCH_SIZES
            or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= MAX_BATCH for b in batch_sizes)):
        raise ConfigError(f"{where}: measure batch_sizes must be a list of 1 to {MAX_BATCH_SIZES} integers from 1 to "
                          f"{MAX_BATCH}, got {_short(batch_sizes)}")
    batch_sizes = tuple(dict.fromkeys(batch_sizes))

    stage_tables = raw.get("stage", [])
    if not isinstance(stage_tables, list):
        raise ConfigError(f"{where}: 'stage' must be a list of [[stage]] tables, got {_short(stage_tables)}")
    if len(stage_tables) > MAX_STAGES:
        raise ConfigError(f"{where}: {len(stage_tables)} stages; at most {MAX_STAGES} are allowed")
    stages = {}
    for index, table in enumerate(stage_tables, start=1):
        label = f"{where} stage {index}"
        if not isinstance(table, dict):
            raise ConfigError(f"{label} must be a table")
        _refuse_unknown(table, STAGE_KEYS, label)
        for key in ("name", "technique"):
            if not isinstance(table.get(key), str) or not table[key]:
                raise ConfigError(f"{label} needs a '{key}'")
        name = table["name"]
        check_stage_name(name, label)
        if name == BASELINE or name in stages:
            raise ConfigError(f"{label}: stage name {name!r} is {'reserved' if name == BASELINE else 'used twice'}")
        technique = registry.get(_short_text(table["technique"]))
        settings = table.get("settings", {})
        if not isinstance(settings, dict):
            raise ConfigError(f"{label}: settings must be a table such as {{ epochs = 1 }}, got {_short(settings)}")
        settings = dict(settings)
        if not isinstance(table.get("input", BASELINE), str):
            raise ConfigError(f"{label}: input must be a stage name, got {_short(table['input'])}")
        epochs_field = technique.config_class.__dataclass_fields__.get("epochs")
        epochs = settings.get("epochs", None if epochs_field is None else epochs_field.default)
        if stage_epochs_cap is not None and isinstance(epochs, (int, float)) and not isinstance(epochs, bool):
            settings["epochs"] = min(epochs, stage_epochs_cap)  # other types: from_dict below names the error
        if unsupported is not None and "unsupported" in technique.config_class.__dataclass_fields__:
            settings.setdefault("unsupported", unsupported)
        try:
            config = technique.config_class.from_dict(settings)
        except ConfigError as exc:
            raise ConfigError(f"stage {name!r}: {exc}") from exc
        formats = _formats(table.get("export", list(default_formats)), EXPORT_FORMATS, label)
        stages[name] = Stage(name, technique.name, table.get("input", BASELINE), config, formats)

    ordered = _execution_order(stages)
    timing = (len(stages) + 1) * len(batch_sizes) * min_seconds
    if timing > MAX_TIMING_SECONDS:
        raise ConfigError(f"{where}: timing every file would take at least {timing:,.0f} s ({len(stages) + 1} stages x "
                          f"{len(batch_sizes)} batch sizes x {min_seconds} s); at most {MAX_TIMING_SECONDS:,} s: "
                          "lower [measure] min_seconds or batch_sizes")
    return RunRecipe(
        stages=tuple(stages[name] for name in ordered),
        baseline_recipe=baseline_recipe,
        baseline_epochs=baseline_epochs,
        baseline_export=default_formats,
        threads=threads,
        batch_sizes=batch_sizes,
        min_seconds=float(min_seconds),
        source=text,
    )


def check_stage_name(name: str, label: str = "stage") -> None:
    """A stage name becomes a folder of the run folder: letters, digits, '-', '_' and inner dots only."""
    if len(name) > MAX_STAGE_NAME:
        raise ConfigError(f"{label}: stage name {_short_text(name)!r} is longer than {MAX_STAGE_NAME} characters")
    if not all(ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in name) or name.startswith(".") or not name:
        raise ConfigError(f"{label}: stage name {name!r} must hold only letters, digits, '-', '_' and '.', "
                          "and not start with '.'")


def _short(value) -> str:
    return _short_text(repr(value))


def _short_text(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _refuse_unknown(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        listed = _short_text(", ".join(unknown))
        raise ConfigError(f"{where}: unknown key(s) {listed}; valid keys: {', '.join(sorted(allowed))}")


def _formats(value, known, where: str) -> tuple[str, ...]:
    formats = (value,) if isinstance(value, str) else tuple(value)
    unknown = [fmt for fmt in formats if fmt not in known]
    if unknown or not formats:
        raise ConfigError(f"{where}: unknown export format {unknown[:1] or formats!r}; known: {', '.join(known)}")
    return formats


def _execution_order(stages: dict[str, Stage]) -> list[str]:
    """Stages ordered so that each comes after its input; a missing input or a cycle is refused by name.

    Iterative, so that a long chain declared in reverse order needs no deep recursion.
    """
    for stage in stages.values():
        if stage.input != BASELINE and stage.input not in stages:
            valid = _short_text(", ".join([BASELINE, *(name for name in stages if name != stage.name)]), 200)
            raise ConfigError(f"stage {stage.name!r} reads {_short_text(stage.input)!r}, which is no stage; "
                              f"valid inputs: {valid}")
    ordered: list[str] = []
    done: set[str] = set()
    for start in stages:
        path: list[str] = []
        name = start
        while name != BASELINE and name not in done:
            if name in path:
                cycle = path[path.index(name):] + [name]
                raise ConfigError(f"stages form a cycle: {_short_text(' -> '.join(cycle), 200)}")
            path.append(name)
            name = stages[name].input
        for name in reversed(path):
            done.add(name)
            ordered.append(name)
    return ordered
