"""The results.json schema, in one place: the pipeline builds results with it, the report reads them through it.

results.json (read by other tools too)::

    {"machine": {...machine_info()...}, "baseline": NAME, "total_seconds": S, "batch_sizes": [1, 32],
     "stages": [{"name": ..., "seconds": ...}, ...],
     "variants": [{"name", "chain": [technique, ...], "file", "format", "accuracy" (fraction 0..1),
                   "file_bytes", "gzip_bytes", "params", "nonzero_params", "parity_ok",
                   "latency_ms_b<N>" for each N of batch_sizes}, ...]}

Every listed key must be present. A measured figure may be null where it was not measured; the report then says
"not measured", with the reason from the variant's optional ``"not_measured": {key: reason}``. Files written before
"batch_sizes" existed name their batch sizes only by their latency keys; those are read as the batch sizes.
Optional keys used when present: machine "latency_threads", "latency_rounds"; per variant "latency_p95_ms_b<N>",
"latency_cuda_ms_b<N>", "images_per_s_b<N>", "macs", "latency_threads", "weight_bytes_by_dtype", "notes",
"input_stage" (the stage this variant's stage read its model from: with "stage" and "precision", the summary finds an
int8 file's float source); top
level "cuda": {"measured": bool, "reason": str}, "refused": {stage: reason} (stages whose technique could not handle
the model), "keras_reference": {...keras_latency()...}, "notes": [str, ...].
Other keys are carried along, unread.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compress.errors import ConfigError

REQUIRED_TOP = ("machine", "baseline", "total_seconds", "stages", "variants")
REQUIRED_VARIANT = ("name", "chain", "file", "format", "accuracy", "file_bytes", "gzip_bytes", "params",
                    "nonzero_params", "parity_ok")
# Figures that may be null (not measured); the latency keys of every batch size join them.
MEASURED = ("accuracy", "file_bytes", "gzip_bytes", "params", "nonzero_params")
_LATENCY_KEY = re.compile(r"^latency_ms_b(\d+)$")
_CUDA_LATENCY_KEY = re.compile(r"^latency_cuda_ms_b(\d+)$")


def latency_key(batch: int, *, kind: str = "latency_ms") -> str:
    """'latency_ms_b1', 'latency_p95_ms_b32', 'latency_cuda_ms_b1' ...: one key per figure and batch size."""
    return f"{kind}_b{batch}"


def batch_sizes(results: dict) -> list[int]:
    """The batch sizes latency was measured at: `batch_sizes`, or those named by the variants' latency keys."""
    if "batch_sizes" in results:
        return [int(batch) for batch in results["batch_sizes"]]
    found = {int(match.group(1)) for v in results.get("variants", []) if isinstance(v, dict)
             for key in v if (match := _LATENCY_KEY.match(key))}
    return sorted(found)


def cuda_batch_sizes(results: dict) -> list[int]:
    """The CPU batch sizes and any other a variant was timed at on CUDA (measure/gpu.py's GPU_BATCH_SIZES)."""
    return sorted({*batch_sizes(results), *(int(match.group(1)) for v in results.get("variants", [])
                                            if isinstance(v, dict) for key in v
                                            if (match := _CUDA_LATENCY_KEY.match(key)))})


def measured_keys(results: dict) -> tuple[str, ...]:
    return (*MEASURED, *(latency_key(batch) for batch in batch_sizes(results)))


