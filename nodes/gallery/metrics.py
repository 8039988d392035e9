"""A gallery node's own Prometheus metrics, beside the per-RPC ones every service has.

Gallery size, the micro-batcher's batch sizes, device time and queue depth, and the
distribution of each probe's best fused score with the decision band it fell in. A score is
recorded with no identity attached (no probe id, TCN or subject id), so the histogram shows
how the node's score distribution sits against its thresholds and nothing about anyone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.gallery.v1 import gallery_pb2 as gal

if TYPE_CHECKING:
    from nodes.gallery.learner import LearningPass
    from nodes.gallery.server import GalleryServicer

#: Batch-size buckets: powers of two up to the largest useful ``batching.max_batch``.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def score_buckets(review: float, hit: float) -> tuple[float, ...]:
    """Fused-score buckets: a log-spaced grid over (0, 1] with the node's review and hit
    thresholds as edges of their own, so the share of probes in each band is exact."""
    grid = np.geomspace(1e-3, 1.0, 25)
    edges = {round(float(e), 6) for e in grid} | {review, hit}
    return tuple(sorted(edges))


class GalleryMetrics:
    """Registers a node's metrics in ``registry`` and records what its servicer reports."""

    def __init__(self, registry: CollectorRegistry, servicer: GalleryServicer[Any]) -> None:
        node = servicer.node
        # Bucket edges at the thresholds of the gallery as it starts (they move as it grows).
        thresholds = servicer.learner.current.for_gallery(len(servicer.gallery))
        Gauge(
            "fedprint_gallery_subjects",
            "subjects in this node's (shard's) gallery",
            ["node"],
            registry=registry,
        ).labels(node).set_function(lambda: len(servicer.gallery))
        Gauge(
            "fedprint_gallery_queue_depth",
            "probes waiting for the next device call",
            ["node"],
            registry=registry,
        ).labels(node).set_function(lambda: servicer.batcher.queue_depth)
        self._batch_size = Histogram(
            "fedprint_gallery_batch_size",
            "probes per device call",
            ["node"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        ).labels(node)
        self._batch_seconds = Histogram(
            "fedprint_gallery_batch_seconds",
            "device time of one batch (encode and search)",
            ["node"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        ).labels(node)
        self._top_score = Histogram(
            "fedprint_gallery_top_score",
            "fused score of each probe's best candidate (no identities recorded)",
            ["node"],
            buckets=score_buckets(thresholds.review, thresholds.hit),
            registry=registry,
        ).labels(node)
        self._decisions = Counter(
            "fedprint_gallery_probe_decisions_total",
            "probes searched, by decision band",
            ["node", "band"],
            registry=registry,
        )
        self._calibration_updates = Counter(
            "fedprint_gallery_calibration_updates_total",
            "times the node moved its thresholds to those learned from its own gallery",
            ["node"],
            registry=registry,
        ).labels(node)
        learner = servicer.learner
        Gauge(
            "fedprint_gallery_suspected_duplicates",
            "pairs of enrolled subjects that score as the same person (seen while learning)",
            ["node"],
            registry=registry,
        ).labels(node).set_function(lambda: len(learner.sample.duplicates))
        hit = Gauge(
            "fedprint_gallery_hit_threshold",
            "the hit threshold the node judges a ten-finger candidate by, at its gallery size",
            ["node"],
            registry=registry,
        )
        hit.labels(node).set_function(lambda: learner.current.for_gallery(len(servicer.gallery), 10).hit)
        self._node = node
        servicer.batcher.on_batch = self.observe_batch

    def observe_learning(self, done: LearningPass) -> None:
        """Counts a learning pass that moved the thresholds."""
        if done.adoption is not None:
            self._calibration_updates.inc()

    def observe_batch(self, size: int, seconds: float) -> None:
        self._batch_size.observe(size)
        self._batch_seconds.observe(seconds)

    def observe_identify(self, response: gal.IdentifyResponse) -> None:
        """Records each probe's band and best score (not who the probe or the candidate is)."""
        for result in response.results:
            self._decisions.labels(self._node, bio.DecisionBand.Name(result.decision)).inc()
            if result.candidates:
                self._top_score.observe(result.candidates[0].fused_score)
