"""`fedprint bench operating-point`: a labelled data set enrolled into a real node over mTLS, the
node learning from its gallery, every probe searched through Identify, and what the node decided
counted at its own thresholds and at the prior's."""

from __future__ import annotations

from pathlib import Path

from bench.operating_point import OperatingPointConfig, run_operating_point
from calibration.learning import LearningPolicy
from synthetic.evaluation_set import write_evaluation_set


async def test_the_operating_point_counts_what_the_node_decided(tmp_path: Path) -> None:
    data = tmp_path / "set"
    # A preset the shipped calibration was not fitted on; a third of the subjects not enrolled.
    write_evaluation_set(data, seed=5, subjects=90, difficulty="smudged", unenrolled_share=0.34, workers=1)
    # A small policy, so that a small gallery is enough to learn from here.
    policy = LearningPolicy(
        min_subjects=40,
        min_pairs=1000,
        probe_subjects=60,
        max_candidates=60,
        min_searches=20,
        min_exceedances=20,
    )
    config = OperatingPointConfig(
        data=data,
        shortlist=30,
        learning_passes=2,
        policy=policy,
        device="cpu",
        traffic_share=0.5,
        traffic_passes=1,
    )
    report = await run_operating_point(config)

    enrolled, mated, nonmated = report["gallery_size"], report["mated_searches"], report["nonmated_searches"]
    traffic = report["traffic_searches"]
    # Half the probes were searched first, as traffic; the rest are the ones counted.
    assert (
        mated + traffic["mated"] == enrolled
        and mated + nonmated + traffic["mated"] + traffic["nonmated"] == 90
    )
    assert abs(mated - traffic["mated"]) <= 1 and nonmated > 0
    # The ten-finger thresholds then rest on those searches.
    assert (
        "searches (10 fingers)" in report["thresholds"]["source"] or "1-10" in report["thresholds"]["source"]
    )
    assert report["thresholds"]["source"].startswith("learned from")
    assert report["learning"]["passes"][0]["pairs_added"] > 0
    for key in ("at_node_thresholds", "at_prior_thresholds"):
        at = report[key]
        assert at["fnir_at_hit"]["n"] == mated and at["fpir_at_hit"]["n"] == nonmated
        # A review threshold below the hit threshold misses no more mates and admits no fewer strangers.
        assert at["fnir_at_review"]["count"] <= at["fnir_at_hit"]["count"]
        assert at["fpir_at_review"]["count"] >= at["fpir_at_hit"]["count"]
        for rate in at.values():
            assert rate["low"] <= rate["value"] <= rate["high"]
    assert report["mates_not_returned"]["count"] <= report["at_node_thresholds"]["fnir_at_review"]["count"]
    assert report["seconds_per_probe"] > 0.0
