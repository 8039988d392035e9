"""A data set in the standard layout enrols into a running node through its own ``Enroll``
(``fedprint enroll DATA``), and ``fedprint bench batching --data`` searches it with the data
set's probes, keeping the node's store and cache for the next run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.batching import BatchingBenchConfig, run_batching_bench
from cli.app import app
from fedprint.datasets import gallery_enrolments, probe_captures
from fedprint.pki import TlsFiles
from launcher.services import build_node
from nodes.gallery.config import BatchingConfig, NodeConfig, ShortlistConfig
from synthetic.evaluation_set import write_evaluation_set


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dataset")
    write_evaluation_set(directory, seed=4, subjects=14, unenrolled_share=0.2, workers=1)
    return directory


def test_each_subject_with_a_gallery_capture_is_one_enrolment(dataset: Path) -> None:
    entries = gallery_enrolments(dataset, "criminal_history")
    ids = [e.subject_id for e in entries]
    assert len(ids) == len(set(ids)) and 0 < len(ids) < 14  # the unenrolled have probes only
    request = entries[0].enroll_request()
    assert request.subject_id == ids[0] and request.criminal_history.subject_id == ids[0]
    assert len(request.tenprint.fingers) == 10
    with pytest.raises(ValueError, match="record field"):
        gallery_enrolments(dataset, "parking_tickets")
    assert {c.subject_id for c in probe_captures(dataset)} > set(ids)


async def test_a_data_set_enrols_into_a_running_node_from_the_command_line(
    dataset: Path, tmp_path: Path, pki: dict[str, TlsFiles]
) -> None:
    node = build_node(NodeConfig(node="iafis", data_dir=tmp_path, tls=pki["iafis"]))
    await node.start()
    try:
        command = ["enroll", str(dataset), "--node", "iafis", "--address", node.host.address]
        command += ["--tls-dir", str(pki["admin"].cert.parent)]
        shown = await asyncio.to_thread(CliRunner().invoke, app, command)
        held = node.servicer.gallery.contents()[0]
    finally:
        await node.stop(0)
    assert shown.exit_code == 0, shown.output
    expected = [e.subject_id for e in gallery_enrolments(dataset, "criminal_history")]
    assert list(held) == expected
    assert f"gallery holds {len(expected)} subjects" in shown.output


async def test_bench_batching_on_a_data_set_reuses_the_node_it_enrolled(
    dataset: Path, tmp_path: Path
) -> None:
    config = BatchingBenchConfig(
        data=dataset,
        workdir=tmp_path,
        requests=6,
        concurrency=3,
        batch_probes=4,
        settings=(
            BatchingConfig(max_batch=1, max_wait_ms=0.0),
            BatchingConfig(max_batch=3, max_wait_ms=20.0),
        ),
        shortlist=ShortlistConfig(min_gallery=1, candidates=4),
    )
    first = await run_batching_bench(config)
    enrolled = len(gallery_enrolments(dataset, "criminal_history"))
    assert first["gallery_size"] == enrolled and first["shortlist_candidates"] == 4
    assert first["dataset"] == str(dataset) and first["one_call_probes"] == 4
    assert all(row["one_call_within_deadline"] for row in first["settings"])
    # GetStats of the live node: the full tier and the shortlist, all in host memory here.
    parts = {m["part"] for m in first["get_stats"]["memory"]}
    assert {"cylinders", "shortlist_descriptors", "shortlist_index"} <= parts
    assert first["get_stats"]["host_bytes_per_subject"] > 0 == first["get_stats"]["device_bytes_per_subject"]
    # The store and the cylinder cache stay in the workdir: the next run maps them.
    assert (tmp_path / "node" / "iafis.cylinders" / "state.json").exists()
    stamp = (tmp_path / "node" / "iafis.cylinders" / "state.json").stat().st_mtime_ns
    second = await run_batching_bench(config)
    assert second["gallery_size"] == enrolled
    assert "cylinders_mapped" in {m["part"] for m in second["get_stats"]["memory"]}
    assert (tmp_path / "node" / "iafis.cylinders" / "state.json").stat().st_mtime_ns == stamp
