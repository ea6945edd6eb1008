"""Magnitude pruning: targets reached per layer and overall, N:M groups, classifier left whole, config checks, CLI."""

import json
import tomllib

import numpy as np
import pytest

from compress.errors import ConfigError
from compress.techniques.prune import PruneConfig, prune


def kernels(model):
    return {layer.name: layer.kernel.numpy() for layer in model.layers if hasattr(layer, "kernel")}


def zeros(array):
    return float(np.mean(array == 0))


def test_polynomial_schedule_reaches_target_and_leaves_classifier_and_input_alone(tiny_cnn, synthetic_data):
    before = [w.copy() for w in tiny_cnn.get_weights()]
    outcome = prune(tiny_cnn, PruneConfig(sparsity=0.75, epochs=2, batch_size=16), synthetic_data, verbose=0)
    stats = outcome.stats

    assert stats["pruned_layers"] == ["conv1", "conv2", "dense1"]
    measured = kernels(outcome.model)
    for name in stats["pruned_layers"]:
        assert abs(zeros(measured[name]) - 0.75) <= 0.01, name
        assert stats["sparsity"][name] == pytest.approx(zeros(measured[name]))
    assert abs(stats["sparsity_pruned_kernels"] - 0.75) <= 0.01
    assert 0 < stats["sparsity_all_params"] < stats["sparsity_pruned_kernels"]
    assert np.count_nonzero(measured["logits"] == 0) == 0  # classifier not pruned
    assert all(np.array_equal(a, b) for a, b in zip(before, tiny_cnn.get_weights()))  # input untouched
    assert not any("prune" in type(layer).__name__.lower() for layer in outcome.model.layers)  # stripped
    assert 0 <= stats["test_accuracy"] <= 1 and np.isfinite(stats["history"]["loss"]).all()
    json.dumps(stats)


