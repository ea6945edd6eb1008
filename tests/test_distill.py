"""Knowledge distillation: the loss by hand, the student architectures, training, the config and the CLI."""

import json
import tomllib

import numpy as np
import pytest

from compress.cli import main
from compress.errors import ConfigError, ModelError
from compress.techniques.distill import DistillConfig, distill, distillation_loss


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_distillation_loss_matches_numpy(alpha):
    labels = np.array([0, 2])
    student = np.array([[2.0, 1.0, 0.1], [0.5, 0.3, 1.5]], dtype=np.float32)
    teacher = np.array([[3.0, 0.5, -1.0], [-0.5, 0.2, 2.5]], dtype=np.float32)
    temperature = 2.0
    hard = -np.log(_softmax(student)[np.arange(2), labels])
    p_teacher, p_student = _softmax(teacher / temperature), _softmax(student / temperature)
    kl = np.sum(p_teacher * np.log(p_teacher / p_student), axis=-1)
    expected = np.mean(alpha * hard + (1 - alpha) * temperature**2 * kl)
    got = float(distillation_loss(labels, student, teacher, alpha, temperature))
    assert got == pytest.approx(expected, rel=1e-5)


def test_distillation_loss_soft_term_vanishes_when_student_matches_teacher():
    logits = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], dtype=np.float32)
    assert float(distillation_loss(np.array([1, 0]), logits, logits, 0.0, 3.0)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("student, filters", [("compact_cnn", [16, 16, 32, 64]), ("conv_pool_cnn", [16, 32, 64]),
                                             ("strided_cnn", [16, 32, 64])])
@pytest.mark.parametrize("shape, classes", [((32, 32, 3), 10), ((28, 28, 1), 5)])
def test_students_build_for_the_input_and_scale_with_width(student, filters, shape, classes):
    from compress.students import STUDENTS, build_student

    small, large = (build_student(student, shape, classes, width) for width in (8, 16))
    assert small.input_shape == (None, *shape) and small.output_shape == (None, classes)
    assert 3 * small.count_params() < large.count_params() < 5 * small.count_params()  # ~width squared
    kinds = {type(layer).__name__ for layer in large.layers}
    assert kinds <= {"InputLayer", "Conv2D", "BatchNormalization", "ReLU", "MaxPooling2D",
                     "GlobalAveragePooling2D", "Dense"}
    assert [layer.filters for layer in large.layers if type(layer).__name__ == "Conv2D"] == filters
    assert student in STUDENTS


def test_the_strided_student_computes_its_first_convolution_at_half_the_size():
    from compress.kerasmodel import count_macs
    from compress.students import build_student

    pooled, strided = (build_student(name, (32, 32, 3), 10, 32) for name in ("conv_pool_cnn", "strided_cnn"))
    assert strided.get_layer("conv1").output_shape == (None, 16, 16, 32)
    assert "conv1_pool" not in {layer.name for layer in strided.layers}
    assert strided.count_params() == pooled.count_params() and strided.output_shape == pooled.output_shape
    saved = 32 * 32 * 32 * 27 * 3 // 4  # three quarters of conv1's multiply-adds at 32x32
    assert count_macs(pooled) - count_macs(strided) == saved


@pytest.fixture(scope="module")
def teacher(synthetic_data):
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input(synthetic_data.input_shape),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(synthetic_data.num_classes),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(synthetic_data.pipeline("train", 32, shuffle=True), epochs=3, verbose=0)
    return model


def test_a_student_ending_in_softmax_is_distilled_on_its_log_probabilities(teacher, synthetic_data):
    from compress.keras import keras
    from compress.techniques.distill import make_distiller

    keras.utils.set_random_seed(1)
    student = keras.Sequential([keras.Input(synthetic_data.input_shape), keras.layers.Flatten(),
                                keras.layers.Dense(synthetic_data.num_classes, activation="softmax")])
    distiller = make_distiller(teacher, student, synthetic_data, alpha=0.5, temperature=4.0)
    distiller.compile(optimizer="adam")
    images, labels = synthetic_data.normalized("test")
    images, labels = images[:32], labels[:32]
    loss = distiller.evaluate(images, labels, batch_size=32, verbose=0, return_dict=True)["loss"]
    student_log_probabilities = np.log(student.predict(images, verbose=0))
    expected = distillation_loss(labels, student_log_probabilities, teacher.predict(images, verbose=0), 0.5, 4.0)
    assert loss == pytest.approx(float(expected), rel=1e-4)


def test_distill_trains_a_named_student_and_leaves_the_teacher_unchanged(teacher, synthetic_data, tmp_path):
    from compress.kerasmodel import load_model, save_model
    from compress.keras import keras
    from compress.students import build_student

    before = teacher.get_weights()
    config = DistillConfig(width=4, epochs=3, batch_size=32, learning_rate=1e-2, augment=False)
    outcome = distill(teacher, config, synthetic_data, out_dir=tmp_path, verbose=0)

    assert all(np.array_equal(a, b) for a, b in zip(before, teacher.get_weights(), strict=True))
    keras.utils.set_random_seed(synthetic_data.seed)  # distill builds its student from the data's seed
    initial = build_student("compact_cnn", synthetic_data.input_shape, synthetic_data.num_classes, 4).get_weights()
    student = outcome.model
    assert student is not teacher and student.output_shape == (None, 3)
    assert not all(np.array_equal(a, b) for a, b in zip(initial, student.get_weights(), strict=True))

    stats = json.loads(json.dumps(outcome.stats))
    assert stats["student_params"] == student.count_params() and stats["teacher_params"] == teacher.count_params()
    for key in ("teacher_test_accuracy", "student_test_accuracy", "scratch_test_accuracy"):
        assert 0.0 <= stats[key] <= 1.0
    assert stats["epochs"] == 3 and len(stats["history"]["loss"]) == 3 and len(stats["scratch_history"]["loss"]) == 3
    assert stats["student_test_accuracy"] > 0.5  # three easy classes: well above chance
    reloaded = load_model(save_model(student, tmp_path / "student.keras"))
    images = synthetic_data.normalized("test")[0][:8]
    assert np.allclose(reloaded.predict(images, verbose=0), student.predict(images, verbose=0), atol=1e-5)


def test_student_from_a_keras_file_is_trained_and_the_file_left_alone(teacher, synthetic_data, tmp_path):
    from compress.kerasmodel import load_model, save_model
    from compress.keras import keras

    path = save_model(keras.Sequential([
        keras.Input(synthetic_data.input_shape),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(synthetic_data.num_classes),
    ]), tmp_path / "mine.keras")
    initial = load_model(path).get_weights()
    config = DistillConfig(student=str(path), epochs=1, compare_scratch=False, augment=False)
    outcome = distill(teacher, config, synthetic_data, out_dir=tmp_path, verbose=0)
    assert not all(np.array_equal(a, b) for a, b in zip(initial, outcome.model.get_weights(), strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(initial, load_model(path).get_weights(), strict=True))
    assert "scratch_test_accuracy" not in outcome.stats
    assert outcome.stats["student"] == str(path)


def test_student_file_that_does_not_fit_the_data_is_refused(teacher, synthetic_data, tmp_path):
    from compress.kerasmodel import save_model
    from compress.keras import keras

    path = save_model(keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(7)]),
                      tmp_path / "wrong.keras")
    with pytest.raises(ModelError, match="7.*3 classes"):
        distill(teacher, DistillConfig(student=str(path)), synthetic_data, out_dir=tmp_path, verbose=0)


