"""Weight clustering: at most `clusters` distinct values per clustered kernel, classifier left whole, config, CLI."""

import json
import tomllib

import numpy as np
import pytest

from compress.errors import ConfigError, ModelError
from compress.techniques.cluster import INITS, ClusterConfig, cluster


def unique(model, name):
    return np.unique(model.get_layer(name).kernel.numpy()).size


@pytest.mark.parametrize("init", list(INITS))
def test_clustered_kernels_hold_at_most_k_values(tiny_cnn, synthetic_data, init):
    before = [w.copy() for w in tiny_cnn.get_weights()]
    config = ClusterConfig(clusters=4, init=init, epochs=1, batch_size=32)
    outcome = cluster(tiny_cnn, config, synthetic_data, verbose=0)
    stats = outcome.stats

    assert stats["clustered_layers"] == ["conv1", "conv2", "dense1"]
    for name in stats["clustered_layers"]:
        assert 2 <= unique(outcome.model, name) <= 4, name
        assert stats["unique_values"][name] == unique(outcome.model, name)
    assert unique(outcome.model, "logits") > 4  # classifier not clustered
    assert all(np.array_equal(a, b) for a, b in zip(before, tiny_cnn.get_weights()))  # input untouched
    assert [type(layer).__name__ for layer in outcome.model.layers] == [
        type(layer).__name__ for layer in tiny_cnn.layers
    ]  # stripped
    assert 0 <= stats["test_accuracy"] <= 1 and np.isfinite(stats["history"]["loss"]).all()
    json.dumps(stats)


def test_linear_centroids_leave_a_peaked_kernel_in_fewer_bits_than_kmeans(tiny_cnn, synthetic_data):
    """Trained kernels are peaked at zero with a few large weights: linear centroids give those their own values
    and leave most weights in the central ones, which gzip codes in fewer bits (k-means++ fills its clusters
    evenly)."""
    import gzip

    dense = tiny_cnn.get_layer("dense1")
    kernel = np.random.default_rng(0).laplace(0, 0.02, dense.kernel.shape).astype(np.float32)
    dense.kernel.assign(kernel)

    def gzip_bits(init):
        config = ClusterConfig(clusters=8, init=init, layers=("dense1",), epochs=0.01, learning_rate=1e-9)
        values = cluster(tiny_cnn, config, synthetic_data, verbose=0).model.get_layer("dense1").kernel.numpy()
        codes = np.unique(values, return_inverse=True)[1].astype(np.uint8)
        return 8 * len(gzip.compress(codes.tobytes(), 9)) / codes.size

    linear, kmeans = gzip_bits("linear"), gzip_bits("kmeans_plus_plus")
    assert linear < kmeans - 0.3, (linear, kmeans)


def test_chosen_layers_unknown_names_and_too_few_weights(tiny_cnn, synthetic_data):
    with pytest.raises(ConfigError, match="nope.*conv1, conv2, dense1, logits"):
        cluster(tiny_cnn, ClusterConfig(layers=("nope",)), synthetic_data, verbose=0)
    with pytest.raises(ModelError, match="conv1 \\(216 weights\\)"):
        cluster(tiny_cnn, ClusterConfig(clusters=256), synthetic_data, verbose=0)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"clusters": 0}, "clusters must be an integer from 2 to 256, got 0"),
        ({"clusters": 1}, "clusters must be an integer from 2 to 256, got 1"),
        ({"clusters": 2.5}, "clusters must be"),  # the wording of a wrong type is the config base's
        ({"init": "best"}, "init must be one of linear, kmeans_plus_plus, density, random, got 'best'"),
        ({"epochs": -1}, "epochs must be a number in (0, 1000] (0.5 trains on half an epoch), got -1"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ],
)
def test_out_of_range_settings_are_refused(settings, message):
    with pytest.raises(ConfigError) as caught:
        ClusterConfig.from_dict(settings)
    assert message in str(caught.value)


def test_config_round_trips_through_dict_and_toml():
    config = ClusterConfig(clusters=8, init="density", layers=("dense1",), epochs=1, batch_size=16, learning_rate=1e-3)
    assert ClusterConfig.from_dict(config.to_dict()) == config
    assert ClusterConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert ClusterConfig.from_dict(ClusterConfig().to_dict()) == ClusterConfig()
    text = 'clusters = 8\ninit = "density"\nlayers = ["dense1"]\nepochs = 1\nbatch_size = 16\nlearning_rate = 0.001\n'
    assert ClusterConfig.from_dict(tomllib.loads(text)) == config


