"""Helpers several test modules share (fixtures live in conftest.py)."""

import numpy as np
from PIL import Image


def make_folder_set(root, classes=("cat", "dog", "fox"), per_class=6, size=(12, 10), mode="RGB", layout="split"):
    """Write a tiny class-folder image set; `layout` 'split' makes train/ and test/, 'flat' one tree."""
    rng = np.random.default_rng(0)
    splits = {"train": per_class, "test": max(2, per_class // 2)} if layout == "split" else {".": per_class}
    for split, count in splits.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                channels = 3 if mode == "RGB" else 1
                pixels = rng.integers(0, 256, size=(size[0], size[1], channels), dtype=np.uint8)
                Image.fromarray(pixels.squeeze(), mode).save(folder / f"{i:03d}.png")
    return root


def optimized_ops(path, tmp_path, level: str = "ORT_ENABLE_ALL") -> list[str]:
    """The op types onnxruntime runs for the ONNX file at `path` after its graph optimisations (at `level`)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
