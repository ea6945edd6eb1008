"""Recipes, plans, change detection and resume, on a tiny model with a stand-in technique (seconds, not minutes)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from compress import registry
from compress.cli import main
from compress.errors import ConfigError, ModelError
from compress.pipeline import RunOptions, load_recipe, parse_recipe, run, stage_keys
from compress.techniques.base import Outcome, Technique, TechniqueConfig, option, require

# ------------------------------------------------------------------ a stand-in technique, registered for these tests

INTERRUPT = {"stage": None}  # name of a stage whose run is cut off after writing a partial file
REFUSE = {"stage": None}  # name of a stage whose technique refuses the model


@dataclass(frozen=True)
class ScaleConfig(TechniqueConfig):
    factor: float = option(0.5, "multiply the last layer's kernel by this")

    def validate(self):
        require(self.factor > 0, f"factor must be > 0, got {self.factor}")


def scale(model, config, data, *, out_dir, verbose=1):
    from compress.techniques.finetune import copy_model

    result = copy_model(model)
    weights = result.layers[-1].get_weights()
    result.layers[-1].set_weights([weights[0] * config.factor, *weights[1:]])
    if REFUSE["stage"] == out_dir.name:
        (out_dir / "half.onnx").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "half.onnx").write_bytes(b"written before the refusal")
        raise ModelError("the scale technique cannot handle this model")
    if INTERRUPT["stage"] == out_dir.name:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model.keras").write_bytes(b"half-written")
        raise KeyboardInterrupt
    return Outcome(result, {"factor": config.factor})


TECHNIQUE = Technique("scale", ScaleConfig, scale, "scale the classifier (a test stand-in)")


@pytest.fixture(autouse=True)
def scale_technique(monkeypatch):
    monkeypatch.setitem(registry._MODULES, "scale", __name__)
    INTERRUPT["stage"] = REFUSE["stage"] = None


FAST_MEASURE = """
[measure]
batch_sizes = [1]
min_seconds = 0.0
"""

RECIPE = FAST_MEASURE + """
[[stage]]
name = "a"
technique = "scale"
settings = { factor = 0.5 }

[[stage]]
name = "b"
technique = "scale"
input = "a"

