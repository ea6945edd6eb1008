"""Training recipes for the baseline: the article's plain one and our default, which beats it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from compress.errors import ConfigError


@dataclass(frozen=True)
class TrainingRecipe:
    """How to train: the optimiser's settings, batch size, augmentation and default length."""

    learning_rate: float
    batch_size: int
    augment: bool
    cosine_decay: bool
    weight_decay: float
    epochs: int
    summary: str


MAX_EPOCHS = 1000  # far beyond any useful run; refuses a typo that would train for years

TRAINING_RECIPES = {
    # The article: Adam at its default rate, Keras' default batch of 32, no augmentation, 10 epochs.
    "article": TrainingRecipe(1e-3, 32, False, False, 0.0, 10, "the article's plain recipe: Adam 1e-3, batch 32, no augmentation"),
    # Flip + shift augmentation fights the 5.5M-parameter dense layer's overfitting; cosine decay to zero
    # lets the short run settle; decoupled weight decay keeps the dense weights small.
    "default": TrainingRecipe(
        1e-3, 64, True, True, 1e-4, 10, "AdamW 1e-3 with cosine decay, batch 64, flip + shift augmentation"
    ),
}


@dataclass(frozen=True)
class TrainConfig:
    recipe: str = "default"
    epochs: int | None = None  # None: the recipe's own length
    seed: int = 0

    def __post_init__(self):
        if self.recipe not in TRAINING_RECIPES:
            raise ConfigError(f"unknown training recipe {self.recipe!r}; known: {', '.join(TRAINING_RECIPES)}")
        if self.epochs is not None and not (
            isinstance(self.epochs, int) and not isinstance(self.epochs, bool) and 1 <= self.epochs <= MAX_EPOCHS
        ):
            raise ConfigError(f"epochs must be an integer from 1 to {MAX_EPOCHS}, got {self.epochs!r}")

    @property
    def resolved_epochs(self) -> int:
        return self.epochs if self.epochs is not None else TRAINING_RECIPES[self.recipe].epochs


def compile_for_training(model, recipe: TrainingRecipe, steps: int) -> None:
    """Compile `model` with the recipe's optimiser over `steps` training steps (the schedule's length)."""
    from compress.keras import keras

    rate = keras.optimizers.schedules.CosineDecay(recipe.learning_rate, steps) if recipe.cosine_decay else recipe.learning_rate
    if recipe.weight_decay:
        optimizer = keras.optimizers.AdamW(learning_rate=rate, weight_decay=recipe.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=rate)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def train_baseline(data, config: TrainConfig, *, verbose: int = 1):
    """Build the article's CNN for `data`'s input and classes, train it; return (model, metrics dict)."""
    from baseline.model import build_article_cnn
    from compress.keras import keras, versions

    keras.utils.set_random_seed(config.seed)
    recipe = TRAINING_RECIPES[config.recipe]
    epochs = config.resolved_epochs
    model = build_article_cnn(data.input_shape, data.num_classes)
    train = data.pipeline("train", recipe.batch_size, shuffle=True, augment=recipe.augment)
    steps = epochs * int(train.cardinality())
    compile_for_training(model, recipe, steps)
    started = time.perf_counter()
    history = model.fit(train, epochs=epochs, validation_data=data.pipeline("val", 256), verbose=verbose)
    train_seconds = time.perf_counter() - started
    test_loss, test_accuracy = model.evaluate(data.pipeline("test", 256), verbose=0)
    metrics = {
        "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss),
        "params": int(model.count_params()),
        "epochs": epochs,
        "train_seconds": round(train_seconds, 2),
        "seed": config.seed,
        "recipe": {"name": config.recipe, **asdict(recipe)},
        "data": data.describe(),
        "history": {key: [float(v) for v in values] for key, values in history.history.items()},
        "versions": versions(),
    }
    return model, metrics
