"""The coordinator's own Prometheus metrics, read from its store at each scrape.

Decisions stored and still incomplete, bookings being retried, the outbox's depth and the age of
its oldest unacknowledged notification, dead letters, and examiner reviews waiting (overdue ones
among them): the figures of ``GetStats``
(:meth:`~federation.store.CoordinatorStore.stats`), so the two can never disagree. The store is
shared by every coordinator replica, so each replica reports the same values: aggregate them with
``max``, not ``sum``.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from federation.store import CoordinatorStore

log = structlog.get_logger(__name__)


class CoordinatorStatsCollector(Collector):
    """Gauges over :meth:`CoordinatorStore.stats`, queried when Prometheus scrapes."""

    def __init__(self, store: CoordinatorStore, review_overdue_s: float) -> None:
        self.store = store
        self.review_overdue_s = review_overdue_s

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            stats = self.store.stats(self.review_overdue_s)
        except Exception as error:  # a scrape must not take the service down; the gap shows
            log.warning("coordinator statistics unavailable", error=type(error).__name__)
            return
        yield GaugeMetricFamily(
            "fedprint_coordinator_decisions", "decisions stored (one per TCN)", stats.decisions
        )
        yield GaugeMetricFamily(
            "fedprint_coordinator_incomplete_decisions", "stored decisions still incomplete", stats.incomplete
        )
        yield GaugeMetricFamily(
            "fedprint_coordinator_retrying_bookings",
            "incomplete bookings kept (sealed) and searched again by the coordinator",
            stats.retrying_bookings,
        )
        yield GaugeMetricFamily(
            "fedprint_coordinator_outbox_pending",
            "notifications not yet acknowledged by ICE",
            stats.outbox_pending,
        )
        yield GaugeMetricFamily(
            "fedprint_coordinator_outbox_oldest_pending_age_seconds",
            "age of the oldest unacknowledged notification (0 when none)",
            stats.oldest_pending_notification_age_s,
        )
        yield GaugeMetricFamily(
            "fedprint_coordinator_dead_letters",
            "notifications given up on, waiting for an operator",
            stats.dead_letters,
        )
        yield GaugeMetricFamily(
            "fedprint_coordinator_open_reviews", "examiner reviews waiting for a verdict", stats.open_reviews
        )
        yield GaugeMetricFamily(
            "fedprint_coordinator_overdue_reviews",
            "examiner reviews waiting longer than review_overdue_s: a booking held without a verdict",
            stats.overdue_reviews,
        )
        yield GaugeMetricFamily(
            "fedprint_coordinator_oldest_open_review_age_seconds",
            "age of the oldest review waiting for a verdict (0 when none)",
            stats.oldest_open_review_age_s,
        )