def test_fractional_epochs_train_on_that_share_of_the_batches(tiny_cnn, synthetic_data):
    from compress.keras import keras
    from compress.techniques.finetune import fine_tune, training_plan

    # 240 training images in batches of 16: 15 batches an epoch.
    assert training_plan(synthetic_data, 2, 16) == (2, 15)
    assert training_plan(synthetic_data, 0.5, 16) == (1, 8)
    assert training_plan(synthetic_data, 1.5, 16) == (2, 11)  # 22.5 batches as two Keras epochs of 11
    assert training_plan(synthetic_data, 0.01, 16) == (1, 1)

    batches = []

    class CountBatches(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            batches.append(0)

        def on_train_batch_end(self, batch, logs=None):
            batches[-1] += 1

    for epochs, expected in ((1.5, [11, 11]), (1, [15])):
        batches.clear()
        history = fine_tune(tiny_cnn, synthetic_data, epochs=epochs, batch_size=16, learning_rate=1e-3, verbose=0,
                            callbacks=[CountBatches()])
        assert batches == expected
        assert len(history["val_accuracy"]) == len(expected)


def test_pruning_over_half_an_epoch_reaches_its_target(tiny_cnn, synthetic_data):
    outcome = prune(tiny_cnn, PruneConfig(sparsity=0.75, epochs=0.5, batch_size=16), synthetic_data, verbose=0)

    assert outcome.stats["fine_tune_steps"] == 8
    assert len(outcome.stats["history"]["loss"]) == 1
    for name in outcome.stats["pruned_layers"]:
        assert abs(zeros(kernels(outcome.model)[name]) - 0.75) <= 0.01, name


def test_constant_schedule_with_per_layer_targets(tiny_cnn, synthetic_data):
    config = PruneConfig(sparsity=0.5, schedule="constant", layer_sparsity={"dense1": 0.9}, epochs=1, batch_size=32)
    outcome = prune(tiny_cnn, config, synthetic_data, verbose=0)
    measured = kernels(outcome.model)
    assert outcome.stats["target_sparsity"] == {"conv1": 0.5, "conv2": 0.5, "dense1": 0.9}
    for name, target in outcome.stats["target_sparsity"].items():
        assert abs(zeros(measured[name]) - target) <= 0.01, name


def m_by_n_groups(kernel, m):
    """Groups of `m` consecutive weights along the input-channel axis (zero-padded), as tfmot arranges them."""
    if kernel.ndim == 4:  # [h, w, in, out] -> [out*h*w, in]
        rows = np.transpose(kernel, (3, 0, 1, 2)).reshape(-1, kernel.shape[2])
    else:  # [in, out] -> [out, in]
        rows = kernel.T
    pad = -rows.shape[1] % m
    rows = np.pad(rows, ((0, 0), (0, pad)))
    return rows.reshape(rows.shape[0], -1, m)


def test_two_of_four_structure(tiny_cnn, synthetic_data):
    outcome = prune(tiny_cnn, PruneConfig(structure="2:4", epochs=1, batch_size=32), synthetic_data, verbose=0)
    measured = kernels(outcome.model)
    for name in ("conv1", "conv2", "dense1"):
        groups = m_by_n_groups(measured[name], 4)
        assert (np.count_nonzero(groups, axis=-1) <= 2).all(), name
    # conv2 (8 input channels) and dense1 (128) split into whole groups of 4: exactly half the weights are zero.
    assert zeros(measured["conv2"]) >= 0.5 and zeros(measured["dense1"]) >= 0.5
    assert np.count_nonzero(measured["logits"] == 0) == 0
    assert outcome.stats["structure"] == "2:4" and outcome.stats["target_sparsity"] is None


def test_chosen_layers_and_unknown_names(tiny_cnn, synthetic_data):
    with pytest.raises(ConfigError, match="nope.*conv1, conv2, dense1, logits"):
        prune(tiny_cnn, PruneConfig(layers=("nope",)), synthetic_data, verbose=0)
    with pytest.raises(ConfigError, match="logits.*pruned layers: conv1, conv2, dense1"):
        prune(tiny_cnn, PruneConfig(layer_sparsity={"logits": 0.5}), synthetic_data, verbose=0)
    outcome = prune(tiny_cnn, PruneConfig(sparsity=0.6, layers=("dense1", "logits"), epochs=1, batch_size=64),
                    synthetic_data, verbose=0)
    measured = kernels(outcome.model)
    assert outcome.stats["pruned_layers"] == ["dense1", "logits"]
    assert abs(zeros(measured["logits"]) - 0.6) <= 0.01
    assert np.count_nonzero(measured["conv1"] == 0) == 0


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"sparsity": 1.5}, "sparsity must be in (0, 1), got 1.5"),
        ({"sparsity": 0}, "sparsity must be in (0, 1), got 0"),
        ({"sparsity": 1.0}, "sparsity must be in (0, 1), got 1.0"),
        ({"schedule": "cubic"}, "schedule must be one of polynomial, constant, got 'cubic'"),
        ({"structure": "4:2"}, "structure must be N:M with 0 < N < M"),
        ({"structure": "2-4"}, "structure must be N:M with 0 < N < M"),
        ({"structure": "0:4"}, "structure must be N:M with 0 < N < M"),
        ({"structure": "2:4:8"}, "structure must be N:M with 0 < N < M"),
        ({"structure": "a:b"}, "structure must be N:M with 0 < N < M"),
        ({"layer_sparsity": "dense1=1.2"}, "layer_sparsity for dense1 must be in (0, 1), got 1.2"),
        ({"layer_sparsity": "dense1"}, "layer_sparsity must look like 'layer=value,layer=value'"),
        ({"structure": "2:4", "layer_sparsity": {"dense1": 0.9}}, "layer_sparsity does not apply with structure 2:4"),
        ({"epochs": 0}, "epochs must be a number in (0, 1000] (0.5 trains on half an epoch), got 0"),
        ({"learning_rate": 0}, "learning_rate must be in (0, 1), got 0"),
        ({"colour": "red"}, "unknown setting(s) colour"),
    ],
)
def test_out_of_range_settings_are_refused(settings, message):
    with pytest.raises(ConfigError) as caught:
        PruneConfig.from_dict(settings)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_config_round_trips_through_dict_and_toml():
    config = PruneConfig(sparsity=0.8, schedule="constant", layers=("conv2", "dense1"),
                         layer_sparsity={"dense1": 0.95, "conv2": 0.5}, epochs=3, batch_size=32, learning_rate=1e-3)
    assert PruneConfig.from_dict(config.to_dict()) == config
    assert PruneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert PruneConfig.from_dict(PruneConfig().to_dict()) == PruneConfig()
    hash(config)
    text = """
        sparsity = 0.8
        schedule = "constant"
        layers = ["conv2", "dense1"]
        epochs = 3
        batch_size = 32
        learning_rate = 1e-3
        [layer_sparsity]
        dense1 = 0.95
        conv2 = 0.5
    """
    assert PruneConfig.from_dict(tomllib.loads(text)) == config
    structured = PruneConfig.from_dict(tomllib.loads('structure = "2:4"\nlayers = "conv2, dense1"'))
    assert structured.m_by_n == (2, 4) and structured.layers == ("conv2", "dense1")
    assert PruneConfig(structure="1:4").m_by_n == (3, 4)  # keep 1 of 4 = tfmot's 3 zeros in blocks of 4
    assert PruneConfig.from_dict({"structure": " 2 : 4 ", "layers": "none"}) == PruneConfig(structure="2:4")


def test_unknown_technique_lists_known_names():
    from compress import registry

    with pytest.raises(ConfigError, match="unknown technique 'nope'; known techniques: prune, qat, .*cluster"):
        registry.get("nope")
    assert registry.get("prune").config_class is PruneConfig


