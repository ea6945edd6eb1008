"""Structured pruning: the smaller model computes what the original computes with the removed channels zeroed.

Each shape (a chain with BatchNormalization, Flatten into Dense, a residual Add, a depthwise block, a Concatenate,
PReLU slopes)
is pruned, then compared with a masked copy of the original: removed filters and biases zeroed, removed
BatchNormalization channels set to output exactly 0 (gamma = beta = 0).
"""

import json

import numpy as np
import pytest

from compress.errors import ConfigError, ModelError
from compress.techniques.structured import count_macs, kept_count, remove_channels


def randomize(model, seed=0):
    """Random weights everywhere (biases and BatchNormalization statistics too), so that every channel matters."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = []
        for variable in layer.weights:
            shape = tuple(variable.shape)
            if "variance" in variable.name:
                weights.append(rng.uniform(0.5, 1.5, shape))
            else:
                weights.append(rng.normal(0.0, 0.5, shape))
        layer.set_weights([w.astype(np.float32) for w in weights])
    return model


def chain_model():
    """(a) Conv-BN-ReLU twice (the second strided) -> GlobalAveragePooling -> Dense classifier."""
    from compress.keras import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="r1")(x)
    x = layers.Conv2D(12, 3, strides=2, padding="same", name="c2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="r2")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(4, name="logits")(x)
    return randomize(keras.Model(inputs, outputs, name="chain"))


def flatten_model():
    """(b) Sequential Conv -> Flatten -> Dense -> Dense classifier."""
    from compress.keras import keras

    layers = keras.layers
    return randomize(keras.Sequential([
        keras.Input((6, 6, 3)),
        layers.Conv2D(6, 3, activation="relu", name="c1"),
        layers.Flatten(name="flatten"),
        layers.Dense(10, activation="relu", name="d1"),
        layers.Dense(3, name="logits"),
    ], name="flat"))


def residual_model():
    """(c) conv0 -> relu -> [conv1 -> BN -> relu -> conv2 -> BN] + the block input -> relu -> GAP -> Dense."""
    from compress.keras import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    block_in = layers.ReLU(name="r0")(layers.Conv2D(8, 3, padding="same", name="c0")(inputs))
    x = layers.Conv2D(6, 3, padding="same", name="c1")(block_in)
    x = layers.ReLU(name="r1")(layers.BatchNormalization(name="bn1")(x))
    x = layers.Conv2D(8, 3, padding="same", name="c2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="r2")(layers.Add(name="add")([x, block_in]))
    outputs = layers.Dense(3, name="logits")(layers.GlobalAveragePooling2D(name="gap")(x))
    return randomize(keras.Model(inputs, outputs, name="residual"))


def depthwise_model():
    """(d) Conv2D -> DepthwiseConv2D (multiplier 2) -> BN -> ReLU(6) -> Conv2D 1x1 -> GAP -> Dense."""
    from compress.keras import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    x = layers.ReLU(6.0, name="relu6")(layers.BatchNormalization(name="bn")(x))
    x = layers.Conv2D(10, 1, name="c2")(x)
    outputs = layers.Dense(3, name="logits")(layers.GlobalAveragePooling2D(name="gap")(x))
    return randomize(keras.Model(inputs, outputs, name="depthwise"))


def separable_model():
    """(e) The Keras image-classification guide's shape: its preprocessing, Conv2D, then SeparableConv2D blocks."""
    from compress.keras import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Normalization(axis=-1, name="norm")(layers.Rescaling(1 / 255, name="rescale")(inputs))
    x = layers.Conv2D(8, 3, padding="same", name="c1")(x)
    x = layers.SeparableConv2D(12, 3, padding="same", depth_multiplier=2, name="s1")(x)
    x = layers.ReLU(name="relu")(layers.BatchNormalization(name="bn")(x))
    x = layers.SeparableConv2D(10, 3, padding="same", name="s2")(x)
    outputs = layers.Dense(3, name="logits")(layers.GlobalAveragePooling2D(name="gap")(x))
    return randomize(keras.Model(inputs, outputs, name="separable"))


