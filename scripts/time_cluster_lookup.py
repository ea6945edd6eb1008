"""Time the nearest-centroid lookup that weight clustering pays on every training step: tfmot's and the toolkit's.

The weights have the shape of the article CNN's dense layer (21632 x 256, 5.5M values), the centroids are 16 random
values in random order. Prints the median of `--repeats` calls of each (compiled with tf.function) and how many
weights the two assign to different centroids (only exact ties may differ, and then at the same distance).

Usage: python scripts/time_cluster_lookup.py [--repeats 10]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from compress.keras import ClusteringAlgorithm, tf  # noqa: E402
from compress.techniques.cluster import nearest_centroids  # noqa: E402


def median_ms(function, repeats: int) -> float:
    function().numpy()  # trace and warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function().numpy()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    tf.random.set_seed(0)
    weights = tf.random.normal([21632, 256])
    centroids = tf.Variable(tf.random.shuffle(tf.random.normal([16])))
    tfmot_lookup = tf.function(lambda: ClusteringAlgorithm(centroids).get_pulling_indices(weights))
    sorted_lookup = tf.function(lambda: nearest_centroids(weights, centroids))
    differ = int(tf.reduce_sum(tf.cast(tfmot_lookup() != sorted_lookup(), tf.int32)))
    print(f"tfmot argmin over |w - c|: {median_ms(tfmot_lookup, args.repeats):.0f} ms")
    print(f"sorted centroids + searchsorted: {median_ms(sorted_lookup, args.repeats):.0f} ms")
    print(f"weights assigned differently: {differ} of {weights.shape.num_elements()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
