"""``fedprint bench extraction`` on a tiny run: the JSON fields and the PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app

FIELDS = {
    "fingers": int,
    "images": int,
    "extractor": str,
    "extractor_version": str,
    "tolerance_px": float,
    "tolerance_deg": float,
    "true_minutiae": int,
    "extracted_minutiae": int,
    "paired": int,
    "missed": int,
    "spurious": int,
    "paired_rate": float,
    "missed_rate": float,
    "spurious_rate": float,
    "seconds_per_finger": float,
    "seconds_per_tenprint": float,
    "eer_extracted": float,
    "eer_true": float,
    "genuine_pairs": int,
    "impostor_pairs": int,
}


@pytest.mark.slow
def test_the_bench_writes_its_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench" / "extraction.json"
    result = CliRunner().invoke(
        app, ["bench", "extraction", "--json", str(out), "--fingers", "3", "--seed", "2"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for name, kind in FIELDS.items():
        assert isinstance(data[name], kind), name
    assert data["fingers"] == 3 and data["images"] == 6
    assert data["genuine_pairs"] == 3 and data["impostor_pairs"] == 6
    assert data["paired"] + data["missed"] == data["true_minutiae"]
    assert data["paired"] + data["spurious"] == data["extracted_minutiae"]
    assert abs(data["paired_rate"] + data["missed_rate"] - 1.0) < 1e-9
    assert data["seconds_per_tenprint"] == pytest.approx(10 * data["seconds_per_finger"])
    assert 0.0 <= data["eer_extracted"] <= 1.0 and 0.0 <= data["eer_true"] <= 1.0
    assert (out.with_suffix(".png")).stat().st_size > 1000
    assert "paired" in result.output


def test_the_bench_refuses_a_missing_device(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(
        app, ["bench", "extraction", "--json", str(tmp_path / "x.json"), "--device", "cuda"]
    )
    assert result.exit_code != 0
    assert not (tmp_path / "x.json").exists()
