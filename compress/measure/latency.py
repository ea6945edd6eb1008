"""Latency of exported files, taken the way a user deploys them: each file in its own runtime with a fixed thread
count, timed in interleaved rounds so that a drift in a shared machine's speed falls on every file alike.

`keras_latency` puts Keras' own numbers beside them, labelled as Keras, never mixed up with the files' numbers.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import numpy as np

from compress.errors import ConfigError, ModelError
from compress.runtimes import CPU, TimedCall, open_session

DEFAULT_TIMING = {"warmup": 10, "min_repeats": 50, "min_seconds": 1.0}
DEFAULT_ROUNDS = 10  # interleaved timing: turns each file gets
ROUND_WARMUP = 2  # untimed calls at the start of each turn


def measure_latency(
    run_callable: Callable[[Any], Any],
    inputs: Any,
    *,
    warmup: int = DEFAULT_TIMING["warmup"],
    min_repeats: int = DEFAULT_TIMING["min_repeats"],
    min_seconds: float = DEFAULT_TIMING["min_seconds"],
    batch_size: int | None = None,
) -> dict:
    """Call `run_callable(inputs)` `warmup` times, then time calls until both `min_repeats` and `min_seconds`.

    Returns median_ms, p95_ms, mean_ms, min_ms, images_per_s (batch / median), repeats, warmup and batch_size.
    The batch size is taken from `inputs` (an array, or a dict/list of arrays) unless given.
    """
    _check_timing_settings(warmup, min_repeats, min_seconds)
    batch = batch_size if batch_size is not None else _batch_of(inputs)
    for _ in range(warmup):
        run_callable(inputs)
    times_ns = _time_calls(lambda: run_callable(inputs), min_repeats, min_seconds)
    return _timing_summary(times_ns, batch, warmup)


def timed_file(path: str | os.PathLike, batch_size: int, *, threads: int = 1, provider: str = CPU,
               seed: int = 0) -> TimedCall:
    """A file loaded in its runtime (`threads` intra-op threads) with a batch of `batch_size` random images ready."""
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    return open_session(path, threads=threads, provider=provider).timer(batch_size, seed)


def file_latency(path: str | os.PathLike, batch_size: int, *, threads: int = 1, provider: str = CPU, seed: int = 0,
                 **timing) -> dict:
    """Latency of one file (see `timed_file`); `timing` passes warmup / min_repeats / min_seconds to
    `measure_latency`. The result records runtime, provider, threads and batch size beside the times."""
    loaded = timed_file(path, batch_size, threads=threads, provider=provider, seed=seed)
    return {**measure_latency(lambda _: loaded.run(), None, batch_size=loaded.batch_size, **timing), **loaded.labels}


def interleaved_latency(
    files: dict[str, TimedCall],
    *,
    rounds: int = DEFAULT_ROUNDS,
    warmup: int = DEFAULT_TIMING["warmup"],
    min_repeats: int = DEFAULT_TIMING["min_repeats"],
    min_seconds: float = DEFAULT_TIMING["min_seconds"],
) -> dict[str, dict]:
    """Time several loaded files in turns, so that a drift in the machine's speed falls on all of them alike.

    Each of `rounds` rounds times every file for 1/rounds of `min_repeats` calls and of `min_seconds` (after
    `ROUND_WARMUP` untimed calls, since the files before it took the caches), starting one file later each
    round. Per file: `measure_latency`'s figures over all its timed calls, plus `rounds` and its labels.
    """
    _check_timing_settings(warmup, min_repeats, min_seconds)
    if not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds!r}")
    for loaded in files.values():
        for _ in range(warmup):
            loaded.run()
    names = list(files)
    times_ns: dict[str, list[int]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            for _ in range(ROUND_WARMUP):
                files[name].run()
            times_ns[name] += _time_calls(files[name].run, -(-min_repeats // rounds), min_seconds / rounds)
    return {
        name: {**_timing_summary(times_ns[name], files[name].batch_size, warmup), "rounds": rounds,
               **files[name].labels}
        for name in names
    }


def _check_timing_settings(warmup: int, min_repeats: int, min_seconds: float) -> None:
    if warmup < 0 or min_repeats < 1 or min_seconds < 0:
        raise ConfigError(
            f"latency settings out of range: warmup {warmup} (>= 0), min_repeats {min_repeats} (>= 1), "
            f"min_seconds {min_seconds} (>= 0)"
        )


def _time_calls(run: Callable[[], Any], min_repeats: int, min_seconds: float) -> list[int]:
    """Nanoseconds of each call of `run()`, calling until both `min_repeats` calls and `min_seconds` are spent."""
    times_ns: list[int] = []
    budget_ns = min_seconds * 1e9
    spent_ns = 0
    while len(times_ns) < min_repeats or spent_ns < budget_ns:
        start = time.perf_counter_ns()
        run()
        elapsed = time.perf_counter_ns() - start
        times_ns.append(elapsed)
        spent_ns += elapsed
    return times_ns


def _timing_summary(times_ns: list[int], batch: int, warmup: int) -> dict:
    times_ms = np.array(times_ns, dtype=np.float64) / 1e6
    median = float(statistics.median(times_ms))
    median = max(median, 1e-6)  # a timer resolution of 0 must not divide by zero below
    return {
        "median_ms": median,
        "p95_ms": max(float(np.percentile(times_ms, 95)), median),
        "mean_ms": float(times_ms.mean()),
        "min_ms": float(times_ms.min()),
        "images_per_s": batch * 1000.0 / median,
        "repeats": len(times_ns),
        "warmup": warmup,
        "batch_size": batch,
    }


def _batch_of(inputs) -> int:
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()), None)
    elif isinstance(inputs, (list, tuple)):
        inputs = inputs[0] if inputs else None
    shape = getattr(inputs, "shape", None)
    if not shape:
        raise ConfigError("cannot tell the batch size from the inputs; pass batch_size")
    return int(shape[0])


def keras_latency(model, batch_size: int, *, seed: int = 0, **timing) -> dict:
    """Keras-side reference latencies, labelled: `model.predict(x, verbose=0)` and a `tf.function(model)` call.

    These are not the exported files' numbers: predict (as the article serves the model) pays Keras' per-call
    overhead; the tf.function call is the graph alone. TensorFlow's own thread pools are used as configured
    (0 means "all cores"), and recorded.
    """
    from compress.keras import keras, tf

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    input_shape = model.input_shape
    if isinstance(input_shape, list):
        raise ModelError("keras_latency handles single-input models only")
    shape = [batch_size, *input_shape[1:]]
    if any(dim is None for dim in shape):
        raise ModelError(f"model input has dynamic dimensions besides the batch: {input_shape}")
    x = np.random.default_rng(seed).random(shape, dtype=np.float32)
    threads = {
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
    }

    predict = measure_latency(lambda v: model.predict(v, batch_size=batch_size, verbose=0), x, **timing)
    predict.update(label="Keras model.predict(x, verbose=0)", runtime=f"tf_keras {keras.__version__}")
    graph = tf.function(model)
    x_tensor = tf.constant(x)
    # .numpy() makes the call wait for the result and hand back an array, as predict does.
    call = measure_latency(lambda v: graph(v, training=False).numpy(), x_tensor, batch_size=batch_size, **timing)
    call.update(label="tf.function(model) call", runtime=f"tensorflow {tf.__version__}")
    for entry in (predict, call):
        entry["threads"] = threads
    return {"predict": predict, "tf_function": call, "batch_size": batch_size}
