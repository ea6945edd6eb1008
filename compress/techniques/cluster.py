"""Weight clustering with tfmot: each chosen kernel keeps only `clusters` distinct values, fine-tuned, then stripped.

A clustered kernel compresses well (gzip) and is the input that cluster-preserving QAT (`qat --preserve clusters`)
expects. The classifier is left whole by default.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.errors import ModelError
from compress.techniques._finetune import (
    as_names,
    require_names,
    check_training_settings,
    copy_model,
    evaluate,
    fine_tune,
    parse_names,
    select_layers,
    wrap_layers,
)
from compress.techniques.base import Outcome, Technique, TechniqueConfig, option, require

# Config value -> tfmot's CentroidInitialization member name.
INITS = {
    "linear": "LINEAR",
    "kmeans_plus_plus": "KMEANS_PLUS_PLUS",
    "density": "DENSITY_BASED",
    "random": "RANDOM",
}


@dataclass(frozen=True)
class ClusterConfig(TechniqueConfig):
    clusters: int = option(16, "distinct values per clustered kernel (at least 2)")
    init: str = option("kmeans_plus_plus", "how centroids start: " + ", ".join(INITS),
                       metavar="{" + ",".join(INITS) + "}")
    layers: tuple[str, ...] = option((), "comma-separated Conv2D/Dense layers to cluster; none: all but the "
                                     "classifier", parse=parse_names, metavar="NAMES")
    epochs: int = option(2, "fine-tuning epochs while clustered")
    batch_size: int = option(64, "fine-tuning batch size")
    learning_rate: float = option(1e-4, "Adam learning rate for fine-tuning")

    def __post_init__(self):
        object.__setattr__(self, "layers", as_names(self.layers))
        super().__post_init__()

    def validate(self) -> None:
        require(isinstance(self.clusters, int) and not isinstance(self.clusters, bool) and self.clusters >= 2,
                f"clusters must be an integer >= 2, got {self.clusters!r}")
        require(self.init in INITS, f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        require_names(self.layers, "layers")
        check_training_settings(self)


def cluster(model, config: ClusterConfig, data, *, out_dir=None, verbose: int = 1) -> Outcome:
    """Cluster the weights of a copy of `model`, fine-tune it on `data`; return the stripped model and stats."""
    from compress.keras import tfmot

    clustering = tfmot.clustering.keras
    work = copy_model(model)
    chosen = select_layers(work, config.layers, "cluster")
    names = [layer.name for layer in chosen]
    too_small = [f"{layer.name} ({layer.kernel.shape.num_elements()} weights)" for layer in chosen
                 if layer.kernel.shape.num_elements() <= config.clusters]
    if too_small:
        raise ModelError(
            f"cannot cluster into {config.clusters} values layer(s) with no more weights than that: "
            f"{', '.join(too_small)}"
        )
    init = getattr(clustering.CentroidInitialization, INITS[config.init])

    def wrap(layer):
        if layer.name not in names:
            return layer
        return clustering.cluster_weights(layer, number_of_clusters=config.clusters, cluster_centroids_init=init)

    wrapped = wrap_layers(work, wrap, "cluster")
    history = fine_tune(
        wrapped, data, epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
        verbose=verbose,
    )
    clustered = clustering.strip_clustering(wrapped)
    stats = {
        "clustered_layers": names,
        "unique_values": unique_values(clustered, names),
        "clusters": config.clusters,
        "init": config.init,
        **evaluate(clustered, data),
        "history": history,
    }
    return Outcome(model=clustered, stats=stats)


def unique_values(model, layer_names) -> dict:
    """Distinct values in each named layer's kernel."""
    import numpy as np

    return {name: int(np.unique(model.get_layer(name).kernel.numpy()).size) for name in layer_names}


TECHNIQUE = Technique(
    name="cluster",
    config_class=ClusterConfig,
    apply=cluster,
    summary="weight clustering (k distinct values per kernel) with fine-tuning, tfmot",
)