def squeeze_excite_model():
    """(f) EfficientNet's squeeze-and-excitation: pooled channels reshaped to (1, 1, C), reduced, expanded, and
    multiplied back onto the block; then Reshapes that keep the channels last and that flatten, as Flatten does."""
    from compress.keras import keras

    layers = keras.layers
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inputs)
    gate = layers.Reshape((1, 1, 8), name="se_reshape")(layers.GlobalAveragePooling2D(name="se_pool")(x))
    gate = layers.Conv2D(4, 1, activation="relu", name="se_reduce")(gate)
    gate = layers.Conv2D(8, 1, activation="sigmoid", name="se_expand")(gate)
    x = layers.Multiply(name="se_excite")([x, gate])
    x = layers.Conv2D(6, 3, strides=2, name="c2")(x)
    x = layers.Reshape((4, 6), name="pixels")(x)  # (2, 2, 6) -> (pixels, channels)
    outputs = layers.Dense(3, name="logits")(layers.Reshape((-1,), name="flat")(x))
    return randomize(keras.Model(inputs, outputs, name="squeeze_excite"))


def concat_model():
    """Two convolutions of the input concatenated, then a convolution reading both."""
    from compress.keras import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(inputs)
    b = layers.Conv2D(6, 1, activation="relu", name="b")(inputs)
    x = layers.Conv2D(5, 3, padding="same", name="c")(layers.Concatenate(name="cat")([a, b]))
    outputs = layers.Dense(3, name="logits")(layers.GlobalMaxPooling2D(name="gmp")(x))
    return randomize(keras.Model(inputs, outputs, name="concat"))


def prelu_model():
    """PReLU slopes per channel (shared over height and width), per position and channel, per Dense unit."""
    from compress.keras import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.PReLU(shared_axes=[1, 2], name="p1")(layers.Conv2D(8, 3, padding="same", name="c1")(inputs))
    x = layers.PReLU(name="p2")(layers.Conv2D(6, 3, strides=2, padding="same", name="c2")(x))
    x = layers.PReLU(name="p3")(layers.Dense(10, name="d1")(layers.Flatten(name="flatten")(x)))
    return randomize(keras.Model(inputs, layers.Dense(4, name="logits")(x), name="prelu"))