[[stage]]
name = "c"
technique = "scale"
settings = { factor = 2.0 }
"""

# ------------------------------------------------------------------------------------------------ recipes


def test_default_recipe_resolves_with_every_technique():
    recipe = load_recipe()
    techniques = {stage.technique for stage in recipe.stages}
    assert techniques == {"prune", "qat", "ptq", "distill", "cluster"}
    order = [stage.name for stage in recipe.stages]
    for stage in recipe.stages:
        assert stage.input == "baseline" or order.index(stage.input) < order.index(stage.name)


def test_full_cifar10_recipe_resolves_and_its_results_came_from_it():
    root = Path(__file__).resolve().parent.parent
    recipe = load_recipe(root / "recipes" / "cifar10.toml")
    assert {stage.technique for stage in recipe.stages} == {"prune", "qat", "ptq", "distill", "cluster"}
    assert recipe.stage("pruned-spqat").input == "pruned" and recipe.stage("distilled-ptq").input == "distilled"
    # benchmarks/cifar10/ holds the results of this recipe: the benchmark script copies it there with them
    assert (root / "benchmarks" / "cifar10" / "recipe.toml").read_text() == recipe.source


def test_quick_caps_epochs():
    full, quick = load_recipe(), load_recipe(quick=True)
    assert quick.baseline_epochs < full.baseline_epochs
    for stage in quick.stages:
        if hasattr(stage.config, "epochs"):
            assert stage.config.epochs == 1


def test_run_unsupported_sets_every_qat_stage_that_does_not_set_it(capsys):
    """A model with layers tfmot cannot quantize (PReLU, ELU) had every QAT stage of `compress run` refused, and no
    way to keep those layers in float short of writing a recipe."""
    text = ('[[stage]]\nname = "q"\ntechnique = "qat"\n\n[[stage]]\nname = "strict"\ntechnique = "qat"\n'
            'settings = { unsupported = "error" }\n\n[[stage]]\nname = "p"\ntechnique = "prune"\n')
    recipe = parse_recipe(text, unsupported="float")
    assert [stage.config.unsupported for stage in recipe.stages[:2]] == ["float", "error"]
    assert parse_recipe(text).stage("q").config.unsupported == "error"
    assert main(["run", "--dry-run", "--unsupported", "float", "--out", "unused"]) == 0
    plan = capsys.readouterr().out
    assert "qat: qat <- baseline; export onnx; unsupported=float" in plan


def test_quick_names_a_wrongly_typed_epochs_setting_in_one_line():
    text = '[[stage]]\nname = "p"\ntechnique = "prune"\nsettings = { epochs = "1" }\n'
    for quick in (False, True):  # --quick caps epochs with min(): a string must not reach it
        with pytest.raises(ConfigError, match="epochs"):
            parse_recipe(text, quick=quick)


def test_quick_refuses_a_stage_epochs_cap_that_is_no_positive_integer():
    parse_recipe(RECIPE + "\n[quick]\nstage_epochs = 2\n", quick=True)
    for bad in ("'one'", "0", "0.5"):
        with pytest.raises(ConfigError, match="quick stage_epochs must be an integer from 1 to 1000"):
            parse_recipe(RECIPE + f"\n[quick]\nstage_epochs = {bad}\n", quick=True)


def test_inputs_may_be_declared_after_their_readers():
    recipe = parse_recipe(RECIPE.replace('input = "a"', 'input = "c"'))
    assert [stage.name for stage in recipe.stages] == ["a", "c", "b"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r + "\n[extra]\nx = 1\n", "unknown key(s) extra; valid keys: baseline, export, measure, quick, stage"),
        (lambda r: r.replace('technique = "scale"\ninput = "a"', 'technique = "sharpen"\ninput = "a"'),
         "unknown technique 'sharpen'; known techniques: prune, qat, ptq, distill, cluster"),
        (lambda r: r.replace('input = "a"', 'input = "zz"'), "reads 'zz', which is no stage; valid inputs: baseline"),
        (lambda r: r.replace('settings = { factor = 0.5 }', 'input = "b"'), "cycle: a -> b -> a"),
        (lambda r: r.replace("factor = 2.0", "factr = 2.0"), "unknown setting(s) factr"),
        (lambda r: r.replace("factor = 2.0", "factor = -1.0"), "factor must be > 0"),
        (lambda r: r.replace('name = "c"', 'name = "a"'), "used twice"),
        (lambda r: r.replace('name = "c"', 'name = "baseline"'), "reserved"),
        (lambda r: r + "\n[[stage]]\nname = 'd'\ntechnique = 'scale'\ncolour = 'red'\n", "unknown key(s) colour"),
        (lambda r: r.replace("[measure]", "[measure\n"), "not valid TOML"),
    ],
    ids=["top-key", "technique", "missing-input", "cycle", "setting-key", "setting-range", "duplicate", "reserved",
         "stage-key", "toml"],
)
def test_recipe_refusals_name_the_problem(edit, message):
    with pytest.raises(ConfigError, match=None) as caught:
        parse_recipe(edit(RECIPE))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_change_detection_reruns_a_changed_stage_and_its_downstream_only(tmp_path):
    options = RunOptions(out=tmp_path, data_args={})
    before = stage_keys(parse_recipe(RECIPE), options, "base")
    after = stage_keys(parse_recipe(RECIPE.replace("factor = 0.5", "factor = 0.25")), options, "base")
    assert before["a"] != after["a"] and before["b"] != after["b"]  # b reads a
    assert before["c"] == after["c"]
    assert stage_keys(parse_recipe(RECIPE), options, "other-baseline")["c"] != before["c"]


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture
def tiny_setup(tmp_path):
    """A folder data set of 8x8 images and a tiny trained-looking model for it."""
    from helpers import make_folder_set

    from compress.kerasmodel import save_model
    from compress.keras import keras

    root = make_folder_set(tmp_path / "images", per_class=8, size=(8, 8))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    model_path = save_model(model, tmp_path / "user_model.keras")
    recipe_path = tmp_path / "recipe.toml"
    recipe_path.write_text(RECIPE)
    return {"data": f"folder:{root}", "model": model_path, "recipe": recipe_path, "out": tmp_path / "run"}


def _options(setup, log):
    return RunOptions(out=setup["out"], data_args={"source": setup["data"], "cache_dir": setup["out"].parent / "c"},
                      model=setup["model"], verbose=0, log=log.append)


def test_run_resumes_and_redoes_only_what_changed(tiny_setup):
    first_log, second_log, third_log = [], [], []
    results = run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, first_log))
    assert [v["name"] for v in results["variants"]] == ["baseline", "a", "b", "c"]
    assert [v["input_stage"] for v in results["variants"]] == [None, "baseline", "a", "baseline"]
    for variant in results["variants"]:
        assert variant["parity_ok"] and 0.0 <= variant["accuracy"] <= 1.0 and variant["latency_ms_b1"] > 0
    out = tiny_setup["out"]
    for name in ("report.md", "results.json", "results.csv", "accuracy_vs_size.png", "accuracy_vs_latency.png"):
        assert (out / name).is_file()
    assert results["machine"]["latency_rounds"] == 10
    assert "the files taking turns over 10 rounds" in (out / "report.md").read_text()
    assert any("interleaved rounds" in line for line in first_log)
    stamp = (out / "b" / "manifest.json").stat().st_mtime_ns

    again = run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, second_log))
    assert sum("skipped" in line for line in second_log) == 4
    assert (out / "b" / "manifest.json").stat().st_mtime_ns == stamp
    assert [stage["seconds"] for stage in again["stages"]] == [stage["seconds"] for stage in results["stages"]]
    assert all(stage["skipped"] for stage in again["stages"])
    assert "| **with the stages run earlier** |" in (out / "report.md").read_text()

    tiny_setup["recipe"].write_text(RECIPE.replace("factor = 0.5", "factor = 0.25"))
    run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, third_log))
    skipped = {line.split()[1] for line in third_log if "skipped" in line}
    assert skipped == {"baseline", "c"}  # a changed, b reads a


def test_a_rerun_on_changed_images_redoes_everything(tiny_setup):
    from PIL import Image

    run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, []))
    root = Path(tiny_setup["data"][len("folder:"):])
    for path in sorted((root / "test" / "cat").iterdir())[:2]:  # the same folder, other test images
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(path)
    log = []
    results = run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, log))
    assert not any("skipped" in line or "measured earlier" in line for line in log)
    assert not any(stage["skipped"] for stage in results["stages"])


def test_a_layer_name_the_model_lacks_is_refused_before_any_work(tiny_setup):
    tiny_setup["recipe"].write_text(
        FAST_MEASURE + '[[stage]]\nname = "p"\ntechnique = "prune"\nsettings = { layer_sparsity = { dense9 = 0.5 } }\n')
    with pytest.raises(ConfigError, match="stage 'p' names layer\\(s\\) dense9"):
        run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, []))
    assert not (tiny_setup["out"] / "baseline").exists()


def test_interrupted_stage_is_never_trusted(tiny_setup):
    INTERRUPT["stage"] = "c"
    with pytest.raises(KeyboardInterrupt):
        run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, []))
    out = tiny_setup["out"]
    assert (out / "a" / "manifest.json").is_file()
    assert not (out / "c" / "manifest.json").exists()  # the half-written stage has no manifest

    leftover = out / "c" / ".model.99999.partial.keras"  # what a SIGKILL during a write leaves
    leftover.write_bytes(b"partial")
    INTERRUPT["stage"] = None
    log = []
    results = run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, log))
    assert {line.split()[1] for line in log if "skipped" in line} == {"baseline", "a", "b"}
    assert {v["name"] for v in results["variants"]} == {"baseline", "a", "b", "c"}
    from compress.kerasmodel import load_model

    assert load_model(out / "c" / "model.keras").count_params() > 0  # rewritten whole
    assert not leftover.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_setup, capsys):
    code = main(["run", "--recipe", str(tiny_setup["recipe"]), "--data", tiny_setup["data"],
                 "--model", str(tiny_setup["model"]), "--out", str(tiny_setup["out"]), "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "b: scale <- a" in printed and printed.count("would run") == 4
    assert not tiny_setup["out"].exists()


def test_cli_refuses_a_bad_recipe_in_one_line(tmp_path, capsys):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[[stage]]\nname = 'x'\ntechnique = 'prune'\nsettings = { sparsity = 1.5 }\n")
    assert main(["run", "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "sparsity" in err and len(err.strip().splitlines()) == 1
    assert main(["run", "--recipe", str(tmp_path / "none.toml"), "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_formats_apply_to_the_baseline_too(tiny_setup):
    recipe = FAST_MEASURE + """
