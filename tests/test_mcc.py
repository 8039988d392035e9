"""MCC cylinders and LSS scores: the batched kernels against the literal reference, and the
properties a matcher must have (rotation invariance in the image convention, symmetry, batching).

Tolerances: cylinder bits, cell validity and cylinder validity must be identical to the
reference (float32 vs float64 could only flip a cell whose sum lies within ~1e-9 of mu_psi;
none does in these seeds); float-variant cell values within 1e-5; local similarities and LSS
scores within 1e-5 (binary, counts are exact) and 1e-4 (float, where ||a-b||² is obtained as
||a||² + ||b||² - 2a·b in float32).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_kernels import (
    CylinderSet,
    MccParams,
    encode_fingers,
    local_similarities,
    lss_pair_count,
    lss_scores,
    score_fingers,
)
from gpu_kernels.cylinders import disk_mask, pack_bits, unpack_bits
from gpu_kernels.reference import (
    reference_cylinders,
    reference_local_matrix,
    reference_lss_from_cylinders,
    reference_lss_pair_count,
    reference_score,
)
from gpu_kernels.similarity import score_flops
from minutiae.template import FingerTemplate

# Floating-point kernels: CI runs these again with AVX2 and with no vector extensions.
pytestmark = pytest.mark.kernels

BINARY = MccParams(consolidation="lss")
FLOAT = MccParams(binary=False, consolidation="lss")
SIZE = 400


def random_template(rng: np.random.Generator, n: int, side: float = 220.0) -> FingerTemplate:
    """n minutiae uniform in a side x side square of a 400 x 400 image, random directions."""
    xy = rng.uniform(90, 90 + side, (n, 2))
    theta = rng.uniform(0, 2 * math.pi, n)
    return FingerTemplate.from_arrays(np.c_[xy, theta], width=SIZE, height=SIZE)


def rotated(t: FingerTemplate, angle: float, shift: tuple[float, float] = (0.0, 0.0)) -> FingerTemplate:
    """The template of the same finger rotated by ``angle`` counter-clockwise *as the image is
    viewed*, about its centroid, then shifted; written in image coordinates (y down), e.g. a
    point above the centre (dy < 0) moves to its left (dx < 0) when angle = +90°."""
    m = t.minutiae.astype(np.float64)
    centre = m[:, :2].mean(0)
    dx, dy = m[:, 0] - centre[0], m[:, 1] - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    x = centre[0] + c * dx + s * dy + shift[0]
    y = centre[1] - s * dx + c * dy + shift[1]
    return FingerTemplate.from_arrays(np.c_[x, y, m[:, 2] + angle], width=SIZE, height=SIZE)


def mirrored(t: FingerTemplate) -> FingerTemplate:
    """Left-right mirror image: x -> W - x, and a direction θ becomes π - θ."""
    m = t.minutiae.astype(np.float64)
    return FingerTemplate.from_arrays(
        np.c_[SIZE - m[:, 0], m[:, 1], math.pi - m[:, 2]], width=SIZE, height=SIZE
    )


def score(a: FingerTemplate | None, b: FingerTemplate | None, params: MccParams = BINARY) -> float:
    return float(score_fingers(encode_fingers([a], params), encode_fingers([b], params), params)[0, 0])


# --------------------------------------------------------------------------- basics


def test_params_are_the_papers_and_frozen() -> None:
    assert BINARY.cells == 1536 and BINARY.spatial_cells == 256 and BINARY.binary
    assert BINARY.delta_s == pytest.approx(8.75)
    with pytest.raises(AttributeError):
        BINARY.radius = 1.0  # type: ignore[misc]


def test_pack_bits_is_numpy_packbits_and_round_trips() -> None:
    bits = torch.randint(0, 2, (3, 5, 1536), dtype=torch.uint8)
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 192)
    np.testing.assert_array_equal(packed.numpy(), np.packbits(bits.numpy(), axis=-1))
    assert torch.equal(unpack_bits(packed).to(torch.uint8), bits)


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("params", [BINARY, FLOAT], ids=["binary", "float"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cylinders_match_reference(params: MccParams, seed: int) -> None:
    rng = np.random.default_rng(seed)
    templates = [random_template(rng, int(n)) for n in rng.integers(8, 26, 3)]
    fast = encode_fingers(templates, params)
    values = fast.unpacked_values().double().numpy()
    cell_valid = fast.unpacked_cell_valid().bool().numpy()
    for f, t in enumerate(templates):
        ref = reference_cylinders(t, params)
        n = t.count
        np.testing.assert_array_equal(cell_valid[f, :n], ref.cell_valid.reshape(n, -1))
        np.testing.assert_array_equal(fast.valid[f, :n].numpy(), ref.valid)
        assert ref.valid.any(), "the seed should give valid cylinders to compare"
        got = values[f, :n]
        want = ref.values.reshape(n, -1)
        if params.binary:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, atol=1e-5)
        assert not fast.valid[f, n:].any()  # padding


@pytest.mark.parametrize(("params", "tol"), [(BINARY, 1e-5), (FLOAT, 2e-3)], ids=["binary", "float"])
def test_local_similarities_and_scores_match_reference(params: MccParams, tol: float) -> None:
    rng = np.random.default_rng(7)
    probes = [random_template(rng, int(n)) for n in (12, 20)]
    gallery = [random_template(rng, int(n)) for n in (9, 16, 25)]
    # A genuine-like pair too, so high similarities are exercised, not just impostor ones.
    gallery.append(rotated(probes[1], 0.3, (15.0, -10.0)))
    p_cyl, g_cyl = encode_fingers(probes, params), encode_fingers(gallery, params)
    lam = local_similarities(p_cyl, g_cyl, params).double().numpy()
    scores = score_fingers(p_cyl, g_cyl, params).double().numpy()
    ref_p = [reference_cylinders(t, params) for t in probes]
    ref_g = [reference_cylinders(t, params) for t in gallery]
    for i, (tp, rp) in enumerate(zip(probes, ref_p, strict=True)):
        for j, (tg, rg) in enumerate(zip(gallery, ref_g, strict=True)):
            gamma = reference_local_matrix(rp, rg, params)
            np.testing.assert_allclose(lam[i, j, : tp.count, : tg.count], gamma, atol=tol)
            assert scores[i, j] == pytest.approx(reference_lss_from_cylinders(rp, rg, params), abs=tol)
    assert scores[1, 3] > 0.95


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n_a=st.integers(0, 18),
    n_b=st.integers(0, 18),
    side=st.sampled_from([60, 220]),
)
def test_scores_match_reference_on_random_templates(seed: int, n_a: int, n_b: int, side: int) -> None:
    # Includes empty and tiny templates and crowded ones (side 60) with degenerate hulls.
    rng = np.random.default_rng(seed)
    a, b = random_template(rng, n_a, side), random_template(rng, n_b, side)
    assert score(a, b) == pytest.approx(reference_score(a, b, BINARY), abs=1e-5)


# --------------------------------------------------------------------------- validity rules


def test_cells_outside_the_disk_are_never_valid() -> None:
    cyl = encode_fingers([random_template(np.random.default_rng(3), 25)], BINARY)
    outside = ~torch.as_tensor(disk_mask(BINARY))
    assert not cyl.unpacked_cell_valid().bool()[..., outside].any()
    assert int(torch.as_tensor(disk_mask(BINARY)).sum()) < 256


def test_cells_are_valid_only_within_omega_of_the_hull() -> None:
    # Three minutiae within a pixel of (200, 200): the enlarged hull is about a disk of radius
    # omega = 50 around them, smaller than the cylinder's disk of radius R = 70.
    t = FingerTemplate.from_arrays(
        [[200, 200, 0.0], [201, 200, 1.0], [200, 201, 2.0]], width=SIZE, height=SIZE
    )
    cyl = encode_fingers([t], BINARY)
    offsets = (np.arange(16) - 7.5) * BINARY.delta_s
    distance = np.hypot(offsets[:, None], offsets[None, :]).reshape(-1)
    valid_cells = cyl.unpacked_cell_valid().bool()[0, 0].numpy()
    assert valid_cells[distance <= BINARY.omega - 2].all()
    assert not valid_cells[distance > BINARY.omega + 2].any()
    # Those cylinders have ~half their disk valid, below min_vc = 0.75, so none is valid...
    assert not cyl.valid.any()
    # ...unless min_vc allows it (they do have the min_m = 2 neighbours).
    lenient = replace(BINARY, min_vc=0.3)
    assert encode_fingers([t], lenient).valid.all()


def test_cylinders_need_min_m_neighbours_within_r_plus_3_sigma() -> None:
    # Minutiae 0-2 are mutual neighbours; 3 has only minutia 2 within R + 3σs = 98 px; 4 has none.
    t = FingerTemplate.from_arrays(
        [[100, 100, 0], [130, 100, 0], [100, 130, 0], [100, 220, 0], [330, 330, 0]], width=SIZE, height=SIZE
    )
    loose = replace(BINARY, min_vc=0.0)
    assert encode_fingers([t], replace(loose, min_m=2)).valid[0].tolist() == [True, True, True, False, False]
    assert encode_fingers([t], replace(loose, min_m=1)).valid[0].tolist() == [True, True, True, True, False]
    assert encode_fingers([t], replace(loose, min_m=0)).valid[0].all()


def test_absent_empty_and_single_minutia_fingers_score_zero() -> None:
    rng = np.random.default_rng(4)
    one = FingerTemplate.from_arrays([[200, 200, 1.0]], width=SIZE, height=SIZE)
    empty = FingerTemplate.from_arrays(np.zeros((0, 3)), width=SIZE, height=SIZE)
    real = random_template(rng, 20)
    probes = encode_fingers([None, empty, one, real], BINARY)
    assert probes.counts.tolist() == [0, 0, 1, 20]
    scores = score_fingers(probes, encode_fingers([real, None], BINARY), BINARY)
    assert scores[:3].eq(0).all() and scores[:, 1].eq(0).all()
    assert scores[3, 0] == pytest.approx(1.0)


# --------------------------------------------------------------------------- LSS


def test_lss_pair_count_follows_the_sigmoid_rule() -> None:
    n = torch.arange(0, 61)
    got = lss_pair_count(n, torch.full_like(n, 100), BINARY)
    assert got.tolist() == [reference_lss_pair_count(int(k), 100, BINARY) for k in n]
    assert got[0] == 4 and got[20] == 8 and got[60] == 12  # min_np, midpoint, max_np
    assert lss_pair_count(torch.tensor(50), torch.tensor(5), BINARY) == 4  # the smaller side rules


def test_lss_is_the_mean_of_the_top_n_p_local_similarities() -> None:
    lam = torch.zeros(1, 2, 5, 5)
    lam[0, 0].view(-1)[:10] = torch.linspace(1.0, 0.1, 10)
    lam[0, 1, 0, 0] = 0.9  # one lucky pair still divides by n_P = 4
    got = lss_scores(lam, torch.tensor([5]), torch.tensor([5, 5]), BINARY)
    assert got[0, 0] == pytest.approx(float(torch.linspace(1.0, 0.1, 10)[:4].mean()))
    assert got[0, 1] == pytest.approx(0.9 / 4)
    assert lss_scores(lam, torch.tensor([5]), torch.tensor([0, 5]), BINARY)[0, 0] == 0


def test_self_score_is_one_and_scores_are_symmetric() -> None:
    rng = np.random.default_rng(5)
    ts = encode_fingers([random_template(rng, int(n)) for n in (14, 22, 30, 18)], BINARY)
    s = score_fingers(ts, ts, BINARY)
    torch.testing.assert_close(torch.diagonal(s), torch.ones(4))
    torch.testing.assert_close(s, s.T, atol=1e-6, rtol=0)
    assert ((s >= 0) & (s <= 1)).all()


# --------------------------------------------------------------------------- coordinate convention


@pytest.mark.parametrize("degrees", [-80, -60, -30, -10, 0, 10, 30, 45, 60, 80])
def test_rotated_and_translated_finger_still_scores_near_one(degrees: int) -> None:
    t = random_template(np.random.default_rng(6), 35, side=240)
    moved = rotated(t, math.radians(degrees), shift=(-37.0, 52.5))
    assert score(t, moved) > 0.99
    assert score(t, moved, FLOAT) > 0.99


def test_rotation_beyond_delta_theta_is_not_matched() -> None:
    # Cylinders are rotation invariant, but MCC refuses pairs whose directions differ by more
    # than delta_theta = 90°: an upside-down impression scores like a stranger (random templates
    # of this density score about 0.35-0.45 against each other).
    t = random_template(np.random.default_rng(6), 35, side=240)
    assert score(t, rotated(t, math.pi)) < 0.6


def test_mirrored_finger_does_not_score_high() -> None:
    rng = np.random.default_rng(8)
    for _ in range(3):
        t = random_template(rng, 35, side=240)
        impostor = random_template(rng, 35, side=240)
        mirror = score(t, mirrored(t))
        assert mirror < 0.6
        assert mirror < score(t, impostor) + 0.15  # no better than a stranger, give or take


def test_image_convention_matters() -> None:
    # Reading angles clockwise (as if y pointed up in the stored numbers) breaks the match of a
    # rotated copy: the convention is tested, not merely self-consistent.
    t = random_template(np.random.default_rng(9), 35, side=240)
    moved = rotated(t, math.radians(30))
    m = moved.minutiae
    wrong = FingerTemplate.from_arrays(np.c_[m[:, :2], -m[:, 2]], width=SIZE, height=SIZE)
    t_wrong = FingerTemplate.from_arrays(np.c_[t.minutiae[:, :2], -t.minutiae[:, 2]], width=SIZE, height=SIZE)
    assert score(t, moved) > 0.99
    assert score(t_wrong, wrong) < 0.8


# --------------------------------------------------------------------------- batching


def test_batched_scores_equal_each_pair_alone() -> None:
    rng = np.random.default_rng(10)
    probes = [random_template(rng, int(n)) for n in (8, 19, 25)]
    gallery = [random_template(rng, int(n)) for n in (25, 11, 16, 9, 21)] + [rotated(probes[0], 0.2)]
    # Bit counts are exact whatever the matmul's blocking; float sums are not. The float variant
    # takes ||a - b|| as sqrt(||a||² + ||b||² - 2a·b): for the nearly identical cylinders of the
    # rotated self-match that difference cancels, and the square root turns float32's relative
    # rounding of ~1e-7 into ~1e-4 of the score (1.06e-4 on one AMX CPU), hence 3e-4.
    for params, tol in ((BINARY, 1e-6), (FLOAT, 3e-4)):
        batched = score_fingers(encode_fingers(probes, params), encode_fingers(gallery, params), params)
        alone = torch.tensor([[score(a, b, params) for b in gallery] for a in probes])
        torch.testing.assert_close(batched, alone, atol=tol, rtol=0)


def test_flops_count_the_products_scoring_runs_over_valid_cylinders() -> None:
    """A roofline compares these: per pair of valid cylinders, bit-based scoring multiplies over
    the C cells twice (a·b, and ||b|a||² from the probe's mask spread over the cells) and over the
    S spatial cells twice; float-valued scoring once over C and three times over S."""
    rng = np.random.default_rng(12)
    probe_t, gallery_t = random_template(rng, 14), random_template(rng, 18)
    for params, over_c, over_s in ((BINARY, 2, 2), (FLOAT, 1, 3)):
        probe, gallery = encode_fingers([probe_t], params), encode_fingers([gallery_t], params)
        n_a, n_b = int(probe.valid.sum()), int(gallery.valid.sum())
        assert n_a > 0 and n_b > 0
        want = 2 * n_a * n_b * (over_c * params.cells + over_s * params.spatial_cells)
        assert score_flops(probe, gallery, params) == want


def test_chunking_does_not_change_scores() -> None:
    rng = np.random.default_rng(11)
    probes = encode_fingers([random_template(rng, 20) for _ in range(2)], BINARY)
    gallery = encode_fingers([random_template(rng, int(n)) for n in rng.integers(5, 25, 7)], BINARY)
    whole = score_fingers(probes, gallery, BINARY)
    assert torch.equal(score_fingers(probes, gallery, BINARY, chunk_bytes=1), whole)  # one finger a chunk


def test_gpu_chunks_follow_the_free_device_memory() -> None:
    from gpu_kernels.similarity import chunk_bytes_for_free

    mib, gib = 1 << 20, 1 << 30
    assert chunk_bytes_for_free(8 * gib) == 2 * gib  # a quarter of what is free
    assert chunk_bytes_for_free(100 * gib) == 4 * gib  # a large device: capped
    assert chunk_bytes_for_free(100 * mib) == 256 * mib  # a nearly full one: a floor, not a crawl


# --------------------------------------------------------------------------- the cylinder set


def test_cylinder_set_select_cat_to_and_nbytes() -> None:
    rng = np.random.default_rng(12)
    small = encode_fingers([random_template(rng, 10), None], BINARY)
    big = encode_fingers([random_template(rng, 24)], BINARY)
    both = CylinderSet.cat([small, big])
    assert len(both) == 3 and both.max_minutiae == 24
    assert both.values.shape == (3, 24, 192) and both.cell_valid.shape == (3, 24, 32)
    assert both.counts.tolist() == [10, 0, 24]
    assert not both.valid[0, 10:].any() and not both.values[0, 10:].any()
    probe = encode_fingers([random_template(rng, 15)], BINARY)
    # Padding and concatenation do not change scores.
    torch.testing.assert_close(
        score_fingers(probe, both, BINARY),
        torch.cat([score_fingers(probe, small, BINARY), score_fingers(probe, big, BINARY)], 1),
    )
    picked = both.select(torch.tensor([2, 0]))
    assert picked.counts.tolist() == [24, 10]
    assert both.select(torch.tensor([False, True, True])).counts.tolist() == [0, 24]
    assert both.select(slice(1, 3)).counts.tolist() == [0, 24]
    assert both.to("cpu").device == torch.device("cpu")
    tensors = (both.values, both.cell_valid, both.valid, both.theta, both.xy, both.counts)
    assert both.nbytes == sum(t.numel() * t.element_size() for t in tensors)
    with pytest.raises(ValueError, match="different parameters"):
        CylinderSet.cat([small, encode_fingers([None], FLOAT)])


def test_scoring_refuses_mismatched_params() -> None:
    cyl = encode_fingers([random_template(np.random.default_rng(13), 12)], BINARY)
    with pytest.raises(ValueError, match="params"):
        score_fingers(cyl, cyl, FLOAT)


def test_float_variant_stores_float_values() -> None:
    cyl = encode_fingers([random_template(np.random.default_rng(14), 12)], FLOAT)
    assert cyl.values.dtype == torch.float32 and cyl.values.shape == (1, 12, 1536)
    assert float(cyl.values.min()) >= 0 and float(cyl.values.max()) <= 1


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_reference() -> None:
    rng = np.random.default_rng(15)
    probes = [random_template(rng, int(n)) for n in (12, 25)]
    gallery = [random_template(rng, int(n)) for n in (9, 18, 25)] + [rotated(probes[0], 0.4)]
    for params in (BINARY, FLOAT):
        cpu = score_fingers(encode_fingers(probes, params), encode_fingers(gallery, params), params)
        cuda = score_fingers(
            encode_fingers(probes, params, "cuda"), encode_fingers(gallery, params, "cuda"), params
        )
        assert cuda.device.type == "cuda"
        torch.testing.assert_close(cuda.cpu(), cpu, atol=2e-3, rtol=0)
        want = [[reference_score(a, b, params) for b in gallery] for a in probes]
        torch.testing.assert_close(
            cuda.cpu().double(), torch.tensor(want, dtype=torch.float64), atol=2e-3, rtol=0
        )
