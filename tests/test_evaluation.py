"""The accuracy harness: metrics on hand-checked cases, the data-set reader, eval and calibration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from calibration.thresholds import Thresholds, calibrated_thresholds, write_thresholds
from cli.app import app
from evaluation import metrics
from evaluation.calibrate import calibrate
from evaluation.run import EvalOptions, evaluate, summary
from minutiae.dataset import DatasetError, read_dataset
from minutiae.xyt import write_xyt
from nodes.gallery.config import NodeConfig
from synthetic.evaluation_set import write_evaluation_set
from synthetic.fingers import DIFFICULTIES, impression, master_finger, master_with_flow

GENUINE = [0.6, 0.7, 0.8, 0.9]
IMPOSTOR = [0.1, 0.2, 0.3, 0.65]


def test_eer_by_hand() -> None:
    # The 0.65 impostor outscores the 0.6 genuine, so some error of 1/4 is unavoidable: accepting
    # at >= 0.6 lets that impostor in (FMR 1/4, FNMR 0), at >= 0.65 also rejects 0.6 (1/4, 1/4);
    # 0.6 is the lowest threshold reaching the EER of 1/4, and the one reported.
    point = metrics.equal_error_rate(GENUINE, IMPOSTOR)
    assert (point.false_accept, point.false_reject, point.threshold) == (0.25, 0.0, 0.6)
    assert metrics.equal_error_rate([0.9], [0.1]).false_reject == 0.0


def test_fnmr_at_fmr_by_hand() -> None:
    # One false match allowed out of four: the threshold sits just above the 2nd-highest impostor.
    point = metrics.fnmr_at_fmr(GENUINE, IMPOSTOR, 0.25)
    assert point is not None
    assert point.threshold == pytest.approx(0.3) and point.threshold > 0.3
    assert (point.false_accept, point.false_reject) == (0.25, 0.0)
    # 1e-2 of four impostors cannot be resolved.
    assert metrics.fnmr_at_fmr(GENUINE, IMPOSTOR, 1e-2) is None


def test_error_rates_are_monotone() -> None:
    thresholds, fmr, fnmr = metrics.error_rates(GENUINE, IMPOSTOR)
    assert (np.diff(thresholds) > 0).all() and (np.diff(fmr) <= 0).all() and (np.diff(fnmr) >= 0).all()
    assert (fmr[0], fnmr[0], fmr[-1], fnmr[-1]) == (1.0, 0.0, 0.0, 1.0)


def test_identification_metrics_by_hand() -> None:
    outcomes = metrics.SearchOutcomes(
        mate_scores=np.array([0.9, 0.5, 0.3]),
        best_nonmate_scores=np.array([0.2, 0.6, 0.1]),
        nonmated_top_scores=np.array([0.1, 0.2, 0.3, 0.4]),
    )
    assert metrics.rank_one_rate(outcomes).value == pytest.approx(2 / 3)  # the 0.5 mate is outranked
    assert metrics.fnir_at_threshold(outcomes, 0.35) == pytest.approx(2 / 3)  # outranked, and 0.3 < 0.35
    point = metrics.fnir_at_fpir(outcomes, 0.25)
    assert point is not None and point.false_accept == 0.25 and point.false_reject == pytest.approx(2 / 3)
    tied = metrics.SearchOutcomes(np.array([0.5]), np.array([0.5]), np.array([0.1]))
    assert metrics.rank_one_rate(tied).value == 0.0  # a tie is not a rank-1 hit


def test_wilson_interval_by_hand() -> None:
    iv = metrics.wilson_interval(0, 10)
    assert iv.low == 0.0 and iv.high == pytest.approx(0.2775, abs=1e-4)
    half = metrics.wilson_interval(50, 100)
    assert half.low == pytest.approx(0.4038, abs=1e-4) and half.high == pytest.approx(0.5962, abs=1e-4)


def test_calibration_and_config_round_trip(tmp_path: Path) -> None:
    nonmated = np.linspace(0.0, 0.3, 2000)
    outcomes = metrics.SearchOutcomes(np.full(5, 0.6), np.full(5, 0.2), nonmated)
    t = calibrate(outcomes, source="test")
    assert t.hit == pytest.approx(nonmated[-3], abs=1e-5)  # two of 2000 allowed above: the 3rd highest
    assert t.review <= t.hit
    config = tmp_path / "iafis.yaml"
    original = Path(__file__).parents[1] / "config" / "iafis.yaml"
    config.write_text(original.read_text() + "# trailing comment\n")
    write_thresholds(config, t)
    loaded = NodeConfig.load(config)
    assert loaded.thresholds.hit == t.hit and loaded.node == "iafis"
    assert loaded.thresholds.fpir_curve and "trailing comment" in config.read_text()
    assert calibrated_thresholds(config) == loaded.thresholds


def test_generator_is_deterministic_and_workers_do_not_matter(tmp_path: Path) -> None:
    a = master_with_flow(np.random.default_rng(9), 2)
    b = master_with_flow(np.random.default_rng(9), 2)
    assert a.flow == b.flow and np.array_equal(a.template.minutiae, b.template.minutiae)
    write_evaluation_set(tmp_path / "one", seed=4, subjects=3, workers=1)
    # Chunks of one person, so two processes really share the work.
    write_evaluation_set(tmp_path / "two", seed=4, subjects=3, workers=2, chunk=1)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 61  # 3 subjects x 10 fingers x (gallery, probe) + manifest
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()


def test_worker_and_chunk_counts_do_not_change_any_byte(tmp_path: Path) -> None:
    runs = {"serial": (1, 250), "pool": (2, 2), "pool_odd_chunks": (2, 3)}
    for name, (workers, chunk) in runs.items():
        seen: list[int] = []
        count = write_evaluation_set(
            tmp_path / name,
            seed=11,
            subjects=7,
            difficulty="hard",
            unenrolled_share=0.3,
            plain_probes=False,
            workers=workers,
            chunk=chunk,
            on_progress=lambda done, total, seen=seen: seen.append(done),
        )
        assert count == 7 * 10 + 5 * 10  # two of seven persons have a probe but no gallery capture
        # Progress counts persons in order, one call per chunk, up to the total.
        assert seen == sorted(set(seen)) and seen[-1] == 7 and len(seen) == -(-7 // chunk)
    serial = files_under(tmp_path / "serial")
    assert len(serial) == 121 and serial["manifest.csv"].count(b"\n") == 121
    for name in ("pool", "pool_odd_chunks"):
        assert files_under(tmp_path / name) == serial


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_plain_impressions_keep_fewer_minutiae_than_rolled() -> None:
    rng = np.random.default_rng(1)
    d = DIFFICULTIES["realistic"]
    masters = [master_finger(rng, 1 + i % 10) for i in range(40)]
    rolled = np.mean([impression(rng, m, difficulty=d).count for m in masters])
    plain = np.mean([impression(rng, m, difficulty=d, plain=True).count for m in masters])
    assert 20 <= plain < rolled <= 80


def _xyt_dataset(root: Path) -> None:
    """A hand-written manifest over .xyt files, as someone outside the project would lay it out."""
    rng = np.random.default_rng(2)
    lines = ["path,subject_id,finger_position,impression,role"]
    for s in range(4):
        for position in (1, 2):
            m = master_finger(rng, position)
            for impression_no, role in ((1, "gallery"), (2, "probe")):
                name = f"s{s}_f{position}_{impression_no}.xyt"
                (root / name).write_text(write_xyt(impression(rng, m, quality=0.9)))
                lines.append(f"{name},subject{s},{position},{impression_no},{role}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")


def test_eval_runs_on_hand_written_xyt_manifest(tmp_path: Path) -> None:
    _xyt_dataset(tmp_path)
    ds = read_dataset(tmp_path)
    assert len(ds.gallery) == 4 and len(ds.probes) == 4 and ds.templates == 16
    out = tmp_path / "reports" / "report.json"  # a folder the run creates
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--json", str(out), "--impostor-pairs", "24"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    for key in (
        "eer",
        "fnmr_at_fmr",
        "fnir_at_fpir",
        "rank1",
        "genuine_pairs",
        "impostor_pairs",
        "histograms",
    ):
        assert key in report
    assert report["genuine_pairs"] == 8 and report["impostor_pairs"] == 24
    assert set(report["fnmr_at_fmr"]) == {"0.01", "0.001", "0.0001"}
    assert report["rank1"] == 1.0 and math.isfinite(report["eer"])
    assert (out.parent / report["det_plot"]).stat().st_size > 1000


def test_a_shortlisted_search_finds_the_mates_an_exhaustive_one_finds(tmp_path: Path) -> None:
    write_evaluation_set(tmp_path, seed=6, subjects=12, difficulty="easy", workers=1)
    dataset = read_dataset(tmp_path)
    exhaustive = evaluate(dataset, EvalOptions(impostor_pairs=50))
    shortlisted = evaluate(dataset, EvalOptions(impostor_pairs=50, shortlist=4))
    full, short = summary(exhaustive), summary(shortlisted)
    assert full["search_tiers"] == "exhaustive" and full["shortlist_mate_recall"] is None
    assert short["search_tiers"] == "shortlist of 4 + full MCC"
    assert short["shortlist_mate_recall"] == 1.0 and short["rank1"] == full["rank1"] == 1.0
    # Kept mates get the very score exhaustive search gives them.
    assert np.allclose(shortlisted.outcomes.mate_scores, exhaustive.outcomes.mate_scores, atol=1e-6)


def test_match_scores_two_files_of_either_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    m = master_finger(rng, 3)
    (tmp_path / "a.xyt").write_text(write_xyt(impression(rng, m)))
    write_evaluation_set(tmp_path / "set", seed=1, subjects=1, workers=1)
    iso = next((tmp_path / "set").rglob("*_03_g.fmr"))
    result = CliRunner().invoke(app, ["match", str(tmp_path / "a.xyt"), str(iso), "--json"])
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads(result.output)["score"] <= 1.0


def test_malformed_manifest_names_the_line(tmp_path: Path) -> None:
    _xyt_dataset(tmp_path)
    text = (tmp_path / "manifest.csv").read_text().replace(",probe", ",suspect", 1)
    (tmp_path / "manifest.csv").write_text(text)
    with pytest.raises(DatasetError, match="line 3: role 'suspect'"):
        read_dataset(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,subject_id\n")
    with pytest.raises(DatasetError, match="missing columns"):
        read_dataset(tmp_path)


def test_eval_reports_accuracy_at_the_thresholds_a_node_would_use(tmp_path: Path) -> None:
    # Beside the figures at the data set's own quantiles: FNIR and the measured FPIR at the
    # calibration's thresholds for this gallery size and each candidate's fingers compared.
    write_evaluation_set(tmp_path, seed=6, subjects=12, difficulty="easy", workers=1)
    dataset = read_dataset(tmp_path)
    shipped = calibrated_thresholds()
    report = summary(evaluate(dataset, EvalOptions(impostor_pairs=50, operating=shipped)))
    op = report["operating_point"]
    assert op["gallery_size"] == len(dataset.gallery) and op["calibration_digest"].startswith("sha256:")
    assert op["thresholds_10_fingers"]["hit"] == pytest.approx(shipped.for_gallery(len(dataset.gallery)).hit)
    for band, stated in (("hit", shipped.hit_fpir), ("review", shipped.review_fpir)):
        figures = op[band]
        assert figures["stated_fpir"] == stated and figures["mated_searches"] == report["mated_searches"]
        assert 0.0 <= figures["fnir"] <= 1.0 and 0.0 <= figures["fpir"] <= 1.0
    # Easy ten-prints of a dozen subjects: every mate is a hit, no stranger is one.
    assert (op["hit"]["fnir"], op["hit"]["fpir"]) == (0.0, 0.0)
    # An impossible calibration misses every mate at its hit threshold, and says so.
    strict = Thresholds(hit=1e9, review=1e9, source="nobody is a hit")
    unreachable = summary(evaluate(dataset, EvalOptions(impostor_pairs=50, operating=strict)))
    assert unreachable["operating_point"]["hit"]["fnir"] == 1.0
