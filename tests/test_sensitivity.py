"""`compress sensitivity`: per-layer pruning and int8 figures on the validation split, a proposal the prune and ptq
settings accept as written, PTQ's float_layers, and refusals in one line."""

import csv
import json
import tomllib

import numpy as np
import pytest

from compress.cli import main
from compress.cli_parser import CONFIG_PREFIX, build_parser
from compress.errors import ConfigError, ModelError
from compress.sensitivity import SensitivityConfig, analyse
from compress.techniques.prune import PruneConfig
from compress.techniques.ptq import PTQConfig, ptq


def _train(model, data):
    """A few steps of Adam, so that accuracy means something."""
    from compress.keras import keras

    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data.pipeline("train", 32, shuffle=True), epochs=3, verbose=0)
    return model


def test_analyse_measures_every_layer_on_the_validation_split(tiny_cnn, synthetic_data, tmp_path, monkeypatch):
    from compress.data import Dataset

    model = _train(tiny_cnn, synthetic_data)
    before = [w.copy() for w in model.get_weights()]
    splits = []
    normalized = Dataset.normalized
    monkeypatch.setattr(Dataset, "normalized", lambda self, name: splits.append(name) or normalized(self, name))
    lines = []
    result = analyse(model, synthetic_data, SensitivityConfig(), out_dir=tmp_path, log=lines.append)

    assert "val" in splits and "test" not in splits
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    rows = {row["layer"]: row for row in result["layers"]}
    assert list(rows) == ["conv1", "conv2", "dense1", "logits"]
    assert sum(row["weight_share"] for row in rows.values()) == pytest.approx(1.0)
    assert sum(row["mac_share"] for row in rows.values()) == pytest.approx(1.0)
    assert sum(1 for line in lines if line.startswith("  ") and line.split(":")[0].strip() in rows) == 4
    big = max(rows.values(), key=lambda row: row["weights"])
    curve = [result["baseline_val_accuracy"], *(big["val_accuracy"][str(s)] for s in (0.5, 0.7, 0.9, 0.95))]
    assert all(later <= earlier + 0.1 for earlier, later in zip(curve, curve[1:]))  # 30 images: 3 is noise
    assert curve[-1] < curve[0]
    assert result["settings"]["pruning"] == "one-shot, no fine-tune" and result["settings"]["split"] == "val"
    assert all(row["onnx_nodes"] and row["int8_alone_drop"] is not None for row in rows.values())

    assert json.loads((tmp_path / "sensitivity.json").read_text())["proposal"] == result["proposal"]
    with open(tmp_path / "sensitivity.csv") as handle:
        assert [row["layer"] for row in csv.DictReader(handle)] == list(rows)
    assert (tmp_path / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"

    proposal = result["proposal"]
    assert proposal["prune_layer_sparsity"]  # this easy data leaves room at 0.5 for some layer
    args = build_parser().parse_args(["prune", "model.keras", "--out", str(tmp_path / "p"), "--layers",
                                      proposal["prune_layers"], "--layer-sparsity", proposal["prune_layer_sparsity"]])
    settings = {k[len(CONFIG_PREFIX):]: v for k, v in vars(args).items() if k.startswith(CONFIG_PREFIX) and v is not None}
    from_cli = PruneConfig.from_dict(settings)
    from_toml = PruneConfig.from_dict(tomllib.loads(proposal["prune_toml"])["settings"])
    assert from_cli == from_toml
    assert dict(from_cli.layer_sparsity) == {k: v for k, v in proposal["layer_sparsity"].items() if v > 0}
    assert PTQConfig.from_dict({"float_layers": "conv2,logits"}).float_layers == ("conv2", "logits")


def test_channel_sensitivity_removes_whole_channels_and_proposes_a_channels_prune(synthetic_data, tmp_path):
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input(synthetic_data.input_shape)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", name="c2")(x)
    x = keras.layers.ReLU()(keras.layers.Add()([x, keras.layers.Conv2D(8, 1, name="skip")(inputs)]))
    outputs = keras.layers.Dense(synthetic_data.num_classes, name="logits")(keras.layers.GlobalAveragePooling2D()(x))
    model = _train(keras.Model(inputs, outputs), synthetic_data)
    config = SensitivityConfig(sparsities=(0.25, 0.5, 0.875), max_drop=30.0, structure="channels")
    result = analyse(model, synthetic_data, config, out_dir=tmp_path, log=[].append)
    rows = {row["layer"]: row for row in result["layers"]}
    assert result["settings"]["pruning"] == "one-shot, no fine-tune, whole channels (L1 norm)"
    assert rows["c2"]["val_accuracy"] == rows["skip"]["val_accuracy"]  # joined by the Add: one curve
    assert rows["logits"]["val_accuracy"] == {} and rows["logits"]["proposed_sparsity"] == 0.0
    # the last share leaves one channel of c1: it computes what prune --structure channels would make
    from compress.techniques.structured import remove_channels
    smaller, _ = remove_channels(model, sparsity=0.0, layer_sparsity={"c1": 0.875})
    images, labels = synthetic_data.normalized("val")
    expected = float(np.mean(np.argmax(smaller.predict(images, verbose=0), axis=-1) == labels))
    assert rows["c1"]["val_accuracy"]["0.875"] == pytest.approx(expected)
    proposal = result["proposal"]
    settings = tomllib.loads(proposal["prune_toml"])["settings"]
    config = PruneConfig.from_dict(settings)
    assert config.structure == "channels" and set(config.layer_sparsity) == set(rows)
    assert "--structure channels --layer-sparsity" in "\n".join(proposal["lines"])
    with open(tmp_path / "sensitivity.csv") as handle:
        assert next(row for row in csv.DictReader(handle) if row["layer"] == "logits")["val_accuracy@0.5"] == ""
    assert (tmp_path / "sensitivity.png").is_file()


def test_proposal_spends_the_budget_evenly():
    from compress.sensitivity import propose

    rows = [{"layer": "a", "drop_points": {"0.5": 0.0, "0.9": 0.4}, "int8_alone_drop": 0.6},
            {"layer": "b", "drop_points": {"0.5": 2.0, "0.9": 5.0}, "int8_alone_drop": None}]
    proposal = propose(rows, SensitivityConfig(max_drop=1.0))
    assert proposal["layer_sparsity"] == {"a": 0.9, "b": 0.0}
    assert proposal["prune_layer_sparsity"] == "a=0.9" and proposal["ptq_float_layers"] == "a"


def test_ptq_float_layers_keep_their_nodes_float(tiny_cnn, synthetic_data, tmp_path):
    import onnx

    ptq(tiny_cnn, PTQConfig(calibration=16, formats=("onnx-qdq",), float_layers=("conv2",)), synthetic_data,
        out_dir=tmp_path, verbose=0)
    graph = onnx.load(str(tmp_path / "model.int8.onnx")).graph
    producer = {output: node.op_type for node in graph.node for output in node.output}

    def weight_feeds(layer):
        return [producer.get(name, "initializer") for node in graph.node if layer in node.name.split("/")[:-1]
                and node.op_type in ("Conv", "Gemm", "MatMul") for name in node.input[1:]]

    assert weight_feeds("conv2") and "DequantizeLinear" not in weight_feeds("conv2")  # float weights and bias
    assert set(weight_feeds("conv1")) == {"DequantizeLinear"}
    with pytest.raises(ConfigError, match="float_layers names nope, not a layer"):
        ptq(tiny_cnn, PTQConfig(formats=("onnx-qdq",), float_layers=("nope",)), synthetic_data, out_dir=tmp_path)


def test_a_model_without_weight_layers_is_refused(synthetic_data, tmp_path):
    from compress.keras import keras

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D()])
    with pytest.raises(ModelError, match="no Conv2D/SeparableConv2D/Dense layer"):
        analyse(model, synthetic_data, SensitivityConfig(), out_dir=tmp_path, log=lambda line: None)


