"""The package imports light and its command starts fast: TensorFlow loads only when work needs it."""

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True,
    )
    return set(result.stdout.split())


def test_import_compress_does_not_load_tensorflow():
    modules = _modules_after("import compress")
    assert "compress" in modules and "tensorflow" not in modules and "onnxruntime" not in modules


def test_cli_help_does_not_load_tensorflow():
    modules = _modules_after(
        "import contextlib, io\nfrom compress.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])"
    )
    assert "compress.cli" in modules and "tensorflow" not in modules
