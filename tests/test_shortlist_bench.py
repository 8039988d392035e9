"""The shortlist tier (subject codes, faiss index, MCC on each probe's shortlist) and the
matcher benchmark's JSON contract, on a handful of synthetic subjects (CPU, a few seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from bench.matcher import MatcherBenchConfig, run_matcher_bench, synthetic_pairs
from gpu_kernels import MccParams, encode_tenprints, score_tenprints
from gpu_kernels.shortlist import (
    ShortlistIndex,
    enrolment_descriptors,
    score_shortlisted,
    subject_descriptors,
)
from minutiae.template import TenPrintTemplates

PARAMS = MccParams(consolidation="lss")


@pytest.fixture(scope="module")
def encoded() -> tuple:
    gallery, probes = synthetic_pairs(5, seed=3)
    # Three fingers each keep the encoding cheap; one probe lacks a finger.
    gallery = [TenPrintTemplates({f: t.fingers[f] for f in (1, 2, 7)}) for t in gallery]
    probes = [
        TenPrintTemplates({f: t.fingers[f] for f in (1, 2, 7) if (i, f) != (0, 7)})
        for i, t in enumerate(probes)
    ]
    return encode_tenprints(gallery, PARAMS), encode_tenprints(probes, PARAMS)


def test_codes_fit_two_kilobytes_and_vote_the_mate_first(encoded: tuple) -> None:
    gallery, probes = encoded
    index = ShortlistIndex.build(enrolment_descriptors(gallery), gallery.present)
    assert index.bytes_per_subject <= 2048
    scores, rows = index.search(subject_descriptors(probes), probes.present, 2)
    assert rows.shape == scores.shape == (5, 2)
    assert rows[:, 0].tolist() == list(range(5))
    assert (scores[:, 0] >= scores[:, 1]).all()


def test_shortlisted_scores_equal_exhaustive_scores_of_those_rows(encoded: tuple) -> None:
    gallery, probes = encoded
    full = score_tenprints(probes, gallery, PARAMS)
    rows = torch.tensor([[0, 3], [4, 1], [2, 2], [3, 0], [4, 4]])
    short = score_shortlisted(probes, gallery, rows, PARAMS)
    assert torch.allclose(short.fused, torch.gather(full.fused, 1, rows), atol=1e-6)
    idx = rows[..., None].expand(-1, -1, 10)
    assert torch.allclose(short.per_finger, torch.gather(full.per_finger, 1, idx), atol=1e-6)
    assert torch.equal(short.both_present, torch.gather(full.both_present, 1, idx))


def test_matcher_bench_writes_the_design_fields() -> None:
    config = MatcherBenchConfig(
        base_subjects=2,
        gallery_sizes=(2, 4),
        shortlist_only_sizes=(50,),
        batch_sizes=(1, 2),
        batch_gallery=2,
        probe_count=2,
        shortlist_min=3,
        reference_pairs=1,
        unbatched_pairs=2,
        devices=["cpu"],
    )
    result = run_matcher_bench(config)
    for key in (
        "device",
        "gallery_size",
        "probe_count",
        "matches_per_second",
        "reference_matches_per_second",
        "peak_memory_bytes",
        "roofline_flops",
        "float32_roofline_flops",
        "arithmetic",
        "flops_per_match",
        "achieved_flops",
        "roofline_fraction",
        "device_bytes_per_subject",
        "host_bytes_per_subject",
    ):
        assert key in result, key
    assert result["device"] == "cpu" and result["device_bytes_per_subject"] <= 2048
    sweep = result["devices"]["cpu"]["gallery_sweep"]
    assert [r["gallery_size"] for r in sweep] == [2, 4, 50]
    assert sweep[-1]["exhaustive_projected"] and sweep[-1]["shortlist_length"] == 3
    json.dumps(result)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shortlisted_scores_on_cuda_match_cpu(encoded: tuple) -> None:
    gallery, probes = encoded
    rows = torch.tensor([[0, 1]] * 5)
    cpu = score_shortlisted(probes, gallery, rows, PARAMS)
    cuda = score_shortlisted(probes.to("cuda"), gallery, rows, PARAMS)
    assert torch.allclose(cpu.fused, cuda.fused.cpu(), atol=1e-5)


def test_bench_cli_writes_json_and_png(tmp_path, monkeypatch) -> None:
    import bench.matcher as matcher
    import cli.bench

    real = matcher.run_matcher_bench

    def small(config: MatcherBenchConfig, progress=lambda _: None) -> dict:
        config.reference_pairs, config.unbatched_pairs, config.shortlist_min = 1, 2, 3
        return real(config, progress)

    monkeypatch.setattr(matcher, "run_matcher_bench", small)
    out = tmp_path / "m.json"
    args = ["--json", str(out), "--sizes", "2", "--shortlist-sizes", "20", "--batches", "1"]
    result = CliRunner().invoke(
        cli.bench.bench_app, ["matcher", *args, "--probes", "1", "--base", "2", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["gallery_size"] == 2
    assert out.with_suffix(".png").stat().st_size > 0