@dataclass
class VariantResult:
    """One exported file's figures, as the pipeline measured them; `to_dict` gives its results.json entry."""

    name: str
    stage: str
    chain: list[str]
    file: str
    format: str
    precision: str
    accuracy: float | None
    file_bytes: int | None
    gzip_bytes: int | None
    params: int | None
    nonzero_params: int | None
    parity_ok: bool | None
    parity: dict | None = None
    weight_bytes_by_dtype: dict | None = None
    latency: dict[int, dict] = field(default_factory=dict)  # batch size -> timing (median_ms, p95_ms, ...)
    cuda_latency: dict[int, dict] = field(default_factory=dict)
    not_measured: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # carried along unread: macs, notes, ...

    def to_dict(self, batches: list[int]) -> dict:
        entry = {key: value for key, value in asdict(self).items()
                 if key not in ("latency", "cuda_latency", "extra")}
        not_measured = dict(self.not_measured)
        for batch in batches:
            timing = self.latency.get(batch)
            entry[latency_key(batch)] = timing["median_ms"] if timing else None
            if timing:
                entry[latency_key(batch, kind="latency_p95_ms")] = timing["p95_ms"]
                entry[latency_key(batch, kind="images_per_s")] = timing["images_per_s"]
            else:
                not_measured.setdefault(latency_key(batch), "not timed")
        for batch in sorted(self.cuda_latency):  # the GPU batch sizes may go beyond the recipe's
            entry[latency_key(batch, kind="latency_cuda_ms")] = self.cuda_latency[batch]["median_ms"]
        entry["not_measured"] = not_measured
        return {**entry, **self.extra}


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate a results.json (or the results.json inside a folder); any problem is one ConfigError."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; run the pipeline first, or point to a run folder")
    try:
        results = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    validate_results(results, source=str(path))
    return results


def validate_results(results, *, source: str = "results") -> None:
    """Check the results.json contract: every required key present, with a value of the right kind."""
    if not isinstance(results, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    for key in REQUIRED_TOP:
        if key not in results:
            raise ConfigError(f"{source}: missing key {key!r}")
    if not isinstance(results["machine"], dict):
        raise ConfigError(f"{source}: 'machine' must be an object")
    if not isinstance(results["stages"], list):
        raise ConfigError(f"{source}: 'stages' must be a list")
    for index, stage in enumerate(results["stages"]):
        for key in ("name", "seconds"):
            if not isinstance(stage, dict) or key not in stage:
                raise ConfigError(f"{source}: stage {index}: missing key {key!r}")
        _check_number(stage["seconds"], f"{source}: stage {index} ({stage['name']!r}): 'seconds'")
    _check_number(results["total_seconds"], f"{source}: 'total_seconds'")
    variants = results["variants"]
    if not isinstance(variants, list) or not variants:
        raise ConfigError(f"{source}: 'variants' must be a non-empty list")
    batches = results.get("batch_sizes", [])
    if not isinstance(batches, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                                for b in batches):
        raise ConfigError(f"{source}: 'batch_sizes' must be a list of positive integers, got {batches!r}")
    measured = measured_keys(results)
    names = set()
    for index, variant in enumerate(variants):
        if not isinstance(variant, dict):
            raise ConfigError(f"{source}: variant {index} must be an object")
        label = f"variant {index} ({variant.get('name', '?')!r})"
        for key in (*REQUIRED_VARIANT, *measured):
            if key not in variant:
                raise ConfigError(f"{source}: {label}: missing key {key!r}")
        if not isinstance(variant["name"], str) or not variant["name"]:
            raise ConfigError(f"{source}: {label}: 'name' must be a non-empty string")
        if variant["name"] in names:
            raise ConfigError(f"{source}: variant name {variant['name']!r} appears twice")
        names.add(variant["name"])
        if not isinstance(variant["chain"], list) or not all(isinstance(step, str) for step in variant["chain"]):
            raise ConfigError(f"{source}: {label}: 'chain' must be a list of technique names")
        for key in measured:
            _check_number(variant[key], f"{source}: {label}: {key!r}")
        for batch in batch_sizes(results):
            for kind in ("latency_p95_ms", "latency_cuda_ms"):
                _check_number(variant.get(latency_key(batch, kind=kind)), f"{source}: {label}: '{kind}_b{batch}'")
        if variant["accuracy"] is not None and variant["accuracy"] > 1:
            raise ConfigError(
                f"{source}: {label}: 'accuracy' must be a fraction between 0 and 1, got {variant['accuracy']!r}"
            )
        if variant["parity_ok"] not in (True, False, None):
            raise ConfigError(f"{source}: {label}: 'parity_ok' must be true, false or null")
    if results["baseline"] not in names:
        raise ConfigError(f"{source}: baseline {results['baseline']!r} is not one of the variants")


def _check_number(value, what: str) -> None:
    """A measured figure is a non-negative finite number, or null (not measured)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number or null, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")
