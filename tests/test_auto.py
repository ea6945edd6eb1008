"""`compress auto` on a tiny exact model and a stand-in technique (tests/auto_standin.py): seconds per search."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import auto_standin

from compress.auto import AutoConfig, run_auto
from compress.cli import main
from compress.errors import ConfigError
from compress.pipeline import parse_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def standin(monkeypatch):
    for target, name, value in auto_standin.patches():
        if isinstance(target, dict):
            monkeypatch.setitem(target, name, value)
        else:
            monkeypatch.setattr(target, name, value)


@pytest.fixture
def setup(tmp_path):
    """Images whose class is their brightest channel, and a model that reads exactly that (every image right)."""
    from compress.keras import keras
    from compress.kerasmodel import save_model

    rng = np.random.default_rng(0)
    for split, count in (("train", 20), ("test", 4)):
        for label, name in enumerate(("c0", "c1", "c2")):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, size=(8, 8, 3), dtype=np.uint8)
                pixels[..., label] += 180
                Image.fromarray(pixels).save(folder / f"{i}.png")
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    model.layers[-1].set_weights([np.eye(3, dtype=np.float32) * 10, np.zeros(3, np.float32)])
    path = save_model(model, tmp_path / "model.keras")
    data = {"source": f"folder:{tmp_path / 'images'}", "cache_dir": tmp_path / "cache"}
    return {"model": path, "data": data, "out": tmp_path / "auto", "tmp": tmp_path}


def _auto(setup, trials, max_drop=5.0, log=None, **config):
    config = AutoConfig(max_drop=max_drop, trials=trials, quick=True, **config)
    return run_auto(setup["model"], setup["data"], setup["out"], config, log=(log if log is not None else [] ).append)


def test_best_keeps_the_budget_writes_a_recipe_and_a_rerun_continues(setup):
    summary = _auto(setup, trials=5, seed=0)
    assert len(summary["trials"]) == 5 and {row["chain"] for row in summary["trials"]} == {"keep", "flip"}
    best = summary["best"]
    assert best["within_budget"] and best["chain"] == "keep" and best["drop_points"] <= 5.0
    assert best["test_accuracy"] == 1.0 and summary["baseline"]["val_accuracy"] == 1.0
    assert all(summary["trials"][n]["chain"] == "keep" for n in summary["pareto"])
    assert (setup["out"] / "best" / Path(best["file"]).name).read_bytes() == (setup["out"] / best["file"]).read_bytes()
    assert json.loads((setup["out"] / "auto.json").read_text())["best"]["number"] == best["number"]
    recipe = parse_recipe((setup["out"] / "best.toml").read_text())
    [stage] = recipe.stages
    assert stage.technique == "tweak" and stage.config.to_dict() == best["stages"][0]["settings"]

    log = []
    again = _auto(setup, trials=7, seed=1, log=log)
    assert len(again["trials"]) == 7 and again["trials"][:5] == [
        dict(row, test_accuracy=again["trials"][row["number"]]["test_accuracy"]) for row in summary["trials"]]
    assert "5 of 7 trials so far" in log[0]


def test_a_missed_budget_still_leaves_the_best_file_and_says_by_how_much(setup, monkeypatch):
    monkeypatch.setattr("compress.auto.space.CHAINS", {"flip": auto_standin.CHAINS["flip"]})
    log = []
    summary = _auto(setup, trials=2, max_drop=0.0, log=log)
    best = summary["best"]
    assert not best["within_budget"] and best["missed_by_points"] == 100.0
    assert (setup["out"] / "best" / Path(best["file"]).name).is_file()
    assert sum("MISSES the budget by 100.00 points" in line for line in log) == 3  # two trials and the end


def test_the_first_trials_try_each_chain_and_the_report_measures_the_best_beside_a_compare_recipe(setup):
    compare = setup["tmp"] / "compare.toml"
    compare.write_text('[measure]\nbatch_sizes = [1]\nmin_seconds = 0.05\n\n[[stage]]\nname = "halved"\n'
                       'technique = "tweak"\ninput = "baseline"\nsettings = { factor = 0.5 }\n')
    config = AutoConfig(max_drop=5.0, trials=3, quick=True, seed=0)
    summary = run_auto(setup["model"], setup["data"], setup["out"], config, compare_recipe=compare, log=[].append)
    starts = [(row["chain"], row["stages"][0]["settings"]["factor"]) for row in summary["trials"][:2]]
    assert starts == [("keep", 0.5), ("flip", 0.5)]  # every chain at its first choices
    results = json.loads((setup["out"] / "results.json").read_text())
    measured = {variant["name"]: variant for variant in results["variants"]}
    chosen = {Path(summary["trials"][number]["file"]).parent.name
              for number in [*summary["pareto"], summary["best"]["number"]]}
    assert set(measured) == {"baseline", "halved", *chosen}
    assert results["latency"] == "measured in this run" and all(v["accuracy"] == 1.0 for v in measured.values())
    assert all((setup["out"] / name).is_file() for name in ("report.md", "results.csv", "accuracy_vs_size.png"))
    assert "halved" in (setup["out"] / "report.md").read_text()


def test_a_study_of_fewer_trials_than_chains_runs_its_first_trials(setup):
    log = []
    summary = _auto(setup, trials=1, log=log)
    assert [(row["chain"], row["state"]) for row in summary["trials"]] == [("keep", "COMPLETE")]
    assert [line for line in log if line.startswith("trial ")][0].endswith("| 0 trial(s) left")
    assert any(line.startswith("    [2/2] tweak-") and line.endswith(" ...") for line in log)  # a trial's stage


def test_bad_input_is_one_line_and_exit_2(setup, capsys):
    common = [str(setup["model"]), "--data", setup["data"]["source"], "--out", str(setup["out"])]
    two_formats = setup["tmp"] / "two_formats.toml"
    two_formats.write_text('[export]\nformats = ["onnx", "tflite"]\n')
    for extra, message in ((["--max-drop", "-1"], "--max-drop must be"),
                           (["--max-drop", "1", "--compare-recipe", str(two_formats)], "differ from the search's"),
                           (["--max-drop", "1", "--compare-recipe", "nope.toml"], "nope.toml does not exist"),
                           (["--max-drop", "1", "--trials", "0"], "--trials must be"),
                           (["--max-drop", "1", "--storage", "nosuchdb://x"], "--storage nosuchdb://x: cannot open")):
        assert main(["auto", *common, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    _auto(setup, trials=1)
    assert main(["auto", *common, "--max-drop", "2", "--quick"]) == 2  # another setting: another study
    err = capsys.readouterr().err.strip()
    assert "holds the study compress-auto-" in err and "\n" not in err


def test_a_search_space_of_another_version_is_another_study_refused_in_one_line(setup, monkeypatch):
    """Optuna cannot continue a study whose choices changed; a version with other choices names its study apart."""
    from compress.auto import space

    _auto(setup, trials=1)
    monkeypatch.setattr(space, "QUICK_CHOICES", {"factor": (0.5, 1.0, 4.0)})
    with pytest.raises(ConfigError, match=r"holds the study compress-auto-\w+ of another .* search space"):
        _auto(setup, trials=2)


def test_two_workers_share_one_study_and_stop_at_the_asked_count(setup):
    workers = setup["tmp"] / "workers"
    workers.mkdir()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
               **{auto_standin.WAIT_FOR_WORKERS: f"{workers}:2"})
    command = [sys.executable, str(ROOT / "tests" / "auto_standin.py"), "auto", str(setup["model"]),
               "--data", setup["data"]["source"], "--out", str(setup["out"]), "--max-drop", "5", "--trials", "6",
               "--quick"]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
    rows = json.loads((setup["out"] / "auto.json").read_text())["trials"]
    assert sorted(row["number"] for row in rows) == list(range(6))
    assert all(row["state"] == "COMPLETE" for row in rows)
    assert len({row["worker"] for row in rows}) == 2


def test_the_time_budget_stops_new_trials_and_keeps_what_was_found(setup, monkeypatch):
    import compress.auto.search as search

    clock = {"now": 1000.0}  # each trial "takes" a minute: the budget of 2.5 minutes allows three to start
    monkeypatch.setattr(search.time, "monotonic", lambda: clock["now"])
    record = search.Search.record

    def record_and_tick(self, study, trial):
        clock["now"] += 60
        return record(self, study, trial)

    monkeypatch.setattr(search.Search, "record", record_and_tick)
    log = []
    summary = _auto(setup, trials=50, time_budget=2.5, seed=0, log=log)
    assert len(summary["trials"]) == 3 and summary["best"] is not None
    assert (setup["out"] / "best" / Path(summary["best"]["file"]).name).is_file()
    assert [line.rsplit("| ", 1)[-1] for line in log if line.startswith("trial ")] == [
        "1.5 min left", "0.5 min left", "time budget spent"]


def test_a_trial_of_a_killed_worker_is_failed_and_retried(setup, monkeypatch):
    """A worker killed mid-trial leaves it RUNNING; once its heartbeat is older than the grace period, the next
    worker marks it failed, queues a retry and counts the retry instead."""
    import time
    import warnings

    import optuna

    from compress.auto import study as auto_study

    monkeypatch.setattr(auto_study, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(auto_study, "GRACE_SECONDS", 1)
    _auto(setup, trials=1, seed=0)
    url = f"sqlite:///{setup['out'] / 'study.db'}"
    with warnings.catch_warnings():  # Optuna: heartbeats are experimental, and meant for optimize(), not ask()
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=1)
        [name] = optuna.study.get_all_study_names(storage)
        killed = optuna.load_study(study_name=name, storage=storage).ask()  # as a killed worker leaves it
        storage.record_heartbeat(killed._trial_id)
    time.sleep(2.5)

    summary = _auto(setup, trials=3, seed=0)
    states = {row["number"]: row["state"] for row in summary["trials"]}
    assert states[killed.number] == "FAIL"
    assert sorted(state for state in states.values()) == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    retried = optuna.load_study(study_name=name, storage=storage).trials
    assert any(trial.system_attrs.get("failed_trial") == killed.number for trial in retried)
