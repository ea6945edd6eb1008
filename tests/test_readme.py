"""The README's Python example runs as written, on a tiny model and image folder in place of the user's."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    from helpers import make_folder_set

    from compress.kerasmodel import save_model
    from compress.keras import keras

    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    images = make_folder_set(tmp_path / "images", per_class=8, size=(20, 20))
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3)])
    save_model(model, tmp_path / "my_model.keras")
    code = code.replace("/data/my-images", str(images)).replace("(64, 64)", "(8, 8)")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("True ")  # parity ok, then the ONNX file's size
    assert (tmp_path / "out" / "pruned" / "model.onnx").is_file()
