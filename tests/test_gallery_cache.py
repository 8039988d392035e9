"""A restarted node maps its encoded gallery from the cache when the cache is of its store and its
partition, catches up with what was written since, and re-encodes from the stored templates
whenever the cache is not its own."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedprint.clients import enroll
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.pki import TlsFiles
from fedprint.rpc import open_channel
from launcher.services import build_node
from nodes.gallery import GalleryNode
from nodes.gallery.config import NodeConfig
from synthetic.population import Population


async def top_candidates(
    node: GalleryNode, population: Population, pki: dict[str, TlsFiles]
) -> list[tuple[str, float]]:
    """Best candidate of the first four bookings' searches."""
    probes = [gal.Probe(probe_id=b.truth.tcn, tenprint=b.booking.tenprint) for b in population.bookings[:4]]
    async with open_channel(node.host.address, pki["coordinator"], retries=False) as channel:
        response = await gal_grpc.GalleryServiceStub(channel).Identify(
            gal.IdentifyRequest(probes=probes, max_results=1), timeout=60
        )
    return [(r.candidates[0].subject_id, round(r.candidates[0].fused_score, 6)) for r in response.results]


async def started(config: NodeConfig) -> GalleryNode:
    node = build_node(config)
    await node.start()
    return node


async def test_a_restart_maps_the_cache_and_catches_up_with_what_was_written_since(
    tmp_path: Path, population: Population, pki: dict[str, TlsFiles]
) -> None:
    config = NodeConfig(node="iafis", data_dir=tmp_path, tls=pki["iafis"])
    half = len(population.iafis) // 2

    node = await started(config)
    assert not node.loaded.from_cache and node.loaded.subjects == 0
    await enroll(node.host.address, population.iafis[:half], tls=pki["admin"])
    before = await top_candidates(node, population, pki)
    await node.stop(0)  # the gallery changed since start-up: the cache is written
    assert (tmp_path / "iafis.cylinders" / "state.json").exists()

    node = await started(config)
    assert node.loaded.from_cache and (node.loaded.subjects, node.loaded.caught_up) == (half, 0)
    assert await top_candidates(node, population, pki) == before
    # Enrolments after start-up, then a crash: no stop, so the cache still holds the old gallery.
    await enroll(node.host.address, population.iafis[half:], tls=pki["admin"])
    after = await top_candidates(node, population, pki)
    await node.host.stop(0)
    await node.servicer.batcher.close()
    node.servicer.store.close()

    # The old cache is mapped, and only the subjects enrolled since are encoded.
    node = await started(config)
    try:
        assert node.loaded.from_cache
        assert (node.loaded.subjects, node.loaded.caught_up) == (
            len(population.iafis),
            len(population.iafis) - half,
        )
        assert await top_candidates(node, population, pki) == after
    finally:
        await node.stop(0)


async def test_a_cache_of_another_store_or_partition_is_ignored(
    tmp_path: Path, population: Population, pki: dict[str, TlsFiles]
) -> None:
    config = NodeConfig(node="iafis", data_dir=tmp_path / "a", tls=pki["iafis"])
    node = await started(config)
    await enroll(node.host.address, population.iafis[:6], tls=pki["admin"])
    await node.stop(0)
    # Another store (its own database) finds this cache in its data directory: not its own.
    other = tmp_path / "b"
    other.mkdir()
    shutil.copytree(tmp_path / "a" / "iafis.cylinders", other / "iafis.cylinders")
    node = await started(NodeConfig(node="iafis", data_dir=other, tls=pki["iafis"]))
    try:
        assert not node.loaded.from_cache and node.loaded.subjects == 0
    finally:
        await node.stop(0)
    # A shard of the same store, with the whole gallery's cache renamed as its own.
    shard = NodeConfig(
        node="iafis", data_dir=tmp_path / "a", tls=pki["iafis"], role="shard", shard={"count": 2, "index": 1}
    )
    shutil.copytree(tmp_path / "a" / "iafis.cylinders", tmp_path / "a" / shard.cache_name)
    node = await started(shard)
    try:
        assert not node.loaded.from_cache
        owned = [e.subject_id for e in population.iafis[:6] if shard.partition.owns(e.subject_id)]
        assert 0 < node.loaded.subjects == len(owned) < 6
    finally:
        await node.stop(0)


async def test_a_node_can_run_without_a_cache(
    tmp_path: Path, population: Population, pki: dict[str, TlsFiles]
) -> None:
    config = NodeConfig(node="ident", data_dir=tmp_path, gallery_cache=False, tls=pki["ident"])
    node = await started(config)
    await enroll(node.host.address, population.ident[:3], tls=pki["admin"])
    await node.stop(0)
    assert not (tmp_path / "ident.cylinders").exists()
    node = await started(config)
    try:
        assert not node.loaded.from_cache and node.loaded.subjects == 3
    finally:
        await node.stop(0)


async def test_descriptors_of_another_version_are_recomputed_once_and_kept(
    tmp_path: Path, population: Population, pki: dict[str, TlsFiles]
) -> None:
    import json

    import numpy as np

    from gpu_kernels.shortlist import DESCRIPTOR_VERSION

    config = NodeConfig(node="iafis", data_dir=tmp_path, tls=pki["iafis"])
    node = await started(config)
    await enroll(node.host.address, population.iafis[:8], tls=pki["admin"])
    await node.stop(0)
    cache = tmp_path / "iafis.cylinders"
    kept = np.load(cache / "descriptors.npy")
    # As an older release left it: descriptors of another version, here zeros.
    state = json.loads((cache / "state.json").read_text())
    (cache / "state.json").write_text(json.dumps({**state, "descriptor_version": DESCRIPTOR_VERSION - 1}))
    np.save(cache / "descriptors.npy", np.zeros_like(kept))

    node = await started(config)
    try:
        assert node.loaded.from_cache and node.loaded.subjects == 8
        descriptors = node.servicer.gallery.full_tier()[2]
        assert descriptors is not None and np.allclose(descriptors.numpy(), kept, atol=1e-6)
    finally:
        await node.stop(0)
    # Written back at once: the next start-up reads them.
    assert json.loads((cache / "state.json").read_text())["descriptor_version"] == DESCRIPTOR_VERSION
    assert np.allclose(np.load(cache / "descriptors.npy"), kept, atol=1e-6)
