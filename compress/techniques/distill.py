"""Knowledge distillation: train a small student to match the input model (the teacher) as well as the labels.

Loss (Hinton et al., 2015):
    alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)).
The T^2 factor keeps the soft term's gradients on the same scale as the hard term's whatever the temperature.
The teacher runs in inference mode on every training batch (so augmentation applies to both) and is never changed.
With `compare_scratch`, the same student (same initial weights, data order, optimiser and epochs) is also trained on
the labels alone, so the stats say what distillation itself bought.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np

from compress.errors import ModelError
from compress.students import STUDENTS
from compress.techniques.finetune import (
    DISTILL_ALPHA,
    DISTILL_TEMPERATURE,
    MAX_BATCH_SIZE,
    MAX_FINE_TUNE_EPOCHS as MAX_EPOCHS,
    trained,
)

from compress.techniques.base import Outcome, Technique, TechniqueConfig, option, require

# A default student: the widest up to the width the toolkit has always used, with at most this share of the teacher's
# parameters and no more multiply-adds than the teacher.
AUTO_MAX_WIDTH = 16
AUTO_MIN_WIDTH = 4  # narrower students (150-600 parameters) stayed at chance on teachers of a few thousand
AUTO_TEACHER_SHARE = 0.25


@dataclass(frozen=True)
class DistillConfig(TechniqueConfig):
    student: str = option(
        "compact_cnn",
        f"student: an architecture name ({', '.join(STUDENTS)}) or a path to a .keras model to train as the student",
        metavar="NAME|PATH",
    )
    width: int = option(0, "filters of the first convolution of a named student (doubles twice with depth); 0: sized "
                        f"from the teacher, the widest from {AUTO_MIN_WIDTH} to {AUTO_MAX_WIDTH} with at most "
                        f"{AUTO_TEACHER_SHARE * 100:.0f}%% of the teacher's parameters and no more of its multiply-adds",
                        parse=int)
    alpha: float = option(DISTILL_ALPHA,
                          "weight of the hard-label loss in [0, 1]; 1 - alpha weighs the teacher's soft targets",
                          parse=float)
    temperature: float = option(DISTILL_TEMPERATURE, "softmax temperature (> 0) for the soft targets", parse=float)
    epochs: int = option(10, "training epochs (each run, distilled and from scratch)", parse=int)
    learning_rate: float = option(1e-3, "Adam's initial learning rate (cosine decay to zero)", parse=float)
    batch_size: int = option(64, "training batch size", parse=int)
    augment: bool = option(True, "random flip + shift of training images (the teacher sees the same images)")
    compare_scratch: bool = option(True, "also train the same student on labels alone, same budget and seed")

    def validate(self) -> None:
        require(isinstance(self.student, str) and bool(self.student.strip()),
                f"student must be an architecture name or a .keras path, got {self.student!r}")
        require(self.student in STUDENTS or self.student.endswith(".keras"),
                f"unknown student {self.student!r}; known students: {', '.join(STUDENTS)}, or a path to a .keras file")
        require(_is_int(self.width) and 0 <= self.width <= 1024,
                f"width must be an integer from 0 (sized from the teacher) to 1024, got {self.width!r}")
        require(_is_number(self.alpha) and 0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha!r}")
        require(_is_number(self.temperature) and 0.0 < self.temperature < math.inf,
                f"temperature must be a finite number > 0, got {self.temperature!r}")
        require(_is_int(self.epochs) and 1 <= self.epochs <= MAX_EPOCHS,
                f"epochs must be an integer from 1 to {MAX_EPOCHS}, got {self.epochs!r}")
        require(_is_number(self.learning_rate) and 0.0 < self.learning_rate < math.inf,
                f"learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        require(_is_int(self.batch_size) and 1 <= self.batch_size <= MAX_BATCH_SIZE,
                f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE}, got {self.batch_size!r}")
        require(isinstance(self.augment, bool), f"augment must be true or false, got {self.augment!r}")
        require(isinstance(self.compare_scratch, bool),
                f"compare_scratch must be true or false, got {self.compare_scratch!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def distillation_loss(labels, student_logits, teacher_logits, alpha: float, temperature: float):
    """Batch mean of alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    `labels` are integer class indices; both logits are (batch, classes). Returns a scalar tensor; no gradient flows
    into the teacher's logits.
    """
    from compress.keras import tf

    student_logits = tf.convert_to_tensor(student_logits, tf.float32)
    teacher_logits = tf.stop_gradient(tf.convert_to_tensor(teacher_logits, tf.float32))
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    hard = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=student_logits)
    log_teacher = tf.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_student = tf.nn.log_softmax(student_logits / temperature, axis=-1)
    soft = tf.reduce_sum(tf.exp(log_teacher) * (log_teacher - log_student), axis=-1)
    return tf.reduce_mean(alpha * hard + (1.0 - alpha) * temperature**2 * soft)


@functools.lru_cache(maxsize=None)
def _distiller_class():
    """The Distiller model class, defined on first use so that importing this module does not import Keras."""
    from compress.keras import keras, tf

    class Distiller(keras.Model):
        """Wraps teacher and student; `fit` trains the student's weights only, on the distillation loss."""

        def __init__(self, teacher, student, *, alpha, temperature, teacher_gives_probabilities=False,
                     student_gives_probabilities=False):
            super().__init__(name="distiller")
            self.teacher = teacher
            self.student = student
            self.alpha = float(alpha)
            self.temperature = float(temperature)
            self.teacher_gives_probabilities = teacher_gives_probabilities
            self.student_gives_probabilities = student_gives_probabilities
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

        @property
        def metrics(self):
            return [self.loss_tracker, self.accuracy_tracker]

        def call(self, images, training=False):
            return self.student(images, training=training)

        def teacher_logits(self, images):
            return _as_logits(self.teacher(images, training=False), self.teacher_gives_probabilities)

        def student_logits(self, images, training):
            return _as_logits(self.student(images, training=training), self.student_gives_probabilities)

        def train_step(self, batch):
            images, labels = batch
            teacher_logits = self.teacher_logits(images)
            variables = self.student.trainable_variables
            with tf.GradientTape() as tape:
                student_logits = self.student_logits(images, training=True)
                loss = distillation_loss(labels, student_logits, teacher_logits, self.alpha, self.temperature)
                if self.student.losses:  # the student's own regularisers, if a user's model has any
                    loss += tf.add_n(self.student.losses)
            self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            self.loss_tracker.update_state(loss)
            self.accuracy_tracker.update_state(labels, student_logits)
            return {metric.name: metric.result() for metric in self.metrics}

        def test_step(self, batch):
            images, labels = batch
            student_logits = self.student_logits(images, training=False)
            loss = distillation_loss(labels, student_logits, self.teacher_logits(images), self.alpha, self.temperature)
            self.loss_tracker.update_state(loss)
            self.accuracy_tracker.update_state(labels, student_logits)
            return {metric.name: metric.result() for metric in self.metrics}

    return Distiller


