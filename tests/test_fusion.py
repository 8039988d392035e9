"""Ten-print cylinders and fusion: missing fingers, the fusion rule, batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gpu_kernels import (
    FusionParams,
    MccParams,
    TenPrintCylinders,
    encode_fingers,
    encode_tenprints,
    fuse_scores,
    score_fingers,
    score_tenprints,
)
from minutiae.template import FingerTemplate, TenPrintTemplates

# Floating-point kernels: CI runs these again with AVX2 and with no vector extensions.
pytestmark = pytest.mark.kernels

PARAMS = MccParams(consolidation="lss")


def finger(rng: np.random.Generator, position: int, n: int = 18) -> FingerTemplate:
    xy = rng.uniform(90, 310, (n, 2))
    theta = rng.uniform(0, 2 * math.pi, n)
    return FingerTemplate.from_arrays(np.c_[xy, theta], width=400, height=400, finger_position=position)


def tenprint(rng: np.random.Generator, positions: range | list[int] = range(1, 11)) -> TenPrintTemplates:
    return TenPrintTemplates({f: finger(rng, f, int(rng.integers(10, 22))) for f in positions})


def shifted(tp: TenPrintTemplates, dx: float = 12.0) -> TenPrintTemplates:
    """Another impression of the same hand: every finger translated by dx pixels."""
    moved = {}
    for f, t in tp.fingers.items():
        m = t.minutiae.copy()
        m[:, 0] += dx
        moved[f] = FingerTemplate.from_arrays(m, width=400, height=400, finger_position=f)
    return TenPrintTemplates(moved)


def test_present_marks_captured_usable_fingers() -> None:
    rng = np.random.default_rng(0)
    one_minutia = FingerTemplate.from_arrays([[200, 200, 1.0]], width=400, height=400, finger_position=3)
    partial = TenPrintTemplates({1: finger(rng, 1), 2: finger(rng, 2), 3: one_minutia})
    cyl = encode_tenprints([tenprint(rng), partial, TenPrintTemplates()], PARAMS)
    assert len(cyl) == 3
    assert cyl.present[0].all()
    # Position 3 was captured but yields no valid cylinder: it counts as missing.
    assert cyl.present[1].tolist() == [True, True] + [False] * 8
    assert not cyl.present[2].any()


def test_per_finger_scores_are_same_position_lss_and_masked() -> None:
    rng = np.random.default_rng(1)
    probes = [tenprint(rng), tenprint(rng, [1, 2, 5])]
    gallery = [tenprint(rng, [2, 5, 6, 7]), shifted(probes[0]), tenprint(rng)]
    scores = score_tenprints(encode_tenprints(probes, PARAMS), encode_tenprints(gallery, PARAMS), PARAMS)
    assert scores.per_finger.shape == (2, 3, 10) and scores.fused.shape == (2, 3)
    for f in range(1, 11):
        a = encode_fingers([tp.fingers.get(f) for tp in probes], PARAMS)
        b = encode_fingers([tp.fingers.get(f) for tp in gallery], PARAMS)
        want = score_fingers(a, b, PARAMS) * scores.both_present[:, :, f - 1]
        torch.testing.assert_close(scores.per_finger[:, :, f - 1], want)
    assert scores.both_present[1, 0].tolist() == [f in (2, 5) for f in range(1, 11)]
    assert not scores.per_finger[~scores.both_present].any()
    # The genuine pair wins by a distance.
    assert scores.fused[0].argmax() == 1 and scores.fused[0, 1] > 0.75


def test_fusion_rule_by_hand() -> None:
    fusion = FusionParams(prior=0.05, strength=2.0)
    per_finger = torch.tensor([[0.9, 0.5, 0.0] + [0.0] * 7, [0.3] * 10])
    both = torch.tensor([[True, True, False] + [False] * 7, [True] * 10])
    fused = fuse_scores(per_finger, both, fusion)
    assert fused[0] == pytest.approx((0.9 + 0.5 + 0.1) / 4)
    assert fused[1] == pytest.approx((3.0 + 0.1) / 12)


def test_no_common_finger_fuses_to_zero() -> None:
    rng = np.random.default_rng(2)
    left = encode_tenprints([tenprint(rng, [1, 2, 3])], PARAMS)
    right = encode_tenprints([tenprint(rng, [6, 7, 8])], PARAMS)
    scores = score_tenprints(left, right, PARAMS)
    assert not scores.both_present.any()
    assert scores.fused.item() == 0.0


def test_one_finger_cannot_reach_a_ten_finger_score() -> None:
    both = torch.ones(10, dtype=torch.bool)
    one = torch.zeros(10, dtype=torch.bool)
    one[0] = True
    perfect = torch.ones(10)
    assert fuse_scores(perfect, one) < 0.5 < fuse_scores(torch.full((10,), 0.6), both)
    assert fuse_scores(perfect, one) < fuse_scores(perfect, both) <= 1.0


def test_fused_scores_are_in_unit_interval_and_monotone() -> None:
    gen = torch.Generator().manual_seed(3)
    per_finger = torch.rand((50, 10), generator=gen)
    both = torch.rand((50, 10), generator=gen) > 0.4
    fused = fuse_scores(per_finger, both)
    assert ((fused >= 0) & (fused <= 1)).all()
    higher = fuse_scores(per_finger + 0.1 * both, both)
    assert (higher[both.any(-1)] > fused[both.any(-1)]).all()
    # The plain mean is the limit of no shrinkage.
    n = both.sum(-1)
    mean = torch.where(both, per_finger, 0).sum(-1) / n.clamp(min=1)
    torch.testing.assert_close(fuse_scores(per_finger, both, FusionParams(strength=0.0)), mean * (n > 0))


def test_batched_tenprint_scores_equal_each_pair_alone() -> None:
    rng = np.random.default_rng(4)
    probes = [tenprint(rng), tenprint(rng, [1, 4, 9])]
    gallery = [tenprint(rng, [1, 2, 3, 4]), shifted(probes[1]), tenprint(rng)]
    gal = encode_tenprints(gallery, PARAMS)
    batched = score_tenprints(encode_tenprints(probes, PARAMS), gal, PARAMS)
    for i, p in enumerate(probes):
        for j, g in enumerate(gallery):
            alone = score_tenprints(encode_tenprints([p], PARAMS), encode_tenprints([g], PARAMS), PARAMS)
            torch.testing.assert_close(batched.per_finger[i, j], alone.per_finger[0, 0], atol=1e-6, rtol=0)
            torch.testing.assert_close(batched.fused[i, j], alone.fused[0, 0], atol=1e-6, rtol=0)


def test_tenprint_cylinders_select_cat_to_len_nbytes() -> None:
    rng = np.random.default_rng(5)
    a = encode_tenprints([tenprint(rng), tenprint(rng, [2, 3])], PARAMS)
    b = encode_tenprints([tenprint(rng, [1])], PARAMS)
    both = TenPrintCylinders.cat([a, b])
    assert len(both) == 3 and both.present.shape == (3, 10)
    assert both.present[2].tolist() == [True] + [False] * 9
    assert len(both.select(torch.tensor([2, 0]))) == 2
    torch.testing.assert_close(both.select(torch.tensor([1])).present, a.present[1:2])
    assert len(both.select(slice(0, 2))) == 2
    assert both.to("cpu").device == torch.device("cpu")
    assert both.nbytes == sum(f.nbytes for f in both.fingers) + both.present.numel()
    probe = encode_tenprints([tenprint(rng)], PARAMS)
    whole = score_tenprints(probe, both, PARAMS).fused
    parts = torch.cat([score_tenprints(probe, a, PARAMS).fused, score_tenprints(probe, b, PARAMS).fused], 1)
    torch.testing.assert_close(whole, parts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tenprint_scores_on_cuda_match_cpu() -> None:
    rng = np.random.default_rng(6)
    probes = [tenprint(rng)]
    gallery = [tenprint(rng), shifted(probes[0]), tenprint(rng, [1, 2])]
    cpu = score_tenprints(encode_tenprints(probes, PARAMS), encode_tenprints(gallery, PARAMS), PARAMS)
    cuda = score_tenprints(
        encode_tenprints(probes, PARAMS, "cuda"), encode_tenprints(gallery, PARAMS, "cuda"), PARAMS
    )
    torch.testing.assert_close(cuda.fused.cpu(), cpu.fused, atol=1e-5, rtol=0)
    assert torch.equal(cuda.both_present.cpu(), cpu.both_present)


def test_empty_sets_give_empty_score_matrices() -> None:
    rng = np.random.default_rng(7)
    one = encode_tenprints([tenprint(rng)], PARAMS)
    none = encode_tenprints([], PARAMS)
    assert len(none) == 0 and none.present.shape == (0, 10)
    assert score_tenprints(one, none, PARAMS).fused.shape == (1, 0)
    assert score_tenprints(none, one, PARAMS).per_finger.shape == (0, 1, 10)
