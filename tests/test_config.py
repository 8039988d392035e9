"""Service configuration: the shipped example files load, bad values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from evaluation.calibration import Thresholds
from federation.config import CoordinatorConfig
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
