"""The one module that imports TensorFlow and Keras: everything else takes `tf`, `keras` and `tfmot` from here.

tensorflow-model-optimization works only with Keras 2 (the `tf_keras` package), and TensorFlow decides which
Keras `tf.keras` means when it is first imported; so the choice is made here, once, before that import.
"""

import os
import sys

from compress.errors import CompressError

if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    raise CompressError(
        "TensorFlow was imported before compress with Keras 3 active; set TF_USE_LEGACY_KERAS=1 "
        "before importing TensorFlow, or import compress first"
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off the console
# TensorFlow leaves its oneDNN kernels off on some x86 CPUs (an AMD EPYC with AVX2 among them); there they train
# the article CNN 1.3x and the distillation student 1.6x faster per step (scripts/time_training_step.py). A user's
# own setting wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
from tensorflow_model_optimization.python.core.clustering.keras.clustering_algorithm import (  # noqa: E402
    ClusteringAlgorithm,  # tfmot's per-tensor centroid lookup, which compress.techniques.cluster speeds up
)

# TensorFlow's Python-side warnings (tf.function retracing, deprecations) say nothing a user can act on.
tf.get_logger().setLevel("ERROR")

__all__ = ["tf", "keras", "tfmot", "ClusteringAlgorithm", "versions"]


def versions() -> dict[str, str]:
    """Versions of the libraries that shape a trained or compressed model."""
    return {"tensorflow": tf.__version__, "tf_keras": keras.__version__, "tfmot": tfmot.__version__}