[export]
formats = ["onnx", "tflite"]

[[stage]]
name = "a"
technique = "scale"
export = ["onnx"]
"""
    tiny_setup["recipe"].write_text(recipe)
    results = run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, []))
    assert [v["name"] for v in results["variants"]] == ["baseline:onnx", "baseline:tflite", "a"]
    assert results["baseline"] == "baseline:onnx"
    assert all(v["parity_ok"] for v in results["variants"])
    assert (tiny_setup["out"] / "report.md").is_file()


# ------------------------------------------------------------------------------------------------ hardening


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "a\\\\b", "x" * 65, "é"])
def test_stage_names_must_be_plain_folder_names(name, tmp_path):
    recipe = RECIPE.replace('name = "c"', f'name = "{name}"')
    with pytest.raises(ConfigError, match="stage name") as caught:
        parse_recipe(recipe)
    assert len(str(caught.value)) < 300
    assert not any(tmp_path.iterdir())


def test_a_stage_folder_never_leaves_the_run_folder(tmp_path):
    from compress.pipeline.folders import stage_dir

    assert stage_dir(tmp_path / "run", "a") == tmp_path / "run" / "a"
    for name in ("..", "../x", "/etc"):
        with pytest.raises(ConfigError, match="outside the run folder"):
            stage_dir(tmp_path / "run", name)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[stage]]\nname = "a"\ntechnique = "scale"\nsettings = "high"\n', "settings must be a table"),
        ('[[stage]]\nname = "a"\ntechnique = "scale"\nsettings = 5\n', "settings must be a table"),
        ("stage = 5\n", "'stage' must be a list"),
        ('[[stage]]\nname = "a"\ntechnique = "scale"\ninput = 3\n', "input must be a stage name"),
        ("[measure]\nmin_seconds = 1e9\n", "min_seconds must be a number from 0 to 60"),
        ("[measure]\nbatch_sizes = [1000000]\n", "batch_sizes must be a list of 1 to 8 integers from 1 to 1024"),
        ("[measure]\nthreads = 100000\n", "threads must be an integer from 1 to 256"),
        ("[baseline]\nepochs = 1000000000\n", "baseline epochs must be an integer from 1 to 1000"),
        ("[measure]\nmin_seconds = 60\nbatch_sizes = [1, 2, 4, 8, 16, 32, 64, 128]\n"
         + "".join(f'[[stage]]\nname = "s{i}"\ntechnique = "scale"\n' for i in range(10)), "timing every file would take"),
    ],
    ids=["settings-text", "settings-number", "stage-number", "input-number", "min-seconds", "batch", "threads",
         "epochs", "total-timing"],
)
def test_recipe_shapes_and_bounds_are_one_line_refusals(text, message):
    with pytest.raises(ConfigError) as caught:
        parse_recipe(text)
    assert message in str(caught.value) and "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_a_long_chain_declared_in_reverse_order_resolves():
    stages = [f'[[stage]]\nname = "s{i}"\ntechnique = "scale"\ninput = "{f"s{i - 1}" if i else "baseline"}"\n'
              for i in range(200)]
    recipe = parse_recipe(FAST_MEASURE.replace("min_seconds = 0.0", "min_seconds = 0.001") + "".join(reversed(stages)))
    assert [stage.name for stage in recipe.stages] == [f"s{i}" for i in range(200)]
    with pytest.raises(ConfigError, match="at most 200"):
        parse_recipe("".join(stages) + stages[0].replace('"s0"', '"extra"', 1))


def test_a_huge_stage_name_is_refused_in_a_short_line():
    with pytest.raises(ConfigError) as caught:
        parse_recipe(f'[[stage]]\nname = "{"n" * 10_000_000}"\ntechnique = "scale"\n')
    assert len(str(caught.value)) < 300


def _lambda_model(marker: Path):
    """A model whose Lambda layer writes `marker` when its code runs."""
    from compress.keras import keras

    path = str(marker)

    def touch(x):
        open(path, "w").write("the Lambda's code ran")
        return x

    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Lambda(touch), keras.layers.Conv2D(4, 3),
                             keras.layers.Flatten(), keras.layers.Dense(3)])


def test_a_replaced_run_folder_model_is_never_trusted(tiny_setup):
    """A file changed since its stage finished makes the stage run again; a model holding code is loaded in safe
    mode even from the run folder, so its code never runs without --unsafe."""
    import json

    from compress.files import sha256_file
    from compress.kerasmodel import save_model

    run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, []))
    out, marker = tiny_setup["out"], tiny_setup["out"].parent / "lambda-ran"
    model_path = out / "baseline" / "model.keras"
    save_model(_lambda_model(marker), model_path)
    marker.unlink()  # building the model ran the Lambda once; only a run of it from now on counts
    log = []
    run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, log))
    assert not any(line.startswith("[1/4] baseline") and "skipped" in line for line in log)
    assert not marker.exists()

    # Tampering with the manifest too: the hash matches, but safe mode refuses the Lambda before it runs.
    save_model(_lambda_model(marker), model_path)
    marker.unlink()
    manifest = json.loads((out / "baseline" / "manifest.json").read_text())
    manifest["sha256"]["model.keras"] = sha256_file(model_path)
    (out / "baseline" / "manifest.json").write_text(json.dumps(manifest))
    (out / "a" / "manifest.json").unlink()
    with pytest.raises(ModelError, match="Lambda"):
        run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, []))
    assert not marker.exists()


def test_a_rerun_reuses_measurements_unless_asked(tiny_setup):
    run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, []))
    log = []
    again = run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, log))
    assert sum("measured earlier" in line for line in log) == 4
    assert any("timings reused" in line for line in log) and again["latency"].startswith("reused")
    options = _options(tiny_setup, log := [])
    options.remeasure = True
    remeasured = run(load_recipe(tiny_setup["recipe"]), options)
    assert not any("measured earlier" in line for line in log) and remeasured["latency"] == "measured in this run"


@pytest.mark.parametrize("build, message", [
    (lambda keras: keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(5)]),
     "outputs 5 per image but"),
    (lambda keras: keras.Sequential([keras.Input((16,)), keras.layers.Dense(3)]), "compress handles image models"),
    (lambda keras: keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Flatten(), keras.layers.Dense(3)]),
     "pass --image-size"),
], ids=["classes", "vector-input", "image-size"])
def test_run_refuses_a_model_that_does_not_fit_the_data_before_any_work(tiny_setup, build, message):
    from compress.errors import CompressError
    from compress.keras import keras
    from compress.kerasmodel import save_model

    save_model(build(keras), tiny_setup["model"])
    with pytest.raises(CompressError, match=message):
        run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, []))
    assert not tiny_setup["out"].exists()


def test_two_input_model_is_refused_before_any_work(tiny_setup):
    from compress.errors import CompressError
    from compress.keras import keras
    from compress.kerasmodel import save_model

    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    joined = keras.layers.Dense(3)(keras.layers.Flatten()(keras.layers.Add()([a, b])))
    save_model(keras.Model([a, b], joined), tiny_setup["model"])
    with pytest.raises(CompressError, match="2 inputs"):
        run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, []))
    assert not tiny_setup["out"].exists()


def test_structured_recipe_resolves_with_channel_pruning_chains():
    root = Path(__file__).resolve().parent.parent
    recipe = load_recipe(root / "recipes" / "structured.toml")
    assert recipe.stage("channels50").config.structure == "channels"
    assert recipe.stage("channels50-qat").input == "channels50"
    assert recipe.stage("distilled-channels-qat").input == "distilled-channels"
    assert recipe.stage("distilled-channels").input == "distilled"


def test_a_refused_stage_is_reported_and_the_run_goes_on(tiny_setup):
    REFUSE["stage"] = "a"
    log = []
    results = run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, log))
    assert [v["name"] for v in results["variants"]] == ["baseline", "c"]  # b reads a
    assert results["refused"] == {"a": "the scale technique cannot handle this model",
                                  "b": "its input stage a was refused"}
    assert not (tiny_setup["out"] / "a" / "half.onnx").exists()
    assert "a: the scale technique cannot handle this model" in (tiny_setup["out"] / "report.md").read_text()
    again = []
    run(load_recipe(tiny_setup["recipe"]), _options(tiny_setup, again))
    assert sum("skipped" in line for line in again) == 4  # a refusal is remembered, not retried