def test_cli_refuses_one_cluster(tmp_path, capsys):
    from compress.cli import main

    code = main(["cluster", str(tmp_path / "model.keras"), "--out", str(tmp_path / "out"), "--clusters", "1"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "compress: error: clusters must be an integer from 2 to 256, got 1"


def test_cli_clusters_baseline_on_shipped_data(baseline_1epoch, tmp_path, capsys):
    from compress.cli import main
    from compress.kerasmodel import load_model

    out = tmp_path / "clustered"
    code = main(["cluster", str(baseline_1epoch), "--out", str(out), "--data", "cifar10-mini", "--epochs", "1",
                 "--clusters", "8", "--init", "linear", "--batch-size", "128", "--quiet"])
    assert code == 0, capsys.readouterr().err
    stats = json.loads((out / "stats.json").read_text())["stats"]
    assert stats["clustered_layers"] == ["conv1", "conv2", "dense1"]
    model = load_model(out / "model.keras")
    for name in stats["clustered_layers"]:
        assert unique(model, name) <= 8, name
    assert unique(model, "logits") > 8


def test_sorted_lookup_finds_the_nearest_centroid_as_tfmot_does():
    from compress.keras import ClusteringAlgorithm, tf
    from compress.techniques.cluster import nearest_centroids

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(5, 3, 3, 40)).astype(np.float32)
    weights[0, 0, 0, :3] = [-10.0, 10.0, 0.0]  # beyond both ends, and exactly on a centroid
    centroids = tf.Variable(rng.permutation(np.linspace(-1, 1, 7)).astype(np.float32))  # unsorted, holds 0.0
    ours = nearest_centroids(weights, centroids).numpy()
    theirs = ClusteringAlgorithm(centroids).get_pulling_indices(weights).numpy()
    assert ours.dtype == np.int64 and ours.shape == weights.shape
    values = centroids.numpy()
    assert np.array_equal(np.abs(weights - values[ours]), np.abs(weights - values[theirs]))
    assert values[ours[0, 0, 0, 2]] == 0.0 and ours[0, 0, 0, 0] == np.argmin(values)


def test_clustering_wrappers_get_the_sorted_lookup_and_compute_the_same(tiny_cnn, synthetic_data):
    from compress.keras import keras, tfmot
    from compress.techniques.cluster import use_sorted_lookup

    clustering = tfmot.clustering.keras
    wrapped = keras.models.clone_model(
        tiny_cnn,
        clone_function=lambda layer: layer if layer.name not in ("conv1", "conv2", "dense1") else
        clustering.cluster_weights(layer, number_of_clusters=4,
                                   cluster_centroids_init=clustering.CentroidInitialization.LINEAR),
    )
    images = synthetic_data.normalized("test")[0][:16]
    before = wrapped(images, training=False).numpy()
    use_sorted_lookup(wrapped)
    algorithms = [algorithm for layer in wrapped.layers
                  for algorithm in getattr(layer, "clustering_algorithms", {}).values()]
    assert [type(algorithm).__name__ for algorithm in algorithms] == ["SortedLookupClustering"] * 3
    np.testing.assert_allclose(wrapped(images, training=False).numpy(), before, rtol=1e-6, atol=1e-6)


def test_separable_convolutions_are_pruned_and_clustered_in_their_pointwise_kernels(synthetic_data):
    """An Xception-style model keeps most weights in SeparableConv2D pointwise kernels: pruning and clustering
    work on them (tfmot leaves the small depthwise kernels alone), instead of listing them as left alone."""
    from compress.keras import keras
    from compress.techniques.prune import PruneConfig, prune

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([keras.Input(synthetic_data.input_shape), layers.Conv2D(8, 3, name="stem"),
                              layers.SeparableConv2D(32, 3, padding="same", name="sep1"),
                              layers.SeparableConv2D(32, 3, padding="same", name="sep2"),
                              layers.GlobalAveragePooling2D(), layers.Dense(synthetic_data.num_classes, name="logits")])
    clustered = cluster(model, ClusterConfig(clusters=4, epochs=1, batch_size=32), synthetic_data, verbose=0)
    assert {"sep1", "sep2"} <= set(clustered.stats["clustered_layers"]) and "sep1" not in clustered.stats["left_alone"]
    for name in ("sep1", "sep2"):
        assert np.unique(clustered.model.get_layer(name).pointwise_kernel.numpy()).size <= 4
    pruned = prune(model, PruneConfig(sparsity=0.5, epochs=1, batch_size=32), synthetic_data, verbose=0)
    kernel = pruned.model.get_layer("sep2").pointwise_kernel.numpy()
    assert float(np.mean(kernel == 0)) == pytest.approx(0.5, abs=0.02)
