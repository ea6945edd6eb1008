"""The `compress` command line's options: one parser, every subcommand, and the options each technique's config
declares. Each subcommand names its handler in compress.cli, which parses, dispatches and prints."""

from __future__ import annotations

import argparse
import dataclasses

from compress.data import CIFAR10_DIR_ENV, KNOWN_SOURCES
from compress.errors import CompressError

DEBUG_ENV = "COMPRESS_DEBUG"


def add_data_arguments(parser: argparse.ArgumentParser, *, default: str | None = "cifar10-mini",
                       purpose: str = "") -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default=default,
        metavar="SOURCE",
        help=f"data source{purpose}: {', '.join(KNOWN_SOURCES)} "
        + ("(default: cifar10-mini, shipped with the package)" if default else "(default: seeded random images)"),
    )
    group.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"class-folder copy of CIFAR-10 for --data cifar10 (default: ${CIFAR10_DIR_ENV}, else Keras' download)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed for the validation split, shuffling and training")
    group.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of each class's training images kept for validation (unless the folder has a val/ "
        "folder beside train/ and test/)"
    )
    group.add_argument(
        "--image-size", type=_image_size, metavar="HxW", help="resize every image to HxW (e.g. 32x32)"
    )
    group.add_argument(
        "--skip-unreadable", action="store_true",
        help="leave out images that cannot be read (empty, damaged, not images) instead of refusing the folder; "
             "they are listed",
    )
    group.add_argument(
        "--input-range", choices=("auto", "raw", "unit", "symmetric"), default="auto",
        help="pixels as the model takes them: raw 0-255, unit [0, 1] or symmetric [-1, 1]; auto: raw for a model "
             "whose first layer is Rescaling or Normalization, else unit (default: auto)",
    )


def _image_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 32x32, got {text!r}") from None
    from compress.data import MAX_IMAGE_SIDE

    if not (1 <= height <= MAX_IMAGE_SIDE and 1 <= width <= MAX_IMAGE_SIDE):
        raise argparse.ArgumentTypeError(f"image size must be from 1x1 to {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}, got {text!r}")
    return height, width


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


CONFIG_PREFIX = "config_"


