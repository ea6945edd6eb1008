"""Magnitude pruning with tfmot: zero the smallest weights of chosen layers while fine-tuning, then strip.

Unstructured pruning follows a schedule to a target sparsity (one for all layers, or per layer); N:M structured
pruning keeps at most N non-zero weights in every M consecutive ones along the input-channel axis (tfmot's
`sparsity_m_by_n`, the pattern sparse tensor cores and XNNPACK use). The classifier is left whole by default.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.errors import ConfigError
from compress.techniques.finetune import (
    as_names,
    require_names,
    check_training_settings,
    is_number,
    FrozenDict,
    all_params_sparsity,
    check_mapping,
    copy_model,
    evaluate,
    fine_tune,
    parse_name_values,
    parse_names,
    left_alone,
    main_kernel,
    select_layers,
    training_plan,
    wrap_layers,
    zero_fraction,
)
from compress.techniques.base import Outcome, Technique, TechniqueConfig, option, require
from compress.techniques.structured import MAX_MULTIPLE

SCHEDULES = ("polynomial", "constant")
# Kept channel counts of structured pruning are rounded to multiples of this: a multiple of AVX2's block of 8 too.
CHANNEL_MULTIPLE = 16
# Pruning reaches its target at this share of the fine-tuning steps; the rest recovers accuracy at full sparsity.
PRUNING_END_FRACTION = 0.8
# Masks are recomputed about this many times on the way to the target.
MASK_UPDATES = 10


CHANNELS = "channels"


def parse_structure(text: str) -> str:
    """Text of --structure / a recipe: 'none' (or empty) for unstructured, 'channels', else 'N:M' as written."""
    text = text.strip().lower()
    if text in ("", "none"):
        return "none"
    if text == CHANNELS:
        return CHANNELS
    parts = text.split(":")
    if len(parts) == 2 and all(part.strip().isdigit() for part in parts):
        return ":".join(part.strip() for part in parts)
    return text  # validate() refuses it with the expected form


def structure_pair(structure: str) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep N of every M weights; 'none' or 'channels' -> None. Malformed text is one ConfigError."""
    if structure in ("none", CHANNELS):
        return None
    parts = structure.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        n, m = int(parts[0]), int(parts[1])
    except ValueError:
        raise ConfigError(f"structure must be N:M with 0 < N < M (e.g. 2:4), none or channels, got {structure!r}"
                          ) from None
    if not 0 < n < m:
        raise ConfigError(f"structure must be N:M with 0 < N < M (e.g. 2:4), none or channels, got {structure!r}")
    return n, m


