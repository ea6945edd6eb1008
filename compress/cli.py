"""The `compress` command: options (compress.cli_parser) into configs, then the library; nothing else lives here."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from compress.cli_parser import CONFIG_PREFIX, DEBUG_ENV, build_parser
from compress.errors import MAX_MESSAGE_CHARS, CompressError, ConfigError


def data_arguments(args: argparse.Namespace) -> dict:
    """compress.data.load_data's keyword arguments. The full set's folder, named by --data-dir or by
    $COMPRESS_CIFAR10_DIR, is written in as an absolute path: run folders are keyed by these arguments, so a rerun
    resumes whichever of the two names the folder."""
    from compress.data import CIFAR10_DIR_ENV

    data_dir = args.data_dir
    if data_dir is None and args.data == "cifar10":
        data_dir = os.environ.get(CIFAR10_DIR_ENV) or None
    return dict(source=args.data, data_dir=None if data_dir is None else str(Path(data_dir).resolve()),
                seed=args.seed, val_fraction=args.val_fraction, image_size=args.image_size,
                **({"skip_unreadable": True} if args.skip_unreadable else {}))  # absent: earlier run keys hold


def data_arguments_for_model(args: argparse.Namespace, model_path, log) -> dict:
    """`data_arguments`, with the images resized to the input size the model file declares where --image-size is
    not given and the images (their first few of each class) are not all that size already; said."""
    from compress.checks import declared_image_size
    from compress.data import sample_image_sizes

    arguments = data_arguments(args)
    if arguments["image_size"] is not None or not model_path:
        return arguments
    size = declared_image_size(Path(model_path))
    found = sample_image_sizes(**arguments) if size is not None else set()
    if not found or found == {size}:
        return arguments
    sizes = ", ".join(f"{height}x{width}" for height, width in sorted(found)[:3]) + (" ..." if len(found) > 3 else "")
    log(f"images: {sizes} resized to {size[0]}x{size[1]}, the input size of {Path(model_path).name} "
        "(--image-size HxW sets another)")
    return {**arguments, "image_size": size}


def load_data_from_args(args: argparse.Namespace):
    from compress.data import load_data

    log = lambda message: info(args, message)  # noqa: E731
    model_path = getattr(args, "model", None) or getattr(args, "file", None)
    data = load_data(**data_arguments_for_model(args, model_path, log), log=log)
    for note in data.notes:
        info(args, f"data: {note}")
    return data


def keras_verbosity(args: argparse.Namespace) -> int:
    """Keras' progress bar on a terminal, one line per epoch in a log, nothing with --quiet."""
    if args.quiet:
        return 0
    return 1 if sys.stdout.isatty() else 2


