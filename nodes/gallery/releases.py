"""Need to know: a node releases a subject's enrolled prints and record (``GetSubject``) only to the
caller it returned that subject to, as the deciding candidate of a probe in the review or hit band,
for that probe, within its release window (``NodeConfig.release_window_s``). Every release is
recorded with the probe (the coordinator's TCN, which with the node names the review) and the
examiner the caller names. A request for anything else is refused alike, whether or not the
subject exists.

Why the deciding candidate only: the coordinator opens a review on a node's first candidate and on
no other (:func:`federation.review.opened_reviews`). Why the hit band as well as the review band:
the coordinator may lower a node's hit to a review (its evidence rule,
:meth:`federation.policy.ThreatPolicy.weigh_evidence`), which the node cannot know of; a hit's
record already went to that caller with the answer, so only its prints are added.

The record of what was returned lives in the node's gallery store, so it survives a restart and
is shared by replicas on one database. In a sharded node the router keeps it: it sees the merged
candidates its caller gets, and shards answer their router only.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import structlog

from fedprint.access import current_caller
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.gallery.v1 import gallery_pb2 as gal
from nodes.gallery.store import GalleryStore, ReturnedCandidate, SubjectRelease

log = structlog.get_logger(__name__)

#: Bands whose deciding candidate the caller may fetch for a review.
RELEASABLE_BANDS = frozenset({bio.REVIEW, bio.HIT})
#: How often a process purges the expired record (and the oldest past the bound).
PURGE_EVERY_S = 60.0


def caller_name() -> str:
    """The current caller's certificate subject; "" on a plaintext (insecure) server."""
    identity = current_caller().identity
    return identity.subject if identity is not None else ""


class ReleaseLedger:
    """What a node returned to whom, and the releases it allows on that ground."""

    def __init__(self, store: GalleryStore[Any], node: str, window_s: float, max_records: int) -> None:
        self.store = store
        self.node = node
        self.window_s = window_s
        self.max_records = max_records
        self._purged_at = float("-inf")

    def returned(self, caller: str, response: gal.IdentifyResponse) -> None:
        """Records the deciding candidate of each probe of ``response`` that may go to review."""
        self.store.record_returned(
            [
                ReturnedCandidate(caller, r.probe_id, r.decided_by, r.decision)
                for r in response.results
                if r.decision in RELEASABLE_BANDS and r.decided_by and r.probe_id
            ]
        )
        if time.monotonic() - self._purged_at >= PURGE_EVERY_S:
            self.purge()

    def purge(self) -> int:
        """Forgets what was returned longer ago than the window, and the oldest past the bound."""
        self._purged_at = time.monotonic()
        before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.window_s)
        purged = self.store.purge_returned(before, self.max_records)
        if purged:
            log.info("returned candidates forgotten", node=self.node, records=purged)
        return purged

    def may_release(self, caller: str, request: gal.GetSubjectRequest) -> bool:
        """Whether ``caller`` was given ``request.subject_id`` for ``request.probe_id`` within the
        window."""
        if not request.probe_id:
            return False
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.window_s)
        return self.store.returned_since(caller, request.probe_id, request.subject_id, since)

    def released(self, caller: str, request: gal.GetSubjectRequest) -> None:
        """Records a release (and logs it)."""
        self.store.record_release(
            SubjectRelease(
                dt.datetime.now(dt.UTC), caller, request.probe_id, request.subject_id, request.examiner
            )
        )
        log.info(
            "subject released for review",
            node=self.node,
            subject_id=request.subject_id,
            review=f"{request.probe_id}/{self.node}",
            caller=caller,
            examiner=request.examiner,
        )

    def refusal(self) -> str:
        """The one message of every refused request (it says nothing of the subject)."""
        hours = self.window_s / 3600
        return (
            f"the {self.node} node releases a subject only to the caller it returned that subject to, "
            f"as the deciding candidate in the review or hit band, for that probe (probe_id), within "
            f"{hours:g} h"
        )


__all__ = ["RELEASABLE_BANDS", "ReleaseLedger", "caller_name"]