def _as_logits(outputs, gives_probabilities: bool):
    """Log-probabilities are logits (softmax(log p) = p): a model ending in a softmax distils like any other."""
    from compress.keras import tf

    return tf.math.log(tf.maximum(outputs, 1e-12)) if gives_probabilities else outputs


def make_distiller(teacher, student, data, *, alpha: float, temperature: float):
    """A Distiller training `student` on `teacher`'s outputs, each model's softmax (if any) told from its outputs."""
    from compress.checks import check_model_fits_data

    def gives_probabilities(model, role):
        return check_model_fits_data(model, data, role=role)["outputs"] != "logits"

    return _distiller_class()(teacher, student, alpha=alpha, temperature=temperature,
                              teacher_gives_probabilities=gives_probabilities(teacher, "teacher"),
                              student_gives_probabilities=gives_probabilities(student, "student"))


def distill(model, config: DistillConfig, data, *, out_dir=None, verbose: int = 1) -> Outcome:
    """Train `config.student` to mimic `model` (the teacher, left unchanged) on `data`; return the student alone."""
    from compress.keras import keras

    from compress.checks import check_model_fits_data
    from compress.kerasmodel import BINARY_SCORES, binary_kind

    teacher = model
    check_model_fits_data(teacher, data, role="teacher")
    teacher_kind = binary_kind(teacher)  # a binary classifier's student gives one score too, of the same kind

    keras.utils.set_random_seed(data.seed)
    teacher_macs = _macs_or_none(teacher)
    student = _make_student(config, data, int(teacher.count_params()), teacher_macs,
                            head=BINARY_SCORES if teacher_kind else "logits")
    initial_weights = student.get_weights()

    train_started = time.perf_counter()
    distiller = make_distiller(teacher, student, data, alpha=config.alpha, temperature=config.temperature)
    keras.utils.set_random_seed(data.seed)
    train = data.pipeline("train", config.batch_size, shuffle=True, augment=config.augment)
    distiller.compile(optimizer=_optimizer(config, int(train.cardinality())))
    history = trained(distiller, train, learning_rate=config.learning_rate, epochs=config.epochs,
                      validation_data=data.pipeline("val", 256), verbose=verbose)
    train_seconds = time.perf_counter() - train_started

    teacher_params = int(teacher.count_params())
    student_params = int(student.count_params())
    stats = {
        "student": config.student,
        "student_architecture": student.name,
        "student_params": student_params,
        "teacher_params": teacher_params,
        "param_ratio": round(teacher_params / student_params, 2),
        "student_macs": _macs_or_none(student),
        "teacher_macs": teacher_macs,
        "teacher_test_accuracy": _test_accuracy(teacher, data),
        "student_test_accuracy": _test_accuracy(student, data),
        "epochs": config.epochs,
        "train_seconds": round(train_seconds, 2),
        "history": history,
    }
    if config.compare_scratch:
        scratch, scratch_history = _train_from_scratch(student, initial_weights, config, data, verbose)
        stats["scratch_test_accuracy"] = _test_accuracy(scratch, data)
        stats["distillation_gain"] = round(stats["student_test_accuracy"] - stats["scratch_test_accuracy"], 6)
        stats["scratch_history"] = scratch_history
    if teacher_kind == "sigmoid":  # trained on logits; it answers in probabilities, as the teacher does
        student.get_layer(BINARY_SCORES).activation = keras.activations.softmax
    return Outcome(model=student, stats=stats)


