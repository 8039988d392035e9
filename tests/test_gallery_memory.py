"""What a gallery holds, and how it grows: ``GetStats`` reports the device and host bytes of
the live gallery, and enrolment appends rows into buffers that grow by doubling, so a search
always reads one consistent snapshot."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from fedprint.clients import enroll
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.pki import TlsFiles
from fedprint.rpc import open_channel
from fedprint.tenprint import decode_tenprint
from gpu_kernels.shortlist import enrolment_descriptors
from launcher.services import build_node
from nodes.gallery.config import NodeConfig, ShortlistConfig
from nodes.gallery.gallery import Gallery
from synthetic.population import Population

CPU = torch.device("cpu")


def held_bytes(gallery: Gallery) -> int:
    """The gallery's bytes counted independently of ``Gallery.memory``: one row per minutia
    (packed cell values and validity, the valid flag, angle and position), a count and an offset
    per finger, the presence flags, and the shortlist descriptors computed again."""
    _, cylinders = gallery.contents()
    assert cylinders is not None
    p = gallery.params
    row = p.cells // 8 + p.spatial_cells // 8 + 1 + 4 + 2 * 4
    minutiae = sum(int(f.counts.sum()) for f in cylinders.fingers)
    subjects = len(cylinders)
    rows = minutiae * row + subjects * 10 * (1 + 8 + 8)
    return rows + enrolment_descriptors(cylinders).numel() * 4


async def test_get_stats_reports_the_bytes_of_the_live_gallery_per_subject(
    tmp_path: Path, population: Population, pki: dict[str, TlsFiles]
) -> None:
    # A shortlist from the first subject on, so that a search builds the faiss index too.
    config = NodeConfig(
        node="iafis",
        data_dir=tmp_path,
        tls=pki["iafis"],
        shortlist=ShortlistConfig(min_gallery=1, candidates=5),
    )
    node = build_node(config)
    await node.host.start()
    try:
        async with (
            open_channel(node.host.address, pki["admin"]) as admin_channel,
            open_channel(node.host.address, pki["coordinator"], retries=False) as search_channel,
        ):
            admin = gal_grpc.GalleryServiceStub(admin_channel)
            empty = await admin.GetStats(gal.GetStatsRequest(), timeout=5)
            await enroll(node.host.address, population.iafis[:20], tls=pki["admin"])
            small = await admin.GetStats(gal.GetStatsRequest(), timeout=5)
            await enroll(node.host.address, population.iafis[20:], tls=pki["admin"])
            large = await admin.GetStats(gal.GetStatsRequest(), timeout=5)
            probe = gal.Probe(probe_id="P-1", tenprint=population.bookings[0].booking.tenprint)
            await gal_grpc.GalleryServiceStub(search_channel).Identify(
                gal.IdentifyRequest(probes=[probe]), timeout=30
            )
            searched = await admin.GetStats(gal.GetStatsRequest(), timeout=5)
        gallery = node.servicer.gallery
        # The same figures from the command line, as the administrator (in a thread: the command
        # runs its own event loop).
        out = tmp_path / "stats.json"
        command = ["stats", "--address", node.host.address, "--tls-dir", str(pki["admin"].cert.parent)]
        shown = await asyncio.to_thread(CliRunner().invoke, app, [*command, "--json", str(out)])
    finally:
        await node.stop(0)

    assert empty.gallery_size == 0 and empty.host_bytes == empty.device_bytes == 0
    assert empty.host_bytes_per_subject == 0.0
    assert (small.gallery_size, large.gallery_size) == (20, len(population.iafis))
    # A CPU node holds everything in host memory; on a GPU the cylinders would be device bytes.
    assert large.device == "cpu" and large.device_bytes == large.device_bytes_per_subject == 0
    assert small.host_bytes_per_subject > 0 and large.host_bytes > small.host_bytes
    # Per subject times subjects is the tensors' bytes (cylinders padded to the largest finger
    # enrolled so far, so the figure per subject moves a little as the gallery grows).
    per_subject = large.host_bytes_per_subject + large.device_bytes_per_subject
    assert per_subject * large.gallery_size == pytest.approx(held_bytes(gallery), rel=1e-9)
    assert large.host_bytes == sum(m.bytes for m in large.memory)
    assert {m.part for m in large.memory} == {"cylinders", "shortlist_descriptors"}
    # Buffers keep spare rows for the next enrolments: allocated is more, never less, and at most
    # about twice what is in use.
    assert large.host_bytes <= large.host_reserved_bytes <= 2.5 * large.host_bytes
    # A search of a gallery this size (shortlist from 1 subject) built the faiss index: its codes
    # (1,920 bytes per subject) and whitening tables are held now, and counted.
    (index,) = [m for m in searched.memory if m.part == "shortlist_index"]
    assert index.location == "cpu" and index.bytes >= 1920 * searched.gallery_size
    assert searched.host_bytes == large.host_bytes + index.bytes
    assert shown.exit_code == 0, shown.output
    assert "shortlist_index" in shown.output and "host bytes per subject" in shown.output
    assert int(json.loads(out.read_text())["hostBytes"]) == searched.host_bytes


def test_enrolling_one_batch_at_a_time_equals_enrolling_all_at_once(population: Population) -> None:
    entries = population.iafis
    whole = Gallery(CPU, shortlist=ShortlistConfig(min_gallery=1, candidates=8))
    cylinders = whole.encode([e.tenprint for e in entries])
    whole.add([e.subject_id for e in entries], cylinders)
    batched = Gallery(CPU, shortlist=ShortlistConfig(min_gallery=1, candidates=8))
    for lo in range(0, len(entries), 7):
        rows = torch.arange(lo, min(lo + 7, len(entries)))
        batched.add([e.subject_id for e in entries[lo : lo + 7]], cylinders.select(rows))
    assert batched.contents()[0] == whole.contents()[0]
    assert batched.nbytes == whole.nbytes
    probes = whole.encode([decode_tenprint(b.booking.tenprint).templates for b in population.bookings[:6]])
    for one, other in zip(whole.search(probes, k=5), batched.search(probes, k=5), strict=True):
        assert [m.subject_id for m in one.matches] == [m.subject_id for m in other.matches]
        assert [m.fused for m in one.matches] == pytest.approx([m.fused for m in other.matches], abs=1e-6)


def test_an_append_writes_only_new_rows_and_earlier_snapshots_stay_as_they_were(
    population: Population,
) -> None:
    entries = population.iafis
    gallery = Gallery(CPU, shortlist=ShortlistConfig(enabled=False))
    cylinders = gallery.encode([e.tenprint for e in entries[:30]])
    ids = [e.subject_id for e in entries[:30]]
    gallery.add(ids[:9], cylinders.select(torch.arange(9)))
    gallery.add(ids[9:10], cylinders.select(torch.arange(9, 10)))  # the minutia rows double
    before_ids, before, _ = gallery.full_tier()
    assert before is not None
    copy = gallery.contents()[1]
    reserved = gallery.memory().host_reserved_bytes
    assert reserved > gallery.memory().host_bytes

    gallery.add(ids[10:11], cylinders.select(torch.arange(10, 11)))  # fits the rows reserved
    _, after, _ = gallery.full_tier()
    assert after is not None and len(after) == 11
    # The same arrays: nothing was copied, and the reservation did not change.
    first, then = before.segments[0].positions[0], after.segments[0].positions[0]
    assert np.shares_memory(first.arrays["values"], then.arrays["values"])
    assert gallery.memory().host_reserved_bytes == reserved

    gallery.add(ids[11:30], cylinders.select(torch.arange(11, 30)))  # past the rows reserved: doubles
    assert gallery.memory().host_reserved_bytes > reserved
    gallery.remove([ids[0]])
    gallery.add([ids[1]], cylinders.select(torch.arange(1, 2)))  # re-enrolled: moves to the end
    assert gallery.contents()[0] == (*ids[2:30], ids[1])
    # What a search took before all this is unchanged.
    assert len(before) == 10 and before_ids == tuple(ids[:10])
    again = before.select(np.arange(10), CPU, gallery.params)
    assert copy is not None
    for old, new in zip(copy.fingers, again.fingers, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(old.tensors, new.tensors, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_full_tier_stays_in_host_memory(population: Population) -> None:
    """Only what a search scores goes to the device: the cylinders and the descriptors are host
    bytes on a GPU node too, and a search's scores come back from the device."""
    gallery = Gallery(torch.device("cuda"))
    entries = population.iafis[:10]
    gallery.add([e.subject_id for e in entries], gallery.encode([e.tenprint for e in entries]))
    memory = gallery.memory()
    where = {m.part: m.location for m in memory.parts}
    assert where == {"cylinders": "cpu", "shortlist_descriptors": "cpu"}
    assert memory.device_bytes == 0 and memory.host_bytes == held_bytes(gallery)
    probes = gallery.encode([decode_tenprint(b.booking.tenprint).templates for b in population.bookings[:2]])
    assert all(result.matches for result in gallery.search(probes, k=3))