def test_config_round_trips_through_dict_and_toml():
    config = DistillConfig(width=8, alpha=0.3, temperature=2.5, epochs=4, augment=False, compare_scratch=False)
    assert DistillConfig.from_dict(config.to_dict()) == config
    toml = "\n".join(f"{key} = {json.dumps(value)}" for key, value in config.to_dict().items())
    assert DistillConfig.from_dict(tomllib.loads(toml)) == config
    assert DistillConfig.from_dict({"alpha": "0.25", "augment": "false"}) == DistillConfig(alpha=0.25, augment=False)


@pytest.mark.parametrize("settings, message", [
    ({"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0"),
    ({"temperature": -1.0}, "temperature"),
    ({"alpha": -0.1}, r"alpha must be in \[0, 1\], got -0.1"),
    ({"alpha": 1.5}, "alpha"),
    ({"student": "resnet9"}, "unknown student 'resnet9'; known students: compact_cnn, conv_pool_cnn, strided_cnn"),
    ({"width": -1}, r"width must be an integer from 0 \(sized from the teacher\) to 1024"),
    ({"epochs": 0}, "epochs"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig(**settings)


def test_cli_refuses_a_bad_temperature_in_one_line(teacher, tmp_path, capsys):
    from compress.kerasmodel import save_model

    model = save_model(teacher, tmp_path / "teacher.keras")
    assert main(["distill", str(model), "--out", str(tmp_path / "out"), "--temperature", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "temperature" in err and "got 0.0" in err
    assert not (tmp_path / "out").exists()


def test_cli_distills_the_one_epoch_baseline(baseline_1epoch, tmp_path):
    from compress.kerasmodel import load_model

    out = tmp_path / "distilled"
    assert main(["distill", str(baseline_1epoch), "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["technique"] == "distill" and stats["config"]["epochs"] == 1
    assert stats["stats"]["teacher_params"] == 5_616_266
    assert stats["stats"]["student_params"] < stats["stats"]["teacher_params"] / 50
    for key in ("teacher_test_accuracy", "student_test_accuracy", "scratch_test_accuracy"):
        assert 0.0 <= stats["stats"][key] <= 1.0
    assert load_model(out / "model.keras").output_shape == (None, 10)


def test_default_student_is_sized_from_the_teacher(synthetic_data):
    """Width 0: the widest student up to 16 with at most a quarter of the teacher's parameters; never larger."""
    from compress.errors import ModelError
    from compress.techniques.distill import AUTO_MIN_WIDTH, AUTO_TEACHER_SHARE, _make_student

    from compress.kerasmodel import count_macs
    from compress.students import build_student

    config = DistillConfig()
    assert config.width == 0
    wide = _make_student(config, synthetic_data, 10_000_000, None)
    assert wide.name.endswith("_w16")
    small = _make_student(config, synthetic_data, 8_000, None)
    assert small.count_params() <= AUTO_TEACHER_SHARE * 8_000 and not small.name.endswith("_w16")
    with pytest.raises(ModelError, match="would not make this model smaller"):
        _make_student(config, synthetic_data, 50, None)
    too_narrow = build_student(config.student, (8, 8, 3), 3, AUTO_MIN_WIDTH - 1).count_params()
    with pytest.raises(ModelError, match=f"width {AUTO_MIN_WIDTH}"):  # only a student too narrow to learn would fit
        _make_student(config, synthetic_data, int(too_narrow / AUTO_TEACHER_SHARE), None)
    assert small.output_shape == (None, 3) and small.input_shape == (None, 8, 8, 3)
    # a teacher with many parameters but few multiply-adds (most of them in one Dense layer) gets a student that
    # computes no more than it does
    budget = count_macs(build_student(config.student, (8, 8, 3), 3, 6)) + 1
    cheap = _make_student(config, synthetic_data, 10_000_000, budget)
    assert cheap.name.endswith("_w6") and count_macs(cheap) <= budget
    with pytest.raises(ModelError, match="multiply-adds"):
        _make_student(config, synthetic_data, 10_000_000, 10)
