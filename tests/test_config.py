"""Service configuration: the shipped example files load, bad values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from calibration.thresholds import Thresholds
from federation.config import CoordinatorConfig
from fedprint.settings import SecretInConfigFile
from ice_service.config import IceConfig
from nodes.gallery.config import NodeConfig

CONFIG = Path(__file__).resolve().parents[1] / "config"


def test_the_example_configs_load() -> None:
    assert NodeConfig.load(CONFIG / "iafis.yaml").node == "iafis"
    assert NodeConfig.load(CONFIG / "ident.yaml").node == "ident"
    assert CoordinatorConfig.load(CONFIG / "coordinator.yaml").iafis_address.endswith(":50061")
    assert IceConfig.load(CONFIG / "ice.yaml").listen.endswith(":50063")


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPRINT_BATCHING__MAX_BATCH", "64")
    assert NodeConfig(node="ident", insecure=True).batching.max_batch == 64


def test_the_example_configs_speak_mtls() -> None:
    config = CoordinatorConfig.load(CONFIG / "coordinator.yaml")
    assert config.tls is not None and config.tls.cert == Path("pki/coordinator.pem") and not config.insecure
    assert config.rate_limit is not None and config.rate_limit.per_second > 0


def test_no_tls_is_refused_unless_insecure_is_said() -> None:
    with pytest.raises(ValidationError, match="insecure"):
        IceConfig()
    assert IceConfig(insecure=True).tls is None
    with pytest.raises(ValidationError, match="contradict"):
        IceConfig(insecure=True, tls={"ca": "ca.pem", "cert": "ice.pem", "key": "ice.key"})


def test_review_threshold_above_hit_is_refused() -> None:
    with pytest.raises(ValidationError, match="review threshold"):
        Thresholds(hit=0.3, review=0.4)


def test_unknown_fields_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("node: iafis\ninsecure: true\nthreshold: 0.3\n")  # misspelt
    with pytest.raises(ValidationError, match="threshold"):
        NodeConfig.load(path)


def test_bad_ori_in_allow_list_is_refused() -> None:
    with pytest.raises(ValidationError, match="nine"):
        CoordinatorConfig(
            iafis_address="a:1",
            ident_address="b:1",
            ice_address="c:1",
            authorized_oris=["XX1"],
            insecure=True,
        )
    with pytest.raises(ValidationError, match="nine"):  # a trailing newline is not part of an ORI
        CoordinatorConfig(
            iafis_address="a:1", ident_address="b:1", ice_address="c:1", authorized_oris=["XX0010000\n"]
        )


def test_target_fpir_moves_the_hit_threshold_along_the_calibration_curve() -> None:
    t = Thresholds(hit=0.40, review=0.37, fpir_curve=[(1e-2, 0.36), (1e-3, 0.39), (1e-4, 0.43)])
    strict = t.for_fpir(1e-4)
    assert strict is not None and (strict.hit, strict.review, strict.hit_fpir) == (0.43, 0.37, 1e-4)
    loose = t.for_fpir(1e-2)
    assert loose is not None and loose.hit == 0.36 and loose.review == 0.36  # review never above hit
    assert t.for_fpir(1e-6) is None
    assert Thresholds(hit=0.4, review=0.3).for_fpir(1e-3) is None


def test_environment_overrides_the_config_file_and_the_command_line_overrides_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        "node: iafis\nlisten: 127.0.0.1:50061\ninsecure: true\nbatching: {max_batch: 16, max_wait_ms: 7}\n"
    )
    assert NodeConfig.load(path).batching.max_batch == 16
    monkeypatch.setenv("FEDPRINT_BATCHING__MAX_BATCH", "64")
    monkeypatch.setenv("FEDPRINT_LISTEN", "0.0.0.0:50061")
    config = NodeConfig.load(path)
    assert config.batching.max_batch == 64  # environment over file
    assert config.batching.max_wait_ms == 7  # the file's other nested value survives (deep merge)
    assert config.listen == "0.0.0.0:50061"
    assert NodeConfig.load(path, listen="127.0.0.1:0").listen == "127.0.0.1:0"  # command line over all


def test_coordinator_deadline_from_the_environment_beats_the_example_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert CoordinatorConfig.load(CONFIG / "coordinator.yaml").node_deadline_s == 20
    monkeypatch.setenv("FEDPRINT_NODE_DEADLINE_S", "5")
    assert CoordinatorConfig.load(CONFIG / "coordinator.yaml").node_deadline_s == 5


def test_a_missing_config_file_is_an_error_not_silence(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        IceConfig.load(tmp_path / "nope.yaml")


def test_a_config_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ice.yaml"
    path.write_text("- listen\n")
    with pytest.raises(ValueError, match="mapping"):
        IceConfig.load(path)


def test_the_database_url_is_a_secret_refused_in_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ice.yaml"
    path.write_text("insecure: true\ndatabase_url: postgresql://ice:hunter2@db/ice\n")
    with pytest.raises(SecretInConfigFile, match="FEDPRINT_DATABASE_URL") as refused:
        IceConfig.load(path)
    assert "hunter2" not in str(refused.value)
    # From the environment it is taken, and kept out of the settings' repr.
    path.write_text("listen: 127.0.0.1:0\ninsecure: true\n")
    monkeypatch.setenv("FEDPRINT_DATABASE_URL", "postgresql://ice:hunter2@db/ice")
    config = IceConfig.load(path)
    assert config.resolved_database_url() == "postgresql://ice:hunter2@db/ice"
    assert "hunter2" not in repr(config)


def test_the_database_url_from_a_mounted_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "database-url"
    secret.write_text("postgresql://coordinator:pw@db:5432/fedprint\n")
    path = tmp_path / "ice.yaml"
    path.write_text(f"insecure: true\ndatabase_url_file: {secret}\n")
    assert IceConfig.load(path).resolved_database_url() == "postgresql://coordinator:pw@db:5432/fedprint"
    assert IceConfig.load(None, insecure=True).resolved_database_url() is None  # SQLite by default
    with pytest.raises(ValidationError, match="both set"):
        IceConfig(database_url="sqlite://", database_url_file=secret, insecure=True)


def test_a_node_role_comes_with_its_own_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Router and shard settings (helm/README.md, the router/shard contract): a shard's partition
    count in its file and its index from the environment, as each StatefulSet gives it."""
    path = tmp_path / "shard.yaml"
    path.write_text("node: iafis\ninsecure: true\nrole: shard\nshard: {count: 3}\n")
    with pytest.raises(ValidationError, match="FEDPRINT_SHARD__INDEX"):
        NodeConfig.load(path)
    monkeypatch.setenv("FEDPRINT_SHARD__INDEX", "2")
    shard = NodeConfig.load(path)
    assert (shard.partition.index, shard.partition.count) == (2, 3)
    assert shard.cache_name == "iafis-shard-2-of-3.cylinders"
    monkeypatch.setenv("FEDPRINT_SHARD__INDEX", "3")
    with pytest.raises(ValidationError, match=r"not below shard\.count"):
        NodeConfig.load(path)
    monkeypatch.delenv("FEDPRINT_SHARD__INDEX")

    router = NodeConfig(node="iafis", insecure=True, role="router", shards=["a:1", "b:2"])
    assert router.partition.whole and router.shards == ["a:1", "b:2"]
    with pytest.raises(ValidationError, match="a router needs `shards`"):
        NodeConfig(node="iafis", insecure=True, role="router")
    with pytest.raises(ValidationError, match="set `role`"):
        NodeConfig(node="iafis", insecure=True, shards=["a:1"])
    assert NodeConfig(node="iafis", insecure=True).role == "standalone"
