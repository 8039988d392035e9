"""A restarted node maps its encoded gallery from the cache when the cache matches the store,
and re-encodes from the stored templates whenever it does not."""

from __future__ import annotations

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
    async with open_channel(node.host.address, pki["coordinator"]) as channel:
        response = await gal_grpc.GalleryServiceStub(channel).Identify(
            gal.IdentifyRequest(probes=probes, max_results=1), timeout=60
        )
    return [(r.candidates[0].subject_id, round(r.candidates[0].fused_score, 6)) for r in response.results]


async def started(config: NodeConfig) -> GalleryNode:
    node = build_node(config)
    await node.start()
    return node


async def test_a_restart_maps_the_cache_and_a_stale_cache_is_ignored(
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
    assert node.loaded.from_cache and node.loaded.subjects == half
    assert await top_candidates(node, population, pki) == before
    # Enrolments after start-up, then a crash: no stop, so the cache still holds the old gallery.
    await enroll(node.host.address, population.iafis[half:], tls=pki["admin"])
    after = await top_candidates(node, population, pki)
    await node.host.stop(0)
    await node.servicer.batcher.close()
    node.servicer.store.close()

    node = await started(config)
    try:
        assert not node.loaded.from_cache and node.loaded.subjects == len(population.iafis)
        assert await top_candidates(node, population, pki) == after
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
