"""A stand-in technique and search space for `compress auto` tests: 'tweak' scales (sign -1: negates) the classifier,
so a chain keeps or loses every image, in a second. Run as a script, it is one `compress auto` worker process."""

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from compress.techniques.base import Outcome, Technique, TechniqueConfig, option, require

WAIT_FOR_WORKERS = "AUTO_TEST_WORKERS"  # DIR:N: each worker announces itself in DIR, trials wait for N of them


@dataclass(frozen=True)
class TweakConfig(TechniqueConfig):
    sign: int = option(1, "1 keeps the predictions, -1 turns every one into the least likely class")
    factor: float = option(1.0, "scale of the classifier's kernel")

    def validate(self):
        require(self.sign in (1, -1) and self.factor > 0, f"bad tweak {self.sign}, {self.factor}")


def tweak(model, config, data, *, out_dir, verbose=1):
    from compress.techniques.finetune import copy_model

    if os.environ.get(WAIT_FOR_WORKERS):  # both workers alive before the trials run out
        folder, count = os.environ[WAIT_FOR_WORKERS].rsplit(":", 1)
        deadline = time.monotonic() + 60
        while len(list(Path(folder).iterdir())) < int(count) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
    result = copy_model(model)
    kernel, bias = result.layers[-1].get_weights()
    result.layers[-1].set_weights([kernel * config.factor * config.sign, bias * config.sign])
    return Outcome(result, {})


TECHNIQUE = Technique("tweak", TweakConfig, tweak, "scale or negate the classifier (a test stand-in)")
CHAINS = {"keep": (("tweak", {"sign": 1}, ("factor",)),), "flip": (("tweak", {"sign": -1}, ("factor",)),)}
CHOICES = {"factor": (0.5, 1.0, 2.0)}


def patches():
    """(object, attribute or key, value) that put the stand-in in place of the real techniques and space."""
    from compress import registry
    from compress.auto import space

    return [(registry._MODULES, "tweak", __name__), (space, "CHAINS", CHAINS), (space, "QUICK_CHOICES", CHOICES),
            (space, "CHOICES", CHOICES)]


if __name__ == "__main__":
    from compress.cli import main

    for target, name, value in patches():
        if isinstance(target, dict):
            target[name] = value
        else:
            setattr(target, name, value)
    folder = os.environ[WAIT_FOR_WORKERS].rsplit(":", 1)[0]
    (Path(folder) / str(os.getpid())).touch()
    sys.exit(main(sys.argv[1:]))
