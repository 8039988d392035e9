"""``fedprint bench shortlist`` on a tiny data set in the standard layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.shortlist import ShortlistBenchConfig, run_shortlist_bench
from synthetic.evaluation_set import write_evaluation_set


def test_recall_grows_with_the_shortlist_and_the_encoded_gallery_is_reused(tmp_path: Path) -> None:
    write_evaluation_set(tmp_path / "data", seed=8, subjects=16, difficulty="easy", workers=1)
    config = ShortlistBenchConfig(
        workdir=tmp_path / "work", candidates=(2, 4, 16), probes=10, scored_probes=3, exhaustive_sample=8
    )
    first = run_shortlist_bench(tmp_path / "data", config)
    assert first["gallery_size"] == 16 and first["probe_count"] == 10
    recall = [first["recall_at"][k] for k in ("2", "4", "16")]
    assert recall == sorted(recall) and recall[-1] == 1.0  # K = the whole gallery keeps every mate
    assert first["chosen_candidates"] in (2, 4, 16)
    assert first["rank1_through_tiers"] == 1.0
    assert first["device_bytes_per_subject"] == 1920 and first["host_bytes_per_subject"] > 0
    assert first["exhaustive_ms_per_probe"] > 0 and first["speedup"] > 0

    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "gallery").iterdir()}
    second = run_shortlist_bench(tmp_path / "data", config)
    assert second["recall_at"] == first["recall_at"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "gallery").iterdir()} == files

    # Descriptors of an older version are recomputed from the kept cylinders, never reused.
    (tmp_path / "work" / "gallery" / "descriptor_version.txt").write_text("1\n")
    np.save(tmp_path / "work" / "gallery" / "descriptors.npy", np.zeros((16, 10, 96), np.float32))
    third = run_shortlist_bench(tmp_path / "data", config)
    assert third["recall_at"] == first["recall_at"]