def masked_copy(model, info):
    """The original with the removed channels zeroed, so that they output exactly 0."""
    from compress.keras import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for name, entry in info["layers"].items():
        removed = entry["removed"]
        if not removed:
            continue
        layer = copy.get_layer(name)
        weights = layer.get_weights()
        if entry["type"] in ("Conv2D", "Dense"):
            weights[0][..., removed] = 0
            weights[1][removed] = 0
        elif entry["type"] == "SeparableConv2D":  # the pointwise filters and the bias
            weights[1][..., removed] = 0
            weights[2][removed] = 0
        elif entry["type"] == "DepthwiseConv2D":
            multiplier = weights[0].shape[-1]
            for channel in removed:
                weights[0][:, :, channel // multiplier, channel % multiplier] = 0
            weights[1][removed] = 0
        elif entry["type"] == "BatchNormalization":
            weights[0][removed] = 0  # gamma
            weights[1][removed] = 0  # beta
        else:
            raise AssertionError(f"unexpected pruned layer type {entry['type']}")
        layer.set_weights(weights)
    return copy


def outputs_of(model, shape, seed=1):
    images = np.random.default_rng(seed).normal(size=(4, *shape)).astype(np.float32)
    return model(images, training=False).numpy()


SHAPES = {
    "chain": (chain_model, ["c1", "c2"]),
    "flatten": (flatten_model, ["c1", "d1"]),
    "residual": (residual_model, ["c0", "c1", "c2"]),
    "depthwise": (depthwise_model, ["c1", "c2"]),
    "concat": (concat_model, ["a", "b", "c"]),
    "separable": (separable_model, ["c1", "s1", "s2"]),
    "squeeze_excite": (squeeze_excite_model, ["c1", "se_reduce", "c2"]),
    "prelu": (prelu_model, ["c1", "c2", "d1"]),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_pruned_model_computes_what_the_masked_original_computes(shape):
    build, pruned_layers = SHAPES[shape]
    model = build()
    before = [w.copy() for w in model.get_weights()]
    pruned, info = remove_channels(model, sparsity=0.5)

    assert pruned.output_shape == model.output_shape
    for name in pruned_layers:
        entry = info["layers"][name]
        assert entry["channels_after"] == entry["channels_before"] - entry["channels_before"] // 2, name
        assert len(entry["removed"]) == entry["channels_before"] // 2
        assert entry["score"] == "l1"
        assert pruned.get_layer(name).output.shape[-1] == entry["channels_after"]
    assert info["layers"]["logits"]["channels_after"] == info["layers"]["logits"]["channels_before"]
    assert "logits" in info["left_alone"] and "classifier" in info["left_alone"]["logits"]
    assert set(info["left_alone"]) == {"logits"}  # preprocessing at the input is followed, not left whole
    assert info["params_after"] == pruned.count_params() < model.count_params() == info["params_before"]
    assert info["macs_after"] == count_macs(pruned) < count_macs(model) == info["macs_before"]
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # original untouched
    json.dumps(info)

    input_shape = model.input_shape[1:]
    masked = outputs_of(masked_copy(model, info), input_shape)
    assert np.abs(masked - outputs_of(model, input_shape)).max() > 1e-3  # the removed channels did matter
    np.testing.assert_allclose(outputs_of(pruned, input_shape), masked, atol=1e-5, rtol=1e-5)


def test_residual_add_removes_the_same_channels_from_both_branches():
    pruned, info = remove_channels(residual_model(), sparsity=0.5, layer_sparsity={"c2": 0.25}, score="l2")
    group = next(g for g in info["groups"] if "c2" in g["layers"])
    assert sorted(group["layers"]) == ["c0", "c2"] and group["pruned"]
    assert group["sparsity"] == 0.25 and group["channels_after"] == 6  # the smaller share of the two members
    layers = info["layers"]
    assert layers["c0"]["removed"] == layers["c2"]["removed"] == layers["bn2"]["removed"]
    assert len(layers["c0"]["removed"]) == 2 and layers["c0"]["score"] == "l2"
    assert layers["c1"]["channels_after"] == 3
    assert pruned.get_layer("bn2").get_weights()[0].shape == (6,)


def test_flatten_into_dense_and_sequential_stay_sequential():
    from compress.keras import keras

    model = flatten_model()
    pruned, info = remove_channels(model, sparsity=0.5, layer_sparsity={"d1": 0.3})
    assert isinstance(pruned, keras.Sequential)
    assert info["layers"]["d1"]["channels_after"] == 7  # floor(0.3 * 10) = 3 removed
    assert pruned.get_layer("d1").get_weights()[0].shape == (4 * 4 * 3, 7)  # 16 pixels x 3 kept channels


def test_sparsity_zero_returns_an_equivalent_model():
    model = residual_model()
    pruned, info = remove_channels(model, sparsity=0.0)
    assert pruned.count_params() == model.count_params() and info["macs_after"] == info["macs_before"]
    assert all(entry["removed"] == [] for entry in info["layers"].values())
    np.testing.assert_allclose(outputs_of(pruned, (8, 8, 3)), outputs_of(model, (8, 8, 3)), atol=1e-6)


def test_at_least_one_channel_stays():
    _, info = remove_channels(chain_model(), sparsity=0.99)
    assert info["layers"]["c1"]["channels_after"] == 1 and info["layers"]["c2"]["channels_after"] == 1


@pytest.mark.parametrize("width, share, multiple, kept", [
    (32, 0.35, 1, 21), (32, 0.35, 16, 16), (64, 0.35, 16, 48), (128, 0.35, 16, 80), (128, 0.35, 8, 88),
    (64, 0.1, 16, 64), (32, 0.9, 16, 16), (24, 0.5, 16, 12), (40, 0.99, 8, 8), (256, 0.5, 16, 128),
])
def test_kept_channels_round_to_the_nearest_multiple(width, share, multiple, kept):
    # 32 x 0.65 = 20.8 -> 21 -> 16 (nearest); 24 < 2 x 16: not rounded; 40 x 0.01 -> 1 -> 8 (at least one multiple)
    assert kept_count(width, share, multiple) == kept


def test_a_channel_multiple_rounds_the_pruned_model_and_keeps_its_outputs():
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="c2")(x)
    outputs = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(x))
    model = randomize(keras.Model(inputs, outputs))
    pruned, info = remove_channels(model, sparsity=0.35, multiple=16)
    assert info["channel_multiple"] == 16
    assert [pruned.get_layer(name).get_weights()[0].shape[-1] for name in ("c1", "c2", "logits")] == [16, 48, 3]
    masked = outputs_of(masked_copy(model, info), (8, 8, 3))
    np.testing.assert_allclose(outputs_of(pruned, (8, 8, 3)), masked, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="channel multiple must be an integer from 1 to 256"):
        remove_channels(model, sparsity=0.5, multiple=0)