def test_cli_refuses_out_of_range_sparsity(tmp_path, capsys):
    from compress.cli import main

    code = main(["prune", str(tmp_path / "model.keras"), "--out", str(tmp_path / "out"), "--sparsity", "1.5"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "compress: error: sparsity must be in (0, 1), got 1.5"


def test_cli_prunes_baseline_on_shipped_data(baseline_1epoch, tmp_path, capsys):
    from compress.cli import main
    from compress.kerasmodel import load_model

    out = tmp_path / "pruned"
    code = main(["prune", str(baseline_1epoch), "--out", str(out), "--data", "cifar10-mini", "--epochs", "1",
                 "--sparsity", "0.7", "--batch-size", "128", "--quiet"])
    assert code == 0, capsys.readouterr().err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["config"]["sparsity"] == 0.7 and stats["stats"]["pruned_layers"] == ["conv1", "conv2", "dense1"]
    for name, value in stats["stats"]["sparsity"].items():
        assert abs(value - 0.7) <= 0.01, name
    model = load_model(out / "model.keras")
    assert np.count_nonzero(model.get_layer("logits").kernel.numpy() == 0) == 0
    assert abs(zeros(model.get_layer("dense1").kernel.numpy()) - 0.7) <= 0.01


@pytest.mark.parametrize("technique", ["prune", "cluster", "qat"])
def test_a_qat_model_is_refused_with_the_order_to_use(technique, tiny_cnn, synthetic_data, tmp_path):
    from compress import registry
    from compress.errors import ModelError
    from compress.keras import tfmot

    entry = registry.get(technique)
    quantized = tfmot.quantization.keras.quantize_model(tiny_cnn)
    with pytest.raises(ModelError, match="quantization-aware \\(QAT\\) already.*apply them before qat"):
        entry.apply(quantized, entry.config_class(), synthetic_data, out_dir=tmp_path)


def test_channel_pruning_makes_a_smaller_model_that_exports_and_keeps_parity(tiny_cnn, synthetic_data, tmp_path):
    from compress.export.exporter import export_model
    from compress.kerasmodel import count_macs

    config = PruneConfig(structure="channels", sparsity=0.5, epochs=0.5, batch_size=16)
    outcome = prune(tiny_cnn, config, synthetic_data, verbose=0)
    smaller, channels = outcome.model, outcome.stats["channels"]
    assert smaller.output_shape == tiny_cnn.output_shape
    assert smaller.count_params() < 0.6 * tiny_cnn.count_params()
    assert count_macs(smaller) == channels["macs_after"] < channels["macs_before"] == count_macs(tiny_cnn)
    assert channels["layers"]["conv1"]["channels_after"] == 4 and channels["layers"]["logits"]["channels_after"] == 3
    assert 0.0 <= outcome.stats["test_accuracy"] <= 1.0
    result = export_model(smaller, tmp_path, data=synthetic_data, chain=["prune"])
    assert result["parity_ok"]


def test_channel_pruning_refuses_a_layer_list():
    with pytest.raises(ConfigError, match="structure channels"):
        PruneConfig(structure="channels", layers=("conv1",))


def test_channel_pruning_can_fine_tune_on_the_unpruned_models_outputs(tiny_cnn, synthetic_data):
    config = PruneConfig(structure="channels", sparsity=0.5, epochs=0.5, batch_size=16, distill=True)
    before = [weights.copy() for weights in tiny_cnn.get_weights()]
    outcome = prune(tiny_cnn, config, synthetic_data, verbose=0)
    assert outcome.stats["fine_tuning"] == "distilled from the unpruned model"
    assert outcome.model.count_params() < 0.6 * tiny_cnn.count_params()
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(outcome.stats["history"])
    assert all(np.array_equal(a, b) for a, b in zip(before, tiny_cnn.get_weights()))  # the teacher is left alone
    with pytest.raises(ConfigError, match="structure channels only"):
        PruneConfig(distill=True)
    with pytest.raises(ConfigError, match="channel_multiple applies with structure channels only"):
        PruneConfig(channel_multiple=8)


def test_channel_pruned_model_goes_through_qat_to_an_int8_file(tiny_cnn, synthetic_data, tmp_path):
    from compress.export.exporter import export_model
    from compress.techniques.qat import QATConfig, qat

    smaller = prune(tiny_cnn, PruneConfig(structure="channels", sparsity=0.5, epochs=0.5, batch_size=16),
                    synthetic_data, verbose=0).model
    quantized = qat(smaller, QATConfig(epochs=0.5, batch_size=16), synthetic_data, verbose=0).model
    result = export_model(quantized, tmp_path, data=synthetic_data, chain=["prune", "qat"])
    assert result["precision"] == "int8" and result["parity_ok"]


def test_training_whose_loss_becomes_nan_is_stopped_and_refused(synthetic_data):
    """A fine-tune that diverged went on to export NaN weights (and once crashed a converter): it stops at the
    first NaN batch and the stage is refused in one line."""
    from compress.errors import ModelError
    from compress.keras import keras
    from compress.techniques.finetune import fine_tune

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([keras.Input(synthetic_data.input_shape), layers.Conv2D(8, 3, activation="relu"),
                              layers.Flatten(), layers.Dense(3)])
    with pytest.raises(ModelError, match=r"training diverged: the loss became nan in epoch 1; a lower learning rate "
                                         r"than 1e\+30 may help"):
        fine_tune(model, synthetic_data, epochs=2, batch_size=32, learning_rate=1e30, verbose=0)
