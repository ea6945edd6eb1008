"""The `compress` command: parses options into configs and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
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


def info(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, flush=True)


def build_parser() -> argparse.ArgumentParser:
    from baseline.train import RECIPES

    parser = argparse.ArgumentParser(
        prog="compress",
        description="Compress trained Keras models and measure the exported files.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