def test_count_macs_matches_a_hand_count():
    # c1: 4x4 outputs x 6 filters x 3x3x3 kernel; d1: 96 inputs x 10 units; logits: 10 x 3.
    assert count_macs(flatten_model()) == 16 * 6 * 27 + 96 * 10 + 10 * 3
    # c1: 8x8x8 x 27; c2 (stride 2): 4x4x12 x 3x3x8; logits: 12 x 4.
    assert count_macs(chain_model()) == 8 * 8 * 8 * 27 + 4 * 4 * 12 * 72 + 12 * 4
    # c1: 8x8x8 x 27; dw: 8x8x16 outputs x 3x3; c2 (1x1): 8x8x10 x 16; logits: 10 x 3.
    assert count_macs(depthwise_model()) == 8 * 8 * 8 * 27 + 8 * 8 * 16 * 9 + 8 * 8 * 10 * 16 + 10 * 3


def test_count_macs_of_separable_and_transposed_convolutions():
    from compress.keras import keras

    layers = keras.layers
    model = keras.Sequential([
        keras.Input((4, 4, 2)),
        layers.SeparableConv2D(3, 3, padding="same", depth_multiplier=2, name="sep"),
        layers.Conv2DTranspose(5, 2, strides=2, name="up"),
    ])
    # sep: 4x4 pixels x 4 middle channels x (9 depthwise + 3 pointwise); up: 4x4x3 inputs x 2x2 x 5.
    assert count_macs(model) == 16 * 4 * (9 + 3) + 16 * 3 * 4 * 5


def test_unsupported_layers_are_left_whole_and_reported():
    from compress.keras import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = layers.LayerNormalization(name="norm")(x)
    x = layers.Conv2D(6, 3, padding="same", name="c2")(x)
    x = layers.SeparableConv2D(4, 3, name="sep")(layers.ReLU(name="relu")(x))
    outputs = layers.Dense(3, name="logits")(layers.GlobalAveragePooling2D(name="gap")(x))
    model = randomize(keras.Model(inputs, outputs))

    pruned, info = remove_channels(model, sparsity=0.5)
    assert "LayerNormalization" in info["left_alone"]["norm"]
    assert "norm" in info["left_alone"]["c1"] and info["layers"]["c1"]["channels_after"] == 8
    assert info["layers"]["c2"]["channels_after"] == 3 and info["layers"]["sep"]["channels_after"] == 2
    assert pruned.get_layer("sep").get_weights()[0].shape == (3, 3, 3, 1)
    json.dumps(info)
    input_shape = (8, 8, 3)
    np.testing.assert_allclose(outputs_of(pruned, input_shape), outputs_of(masked_copy(model, info), input_shape),
                               atol=1e-5, rtol=1e-5)


