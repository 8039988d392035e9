"""The memory-mapped full tier: what is written is what a search reads back, and damaged files
are refused with a message that says what is wrong."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from gpu_kernels import MccParams, TenPrintCylinders, encode_tenprints, score_tenprints
from gpu_kernels.cylinder_file import CylinderFile, CylinderFileError, CylinderFileWriter
from minutiae.template import TenPrintTemplates
from synthetic.fingers import impression, master_finger

# Floating-point kernels: CI runs these again with AVX2 and with no vector extensions.
pytestmark = pytest.mark.kernels

PARAMS = MccParams()


def tenprints(seed: int, subjects: int, missing: int = 0) -> list[TenPrintTemplates]:
    """Synthetic ten-prints; the first ``missing`` subjects lack their left little finger."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(subjects):
        fingers = {
            f: impression(rng, master_finger(rng, f)) for f in range(1, 11) if not (s < missing and f == 10)
        }
        out.append(TenPrintTemplates(fingers))
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TenPrintCylinders]:
    directory = tmp_path_factory.mktemp("cylinders")
    chunks = [encode_tenprints(tenprints(seed, 4, missing=1), PARAMS, "cpu") for seed in (1, 2)]
    with CylinderFileWriter(directory, PARAMS) as writer:
        for chunk in chunks:
            writer.append(chunk)
    return directory, TenPrintCylinders.cat(chunks)


def test_selected_subjects_score_exactly_as_the_encoded_ones(written: tuple[Path, TenPrintCylinders]) -> None:
    directory, encoded = written
    gallery = CylinderFile(directory)
    assert len(gallery) == 8 and gallery.params == PARAMS
    rows = torch.tensor([5, 0, 4, 5, 3, 7])
    loaded = gallery.select(rows)
    assert torch.equal(loaded.present, encoded.present[rows])
    assert not bool(loaded.present[1, 9]) and not bool(loaded.present[2, 9])  # subject 0 and 4's finger 10
    probes = encode_tenprints(tenprints(1, 2), PARAMS, "cpu")
    expected = score_tenprints(probes, encoded.select(rows), PARAMS)
    actual = score_tenprints(probes, loaded, PARAMS)
    assert torch.equal(actual.per_finger, expected.per_finger)
    assert torch.equal(actual.fused, expected.fused)
    # The file stores minutiae only, no padding: fewer bytes than the padded tensors.
    assert gallery.nbytes < encoded.nbytes


def test_the_file_serves_other_matching_settings_but_not_other_cylinders(
    written: tuple[Path, TenPrintCylinders],
) -> None:
    gallery = CylinderFile(written[0])
    relaxed = dataclasses.replace(PARAMS, consolidation="lss_r")
    assert gallery.select(torch.tensor([0]), params=relaxed).params == relaxed
    with pytest.raises(CylinderFileError, match="other cylinder parameters"):
        gallery.select(torch.tensor([0]), params=dataclasses.replace(PARAMS, radius=60.0))


def test_an_interrupted_write_is_not_a_gallery(tmp_path: Path) -> None:
    chunk = encode_tenprints(tenprints(3, 2), PARAMS, "cpu")
    with pytest.raises(RuntimeError), CylinderFileWriter(tmp_path, PARAMS) as writer:
        writer.append(chunk)
        raise RuntimeError("encoder crashed")
    with pytest.raises(CylinderFileError, match=r"no meta\.json"):
        CylinderFile(tmp_path)


def test_a_truncated_file_is_refused_by_name(written: tuple[Path, TenPrintCylinders], tmp_path: Path) -> None:
    directory, _ = written
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in directory.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    damaged = copy / "f03.values.bin"
    damaged.write_bytes(damaged.read_bytes()[:-7])
    with pytest.raises(CylinderFileError, match=r"f03\.values\.bin: .* bytes, expected"):
        CylinderFile(copy)


def test_rows_outside_the_gallery_are_an_error(written: tuple[Path, TenPrintCylinders]) -> None:
    with pytest.raises(IndexError):
        CylinderFile(written[0]).select(torch.tensor([8]))
