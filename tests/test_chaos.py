"""Crashes: a service SIGKILLed and restarted comes back on its address with its data, and
``fedprint bench federation --chaos`` (each service killed once while bookings go in) loses no
booking, leaves none incomplete, and puts every IDENT hit in the ICE queue exactly once."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from bench.chaos import CHAOS_SERVICES, ChaosConfig, chaos_schedule
from bench.federation import FederationBenchConfig, run_federation_bench
from fedprint.clients import list_notifications
from fedprint.ice.v1 import ice_pb2 as ice
from fedprint.ice.v1 import ice_pb2_grpc as ice_grpc
from fedprint.pki import TlsFiles
from fedprint.records.v1 import records_pb2 as rec
from fedprint.rpc import open_channel
from launcher.processes import start_service, stop_service


def test_the_chaos_schedule_follows_its_seed() -> None:
    schedule = chaos_schedule(ChaosConfig(seed=7, kills_per_service=2))
    assert schedule == chaos_schedule(ChaosConfig(seed=7, kills_per_service=2))
    assert schedule != chaos_schedule(ChaosConfig(seed=8, kills_per_service=2))
    assert sorted(e.service for e in schedule) == sorted(CHAOS_SERVICES * 2)
    assert all(0.1 <= e.after_fraction <= 0.8 and 0.5 <= e.down_s <= 3.0 for e in schedule)
    assert [e.after_fraction for e in schedule] == sorted(e.after_fraction for e in schedule)


async def test_a_killed_service_restarts_on_its_address_over_its_data(
    tmp_path: Path, pki: dict[str, TlsFiles]
) -> None:
    files = pki["ice"]
    config = {
        "listen": "127.0.0.1:0",
        "data_dir": str(tmp_path / "ice"),
        "tls": {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)},
    }
    service = await start_service("ice", config, tmp_path)
    try:
        address = service.address
        # As the coordinator's outbox calls ICE: no gRPC retries (the outbox retries by itself).
        async with open_channel(address, pki["coordinator"], retries=False) as channel:
            stub = ice_grpc.IceNotificationServiceStub(channel)
            notice = ice.Notification(
                tcn="TCN-CRASH-1", ori="XX0010000", level=rec.LEVEL_1, ident_match={"subject_id": "S-1"}
            )
            await stub.Notify(notice, timeout=10)
            await service.kill()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Notify(notice, timeout=2)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            await service.restart()
            # Same address, same database: the client's channel reconnects, the notice is there
            # once, and its redelivery is recognised.
            assert service.address == address and (service.kills, service.restarts) == (1, 1)
            assert (await stub.Notify(notice, timeout=10, wait_for_ready=True)).duplicate
        received = await list_notifications(address, tls=pki["ice"])
        assert [n.notification.tcn for n in received] == ["TCN-CRASH-1"]
    finally:
        await stop_service(service)


@pytest.mark.slow
async def test_a_chaos_run_loses_nothing_and_notifies_every_ident_hit_once(tmp_path: Path) -> None:
    config = FederationBenchConfig(
        bookings=20, concurrency=8, persons=60, chaos=ChaosConfig(seed=1, settle_timeout_s=120)
    )
    result = await run_federation_bench(config, workdir=tmp_path)
    chaos = result["chaos"]
    # Every service died once, by SIGKILL, while bookings were going in, and came back.
    assert chaos["kills"] == dict.fromkeys(CHAOS_SERVICES, 1)
    assert chaos["settled"]
    assert result["errors"] == 0 and result["lost"] == 0 and result["not_final"] == 0
    assert result["ident_hits"] > 0
    assert result["ident_hits_notified_once"] == result["ident_hits"]
    assert result["notified_zero"] == result["notified_more_than_once"] == result["notified_unexpected"] == 0
