"""`compress auto`: search compression chains and their settings with Optuna, within an accuracy budget.

`space` says what is searched, `study` holds the Optuna side (storage, sampler, constraint), `search` runs the trials
through the pipeline and writes auto.json, best/ and best.toml.
"""

from compress.auto.search import run_auto
from compress.auto.study import AutoConfig

__all__ = ["AutoConfig", "run_auto"]