@dataclass(frozen=True)
class PruneConfig(TechniqueConfig):
    sparsity: float = option(0.5, "target fraction of zero weights in each pruned kernel, in (0, 1)")
    schedule: str = option("polynomial", "how sparsity rises: polynomial (0 to target over 80%% of the steps) "
                           "or constant (target from the first step)", metavar="{polynomial,constant}")
    layers: tuple[str, ...] = option((), "comma-separated Conv2D/SeparableConv2D/Dense layers to prune; none: "
                                     "all but the "
                                     "classifier", parse=parse_names, metavar="NAMES")
    layer_sparsity: dict = option(FrozenDict(), "per-layer targets overriding --sparsity, e.g. dense1=0.95,conv2=0.5",
                                  parse=lambda text: parse_name_values(text, "layer_sparsity"), metavar="NAME=S,...")
    structure: str = option("none", "none (single weights); channels: remove the share --sparsity of whole Conv2D "
                            "and SeparableConv2D filters and Dense units by L1 norm, so that the model gets smaller "
                            "and faster (the classifier's outputs stay); or N:M: keep at most N non-zero weights in every M "
                            "consecutive input-channel weights (e.g. 2:4; replaces --sparsity/--schedule)",
                            parse=parse_structure, metavar="none|channels|N:M")
    channel_multiple: int = option(CHANNEL_MULTIPLE, "structure channels: each layer keeps the nearest multiple of "
                                   "this many channels (CPU kernels work on blocks of 8 (AVX2) or 16 (AVX-512) "
                                   "channels, and a layer of 21 ran slower than one of 32); layers narrower than two "
                                   "multiples are not rounded; 1: the exact share", parse=int)
    distill: bool = option(False, "structure channels: fine-tune on the unpruned model's outputs as well as the "
                           "labels (knowledge distillation, alpha 0.5, temperature 4)")
    epochs: float = option(2, "fine-tuning epochs while pruning (0.5: half an epoch)")
    batch_size: int = option(64, "fine-tuning batch size")
    learning_rate: float = option(5e-4, "Adam learning rate for fine-tuning")

    def __post_init__(self):
        # TOML/JSON hand over plain dicts and lists: keep the frozen config hashable.
        check_mapping(self.layer_sparsity, "layer_sparsity")
        object.__setattr__(self, "layer_sparsity", FrozenDict(self.layer_sparsity))
        object.__setattr__(self, "layers", as_names(self.layers))
        if isinstance(self.structure, str):
            object.__setattr__(self, "structure", parse_structure(self.structure))
        super().__post_init__()

    def validate(self) -> None:
        require(_is_fraction(self.sparsity), f"sparsity must be in (0, 1), got {self.sparsity!r}")
        require(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        require_names(self.layers, "layers")
        for name, value in self.layer_sparsity.items():  # channels: 0 keeps a layer whole
            require(_is_fraction(value) or (self.structure == CHANNELS and value == 0),
                    f"layer_sparsity for {name} must be in (0, 1), got {value!r}")
        require(isinstance(self.structure, str), f"structure must be N:M text such as 2:4, got {self.structure!r}")
        pair = structure_pair(self.structure)
        require(self.structure != CHANNELS or not self.layers,
                "layers does not apply with structure channels (every prunable layer takes part; per-layer shares go "
                "in layer_sparsity)")
        require(isinstance(self.channel_multiple, int) and not isinstance(self.channel_multiple, bool)
                and 1 <= self.channel_multiple <= MAX_MULTIPLE,
                f"channel_multiple must be an integer from 1 to {MAX_MULTIPLE}, got {self.channel_multiple!r}")
        require(self.channel_multiple == CHANNEL_MULTIPLE or self.structure == CHANNELS,
                "channel_multiple applies with structure channels only")
        require(isinstance(self.distill, bool), f"distill must be true or false, got {self.distill!r}")
        require(not self.distill or self.structure == CHANNELS,
                "distill applies with structure channels only (the unpruned model teaches the smaller one)")
        require(pair is None or not self.layer_sparsity,
                f"layer_sparsity does not apply with structure {self.structure} (N:M fixes every layer's sparsity)")
        check_training_settings(self)

    @property
    def m_by_n(self) -> tuple[int, int] | None:
        """tfmot's `sparsity_m_by_n`: (zeros, block) for N:M = keep N of M."""
        pair = structure_pair(self.structure)
        return None if pair is None else (pair[1] - pair[0], pair[1])


def _is_fraction(value) -> bool:
    return is_number(value) and 0 < value < 1


def pruning_schedule(kind: str, target: float, total_steps: int):
    """A tfmot schedule that reaches `target` at a mask update no later than ~80% of `total_steps`."""
    from compress.keras import tfmot

    sparsity = tfmot.sparsity.keras
    # tfmot's step counter is 1 at the first batch; masks change at steps that are multiples of `frequency`
    # in [begin_step, end_step]. end_step is a multiple of frequency so the last update applies the target.
    frequency = max(1, int(total_steps * PRUNING_END_FRACTION) // MASK_UPDATES)
    end_step = max(frequency, (int(total_steps * PRUNING_END_FRACTION) // frequency) * frequency)
    if kind == "constant":
        return sparsity.ConstantSparsity(target, begin_step=0, end_step=end_step, frequency=frequency)
    return sparsity.PolynomialDecay(0.0, target, begin_step=0, end_step=end_step, frequency=frequency)


def prune(model, config: PruneConfig, data, *, out_dir=None, verbose: int = 1) -> Outcome:
    """Prune a copy of `model` while fine-tuning it on `data`; return the stripped model and its sparsity."""
    from compress.keras import tfmot

    if config.structure == CHANNELS:
        return _prune_channels(model, config, data, verbose)
    work = copy_model(model)
    chosen = select_layers(work, config.layers, "prune")
    names = [layer.name for layer in chosen]
    unknown = sorted(set(config.layer_sparsity) - set(names))
    if unknown:
        raise ConfigError(
            f"layer_sparsity names {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} not pruned; "
            f"pruned layers: {', '.join(names)} (choose others with --layers)"
        )
    targets = {name: float(config.layer_sparsity.get(name, config.sparsity)) for name in names}
    keras_epochs, steps_each = training_plan(data, config.epochs, config.batch_size)
    steps = keras_epochs * steps_each

    def wrap(layer):
        if layer.name not in targets:
            return layer
        return tfmot.sparsity.keras.prune_low_magnitude(
            layer,
            pruning_schedule=pruning_schedule(config.schedule, targets[layer.name], steps),
            sparsity_m_by_n=config.m_by_n,
        )

    wrapped = wrap_layers(work, wrap, "prune")
    history = fine_tune(
        wrapped, data, epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
        verbose=verbose, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
    )
    pruned = tfmot.sparsity.keras.strip_pruning(wrapped)

    stats = sparsity_stats(pruned, names)
    stats.update(
        {
            "pruned_layers": names,
            "left_alone": left_alone(work, chosen, "prune"),
            "target_sparsity": targets if config.m_by_n is None else None,
            "structure": config.structure,
            "schedule": config.schedule if config.m_by_n is None else "one-shot N:M mask at the first step",
            "fine_tune_steps": steps,
        }
    )
    stats.update(evaluate(pruned, data))
    stats["history"] = history
    return Outcome(model=pruned, stats=stats)


def _prune_channels(model, config: PruneConfig, data, verbose: int) -> Outcome:
    """Remove whole filters and units (compress.techniques.structured), then fine-tune the smaller model."""
    from compress.techniques.structured import remove_channels

    smaller, info = remove_channels(copy_model(model), sparsity=config.sparsity, layer_sparsity=config.layer_sparsity,
                                    multiple=config.channel_multiple)
    history = fine_tune(smaller, data, epochs=config.epochs, batch_size=config.batch_size,
                        learning_rate=config.learning_rate, verbose=verbose, teacher=model if config.distill else None)
    stats = {"structure": CHANNELS, "target_sparsity": config.sparsity, "channels": info, **evaluate(smaller, data),
             "fine_tuning": "distilled from the unpruned model" if config.distill else "labels", "history": history}
    return Outcome(model=smaller, stats=stats)


def sparsity_stats(model, layer_names) -> dict:
    """Zeros per pruned kernel, over all pruned kernels together, and over all of the model's parameters."""
    import numpy as np

    per_layer, zeros, total = {}, 0, 0
    for name in layer_names:
        kernel = main_kernel(model.get_layer(name)).numpy()
        per_layer[name] = zero_fraction(kernel)
        zeros += int(np.count_nonzero(kernel == 0))
        total += int(kernel.size)
    return {
        "sparsity": per_layer,
        "sparsity_pruned_kernels": zeros / total if total else 0.0,
        **all_params_sparsity(model),
    }


TECHNIQUE = Technique(
    name="prune",
    config_class=PruneConfig,
    apply=prune,
    summary="pruning with fine-tuning: single weights or N:M (tfmot), or whole channels (a smaller, faster model)",
)
