"""Thresholds that follow the gallery size: a tail model of impostor subject-pair scores gives
each gallery size the threshold of its target FPIR (calibration.thresholds, evaluation.calibrate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from calibration.tails import CalibrationError, fit_gpd, fit_tail
from calibration.thresholds import (
    CHECKED_GALLERY_SIZES,
    TailModel,
    Thresholds,
    calibrated_thresholds,
    write_thresholds,
)
from cli.app import app
from evaluation import metrics
from evaluation.calibrate import calibrate


def test_probability_weighted_moments_recover_a_known_pareto_tail() -> None:
    rng = np.random.default_rng(0)
    scale, shape = 2.0, 0.15
    u = rng.random(40_000)
    excess = scale / shape * ((1 - u) ** -shape - 1)
    fitted_scale, fitted_shape = fit_gpd(excess)
    assert fitted_scale == pytest.approx(scale, rel=0.05)
    assert fitted_shape == pytest.approx(shape, abs=0.03)


def test_the_predicted_fpir_holds_in_simulated_searches_of_two_sizes_tenfold_apart() -> None:
    rng = np.random.default_rng(1)
    # Impostor pair scores with a heavier-than-normal upper tail, like fused LLRs.
    model = fit_tail(rng.gumbel(-10.0, 1.5, size=200_000))
    for size in (100, 1000):
        t = Thresholds(hit=0, review=0, hit_fpir=1e-2, review_fpir=5e-2, tails=[model] * 10).for_gallery(size)
        searches = rng.gumbel(-10.0, 1.5, size=(4_000, size)).max(axis=1)
        for target, threshold in ((1e-2, t.hit), (5e-2, t.review)):
            measured = metrics.wilson_interval(int((searches >= threshold).sum()), searches.size)
            # Within sampling error of a prediction good to 20 % (a fitted tail is an estimate).
            assert measured.low <= 1.2 * target and 0.8 * target <= measured.high, (size, target, measured)


def test_the_threshold_rises_with_the_gallery_and_each_size_states_its_own() -> None:
    shipped = calibrated_thresholds()
    ten = shipped.tail(10)
    assert ten is not None, "the shipped calibration follows the gallery size"
    small, large = shipped.for_gallery(200), shipped.for_gallery(2_000)
    assert large.hit > small.hit and large.review > small.review
    assert (small.gallery_size, large.gallery_size) == (200, 2_000)
    assert small.hit_fpir == large.hit_fpir == shipped.hit_fpir
    assert ten.fpir(large.hit, 2_000) == pytest.approx(shipped.hit_fpir, rel=1e-6)


def test_fewer_fingers_compared_need_more_evidence() -> None:
    shipped = calibrated_thresholds()
    one, four, ten = (shipped.for_gallery(240, n).hit for n in (1, 4, 10))
    # Ten impostor fingers add up to a far lower sum than one, so one finger must score higher.
    assert one > four > ten


def test_a_tail_calibration_survives_its_config_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    empty = metrics.SearchOutcomes(np.zeros(0), np.zeros(0), np.zeros(0))
    thresholds = calibrate(
        empty, source="test", tails=[fit_tail(rng.normal(size=50_000))] * 10, gallery_size=500
    )
    config = tmp_path / "node.yaml"
    config.write_text("node: ident\n")
    write_thresholds(config, thresholds)
    loaded = calibrated_thresholds(config)
    assert loaded.for_gallery(500).hit == pytest.approx(thresholds.hit)
    assert "node: ident" in config.read_text()


def test_too_few_impostor_pairs_cannot_carry_a_tail() -> None:
    with pytest.raises(CalibrationError, match="too few"):
        fit_tail(np.arange(100.0))


def test_a_bounded_tail_is_fitted_as_an_exponential_one_and_refused_in_a_calibration() -> None:
    # Impostor scores with a hard ceiling: the moments say "bounded", but a sample cannot show
    # that no impostor ever scores past its end, and past the end anything would be a hit.
    rng = np.random.default_rng(3)
    scale, shape = fit_gpd(rng.uniform(0.0, 1.0, 5_000))
    assert shape == 0.0 and scale == pytest.approx(0.5, rel=0.05)
    bounded = fit_tail(rng.normal(size=20_000)).model_dump()
    bounded["shape"] = -0.2
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        TailModel.model_validate(bounded)


def test_the_shipped_calibration_is_monotone_at_every_gallery_size_and_finger_count() -> None:
    shipped = calibrated_thresholds()
    assert shipped.tails and min(t.shape for t in shipped.tails) >= 0.0
    assert shipped.problems() == []
    assert CHECKED_GALLERY_SIZES[0] == 10 and CHECKED_GALLERY_SIZES[-1] == 10**9


@settings(max_examples=300, deadline=None)
@given(
    small=st.integers(10, 10**9),
    factor=st.floats(1.0, 1e4),
    fewer=st.integers(1, 10),
    more=st.integers(1, 10),
)
def test_fewer_fingers_and_larger_galleries_never_need_a_lower_threshold(
    small: int, factor: float, fewer: int, more: int
) -> None:
    shipped = calibrated_thresholds()
    larger = min(10**9, int(small * factor))
    fewer, more = min(fewer, more), max(fewer, more)
    for fpir_of in ("hit", "review"):
        at = {
            (size, fingers): getattr(shipped.for_gallery(size, fingers), fpir_of)
            for size in (small, larger)
            for fingers in (fewer, more)
        }
        assert at[(small, fewer)] >= at[(small, more)] - 1e-9
        assert at[(larger, more)] >= at[(small, more)] - 1e-9
        assert at[(larger, fewer)] >= at[(small, fewer)] - 1e-9
    one_finger = shipped.for_gallery(10**9, 1).hit
    assert one_finger > 9.3  # above the highest one finger's evidence was seen to reach


def test_calibrating_on_the_pairs_the_evidence_model_is_fitted_on_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(tmp_path),
            "--calibrate",
            str(tmp_path / "t.yaml"),
            "--fit-fusion",
            str(tmp_path / "m.json"),
        ],
    )
    assert result.exit_code != 0 and "fit on the same pairs" in result.output
    assert not (tmp_path / "t.yaml").exists()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), spread=st.floats(0.2, 3.0))
def test_any_calibration_calibrate_writes_is_monotone(seed: int, spread: float) -> None:
    # Ten independently fitted tails whose samples may put fewer fingers below more: the
    # thresholds a node derives from them never do, at any gallery size.
    rng = np.random.default_rng(seed)
    tails = [fit_tail(rng.gumbel(-3.0 * n, spread * (1 + rng.random()), size=4_000)) for n in range(1, 11)]
    empty = metrics.SearchOutcomes(np.zeros(0), np.zeros(0), np.zeros(0))
    written = calibrate(empty, source="test", tails=tails, gallery_size=100)
    assert written.problems() == []
