"""Weight clustering with tfmot: each chosen kernel keeps only `clusters` distinct values, fine-tuned, then stripped.

A clustered kernel compresses well (gzip) and is the input that cluster-preserving QAT (`qat --preserve clusters`)
expects. The classifier is left whole by default.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from compress.errors import ModelError
from compress.techniques.finetune import (
    as_names,
    require_names,
    check_training_settings,
    copy_model,
    evaluate,
    fine_tune,
    parse_names,
    left_alone,
    main_kernel,
    select_layers,
    wrap_layers,
)
from compress.techniques.base import Outcome, Technique, TechniqueConfig, option, require

# Config value -> tfmot's CentroidInitialization member name.
# 8-bit weights hold 256 values; more centroids compress nothing and make every step's lookup slower.
MAX_CLUSTERS = 256
INITS = {
    "linear": "LINEAR",
    "kmeans_plus_plus": "KMEANS_PLUS_PLUS",
    "density": "DENSITY_BASED",
    "random": "RANDOM",
}


@dataclass(frozen=True)
class ClusterConfig(TechniqueConfig):
    clusters: int = option(16, "distinct values per clustered kernel (at least 2)")
    # k-means++ spreads the centroids where the weights are, which compact kernels need at few clusters: on the
    # CIFAR-10 recipe's distilled student, linear centroids lost 1.8 points at 8 clusters and 6.9 at 4 (k-means++:
    # 0.1 and 1.0). Linear centroids span the range evenly, keeping the few large weights (Han et al., Deep
    # Compression) and most weights in the central values, which gzip codes in fewer bits: at 16 clusters the zoo's
    # models and the article CNN came out 1.1-2.3x smaller at the same accuracy (the default recipe uses them).
    init: str = option("kmeans_plus_plus", "how centroids start: " + ", ".join(INITS),
                       metavar="{" + ",".join(INITS) + "}")
    layers: tuple[str, ...] = option((), "comma-separated Conv2D/SeparableConv2D/Dense layers to cluster; none: "
                                     "all but the "
                                     "classifier", parse=parse_names, metavar="NAMES")
    epochs: float = option(2, "fine-tuning epochs while clustered (0.5: half an epoch)")
    # Every step reassigns each clustered weight to its nearest centroid, a cost per step whatever the batch, so
    # large batches pay (step times in the README).
    batch_size: int = option(256, "fine-tuning batch size")
    learning_rate: float = option(1e-4, "Adam learning rate for fine-tuning")

    def __post_init__(self):
        object.__setattr__(self, "layers", as_names(self.layers))
        super().__post_init__()

    def validate(self) -> None:
        require(isinstance(self.clusters, int) and not isinstance(self.clusters, bool)
                and 2 <= self.clusters <= MAX_CLUSTERS,
                f"clusters must be an integer from 2 to {MAX_CLUSTERS}, got {self.clusters!r}")
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
    too_small = [f"{layer.name} ({main_kernel(layer).shape.num_elements()} weights)" for layer in chosen
                 if main_kernel(layer).shape.num_elements() <= config.clusters]
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
    use_sorted_lookup(wrapped)
    history = fine_tune(
        wrapped, data, epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
        verbose=verbose,
    )
    clustered = clustering.strip_clustering(wrapped)
    stats = {
        "clustered_layers": names,
        "left_alone": left_alone(work, chosen, "cluster"),
        "unique_values": unique_values(clustered, names),
        "clusters": config.clusters,
        "init": config.init,
        **evaluate(clustered, data),
        "history": history,
    }
    return Outcome(model=clustered, stats=stats)


def nearest_centroids(weight, centroids):
    """For each weight, the index (int64, weight's shape) of its nearest centroid; ties may go either way.

    The centroids are sorted and each weight is placed among the midpoints between neighbours: memory of the
    weight's size and O(n log k) work, where tfmot's argmin over |w - c| builds an n x k tensor; paid on every
    training step, so it matters (scripts/time_cluster_lookup.py and the README give the timings).
    """
    from compress.keras import tf

    order = tf.argsort(centroids)
    ordered = tf.gather(centroids, order)
    slots = tf.searchsorted((ordered[1:] + ordered[:-1]) / 2, tf.reshape(weight, [-1]))
    return tf.reshape(tf.gather(tf.cast(order, tf.int64), slots), tf.shape(weight))


@functools.lru_cache(maxsize=None)
def _sorted_lookup_class():
    """tfmot's per-tensor clustering algorithm with `nearest_centroids` as its lookup, defined on first use."""
    from compress.keras import ClusteringAlgorithm

    class SortedLookupClustering(ClusteringAlgorithm):
        def get_pulling_indices(self, weight, centroids=None):
            return nearest_centroids(weight, self.cluster_centroids if centroids is None else centroids)

    return SortedLookupClustering


def use_sorted_lookup(wrapped) -> None:
    """Give every per-tensor clustering wrapper of `wrapped` the sorted lookup; the clustered weights are the same."""
    from compress.keras import ClusteringAlgorithm

    for layer in wrapped.layers:
        for algorithm in getattr(layer, "clustering_algorithms", {}).values():
            if type(algorithm) is ClusteringAlgorithm:  # per-channel variants keep tfmot's own lookup
                algorithm.__class__ = _sorted_lookup_class()


def unique_values(model, layer_names) -> dict:
    """Distinct values in each named layer's kernel."""
    import numpy as np

    return {name: int(np.unique(main_kernel(model.get_layer(name)).numpy()).size) for name in layer_names}


TECHNIQUE = Technique(
    name="cluster",
    config_class=ClusterConfig,
    apply=cluster,
    summary="weight clustering (k distinct values per kernel) with fine-tuning, tfmot",
)