def test_a_gallery_started_from_a_mapped_cache_searches_as_one_built_by_enrolment(
    population: Population, tmp_path: Path
) -> None:
    from gpu_kernels.cylinder_file import CylinderFile, CylinderFileWriter

    entries = population.iafis
    ids = [e.subject_id for e in entries]
    shortlist = ShortlistConfig(min_gallery=1, candidates=8)
    built = Gallery(CPU, shortlist=shortlist)
    cylinders = built.encode([e.tenprint for e in entries])
    built.add(ids, cylinders)
    with CylinderFileWriter(tmp_path / "cache", built.params) as writer:
        writer.append(cylinders)
    mapped = Gallery(CPU, shortlist=shortlist)
    mapped.load_mapped(ids, CylinderFile(tmp_path / "cache").rows, None)

    probes = built.encode([decode_tenprint(b.booking.tenprint).templates for b in population.bookings[:6]])
    for one, other in zip(built.search(probes, k=5), mapped.search(probes, k=5), strict=True):
        assert [(m.subject_id, m.candidate_minutiae) for m in one.matches] == [
            (m.subject_id, m.candidate_minutiae) for m in other.matches
        ]
        assert [m.fused for m in one.matches] == pytest.approx([m.fused for m in other.matches], abs=1e-6)
    # The mapped file is reported as such, and nothing of it was copied into the host arrays.
    parts = {m.part: m for m in mapped.memory().parts}
    assert parts["cylinders_mapped"].bytes == CylinderFile(tmp_path / "cache").rows.nbytes
    assert parts["cylinders"].bytes == 0
    assert mapped.nbytes == built.nbytes

    # Enrolments after start-up are appended after the mapped rows; a removal rebuilds the
    # gallery in host arrays without the subject.
    mapped.add(["LATE-1"], cylinders.select(torch.arange(0, 1)))
    assert mapped.contents()[0][-1] == "LATE-1" and len(mapped) == len(ids) + 1
    assert {m.part for m in mapped.memory().parts} >= {"cylinders_mapped", "cylinders"}
    assert mapped.remove([ids[3]]) == 1
    assert "cylinders_mapped" not in {m.part for m in mapped.memory().parts}
    assert mapped.contents()[0] == (*ids[:3], *ids[4:], "LATE-1")
    found = mapped.search(probes.select(slice(0, 1)), k=1, subset=["LATE-1"])[0].matches
    assert [m.subject_id for m in found] == ["LATE-1"]