def _make_student(config: DistillConfig, data, teacher_params: int, teacher_macs: int | None, *,
                  head: str = "logits"):
    if config.student in STUDENTS:
        from compress.students import build_student

        if config.width:
            return build_student(config.student, data.input_shape, data.num_classes, config.width, head=head)
        return _sized_student(config.student, data, teacher_params, teacher_macs, head=head)
    from compress.kerasmodel import load_model

    from compress.checks import check_model_fits_data

    student = load_model(config.student)
    if check_model_fits_data(student, data, role="student")["outputs"] != "logits":
        raise ModelError(
            f"student {config.student} ends in a softmax; distillation trains on logits, so remove the final softmax"
        )
    return student


def _macs_or_none(model) -> int | None:
    """Multiply-adds per image; None for a model whose graph cannot be read (then only parameters bound a student)."""
    from compress.kerasmodel import count_macs

    try:
        return count_macs(model)
    except ModelError:
        return None


def _sized_student(name: str, data, teacher_params: int, teacher_macs: int | None, *, head: str = "logits"):
    """The widest named student, from AUTO_MIN_WIDTH to AUTO_MAX_WIDTH, with at most AUTO_TEACHER_SHARE of the
    teacher's parameters and at most its multiply-adds: distillation is there to make the model smaller and cheaper
    to run, so a student is never larger or slower than its teacher, nor too narrow to learn."""
    from compress.kerasmodel import count_macs
    from compress.students import build_student

    for width in range(AUTO_MAX_WIDTH, AUTO_MIN_WIDTH - 1, -1):
        student = build_student(name, data.input_shape, data.num_classes, width, head=head)
        if student.count_params() <= AUTO_TEACHER_SHARE * teacher_params and (
                teacher_macs is None or count_macs(student) <= teacher_macs):
            return student
    raise ModelError(f"the smallest {name} student (width {AUTO_MIN_WIDTH}) has {student.count_params():,} parameters "
                     f"and {count_macs(student):,} multiply-adds, the teacher {teacher_params:,} and "
                     f"{'?' if teacher_macs is None else f'{teacher_macs:,}'}: more than {AUTO_TEACHER_SHARE:.0%} "
                     "of its parameters or all its multiply-adds; distillation would not make this model smaller "
                     "(pass --width to force one, or leave distill out)")


def _train_from_scratch(student, initial_weights, config: DistillConfig, data, verbose: int):
    """The same student, from the same initial weights, trained on the labels alone with the same data order."""
    from compress.keras import keras

    keras.utils.set_random_seed(data.seed)
    try:
        scratch = keras.models.clone_model(student)
    except Exception as exc:  # clone_model refuses subclassed models with several error types
        raise ModelError(f"cannot copy student {config.student} for the scratch comparison: {exc}; "
                         "pass --no-compare-scratch") from exc
    scratch.set_weights(initial_weights)
    keras.utils.set_random_seed(data.seed)
    train = data.pipeline("train", config.batch_size, shuffle=True, augment=config.augment)
    scratch.compile(
        optimizer=_optimizer(config, int(train.cardinality())),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return scratch, trained(scratch, train, learning_rate=config.learning_rate, epochs=config.epochs,
                            validation_data=data.pipeline("val", 256), verbose=verbose)


def _optimizer(config: DistillConfig, steps_per_epoch: int):
    from compress.keras import keras

    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, max(1, config.epochs * steps_per_epoch))
    return keras.optimizers.Adam(learning_rate=schedule)


def _test_accuracy(model, data) -> float:
    images, labels = data.normalized("test")
    predictions = np.argmax(model.predict(images, batch_size=256, verbose=0), axis=-1)
    return float(np.mean(predictions == labels))


TECHNIQUE = Technique(
    name="distill",
    config_class=DistillConfig,
    apply=distill,
    summary="knowledge distillation: train a compact student to mimic the model",
)
