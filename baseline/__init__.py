"""The article's CNN (Conv64-MaxPool-Conv128-Flatten-Dense256-Dense10) and its training recipes."""

from baseline.model import build_article_cnn
from baseline.train import TRAINING_RECIPES, TrainConfig, train_baseline

__all__ = ["build_article_cnn", "TRAINING_RECIPES", "TrainConfig", "train_baseline"]
