"""Thresholds that follow the gallery size: a tail model of impostor subject-pair scores gives
each gallery size the threshold of its target FPIR (evaluation.calibration, evaluation.calibrate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evaluation import metrics
from evaluation.calibrate import CalibrationError, calibrate, fit_gpd, fit_tail, write_thresholds
from evaluation.calibration import Thresholds, calibrated_thresholds


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
