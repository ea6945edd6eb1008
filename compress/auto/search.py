"""`compress auto`: an Optuna study over compression chains. Each trial runs its chain through the pipeline into one
stage folder all trials share (OUT/stages, stages named by a hash of their chain prefix, so a shared prefix is trained
once) and is judged on its exported file: validation accuracy, gzip bytes, batch-1 latency.

    OUT/auto.json   every trial, the Pareto front, `best` (within the accuracy budget, or else the nearest miss)
    OUT/best/       best's file, replaced after every trial that beats it; OUT/best.toml the recipe rebuilding it
    OUT/study.db    the study (default storage): a rerun continues it, several processes may share it

The test split is measured only at the end, for the best and the Pareto files: decisions never see it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path

from compress.auto import space
from compress.auto.space import (
    layer_plans,
    readable_names,
    recipe_text,
    resolve_channel_plans,
    sample,
    stage_names,
    starting_points,
)
from compress.auto.study import (
    STUDY_PREFIX,
    AutoConfig,
    finished_trials,
    open_study,
    study_is_done,
)
from compress.errors import CompressError, ConfigError, ModelError
from compress.files import FileLock, atomic_path, check_output_dir, sha256_file, write_json, write_text
from compress.pipeline.folders import RunOptions, digest_of, jsonable, read_manifest, stage_dir
from compress.pipeline.recipe import BASELINE, load_recipe, parse_recipe
from compress.pipeline.runner import run_stages

LATENCY = {False: {"min_seconds": 0.5}, True: {"min_seconds": 0.05, "warmup": 3, "min_repeats": 10}}


def run_auto(model: str | Path, data_args: dict, out: str | Path, config: AutoConfig, *, unsafe: bool = False,
             input_range: str = "auto", compare_recipe: str | Path | None = None, log=print) -> dict:
    """Search until the study holds `config.trials` trials or the time budget is spent, then measure the best and
    Pareto files beside `compare_recipe`'s stages (if any) for the report; returns auto.json's dict."""
    from compress.checks import check_writable
    from compress.data import load_data
    from compress.measure.accuracy import evaluate_file

    out = check_writable(check_output_dir(out))
    model = Path(model)
    if not model.is_file():
        raise ConfigError(f"model file {model} does not exist")
    compare_text = None if compare_recipe is None else read_compare_recipe(compare_recipe, config.quick)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = load_data(**data_args, log=log).fingerprint()
    name = STUDY_PREFIX + digest_of({"model": sha256_file(model), "data": jsonable(data_args),
                                     "data_fingerprint": fingerprint, "quick": config.quick,
                                     "max_drop": config.max_drop, "objective": config.objective,
                                     "space": space.fingerprint(config.quick)})
    url = config.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    with FileLock(out / ".study.lock"):  # processes starting together would race to create the tables
        study = open_study(config, url, name)
        if not study.trials:
            for point in starting_points(config.quick)[: config.trials]:
                study.enqueue_trial(point)
    options = RunOptions(out=out / "stages", data_args=data_args, model=model, unsafe=unsafe,
                         input_range=input_range, lock_stages=True, verbose=0, log=stage_progress(log))
    data, _ = run_stages(parse_recipe(recipe_text([], [])), options)
    baseline_file, _ = final_file(options.out, BASELINE)
    search = Search(config, out, study, options, data, log)
    search.compare_text = compare_text
    if "sensitivity-prune-qat" in space.CHAINS:  # (tests put a space of their own in its place)
        search.plans = layer_plans(stage_dir(options.out, BASELINE) / "model.keras", data, config.max_drop,
                                   out / "sensitivity", unsafe=unsafe, log=log)
    search.header = {"model": str(model), "data": jsonable(data_args), "study": name, "storage": url,
                     "objective": config.objective, "max_drop_points": config.max_drop,
                     "layer_plans": {str(scale): plan for scale, plan in search.plans.items()},
                     "baseline": {"file": str(baseline_file.relative_to(out)),
                                  "val_accuracy": evaluate_file(baseline_file, data, split="val")["accuracy"]}}
    log(f"study {name} in {url}: {finished_trials(study)} of {config.trials} trials so far; baseline val accuracy "
        f"{search.header['baseline']['val_accuracy']:.4f}, budget {config.max_drop} points")
    search.loop()
    return search.finish()


def stage_progress(log):
    """The pipeline's lines as a trial's stages start and end, indented, so that a long trial shows where it is;
    the rest (skipped stages, the checks every trial repeats) left out."""
    def progress(message: str) -> None:
        if message.endswith(" ...") or message.lstrip().startswith(("done in", "refused:")):
            log(f"    {message.strip()}")
    return progress


def read_compare_recipe(path: str | Path, quick: bool) -> str:
    """The text of a recipe whose stages the report measures beside the search's files, checked before the search.
    Its [export] formats must be the search's: they are part of every stage's key, the baseline's included."""
    recipe = load_recipe(path, quick=quick)
    if recipe.baseline_export != parse_recipe("").baseline_export:
        raise ConfigError(f"--compare-recipe {path}: its [export] formats ({', '.join(recipe.baseline_export)}) "
                          f"differ from the search's ({', '.join(parse_recipe('').baseline_export)}); drop its "
                          "[export] table")
    return recipe.source


