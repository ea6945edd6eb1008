"""What `compress auto` searches: chains of techniques and their settings, sampled per trial, and the recipe that runs
a sampled chain. Stage names are hashes of the chain up to them, so that trials sharing a prefix share its stages."""

from __future__ import annotations

import json

from compress.pipeline.folders import digest_of
from compress.pipeline.recipe import BASELINE

# chain name -> stages: (technique, fixed settings, sampled settings). PTQ makes one ONNX file, the one measured.
ONE_FILE_PTQ = ("ptq", {"formats": ["onnx-qdq"]}, ())
CHAINS: dict[str, tuple[tuple[str, dict, tuple[str, ...]], ...]] = {
    "ptq": (ONE_FILE_PTQ,),
    "prune-qat": (("prune", {}, ("sparsity", "epochs")), ("qat", {"preserve": "sparsity"}, ("epochs",))),
    "cluster-qat": (("cluster", {}, ("clusters", "epochs")), ("qat", {"preserve": "clusters"}, ("epochs",))),
    "distill-ptq": (("distill", {"compare_scratch": False}, ("width", "epochs")), ONE_FILE_PTQ),
    "distill-prune-qat": (("distill", {"compare_scratch": False}, ("width", "epochs")),
                          ("prune", {}, ("sparsity", "epochs")), ("qat", {"preserve": "sparsity"}, ("epochs",))),
    "channels-ptq": (("prune", {"structure": "channels"}, ("sparsity", "epochs")), ONE_FILE_PTQ),
}
CHOICES = {"sparsity": (0.5, 0.7, 0.8, 0.9), "clusters": (8, 16, 32), "width": (8, 16, 32), "epochs": (1, 2, 4)}
QUICK_CHOICES = {**CHOICES, "epochs": (1,)}


def sample(trial, quick: bool) -> tuple[str, list[tuple[str, dict]]]:
    """The trial's chain and each stage's settings. One `epochs` serves every stage, so prefixes are shared more."""
    choices = QUICK_CHOICES if quick else CHOICES
    chain = trial.suggest_categorical("chain", list(CHAINS))
    stages = []
    for technique, fixed, sampled in CHAINS[chain]:
        settings = dict(fixed)
        for name in sampled:
            settings[name] = trial.suggest_categorical(name, list(choices[name]))
        stages.append((technique, settings))
    return chain, stages


def stage_names(stages: list[tuple[str, dict]]) -> list[str]:
    """technique-<hash of the chain up to this stage>: the same prefix gets the same folder in every trial."""
    return [f"{technique}-{digest_of(stages[: position + 1])}" for position, (technique, _) in enumerate(stages)]


def readable_names(stages: list[tuple[str, dict]]) -> list[str]:
    """distill, distill-prune, distill-prune-qat: names for a recipe a person reads."""
    return ["-".join(technique for technique, _ in stages[: position + 1]) for position in range(len(stages))]


def recipe_text(stages: list[tuple[str, dict]], names: list[str], *, min_seconds: float | None = None,
                comment: str = "") -> str:
    """TOML of the chain, each stage reading the one before; `min_seconds` adds a batch-1-only [measure] table."""
    lines = [f"# {line}" for line in comment.splitlines()]
    if min_seconds is not None:
        lines += ["[measure]", "batch_sizes = [1]", f"min_seconds = {min_seconds}", ""]
    previous = BASELINE
    for (technique, settings), name in zip(stages, names):
        inline = ", ".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
        lines += ["[[stage]]", f"name = {json.dumps(name)}", f"technique = {json.dumps(technique)}",
                  f"input = {json.dumps(previous)}", f"settings = {{ {inline} }}", ""]
        previous = name
    return "\n".join(lines)
