"""The `compress` command: parses options into configs and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from compress.data import CIFAR10_DIR_ENV, KNOWN_SOURCES
from compress.errors import CompressError


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default="cifar10-mini",
        metavar="SOURCE",
        help=f"data source: {', '.join(KNOWN_SOURCES)} (default: cifar10-mini, shipped with the package)",
    )
    group.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"class-folder copy of CIFAR-10 for --data cifar10 (default: ${CIFAR10_DIR_ENV}, else Keras' download)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed for the validation split, shuffling and training")
    group.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of each class's training images kept for validation"
    )
    group.add_argument(
        "--image-size", type=_image_size, metavar="HxW", help="resize every image to HxW (e.g. 32x32)"
    )


def _image_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 32x32, got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return height, width


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def load_data_from_args(args: argparse.Namespace):
    from compress.data import load_data

    return load_data(
        args.data, data_dir=args.data_dir, seed=args.seed, val_fraction=args.val_fraction, image_size=args.image_size
    )


def keras_verbosity(args: argparse.Namespace) -> int:
    """Keras' progress bar on a terminal, one line per epoch in a log, nothing with --quiet."""
    if args.quiet:
        return 0
    return 1 if sys.stdout.isatty() else 2


def cmd_train(args: argparse.Namespace) -> int:
    from baseline.train import TrainConfig, train_baseline
    from compress.io import check_output_dir, save_model, write_json

    config = TrainConfig(recipe=args.recipe, epochs=args.epochs, seed=args.seed)
    out = check_output_dir(args.out)
    data = load_data_from_args(args)
    info(args, f"training the article's CNN on {data.source}: {data.describe()['counts']} images, recipe {config.recipe}")
    model, metrics = train_baseline(data, config, verbose=keras_verbosity(args))
    save_model(model, out / "model.keras")
    write_json(out / "metrics.json", metrics)
    info(args, f"test accuracy {metrics['test_accuracy']:.4f}; wrote {out / 'model.keras'} and {out / 'metrics.json'}")
    return 0


def cmd_technique(args: argparse.Namespace) -> int:
    """Apply one registered technique to a model file; writes OUT/model.keras (if any), its files and OUT/stats.json."""
    from compress import registry
    from compress.io import check_output_dir, load_model, save_model, write_json

    technique = registry.get(args.command)
    settings = {name: value for name, value in vars(args).items() if name.startswith(CONFIG_PREFIX) and value is not None}
    config = technique.config_class.from_dict({name[len(CONFIG_PREFIX):]: value for name, value in settings.items()})
    out = check_output_dir(args.out)
    model = load_model(args.model, unsafe=args.unsafe)
    data = load_data_from_args(args)
    info(args, f"{technique.name}: {technique.summary}")
    outcome = technique.apply(model, config, data, out_dir=out, verbose=keras_verbosity(args))
    written = dict(outcome.files)
    if outcome.model is not None:
        written["model"] = save_model(outcome.model, out / "model.keras")
    stats = {
        "technique": technique.name,
        "input": str(args.model),
        "config": config.to_dict(),
        "stats": outcome.stats,
        "files": {name: str(path) for name, path in written.items()},
    }
    write_json(out / "stats.json", stats)
    info(args, f"wrote {', '.join(str(path) for path in written.values())} and {out / 'stats.json'}")
    return 0


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
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def info(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, flush=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) rather than the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from baseline.train import RECIPES

    parser = OneLineParser(
        prog="compress",
        description="Compress trained Keras models and measure the exported files.",
    )
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
        "--recipe",
        choices=sorted(RECIPES),
        default="default",
        help="; ".join(f"{name}: {recipe.summary}" for name, recipe in RECIPES.items()),
    )
    train.add_argument("--out", required=True, metavar="DIR", help="output folder")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.set_defaults(handler=cmd_train)

    from compress import registry

    for technique in registry.available():
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
        sub.set_defaults(handler=cmd_technique)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code
    try:
        return args.handler(args)
    except CompressError as exc:
        print(f"compress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compress: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