def cmd_train(args: argparse.Namespace) -> int:
    from baseline.train import TrainConfig, train_baseline
    from compress.checks import check_writable
    from compress.files import write_json
    from compress.kerasmodel import save_model

    config = TrainConfig(recipe=args.training_recipe, epochs=args.epochs, seed=args.seed)
    out = check_writable(args.out)
    data = load_data_from_args(args)
    info(args, f"training the article's CNN on {data.source}: {data.describe()['counts']} images, recipe {config.recipe}")
    model, metrics = train_baseline(data, config, verbose=keras_verbosity(args))
    save_model(model, out / "model.keras")
    write_json(out / "metrics.json", metrics)
    info(args, f"test accuracy {metrics['test_accuracy']:.4f}; wrote {out / 'model.keras'} and {out / 'metrics.json'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from compress.pipeline import RunOptions, describe_plan, load_recipe, run

    recipe = load_recipe(args.recipe, quick=args.quick, unsupported=args.unsupported)
    out = args.out or default_run_dir(args)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    options = RunOptions(
        out=Path(out),
        data_args=data_arguments_for_model(args, args.model, log),
        model=Path(args.model) if args.model else None,
        unsafe=args.unsafe,
        remeasure=args.remeasure,
        input_range=args.input_range,
        verbose=keras_verbosity(args),
        log=log,
    )
    if args.dry_run:
        print(f"plan for {out}:")
        print("\n".join(describe_plan(recipe, options)))
        return 0
    from compress.report.summary import format_summary, summarize

    results = run(recipe, options)
    info(args, "\n".join(format_summary(summarize(results))))
    return 0


def cmd_auto(args: argparse.Namespace) -> int:
    from compress.auto import AutoConfig, run_auto

    config = AutoConfig(max_drop=args.max_drop, objective=args.objective, trials=args.trials,
                        time_budget=args.time_budget, storage=args.storage, quick=args.quick,
                        seed=args.sampler_seed)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    run_auto(args.model, data_arguments_for_model(args, args.model, log), args.out, config, unsafe=args.unsafe,
             input_range=args.input_range, compare_recipe=args.compare_recipe, log=log)
    return 0


def default_run_dir(args: argparse.Namespace) -> str:
    """runs/<recipe>-<data>[-quick]: the same command reuses, and so resumes, the same folder."""
    recipe = Path(args.recipe).stem if args.recipe else "default"
    data = args.data.replace("folder:", "folder-").replace("/", "_").strip("_") or "data"
    return str(Path("runs") / f"{recipe}-{data}{'-quick' if args.quick else ''}")


def cmd_technique(args: argparse.Namespace) -> int:
    """Apply one registered technique to a model file; writes OUT/model.keras (if any), its files and OUT/stats.json."""
    from compress import registry
    from compress.checks import check_writable
    from compress.files import write_json
    from compress.kerasmodel import save_model

    technique = registry.get(args.command)
    settings = {name: value for name, value in vars(args).items() if name.startswith(CONFIG_PREFIX) and value is not None}
    config = technique.config_class.from_dict({name[len(CONFIG_PREFIX):]: value for name, value in settings.items()})
    out = check_writable(args.out)
    model, data, source = _user_model(args, load_data_from_args(args))
    info(args, f"{technique.name}: {technique.summary}")
    outcome = technique.apply(model, config, data, out_dir=out, verbose=keras_verbosity(args))
    written = dict(outcome.files)
    if outcome.model is not None:
        written["model"] = save_model(outcome.model, out / "model.keras")
    stats = {
        "technique": technique.name,
        "input": str(args.model),
        "input_model": source,
        "input_range": data.input_range,
        "config": config.to_dict(),
        "stats": outcome.stats,
        "files": {name: str(path) for name, path in written.items()},
    }
    write_json(out / "stats.json", stats)
    info(args, f"wrote {', '.join(str(path) for path in written.values())} and {out / 'stats.json'}")
    return 0


def _user_model(args: argparse.Namespace, data):
    """(model, data, source): the model of `args.model`, `data` in the range that model takes, the two checked
    against each other before any work, and where the model came from (a Keras 3 file is translated to tf_keras
    and must reproduce the original on the first test images)."""
    from compress.checks import (check_model_fits_data, class_order_note, decide_input_range, in_plain_form,
                                 matched_to_data)
    from compress.kerasmodel import load_model_with_source, translation_note

    log = lambda message: info(args, message)  # noqa: E731
    samples = data.normalized("test")[0][:256] if data is not None else None
    model, source = load_model_with_source(args.model, unsafe=args.unsafe, sample_images=samples)
    if translation_note(source):
        log(translation_note(source))
    if data is not None:
        model, data = matched_to_data(model, data, log)
        data = data.with_input_range(decide_input_range(model, args.input_range, log, data))
        check_model_fits_data(model, data, log=log)
        note = class_order_note(model, data)
        if note is not None:
            print(f"warning: {note}", file=sys.stderr, flush=True)
    elif len(getattr(model, "inputs", None) or []) == 1:
        model = in_plain_form(model, log)
    return model, data, source


def cmd_report(args: argparse.Namespace) -> int:
    from compress.report import write_report
    from compress.report.summary import format_summary, summarize
    from compress.results import load_results

    results = load_results(f"{args.dir}/results.json")
    for path in write_report(results, args.dir):
        info(args, f"wrote {path}")
    for line in format_summary(summarize(results)):
        info(args, line)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a .keras model to ONNX / TFLite, check parity; exit 2 when a file fails its parity check."""
    from compress.checks import check_writable
    from compress.errors import ExportError
    from compress.export.exporter import export_model
    from compress.files import sha256_file
    from compress.export.parity import parity_failure_message

    check_writable(args.out)
    model, data, _ = _user_model(args, load_data_from_args(args) if args.data else None)
    result = export_model(
        model, args.out, formats=args.format or ["onnx"], data=data, chain=args.chain,
        source_hash=sha256_file(args.model), opset=args.opset, int8_weights=args.int8_weights,
    )
    for file in result["files"].values():
        check = result["parity"]["files"][Path(file["path"]).name]
        diff = "n/a" if check["max_abs_diff"] is None else f"{check['max_abs_diff']:.3g}"
        info(args, f"{file['path']}: {file['precision']}, {file['bytes']:,} bytes; {check['runtime']} vs Keras: "
                   f"top-1 agreement {check['top1_agreement']:.2%}, max |diff| {diff}{'' if check['ok'] else ' FAILED'}")
    if not result["parity_ok"]:
        raise ExportError(parity_failure_message(result, f"{args.out}/parity.json"))
    info(args, f"wrote {', '.join(item['path'] for item in result['files'].values())}, "
               f"{args.out}/parity.json and {args.out}/export.json")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Accuracy of a .onnx / .tflite / .keras / .h5 file on the test split, measured in the file's own runtime."""
    from compress.checks import check_writable, file_input_range, near_chance_note
    from compress.files import write_json
    from compress.measure.accuracy import evaluate_file

    if args.json:
        if Path(args.json).is_dir():
            raise ConfigError(f"--json {args.json} is a folder; give a file path such as {Path(args.json) / 'result.json'}")
        check_writable(Path(args.json).parent)
    data = load_data_from_args(args)
    data = data.with_input_range(file_input_range(args.file, args.input_range, unsafe=args.unsafe,
                                                  log=lambda message: info(args, message), data=data))
    result = evaluate_file(args.file, data, batch_size=args.batch_size, unsafe=args.unsafe, limit=args.limit)
    if "images_converted" in result:
        info(args, f"images: {result['images_converted']} for {Path(args.file).name}")
    print(f"{result['file']}: accuracy {result['accuracy']:.4f} on {result['images']} {data.source} test images "
          f"({result['runtime']}, {result['device']})", flush=True)
    note = near_chance_note("the file", result["accuracy"], data)
    if note is not None:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    if args.json:
        write_json(args.json, result)
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """Per-layer pruning and int8 sensitivity on the validation split, and a proposal within --max-drop."""
    from compress.checks import check_writable
    from compress.sensitivity import SensitivityConfig, analyse

    config = SensitivityConfig(sparsities=args.sparsities, max_drop=args.max_drop, structure=args.structure)
    out = check_writable(args.out)
    model, data, _ = _user_model(args, load_data_from_args(args))
    analyse(model, data, config, out_dir=out, log=lambda message: info(args, message))
    info(args, f"wrote {out / 'sensitivity.json'}, {out / 'sensitivity.csv'} and {out / 'sensitivity.png'}")
    return 0


def info(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, flush=True)


# The parser names each subcommand's handler; the names are resolved here, so that options know no commands.
HANDLERS = {
    "cmd_train": cmd_train,
    "cmd_run": cmd_run,
    "cmd_auto": cmd_auto,
    "cmd_technique": cmd_technique,
    "cmd_report": cmd_report,
    "cmd_export": cmd_export,
    "cmd_evaluate": cmd_evaluate,
    "cmd_sensitivity": cmd_sensitivity,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv[:1] or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    from compress.keras import configure

    configure(quiet=not debug)
    with contextlib.nullcontext() if debug else _native_logs_silenced():
        return _main(argv, debug)


def _main(argv: list[str], debug: bool) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code
    try:
        return HANDLERS[args.handler](args)
    except CompressError as exc:
        if debug:
            raise
        print(f"compress: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permission denied ... while writing: the user's machine, not a bug
        if debug:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"compress: error: cannot read or write{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compress: interrupted", file=sys.stderr)
        return 130


def _one_line(message: str) -> str:
    line = " ".join(message.split())
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 1] + "…"


@contextlib.contextmanager
def _native_logs_silenced():
    """Send what TensorFlow's C++ code writes to file descriptor 2 (oneDNN, CPU features, cuInit, XNNPACK lines that
    its log-level settings no longer stop) to nowhere, while Python's own stderr, ours, stays on the terminal."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to redirect (a closed descriptor): nothing to silence
        yield
        return
    python_stderr = sys.stderr
    python_stderr.flush()
    try:
        on_fd2 = python_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a test harness's in-memory stream: it is not on fd 2
        on_fd2 = False
    if on_fd2:
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding=python_stderr.encoding,
                               errors="backslashreplace")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if sys.stderr is not python_stderr:
            sys.stderr.close()
            sys.stderr = python_stderr


if __name__ == "__main__":
    sys.exit(main())