@pytest.mark.parametrize("option, value, words", [
    ("--sparsities", "0.5,1.2", "sparsities must be numbers in (0, 1)"),
    ("--sparsities", "0,0.5", "sparsities must be numbers in (0, 1)"),
    ("--sparsities", "half", "sparsities must be numbers"),
    ("--max-drop", "-1", "max_drop must be a number of accuracy points >= 0"),
])
def test_cli_refuses_bad_settings_in_one_line(tmp_path, capsys, option, value, words):
    assert main(["sensitivity", str(tmp_path / "model.keras"), "--out", str(tmp_path / "out"), option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
    assert not (tmp_path / "out").exists()


def test_auto_turns_the_analysis_into_per_layer_prune_settings_and_reuses_it(tiny_cnn, synthetic_data, tmp_path):
    import optuna

    from compress.auto.space import CHOICES, layer_plans, recipe_text, sample, stage_names
    from compress.pipeline.recipe import parse_recipe
    from compress.kerasmodel import save_model

    path = save_model(tiny_cnn, tmp_path / "model.keras")
    log = []
    plans = layer_plans(path, synthetic_data, 1.0, tmp_path / "sensitivity", unsafe=False, log=log.append)
    analysis = json.loads((tmp_path / "sensitivity" / "sensitivity.json").read_text())
    assert len(log) == 1 and analysis["model_sha256"]
    assert plans and set(plans) <= set(CHOICES["layer_plan"])
    tried = {str(s) for s in analysis["settings"]["sparsities"]}
    for scale, plan in plans.items():
        assert set(plan["layers"]) == set(plan["layer_sparsity"]) <= {row["layer"] for row in analysis["layers"]}
        for name, sparsity in plan["layer_sparsity"].items():  # each layer within its share of scale x the budget
            row = next(row for row in analysis["layers"] if row["layer"] == name)
            assert str(sparsity) in tried and row["drop_points"][str(sparsity)] <= scale / len(analysis["layers"])
        PruneConfig.from_dict(plan)  # settings prune takes as they are
    assert layer_plans(path, synthetic_data, 1.0, tmp_path / "sensitivity", unsafe=False, log=log.append) == plans
    assert len(log) == 1  # the analysis was reused

    scale = next(iter(plans))
    trial = optuna.trial.FixedTrial({"chain": "sensitivity-prune-qat", "layer_plan": scale, "epochs": 2})
    chain, stages = sample(trial, False, plans)
    assert chain == "sensitivity-prune-qat" and stages[0] == ("prune", {**plans[scale], "epochs": 2})
    [stage, _] = parse_recipe(recipe_text(stages, stage_names(stages))).stages  # the plan goes into a recipe whole
    assert dict(stage.config.layer_sparsity) == plans[scale]["layer_sparsity"]
    with pytest.raises(ModelError, match="no layer keeps within"):
        sample(trial, False, {})


def test_channel_shares_go_where_each_removed_weight_costs_least():
    from compress.sensitivity import allocate_channel_shares

    rows = [{"layer": "a", "weights": 100, "drop_points": {"0.25": 0.0, "0.5": 10.0}},
            {"layer": "b", "weights": 1000, "drop_points": {"0.25": 5.0, "0.5": 6.0}},
            {"layer": "classifier", "weights": 50, "drop_points": {}}]
    # a's first quarter is free, then b's (0.02 points per weight) and b's second quarter (0.004) before a's (0.4)
    assert allocate_channel_shares(rows, 0.3) == {"a": 0.25, "b": 0.5, "classifier": 0.0}
    assert allocate_channel_shares(rows, 0.01) == {"a": 0.25, "b": 0.0, "classifier": 0.0}
    assert allocate_channel_shares(rows, 0.99) == {"a": 0.5, "b": 0.5, "classifier": 0.0}  # all it can


def test_auto_plans_channel_shares_on_the_model_the_chain_prefix_ends_in(tiny_cnn, synthetic_data, tmp_path):
    import optuna

    from compress.auto.space import CHANNEL_SHARES, layer_plans, recipe_text, resolve_channel_plans, sample, stage_names
    from compress.kerasmodel import save_model
    from compress.pipeline.recipe import parse_recipe

    (tmp_path / "student").mkdir()
    path = save_model(tiny_cnn, tmp_path / "student" / "model.keras")  # stands in for the distilled student
    trained, log = [], []

    def run_prefix(prefix):
        trained.append(list(prefix))
        return path

    def plans_of(model_path, name):
        return layer_plans(model_path, synthetic_data, 1.0, tmp_path / "sensitivity" / name, unsafe=False,
                           log=log.append, structure="channels")

    trial = optuna.trial.FixedTrial({"chain": "distill-channelplan-qat", "student": "conv_pool_cnn", "width": 8,
                                     "distill_epochs": 10, "channel_plan": 0.35, "epochs": 2})
    chain, stages = sample(trial, False)
    assert stages[1] == ("prune", {"structure": "channels", "distill": True, "channel_plan": 0.35, "epochs": 2})
    resolved = resolve_channel_plans(stages, run_prefix, plans_of)
    assert trained == [stages[:1]]  # the student is trained before its channels are analysed
    assert resolved[0] == stages[0] and resolved[2] == stages[2]
    [folder] = (tmp_path / "sensitivity").iterdir()
    assert folder.name == stage_names(stages[:1])[0]
    analysis = json.loads((folder / "sensitivity.json").read_text())
    assert analysis["settings"]["structure"] == "channels"
    assert analysis["settings"]["sparsities"] == list(CHANNEL_SHARES)
    technique, settings = resolved[1]
    assert technique == "prune" and "channel_plan" not in settings
    shares = settings["layer_sparsity"]
    assert set(shares) == {"conv1", "conv2", "dense1", "logits"} and shares["logits"] == 0.0  # every layer named
    assert set(shares.values()) <= {0.0, *CHANNEL_SHARES}
    weights = {row["layer"]: row["weights"] for row in analysis["layers"]}
    assert sum(shares[name] * weights[name] for name in shares) >= 0.35 * sum(weights.values())
    assert PruneConfig.from_dict(settings).structure == "channels"
    [_, stage, _] = parse_recipe(recipe_text(resolved, stage_names(resolved))).stages
    assert dict(stage.config.layer_sparsity) == shares
    assert resolve_channel_plans(stages, run_prefix, plans_of) == resolved and len(log) == 1  # analysis reused
    with pytest.raises(ModelError, match="no layer of student has channels to remove"):
        resolve_channel_plans(stages, run_prefix, lambda model_path, name: {})
