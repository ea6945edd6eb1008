"""What `compress auto` searches: chains of techniques and their settings, sampled per trial, and the recipe that runs
a sampled chain. Stage names are hashes of the chain up to them, so that trials sharing a prefix share its stages."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

from compress.errors import ModelError
from compress.files import FileLock, sha256_file, write_json
from compress.pipeline.folders import digest_of
from compress.pipeline.recipe import BASELINE

# chain name -> stages: (technique, fixed settings, sampled parameters). PTQ makes one ONNX file, the one measured.
# A parameter sets the setting of its own name, or the one PARAMETER_SETTING names.
ONE_FILE_PTQ = ("ptq", {"formats": ["onnx-qdq"]}, ())
# The students and learning rate of recipes/cifar10.toml: pooling after every convolution keeps an epoch cheap;
# strided_cnn's first convolution strides instead, for the fastest files.
DISTILL = ("distill", {"compare_scratch": False, "learning_rate": 0.005}, ("student", "width", "distill_epochs"))
CHANNELS = ("prune", {"structure": "channels", "distill": True}, ("channels", "epochs"))
# per-layer channel shares from the channel sensitivity of the stage's input model (`resolve_channel_plans`)
CHANNEL_PLAN = ("prune", {"structure": "channels", "distill": True}, ("channel_plan", "epochs"))
# The starting points run in this order: cheap chains and those reusing a prefix trained before them first, the
# chains that fine-tune the whole model longest (clustering trains slowest) last.
CHAINS: dict[str, tuple[tuple[str, dict, tuple[str, ...]], ...]] = {
    "ptq": (ONE_FILE_PTQ,),
    "distill-ptq": (DISTILL, ONE_FILE_PTQ),
    "distill-channelplan-qat": (DISTILL, CHANNEL_PLAN, ("qat", {}, ("epochs",))),
    "distill-channels-qat": (DISTILL, CHANNELS, ("qat", {}, ("epochs",))),
    "distill-channelplan-cluster-qat": (DISTILL, CHANNEL_PLAN, ("cluster", {}, ("clusters", "epochs")),
                                        ("qat", {"preserve": "clusters"}, ("epochs",))),
    "distill-prune-qat": (DISTILL, ("prune", {}, ("sparsity", "epochs")),
                          ("qat", {"preserve": "sparsity"}, ("epochs",))),
    "channels-ptq": (CHANNELS, ONE_FILE_PTQ),
    "channels-qat": (CHANNELS, ("qat", {}, ("epochs",))),
    "channelplan-qat": (CHANNEL_PLAN, ("qat", {}, ("epochs",))),
    "prune-qat": (("prune", {}, ("sparsity", "epochs")), ("qat", {"preserve": "sparsity"}, ("epochs",))),
    # per-layer sparsities from the sensitivity analysis (`layer_plans`), for the budget times `layer_plan`
    "sensitivity-prune-qat": (("prune", {}, ("layer_plan", "epochs")), ("qat", {"preserve": "sparsity"}, ("epochs",))),
    "cluster-qat": (("cluster", {}, ("clusters", "epochs")), ("qat", {"preserve": "clusters"}, ("epochs",))),
}
PARAMETER_SETTING = {"distill_epochs": "epochs", "channels": "sparsity"}
# The first choice of each parameter is where the search starts: the first trials try every chain with it.
# layer_plan: the sensitivity analysis prunes one layer at a time without fine-tuning, which overstates the loss
# after fine-tuning, so its proposals are asked for at multiples of the budget. channel_plan: the share of the
# weights to remove, spread over the layers by their channel sensitivity (allocate_channel_shares).
# clusters: 8 and 4 values a kernel made recipes/cifar10.toml's smallest files (809x and 1146x), 16 its safest.
CHOICES = {"sparsity": (0.8, 0.5, 0.7, 0.9), "channels": (0.5, 0.25, 0.4, 0.6), "clusters": (8, 4, 16),
           "student": ("conv_pool_cnn", "strided_cnn"), "width": (32, 8, 16), "epochs": (2, 1, 4),
           "distill_epochs": (10, 5), "layer_plan": (3, 1, 10), "channel_plan": (0.35, 0.25, 0.5)}
# the channel shares the channel sensitivity analysis tries per layer
CHANNEL_SHARES = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
QUICK_CHOICES = {**CHOICES, "epochs": (1,), "distill_epochs": (1,)}


def fingerprint(quick: bool) -> dict:
    """The search space (chains, each stage's sampled parameters, their choices) as data: part of the study's name,
    since Optuna cannot continue a study whose choices changed (as they may between versions)."""
    return {"chains": {chain: [list(sampled) for _, _, sampled in stages] for chain, stages in CHAINS.items()},
            "choices": {name: list(values) for name, values in (QUICK_CHOICES if quick else CHOICES).items()}}


def sample(trial, quick: bool, plans: dict | None = None) -> tuple[str, list[tuple[str, dict]]]:
    """The trial's chain and each stage's settings. One `epochs` serves every fine-tuning stage, so that prefixes
    are shared more. `plans`: `layer_plans`' result, for the layer_plan parameter. A channel_plan stays a setting
    until `resolve_channel_plans` replaces it."""
    choices = QUICK_CHOICES if quick else CHOICES
    chain = trial.suggest_categorical("chain", list(CHAINS))
    stages = []
    for technique, fixed, sampled in CHAINS[chain]:
        settings = dict(fixed)
        for name in sampled:
            value = trial.suggest_categorical(name, list(choices[name]))
            if name == "layer_plan":
                if value not in (plans or {}):
                    raise ModelError(f"no layer keeps within {value} x the budget at any sparsity the sensitivity "
                                     "analysis tried")
                settings.update(plans[value])
            else:
                settings[PARAMETER_SETTING.get(name, name)] = value
        stages.append((technique, settings))
    return chain, stages


def layer_plans(model_path: Path, data, max_drop: float, folder: Path, *, unsafe: bool, log,
                structure: str = "none") -> dict:
    """Per-layer prune settings from `compress sensitivity` on the validation split: budget multiple -> the layers
    and sparsities it proposes for that many points; with structure channels, share of the weights -> the channel
    shares `allocate_channel_shares` spreads it into. The analysis is kept in `folder` and reused for the same
    model file."""
    from compress.kerasmodel import load_model
    from compress.sensitivity import DEFAULT_SPARSITIES, SensitivityConfig, allocate_channel_shares, analyse, propose

    channels = structure == "channels"
    config = SensitivityConfig(max_drop=max_drop, structure=structure,
                               sparsities=CHANNEL_SHARES if channels else DEFAULT_SPARSITIES)
    digest = sha256_file(model_path)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / ".lock"):  # processes sharing the study analyse a model once
        try:
            result = json.loads((folder / "sensitivity.json").read_text())
        except (OSError, ValueError):
            result = {}
        if result.get("model_sha256") != digest or result["settings"]["sparsities"] != list(config.sparsities):
            log(f"sensitivity of each layer{' to channel removal' if channels else ''} of {model_path.parent.name}/"
                f"{model_path.name} (validation split), for per-layer pruning plans ...")
            result = analyse(load_model(model_path, unsafe=unsafe), data, config, out_dir=folder, log=lambda _: None)
            write_json(folder / "sensitivity.json", {**result, "model_sha256": digest})
    plans = {}
    for choice in CHOICES["channel_plan" if channels else "layer_plan"]:
        if channels:  # every layer named, 0 keeping it whole: an unnamed one would take --sparsity
            shares = allocate_channel_shares(result["layers"], choice)
            if any(shares.values()):
                plans[choice] = {"layer_sparsity": shares}
            continue
        proposal = propose(copy.deepcopy(result["layers"]), replace(config, max_drop=max_drop * choice))
        chosen = {name: value for name, value in proposal["layer_sparsity"].items() if value > 0}
        if chosen:
            plans[choice] = {"layers": list(chosen), "layer_sparsity": chosen}
    return plans


def resolve_channel_plans(stages: list[tuple[str, dict]], run_prefix, plans_of) -> list[tuple[str, dict]]:
    """The stages with each `channel_plan` (a share of the weights) replaced by the per-layer channel shares the
    analysis of that stage's input model gives: `run_prefix(stages)` trains the stages before it and returns the
    path of the model they end in, `plans_of(path, prefix_name)` is `layer_plans` for it."""
    resolved: list[tuple[str, dict]] = []
    for technique, settings in stages:
        if "channel_plan" in settings:
            share = settings["channel_plan"]
            model_path = run_prefix(resolved)
            plans = plans_of(model_path, stage_names(resolved)[-1] if resolved else BASELINE)
            if share not in plans:
                raise ModelError(f"no layer of {model_path.parent.name} has channels to remove (the classifier's "
                                 "outputs stay, and so do channels joined with them)")
            settings = {**{key: value for key, value in settings.items() if key != "channel_plan"}, **plans[share]}
        resolved.append((technique, settings))
    return resolved


def starting_points(quick: bool) -> list[dict]:
    """One trial per chain, every parameter at its first choice: the search sees each chain before it samples."""
    choices = QUICK_CHOICES if quick else CHOICES
    return [{"chain": chain, **{name: choices[name][0] for _, _, sampled in stages for name in sampled}}
            for chain, stages in CHAINS.items()]


def stage_names(stages: list[tuple[str, dict]]) -> list[str]:
    """technique-<hash of the chain up to this stage>: the same prefix gets the same folder in every trial."""
    return [f"{technique}-{digest_of(stages[: position + 1])}" for position, (technique, _) in enumerate(stages)]


def readable_names(stages: list[tuple[str, dict]]) -> list[str]:
    """distill, distill-prune, distill-prune-qat: names for a recipe a person reads."""
    return ["-".join(technique for technique, _ in stages[: position + 1]) for position in range(len(stages))]


def recipe_text(stages: list[tuple[str, dict]], names: list[str], *, min_seconds: float | None = None,
                comment: str = "", skip: set[str] = frozenset()) -> str:
    """TOML of the chain, each stage reading the one before; `min_seconds` adds a batch-1-only [measure] table.
    Stages named in `skip` (written already, for another chain with the same prefix) are left out."""
    lines = [f"# {line}" for line in comment.splitlines()]
    if min_seconds is not None:
        lines += ["[measure]", "batch_sizes = [1]", f"min_seconds = {min_seconds}", ""]
    previous = BASELINE
    for (technique, settings), name in zip(stages, names):
        if name in skip:
            previous = name
            continue
        inline = ", ".join(f"{key} = {toml_value(value)}" for key, value in settings.items())
        lines += ["[[stage]]", f"name = {json.dumps(name)}", f"technique = {json.dumps(technique)}",
                  f"input = {json.dumps(previous)}", f"settings = {{ {inline} }}", ""]
        previous = name
    return "\n".join(lines)


def toml_value(value) -> str:
    """A setting as TOML: JSON's form for strings, numbers, booleans and lists; an inline table for a mapping."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(key))} = {toml_value(item)}" for key, item in value.items()) + " }"
    return json.dumps(value)
