"""The one place a LiteRT (TFLite) interpreter is created; int8 inputs and outputs use the file's own scales."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.errors import ModelError, first_line
from compress.runtimes.session import Session


class LiteRTSession(Session):
    def __init__(self, path: Path, *, threads: int | None, reference_kernels: bool = False):
        import importlib.metadata

        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = OpResolverType.BUILTIN_REF if reference_kernels else OpResolverType.AUTO
        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads,
                                           experimental_op_resolver_type=resolver)
        except Exception as exc:  # ValueError / RuntimeError for a damaged flatbuffer
            raise ModelError(f"the TFLite interpreter cannot load {path}: {first_line(exc)}") from exc
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; expected one of each")
        self.input_index, self.output_index = inputs[0]["index"], outputs[0]["index"]
        signature = [int(dim) for dim in inputs[0].get("shape_signature", inputs[0]["shape"])]
        shape = tuple(None if dim < 0 else dim for dim in signature[1:])
        self.batch = None
        labels = dict(runtime=f"ai-edge-litert {importlib.metadata.version('ai-edge-litert')}", provider="cpu",
                      threads=threads)
        from compress.export.convert import tflite_metadata

        super().__init__(path, "litert", shape, labels, tflite_metadata(path).get("binary_output"))

    def prepare(self, images: np.ndarray) -> np.ndarray:
        if self.batch != len(images):
            try:
                self.interpreter.resize_tensor_input(self.input_index, [len(images), *images.shape[1:]])
                self.interpreter.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                raise ModelError(f"the TFLite interpreter cannot run {self.path} on this batch: {first_line(exc)}"
                                 ) from exc
            self.batch = len(images)
        detail = self.interpreter.get_input_details()[0]
        if np.issubdtype(detail["dtype"], np.integer):  # int8 / uint8 input: quantize with the file's own scale
            scale, zero_point = detail["quantization"]
            limits = np.iinfo(detail["dtype"])
            return np.clip(np.round(images / scale + zero_point), limits.min, limits.max).astype(detail["dtype"])
        return images

    def run_prepared(self, prepared: np.ndarray) -> np.ndarray:
        if self.batch != len(prepared):
            raise ModelError(f"{self.path}: batch prepared for {self.batch} images, got {len(prepared)}")
        self.interpreter.set_tensor(self.input_index, prepared)
        self.interpreter.invoke()
        result = self.interpreter.get_tensor(self.output_index)
        detail = self.interpreter.get_output_details()[0]
        if np.issubdtype(detail["dtype"], np.integer):
            scale, zero_point = detail["quantization"]
            return (result.astype(np.float32) - zero_point) * scale
        return result.copy()
