"""The one module that imports TensorFlow and Keras: everything else takes `tf`, `keras` and `tfmot` from here.

tensorflow-model-optimization works only with Keras 2 (the `tf_keras` package), and TensorFlow decides which Keras
`tf.keras` means when it is first imported. Importing `compress` changes nothing; the first use of `tf`, `keras` or
`tfmot` here sets TF_USE_LEGACY_KERAS=1 (the one setting the toolkit cannot work without) and imports them.
`configure()` adds what the command line wants on top: TensorFlow's oneDNN kernels on and its logging quiet.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from compress.errors import CompressError

_LAZY = ("tf", "keras", "tfmot", "ClusteringAlgorithm", "OutputOnlyQuantizeConfig")
__all__ = ["configure", "versions", *_LAZY]


def configure(*, quiet: bool = True) -> None:
    """Process settings for a command-line run; call before anything imports TensorFlow.

    TensorFlow leaves its oneDNN kernels off on some x86 CPUs, where they train markedly faster (see the README);
    a user's own TF_ENABLE_ONEDNN_OPTS wins. `quiet` turns TensorFlow's C++ and Python logging down.
    """
    _choose_keras2()
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if quiet:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
        # tfmot writes notes to the root logger ("... so apply CQAT instead") and as UserWarnings with its source
        # lines; what they say that matters (layers left alone, clusters kept) is in our stats and report.
        logging.getLogger().setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="tensorflow_model_optimization")


def _choose_keras2() -> None:
    if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise CompressError(
            "TensorFlow was imported before compress with Keras 3 active; set TF_USE_LEGACY_KERAS=1 "
            "before importing TensorFlow, or use compress before importing TensorFlow"
        )
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


def _load() -> None:
    _choose_keras2()
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras
    from tensorflow_model_optimization.python.core.clustering.keras.clustering_algorithm import (
        ClusteringAlgorithm,  # tfmot's per-tensor centroid lookup, which compress.techniques.cluster speeds up
    )
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit.default_8bit_quantize_configs import (  # noqa: E501
        Default8BitOutputQuantizeConfig as OutputOnlyQuantizeConfig,  # quantizes a layer's output only
    )

    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "3":
        tf.get_logger().setLevel("ERROR")  # tf.function retracing and deprecation notes say nothing a user can act on
    globals().update(tf=tf, keras=keras, tfmot=tfmot, ClusteringAlgorithm=ClusteringAlgorithm,
                     OutputOnlyQuantizeConfig=OutputOnlyQuantizeConfig)


def __getattr__(name: str):
    if name in _LAZY:
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def versions() -> dict[str, str]:
    """Versions of the libraries that shape a trained or compressed model."""
    _load()
    loaded = globals()
    return {name: loaded[module].__version__ for name, module in
            (("tensorflow", "tf"), ("tf_keras", "keras"), ("tfmot", "tfmot"))}
