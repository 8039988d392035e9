"""The full tier's row layout in host memory: what a buffer is given is what it gives back,
padded to the largest selected finger, in any order, and across a mapped base and the rows
appended after it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gpu_kernels import MccParams, TenPrintCylinders, encode_tenprints, score_tenprints
from gpu_kernels.cylinder_file import CylinderFile, CylinderFileWriter
from gpu_kernels.cylinder_rows import RowsBuffer
from nodes.gallery.gallery import FullTier
from tests.test_cylinder_file import tenprints

PARAMS = MccParams()
CPU = torch.device("cpu")


def same(a: TenPrintCylinders, b: TenPrintCylinders) -> bool:
    """Equal subjects, position by position, over each finger's minutiae (padding aside)."""
    if not torch.equal(a.present, b.present):
        return False
    for fa, fb in zip(a.fingers, b.fingers, strict=True):
        if not torch.equal(fa.counts, fb.counts):
            return False
        m = int(fa.counts.max())
        for x, y in zip(fa.tensors[:-1], fb.tensors[:-1], strict=True):
            if not torch.equal(x[:, :m], y[:, :m]):
                return False
    return True


@pytest.fixture(scope="module")
def encoded() -> TenPrintCylinders:
    return encode_tenprints(tenprints(3, 9, missing=2), PARAMS, "cpu")


def test_a_buffer_gives_back_what_it_was_given_in_any_order(encoded: TenPrintCylinders) -> None:
    buffer = RowsBuffer(PARAMS)
    for lo in range(0, 9, 4):
        buffer.append(encoded.select(torch.arange(lo, min(lo + 4, 9))))
    rows = buffer.view()
    assert len(rows) == 9
    order = np.array([8, 0, 3, 3, 5])
    picked = rows.select(order, CPU)
    assert same(picked, encoded.select(torch.from_numpy(order)))
    # Padded to the largest finger picked, not to the largest in the buffer.
    assert picked.fingers[0].max_minutiae == int(encoded.fingers[0].counts[order].max())
    assert (rows.counts(order) == np.stack([f.counts[order].numpy() for f in encoded.fingers], -1)).all()
    # Scores of gathered subjects are the scores of the subjects as encoded.
    probe = encoded.select(slice(0, 1))
    assert torch.equal(
        score_tenprints(probe, picked, PARAMS).fused,
        score_tenprints(probe, encoded.select(torch.from_numpy(order)), PARAMS).fused,
    )


def test_a_view_does_not_change_when_the_buffer_grows(encoded: TenPrintCylinders) -> None:
    buffer = RowsBuffer(PARAMS)
    buffer.append(encoded.select(slice(0, 2)))
    early = buffer.view()
    before = early.select(np.arange(2), CPU)
    for lo in range(2, 9):
        buffer.append(encoded.select(slice(lo, lo + 1)))
    assert len(early) == 2 and same(early.select(np.arange(2), CPU), before)
    assert buffer.reserved_bytes >= buffer.view().nbytes


def test_a_tier_of_a_mapped_base_and_appended_rows_reads_as_one(
    encoded: TenPrintCylinders, tmp_path: Path
) -> None:
    with CylinderFileWriter(tmp_path / "base", PARAMS) as writer:
        writer.append(encoded.select(slice(0, 5)))
    tail = RowsBuffer(PARAMS)
    tail.append(encoded.select(slice(5, 9)))
    tier = FullTier([CylinderFile(tmp_path / "base").rows, tail.view()])
    assert len(tier) == 9
    order = np.array([7, 1, 5, 4, 0, 8])
    assert same(tier.select(order, CPU, PARAMS), encoded.select(torch.from_numpy(order)))
    assert torch.equal(tier.present(), encoded.present)
    whole = TenPrintCylinders.cat(list(tier.chunks(4, CPU, PARAMS)))
    assert same(whole, encoded)
    with pytest.raises(IndexError):
        tier.select(np.array([9]), CPU, PARAMS)


def test_float_cylinders_are_refused() -> None:
    with pytest.raises(ValueError, match="bit-packed"):
        RowsBuffer(MccParams(binary=False))