def test_a_rescaling_of_each_channel_by_its_own_factor_keeps_the_channels_it_reads():
    from compress.keras import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, padding="same", name="c1")(inputs)
    x = layers.Rescaling([1.0, 2.0, 3.0, 4.0], name="scale")(x)
    x = layers.Conv2D(6, 3, padding="same", name="c2")(x)
    outputs = layers.Dense(2, name="logits")(layers.GlobalAveragePooling2D(name="gap")(x))
    _, info = remove_channels(randomize(keras.Model(inputs, outputs)), sparsity=0.5)
    assert info["left_alone"]["scale"] == "rescales each channel by its own factor"
    assert info["layers"]["c1"]["channels_after"] == 4 and info["layers"]["c2"]["channels_after"] == 3


def test_a_reshape_across_the_channels_keeps_the_channels_it_reads():
    from compress.keras import keras

    layers = keras.layers
    inputs = keras.Input((4, 4, 3))
    x = layers.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = layers.Reshape((4, 4, 2, 3), name="split")(x)
    x = layers.Dense(4, name="d1")(layers.Flatten(name="flat")(x))
    _, info = remove_channels(randomize(keras.Model(inputs, layers.Dense(2, name="logits")(x))), sparsity=0.5)
    assert info["left_alone"]["split"] == "reshapes across the channels"
    assert info["layers"]["c1"]["channels_after"] == 6 and info["layers"]["d1"]["channels_after"] == 2


def test_add_with_the_model_input_leaves_the_group_whole():
    from compress.keras import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Add(name="add")([layers.Conv2D(3, 3, padding="same", name="c1")(inputs), inputs])
    x = layers.Conv2D(6, 3, padding="same", name="c2")(x)
    outputs = layers.Dense(2, name="logits")(layers.GlobalAveragePooling2D(name="gap")(x))
    _, info = remove_channels(randomize(keras.Model(inputs, outputs)), sparsity=0.5)
    assert "model input" in info["left_alone"]["c1"] and info["layers"]["c1"]["channels_after"] == 3
    assert info["layers"]["c2"]["channels_after"] == 3


@pytest.mark.parametrize("sparsity", [1.0, -0.1, "x", float("nan"), True])
def test_bad_sparsity_is_one_config_error_line(sparsity):
    with pytest.raises(ConfigError, match=r"^sparsity must be a number in \[0, 1\)") as caught:
        remove_channels(chain_model(), sparsity=sparsity)
    assert "\n" not in str(caught.value)


def test_bad_layer_sparsity_and_score_are_refused():
    model = chain_model()
    with pytest.raises(ConfigError, match="layer_sparsity for c1"):
        remove_channels(model, sparsity=0.5, layer_sparsity={"c1": 1.5})
    with pytest.raises(ConfigError, match="nope"):
        remove_channels(model, sparsity=0.5, layer_sparsity={"nope": 0.5})
    with pytest.raises(ConfigError, match="score"):
        remove_channels(model, sparsity=0.5, score="random")


def test_model_without_prunable_layer_is_refused():
    from compress.keras import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="logits")])
    with pytest.raises(ModelError, match="no layer whose channels can be removed") as caught:
        remove_channels(model, sparsity=0.5)
    assert "\n" not in str(caught.value)


def test_a_model_of_many_layers_left_whole_is_refused_in_a_short_line():
    from compress.keras import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for index in range(12):
        x = layers.GroupNormalization(2, name=f"norm{index}")(layers.Conv2D(4, 3, padding="same", name=f"c{index}")(x))
    outputs = layers.Dense(2, name="logits")(layers.GlobalAveragePooling2D()(x))
    refusal = r"norm0: GroupNormalization layers are not supported; .*; and \d+ more$"
    with pytest.raises(ModelError, match=refusal) as caught:
        remove_channels(keras.Model(inputs, outputs), sparsity=0.5)
    assert len(str(caught.value)) < 400
