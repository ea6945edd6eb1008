"""compress: compress trained Keras models and export them as measured, deployable ONNX / TFLite files.

Importing this package stays light (no TensorFlow); the heavy libraries load when a function needs them.
"""

from compress.data import Dataset, dataset_from_arrays, load_data
from compress.errors import CompressError, ConfigError, DataError, ModelError

__version__ = "0.1.0"
__all__ = ["Dataset", "dataset_from_arrays", "load_data", "CompressError", "ConfigError", "DataError", "ModelError",
           "__version__"]