def final_file(stages: Path, name: str) -> tuple[Path, bool]:
    """A finished stage's ONNX file (the space makes one per stage) and whether it passed its parity check."""
    folder = stage_dir(stages, name)
    manifest = read_manifest(folder)
    if manifest.get("refused") is not None:
        raise ModelError(f"stage {name} was refused: {manifest['refused']}")
    entry = next(entry for entry in manifest["export"].values() if entry["path"].endswith(".onnx"))
    return folder / Path(entry["path"]).name, bool(entry["parity"]["ok"])


class Search:
    """One process's share of the study; `header` is auto.json's fixed part, set before `loop`."""

    def __init__(self, config: AutoConfig, out: Path, study, options: RunOptions, data, log):
        self.config, self.out, self.study, self.options, self.data, self.log = config, out, study, options, data, log
        self.started = time.monotonic()
        self.gate = FileLock(out / ".trials.lock")
        self.header: dict = {}
        self.compare_text: str | None = None  # a recipe whose stages the report measures beside the search's files
        self.plans: dict = {}  # budget multiple -> per-layer prune settings (space.layer_plans)

    def loop(self) -> None:
        """One trial at a time. Counting the study's trials and creating the next one happen under a lock shared
        by every process on OUT (the objective releases it), so together they stop at exactly --trials."""
        while self.seconds_left() is None or self.seconds_left() > 0:
            with self.gate:
                if study_is_done(self.study, self.config.trials):
                    break
                self.study.optimize(self.objective, n_trials=1, catch=(CompressError,), callbacks=[self.record])

    def seconds_left(self) -> float | None:
        if self.config.time_budget is None:
            return None
        return self.config.time_budget * 60 - (time.monotonic() - self.started)

    def objective(self, trial) -> list[float]:
        from compress.measure.accuracy import evaluate_file
        from compress.measure.latency import file_latency
        from compress.measure.sizes import file_size

        self.gate.release()  # the trial exists now: other processes may count it and start theirs
        started = time.perf_counter()
        try:
            chain, stages = sample(trial, self.config.quick, self.plans)
        except CompressError as exc:
            self.log(f"trial {trial.number}: failed: {exc}")
            raise
        trial.set_user_attr("chain", chain)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            stages = resolve_channel_plans(stages, self.run_prefix, self.channel_plans)
            trial.set_user_attr("stages", [{"technique": technique, "settings": settings}
                                           for technique, settings in stages])
            names = stage_names(stages)
            run_stages(parse_recipe(recipe_text(stages, names), where=f"trial {trial.number}'s recipe"), self.options)
            path, parity_ok = final_file(self.options.out, names[-1])
            figures = {"val_accuracy": evaluate_file(path, self.data, split="val")["accuracy"],
                       "gzip_bytes": file_size(path)["gzip_bytes"],
                       "latency_ms": file_latency(path, 1, **LATENCY[self.config.quick])["median_ms"]}
        except CompressError as exc:
            self.log(f"trial {trial.number} {chain}: failed: {exc}")
            raise
        baseline = self.header["baseline"]["val_accuracy"]
        figures.update(parity_ok=parity_ok, file=str(path.relative_to(self.out)),
                       seconds=round(time.perf_counter() - started, 2),
                       constraint=baseline - figures["val_accuracy"] - self.config.max_drop / 100)
        for key, value in figures.items():
            trial.set_user_attr(key, value)
        trial.set_constraint("accuracy_budget", figures["constraint"])  # <= 0: within; NSGA-II and best_trials use it
        return [figures["val_accuracy"],
                *([figures["gzip_bytes"]] if self.config.objective in ("size", "both") else []),
                *([figures["latency_ms"]] if self.config.objective in ("latency", "both") else [])]

    def run_prefix(self, stages: list[tuple[str, dict]]) -> Path:
        """Train `stages` (a chain's first stages) and return the model file they end in."""
        names = stage_names(stages)
        run_stages(parse_recipe(recipe_text(stages, names), where="a chain's first stages"), self.options)
        return stage_dir(self.options.out, names[-1] if names else BASELINE) / "model.keras"

    def channel_plans(self, model_path: Path, stage_name: str) -> dict:
        """Per-layer channel shares for each planned share of the weights, from the channel sensitivity of a stage's
        model (kept in OUT/sensitivity/channels-STAGE)."""
        folder = self.out / "sensitivity" / f"channels-{stage_name}"
        return layer_plans(model_path, self.data, self.config.max_drop, folder, unsafe=self.options.unsafe,
                           log=self.log, structure="channels")

    def record(self, study, trial) -> None:
        """After every trial: auto.json, best/ and best.toml brought up to date, and one progress line."""
        summary = self.write()
        if trial.state.name != "COMPLETE":
            return
        row = next(row for row in summary["trials"] if row["number"] == trial.number)
        left = self.seconds_left()
        if left is None:
            left = f"{max(self.config.trials - finished_trials(study), 0)} trial(s) left"
        else:
            left = f"{left / 60:.1f} min left" if left > 0 else "time budget spent"
        self.log(f"trial {trial.number} {describe(row)}, parity {'ok' if row['parity_ok'] else 'FAILED'}, "
                 f"{row['seconds']:.0f} s | best: {describe_best(summary['best'])} | {left}")

    def write(self, test_split: bool = False) -> dict:
        """auto.json from the study's trials (every process's), best/ and best.toml; with `test_split`, the best and
        Pareto files' test accuracy too. One process at a time, under OUT/.auto.lock."""
        with FileLock(self.out / ".auto.lock"):
            try:
                previous = json.loads((self.out / "auto.json").read_text())
            except (OSError, ValueError):
                previous = {}
            tested = {row["number"]: row["test_accuracy"] for row in previous.get("trials", [])
                      if row.get("test_accuracy") is not None}
            summary = self.summarize(tested)
            if test_split:
                self.measure_test(summary, tested)
                summary = self.summarize(tested)
            if summary["best"] is not None:
                self.keep_best(summary["best"])
            write_json(self.out / "auto.json", summary)
            return summary

    def summarize(self, tested: dict) -> dict:
        baseline = self.header["baseline"]["val_accuracy"]
        rows = [trial_row(trial, baseline, tested.get(trial.number)) for trial in self.study.get_trials(deepcopy=False)]
        done = [row for row in rows if row["state"] == "COMPLETE"]
        within = [row for row in done if row["drop_points"] <= self.config.max_drop]
        if within:
            best = dict(min(within, key=self.cost), within_budget=True, missed_by_points=0.0)
        elif done:
            best = max(done, key=lambda row: row["val_accuracy"])
            missed = round(best["drop_points"] - self.config.max_drop, 3)
            best = dict(best, within_budget=False, missed_by_points=missed)
        else:
            best = None
        pareto = sorted(trial.number for trial in self.study.best_trials) if done else []
        return {**self.header, "trials": rows, "pareto": pareto, "best": best}

    def cost(self, row: dict) -> float:
        """What `best` minimizes within the budget: gzip bytes, latency, or (both) their product."""
        return {"size": row["gzip_bytes"], "latency": row["latency_ms"],
                "both": row["gzip_bytes"] * row["latency_ms"]}[self.config.objective]

    def measure_test(self, summary: dict, tested: dict) -> None:
        from compress.measure.accuracy import evaluate_file

        wanted = set(summary["pareto"]) | ({summary["best"]["number"]} if summary["best"] else set())
        for row in summary["trials"]:
            if row["number"] in wanted and row["number"] not in tested:
                tested[row["number"]] = evaluate_file(self.out / row["file"], self.data)["accuracy"]
        baseline = self.header["baseline"]
        if "test_accuracy" not in baseline:
            baseline["test_accuracy"] = evaluate_file(self.out / baseline["file"], self.data)["accuracy"]

    def keep_best(self, best: dict) -> None:
        """Copy best's file to OUT/best/ (unless already there) and write the recipe that rebuilds it."""
        source = self.out / best["file"]
        target = self.out / "best" / source.name
        if not (target.is_file() and sha256_file(target) == sha256_file(source)):
            for old in target.parent.glob("*"):
                old.unlink()
            with atomic_path(target) as partial:
                shutil.copyfile(source, partial)
        stages = [(stage["technique"], stage["settings"]) for stage in best["stages"]]
        comment = (f"compress auto's best (trial {best['number']}): {describe(best)}\n"
                   f"rebuild it: compress run --recipe best.toml --model {self.header['model']} (same data options)")
        write_text(self.out / "best.toml", recipe_text(stages, readable_names(stages), comment=comment))

    def finish(self) -> dict:
        """Test accuracy of the best and Pareto files, measured once, and the closing lines."""
        summary = self.write(test_split=True)
        best = summary["best"]
        done = sum(row["state"] == "COMPLETE" for row in summary["trials"])
        self.log(f"{len(summary['trials'])} trial(s) in the study, {done} complete; Pareto front: "
                 f"{', '.join(f'#{number}' for number in summary['pareto']) or 'none within the budget'}")
        if best is not None:
            self.log(f"best: {describe_best(best)}, test accuracy {best['test_accuracy']:.4f} "
                     f"(baseline {summary['baseline']['test_accuracy']:.4f}); wrote {self.out / 'best'}, "
                     f"{self.out / 'best.toml'}, {self.out / 'auto.json'}")
            written = self.report(summary)
            self.log(f"wrote {', '.join(str(path) for path in written)}")
        return summary

    def report(self, summary: dict) -> list[Path]:
        """The best and Pareto files (with the stages of their chains) and the compare recipe's stages, measured
        side by side as `compress run` measures: OUT/results.json, report.md, results.csv and the plots."""
        from compress.pipeline.measure import measure_run
        from compress.report import write_report

        rows = {row["number"]: row for row in summary["trials"]}
        text = self.compare_text or recipe_text([], [], min_seconds=LATENCY[self.config.quick]["min_seconds"])
        written: set[str] = set()
        for number in sorted({*summary["pareto"], summary["best"]["number"]}):
            stages = [(stage["technique"], stage["settings"]) for stage in rows[number]["stages"]]
            names = stage_names(stages)
            text += "\n" + recipe_text(stages, names, skip=written)
            written.update(names)
        recipe = parse_recipe(text, quick=self.config.quick, where="the report's recipe")
        self.log(f"report: the search's {len(written)} stage(s) and {len(recipe.stages) - len(written)} of the "
                 "compare recipe, measured side by side")
        options = replace(self.options, log=self.log, verbose=2)
        started = time.perf_counter()
        data, seconds = run_stages(recipe, options, started)
        results = measure_run(recipe, options, data, [BASELINE, *(stage.name for stage in recipe.stages)], seconds,
                              started)
        write_json(self.out / "results.json", results)
        return [self.out / "results.json", *write_report(results, self.out)]