def add_config_arguments(parser: argparse.ArgumentParser, config_class) -> None:
    """One option per config field, named after it (`clusters` -> --clusters); the config validates the values."""
    group = parser.add_argument_group("technique settings")
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        meta = field.metadata
        help_text = f"{meta.get('help', '')} (default: {_show_default(field.default)})"
        if field.type in ("bool", bool):
            group.add_argument(flag, dest=CONFIG_PREFIX + field.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
            continue
        parse = meta.get("parse") or {"int": int, "float": float, "str": str}.get(str(field.type), str)
        group.add_argument(flag, dest=CONFIG_PREFIX + field.name, type=_cli_type(parse), default=None,
                           metavar=meta.get("metavar") or field.name.upper(), help=help_text)


def _show_default(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _cli_type(parse):
    """Wrap a config parser so a bad value is an argparse error (one line, exit 2), not a traceback."""

    def convert(text: str):
        try:
            return parse(text)
        except (ValueError, CompressError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) rather than the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from baseline.train import TRAINING_RECIPES

    parser = OneLineParser(
        prog="compress",
        description="Compress trained Keras models and measure the exported files.",
    )
    parser.add_argument("--debug", action="store_true",
                        help=f"show full tracebacks and TensorFlow's own log lines (or set {DEBUG_ENV}=1)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)

    train = commands.add_parser(
        "train",
        help="train the article's baseline CNN",
        description="Train the article's CNN (Conv64-MaxPool-Conv128-Flatten-Dense256-Dense) on a data source; "
        "writes OUT/model.keras and OUT/metrics.json.",
    )
    add_data_arguments(train)
    train.add_argument("--epochs", type=_positive_int, help="training epochs (default: the recipe's, 10)")
    train.add_argument(
        "--training-recipe",
        choices=sorted(TRAINING_RECIPES),
        default="default",
        help="; ".join(f"{name}: {recipe.summary}" for name, recipe in TRAINING_RECIPES.items()),
    )
    train.add_argument("--out", required=True, metavar="DIR", help="output folder")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.set_defaults(handler="cmd_train")

    report = commands.add_parser(
        "report",
        help="rebuild a run's report from its results.json",
        description="Rebuild DIR/report.md, DIR/results.csv and the accuracy plots from DIR/results.json alone.",
    )
    report.add_argument("dir", metavar="DIR", help="run folder holding results.json")
    report.add_argument("--quiet", action="store_true", help="no output but errors")
    report.set_defaults(handler="cmd_report")

    run = commands.add_parser(
        "run",
        help="the main job: baseline, every technique and combination, exported, measured, reported",
        description="Run a recipe (default: the shipped one) into a run folder: train or take the baseline, apply "
        "each stage, export every variant, measure accuracy, size and latency on the exported files, and write "
        "report.md, results.json/csv and plots. A rerun skips the stages that finished with the same settings.",
    )
    run.add_argument("--recipe", metavar="FILE.toml", help="recipe file (default: the shipped default recipe)")
    add_data_arguments(run)
    run.add_argument("--model", metavar="BASELINE.keras", help="your trained model, used instead of training one")
    run.add_argument("--out", metavar="DIR", help="run folder (default: runs/<recipe>-<data>[-quick])")
    run.add_argument("--quick", action="store_true",
                     help="short training (the recipe's [quick] epochs): a smoke run in minutes on the shipped data")
    run.add_argument("--dry-run", action="store_true", help="print the resolved plan and what would be skipped; run nothing")
    run.add_argument("--unsafe", action="store_true",
                     help="allow Lambda layers (arbitrary code) in --model and in the run folder's models")
    run.add_argument("--remeasure", action="store_true",
                     help="measure every file again (default: reuse the figures of files unchanged since measured)")
    run.add_argument("--unsupported", choices=("error", "float"),
                     help="layers tfmot cannot quantize, in every QAT stage that does not say: error (refuse the "
                     "stage, naming them; the default) or float (keep them in float)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.set_defaults(handler="cmd_run")

    auto = commands.add_parser(
        "auto",
        help="search chains and settings for the smallest or fastest file within an accuracy budget",
        description="An Optuna study (NSGA-II) over chains (ptq; prune -> qat; cluster -> qat; distill -> ptq; distill "
        "-> prune -> qat; channel pruning -> ptq or qat; distill -> channel pruning -> qat) and their settings, "
        "judged on each exported file's validation accuracy, gzip size and batch-1 latency; the first trials try "
        "every chain once. The test split is measured at the end, for the chosen files. Writes DIR/auto.json, "
        "DIR/best/, DIR/best.toml and the report of the best and Pareto files (DIR/report.md, results.json, "
        "results.csv, plots); a rerun continues the study.",
    )
    auto.add_argument("model", metavar="MODEL", help="the trained model (.keras)")
    add_data_arguments(auto)
    auto.add_argument("--out", required=True, metavar="DIR", help="search folder (stages, study, results)")
    auto.add_argument("--max-drop", type=float, required=True, metavar="POINTS",
                      help="validation accuracy points the chosen file may lose against MODEL")
    auto.add_argument("--objective", default="size", metavar="size|latency|both",
                      help="what the best file minimizes within the budget: gzip bytes, batch-1 latency, or both "
                           "(their product) (default: size)")
    auto.add_argument("--trials", type=int, default=20,
                      help="trials the study holds in the end, over reruns and processes sharing it (default: 20)")
    auto.add_argument("--time-budget", type=float, metavar="MINUTES", help="no trial starts after this many minutes")
    auto.add_argument("--storage", metavar="URL",
                      help="Optuna storage URL that processes share (default: sqlite:///DIR/study.db)")
    auto.add_argument("--compare-recipe", metavar="FILE.toml",
                      help="also run this recipe's stages on MODEL and measure them beside the search's best and "
                           "Pareto files in the report (its [export] table, if any, must keep onnx alone)")
    auto.add_argument("--quick", action="store_true", help="one epoch per stage and short latency timing")
    auto.add_argument("--sampler-seed", type=int, metavar="S",
                      help="seed the sampler, for a search that repeats itself (not for processes sharing a study)")
    auto.add_argument("--unsafe", action="store_true", help="allow model files holding Lambda layers (arbitrary code)")
    auto.add_argument("--quiet", action="store_true", help="no progress output")
    auto.set_defaults(handler="cmd_auto")

    from compress.export.convert import DEFAULT_OPSET
    from compress.export.exporter import EXPORT_FORMATS, INT8_WEIGHT_TYPES
    from compress.export.parity import PARITY_SAMPLES

    export = commands.add_parser(
        "export",
        help="export a .keras model to ONNX / TFLite and check parity",
        description="Export MODEL (.keras; float, pruned, clustered, distilled or QAT) to OUT/model.onnx and/or "
        "OUT/model.tflite (int8 for QAT models), run each file beside the Keras model on fixed inputs and write "
        "OUT/parity.json and OUT/export.json; exit 2 when a file fails the parity check.",
    )
    export.add_argument("model", metavar="MODEL", help="input model (.keras)")
    export.add_argument("--format", action="append", choices=EXPORT_FORMATS,
                        help="output format; repeat for both (default: onnx)")
    export.add_argument("--out", required=True, metavar="DIR", help="output folder")
    export.add_argument("--chain", type=_comma_list, metavar="NAMES",
                        help="techniques that made the model, recorded in the file (e.g. prune,qat)")
    export.add_argument("--opset", type=_positive_int, default=DEFAULT_OPSET, help="ONNX opset, 17 or later")
    export.add_argument("--int8-weights", choices=INT8_WEIGHT_TYPES, default="auto",
                        help="how a QAT model's ONNX file stores weights: int8, uint8 (zero point 128, same values; "
                             "for x86 CPUs without VNNI, whose int8 kernels saturate), or auto (uint8 on such a CPU)")
    add_data_arguments(export, default=None, purpose=f" whose first {PARITY_SAMPLES:,} test images are the parity inputs")
    export.add_argument("--unsafe", action="store_true", help="allow model files holding Lambda layers (arbitrary code)")
    export.add_argument("--quiet", action="store_true", help="no progress output")
    export.set_defaults(handler="cmd_export")

    evaluate = commands.add_parser(
        "evaluate",
        help="measure a .onnx / .tflite / .keras / .h5 file's test accuracy in its own runtime",
        description="Top-1 accuracy of FILE on the data source's test split: .onnx in onnxruntime (CPU), .tflite in "
        "ai_edge_litert, .keras in Keras.",
    )
    evaluate.add_argument("file", metavar="FILE", help="model file (.onnx, .tflite, .keras or .h5)")
    add_data_arguments(evaluate)
    evaluate.add_argument("--batch-size", type=_positive_int, default=64, help="images per run (default: 64)")
    evaluate.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate only the first N test images")
    evaluate.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    evaluate.add_argument("--unsafe", action="store_true", help="allow .keras files holding Lambda layers")
    evaluate.set_defaults(handler="cmd_evaluate")

    from compress.sensitivity import DEFAULT_SPARSITIES, parse_sparsities

    sensitivity = commands.add_parser(
        "sensitivity",
        help="per-layer sensitivity to pruning and int8 on the validation split, and a proposal within a budget",
        description="For every Conv2D/SeparableConv2D/Dense layer alone: validation accuracy after zeroing its "
                    "smallest weights "
        "(or removing that share of its channels) at each sparsity (one-shot, no fine-tune), and the drop of "
        "quantizing it alone / keeping it alone float in an onnxruntime int8 file; proposes --layer-sparsity for prune and --float-layers for ptq within --max-drop. "
        "Writes OUT/sensitivity.json, .csv and .png.",
    )
    sensitivity.add_argument("model", metavar="MODEL", help="input model (.keras)")
    sensitivity.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_data_arguments(sensitivity)
    sensitivity.add_argument("--sparsities", type=_cli_type(parse_sparsities), metavar="LIST",
                             default=DEFAULT_SPARSITIES,
                             help="sparsities tried on each layer, in (0, 1) "
                                  f"(default: {_show_default(DEFAULT_SPARSITIES)})")
    sensitivity.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                             help="validation-accuracy points the proposal may lose, shared evenly by the layers "
                                  "(default: 1.0)")
    sensitivity.add_argument("--structure", choices=("none", "channels"), default="none",
                             help="none: zero a layer's smallest weights; channels: remove its channels with the "
                                  "smallest L1 norm (and the same ones of layers joined with it), as prune "
                                  "--structure channels does (default: none)")
    sensitivity.add_argument("--unsafe", action="store_true", help="allow model files holding Lambda layers")
    sensitivity.add_argument("--quiet", action="store_true", help="no progress output")
    sensitivity.set_defaults(handler="cmd_sensitivity")

    from compress import registry

    for technique in map(registry.get, registry.names()):
        sub = commands.add_parser(
            technique.name,
            help=technique.summary,
            description=f"{technique.summary}. Reads MODEL (.keras); writes OUT/model.keras and/or the files the "
            "technique makes, and OUT/stats.json.",
        )
        sub.add_argument("model", metavar="MODEL", help="input model (.keras)")
        sub.add_argument("--out", required=True, metavar="DIR", help="output folder")
        add_data_arguments(sub)
        add_config_arguments(sub, technique.config_class)
        sub.add_argument("--unsafe", action="store_true", help="allow model files holding Lambda layers (arbitrary code)")
        sub.add_argument("--quiet", action="store_true", help="no progress output")
        sub.set_defaults(handler="cmd_technique")
    return parser
