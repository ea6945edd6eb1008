"""Export: Keras models to ONNX / TFLite files (`exporter`), the converters (`convert`), the int8 graph rewrite
(`int8_rewrite`, pure ONNX) and the parity check (`parity`). Importing this package imports no TensorFlow."""