def trial_row(trial, baseline: float, test_accuracy: float | None) -> dict:
    attrs = trial.user_attrs
    val = attrs.get("val_accuracy")
    return {"number": trial.number, "state": trial.state.name, "worker": attrs.get("worker"),
            "chain": attrs.get("chain"),
            "stages": attrs.get("stages"), "val_accuracy": val, "test_accuracy": test_accuracy,
            "drop_points": None if val is None else round((baseline - val) * 100, 3),
            "gzip_bytes": attrs.get("gzip_bytes"), "latency_ms": attrs.get("latency_ms"),
            "parity_ok": attrs.get("parity_ok"), "seconds": attrs.get("seconds"), "file": attrs.get("file")}


def describe(row: dict) -> str:
    """chain [technique: settings; ...]: figures. Each stage's settings apart: two stages may both set epochs."""
    settings = "; ".join(
        f"{stage['technique']}: " + " ".join(f"{key}={value}" for key, value in stage["settings"].items()
                                             if key not in ("formats", "compare_scratch"))
        for stage in row["stages"])
    change = 0.0 - row["drop_points"] + 0.0  # + 0.0: no "-0.00"
    return (f"{row['chain']} [{settings}]: val {row['val_accuracy']:.4f} ({change:+.2f} points), "
            f"{row['gzip_bytes']:,} B gzip, {row['latency_ms']:.3f} ms")


def describe_best(best: dict) -> str:
    budget = ("within the budget" if best["within_budget"]
              else f"MISSES the budget by {best['missed_by_points']:.2f} points")
    return f"#{best['number']} {describe(best)}, {budget}"
