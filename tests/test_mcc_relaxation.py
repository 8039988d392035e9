"""LSS-R (MCC's relaxation consolidation): the batched kernel against the literal reference,
hand-checked relaxation steps, and the matchability rules the global score depends on.

Tolerances: LSS-R scores within 1e-4 of the float64 reference. The relaxation itself runs in
float32 (errors ~1e-6); pair selections are exact (ranked by integer keys, ties to the lower
index, efficiencies on a 2^-16 grid), so a larger difference would mean a different pair set,
i.e. a bug rather than rounding.
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
    lss_r_scores,
    score_fingers,
    similarity,
)
from gpu_kernels.reference import (
    ReferenceCylinders,
    reference_compatibility,
    reference_lss_r_from_gamma,
    reference_radial_angle,
    reference_score,
)
from gpu_kernels.relaxation import pair_compatibility, relax
from minutiae.template import FingerTemplate
from synthetic.fingers import DIFFICULTIES, impression, master_finger
from tests.test_mcc import SIZE, random_template, rotated

# Floating-point kernels: CI runs these again with AVX2 and with no vector extensions.
pytestmark = pytest.mark.kernels

LSS = MccParams(consolidation="lss")
LSS_R = MccParams(consolidation="lss_r")
LSS_R_FLOAT = MccParams(binary=False, consolidation="lss_r")
TOL = 1e-4


def score(a: FingerTemplate, b: FingerTemplate, params: MccParams = LSS_R) -> float:
    return float(score_fingers(encode_fingers([a], params), encode_fingers([b], params), params)[0, 0])


def geometry_of(t: FingerTemplate, cyl: CylinderSet, row: int) -> ReferenceCylinders:
    """What the reference LSS-R reads of a template: positions, directions and which cylinders
    are valid (validity is checked against the reference encoder in test_mcc.py)."""
    m = t.count
    return ReferenceCylinders(
        values=np.zeros((m, 0, 0, 0)),
        cell_valid=np.zeros((m, 0, 0), bool),
        valid=cyl.valid[row, :m].numpy(),
        theta=t.minutiae[:, 2].astype(np.float64),
        xy=t.minutiae[:, :2].astype(np.float64),
    )


def assert_consolidation_matches_reference(
    probes: list[FingerTemplate], gallery: list[FingerTemplate], params: MccParams, device: str = "cpu"
) -> torch.Tensor:
    """Fast LSS-R scores (on ``device``) against the reference consolidation fed the same Γ;
    returns the scores."""
    p_cyl, g_cyl = encode_fingers(probes, params, device), encode_fingers(gallery, params, device)
    scores = score_fingers(p_cyl, g_cyl, params).cpu()
    lam = local_similarities(p_cyl, g_cyl, params).double().cpu().numpy()
    p_cyl, g_cyl = p_cyl.to("cpu"), g_cyl.to("cpu")
    for i, a in enumerate(probes):
        for j, b in enumerate(gallery):
            gamma = lam[i, j, : a.count, : b.count]
            want = reference_lss_r_from_gamma(
                gamma, geometry_of(a, p_cyl, i), geometry_of(b, g_cyl, j), params
            )
            assert float(scores[i, j]) == pytest.approx(want, abs=TOL), (i, j)
    return scores


# --------------------------------------------------------------------------- parameters


def test_defaults_are_the_papers_and_lss_r_is_the_default() -> None:
    p = MccParams()
    assert p.consolidation == "lss_r"
    assert (p.n_rel, p.w_r) == (5, 0.5)
    assert (p.mu_rho1, p.tau_rho1) == (5.0, -1.6)
    assert (p.mu_rho2, p.tau_rho2, p.mu_rho3, p.tau_rho3) == (math.pi / 12, -30.0, math.pi / 12, -30.0)
    with pytest.raises(ValueError, match="consolidation"):
        MccParams(consolidation="lsa")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="w_r"):
        MccParams(w_r=1.5)


def test_a_gallery_encoded_once_can_be_scored_either_way() -> None:
    # Consolidation and matchability settings do not shape cylinders, so no re-encoding.
    rng = np.random.default_rng(1)
    cyl = encode_fingers([random_template(rng, 20), random_template(rng, 18)], LSS)
    assert LSS.same_cylinders(LSS_R) and not LSS.same_cylinders(LSS_R_FLOAT)
    by_lss_r = score_fingers(cyl, cyl, LSS_R)
    assert by_lss_r.shape == (2, 2) and torch.diagonal(by_lss_r).gt(0.99).all()
    with pytest.raises(ValueError, match="params"):
        score_fingers(cyl, cyl, LSS_R_FLOAT)


# --------------------------------------------------------------------------- compatibility ρ


def test_compatibility_of_a_rigidly_moved_pair_set_is_near_one_and_invariant() -> None:
    rng = np.random.default_rng(2)
    xy = torch.tensor(rng.uniform(100, 300, (6, 2)), dtype=torch.float32)
    theta = torch.tensor(rng.uniform(0, 2 * math.pi, 6), dtype=torch.float32)
    # Rotate by 40° counter-clockwise as the image is viewed (y down), then shift.
    a = math.radians(40)
    c, s = math.cos(a), math.sin(a)
    moved = torch.stack([c * xy[:, 0] + s * xy[:, 1] + 17, -s * xy[:, 0] + c * xy[:, 1] - 9], -1)
    rho = pair_compatibility(xy, theta, moved, theta + a, LSS_R)
    # Z(0) for each term: 1/(1+e^-8) and twice 1/(1+e^-7.85).
    perfect = (1 / (1 + math.exp(-8))) * (1 / (1 + math.exp(-30 * math.pi / 12))) ** 2
    off = ~torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(rho[off], torch.full((30,), perfect), atol=1e-4, rtol=0)
    assert rho.diagonal().eq(0).all()


def test_compatibility_matches_reference_term_by_term() -> None:
    rng = np.random.default_rng(3)
    n = 7
    xa, xb = rng.uniform(80, 320, (n, 2)), rng.uniform(80, 320, (n, 2))
    ta, tb = rng.uniform(0, 2 * math.pi, n), rng.uniform(0, 2 * math.pi, n)
    # Make some pairs nearly consistent so ρ is not all ~0.
    xb[:4] = xa[:4] + np.array([3.0, -2.0]) + rng.normal(0, 2, (4, 2))
    tb[:4] = ta[:4] + rng.normal(0, 0.1, 4)
    rho = pair_compatibility(*(torch.tensor(v, dtype=torch.float64) for v in (xa, ta, xb, tb)), LSS_R).numpy()
    ca = ReferenceCylinders(np.zeros((n, 0, 0, 0)), np.zeros((n, 0, 0), bool), np.ones(n, bool), ta, xa)
    cb = ReferenceCylinders(np.zeros((n, 0, 0, 0)), np.zeros((n, 0, 0), bool), np.ones(n, bool), tb, xb)
    for t in range(n):
        for k in range(n):
            want = 0.0 if t == k else reference_compatibility(ca, cb, (t, t), (k, k), LSS_R)
            assert rho[t, k] == pytest.approx(want, abs=1e-9)
    assert rho[:4, :4].sum() > 1.0


def test_radial_angle_is_measured_in_the_image_convention() -> None:
    # A minutia pointing right (θ = 0); a neighbour straight above it in the picture (smaller y)
    # lies 90° counter-clockwise as viewed, so dR = 0 - 90°.
    assert reference_radial_angle(100, 100, 0.0, 100, 50) == pytest.approx(-math.pi / 2)
    xy = torch.tensor([[100.0, 100.0], [100.0, 50.0]])
    theta = torch.tensor([0.0, 0.0])
    # The same picture turned upside down on the gallery side agrees on dR, so ρ stays high.
    flipped = torch.tensor([[300.0, 300.0], [300.0, 350.0]])
    assert pair_compatibility(xy, theta, flipped, theta + math.pi, LSS_R)[0, 1] > 0.99
    # Mirrored (neighbour below instead of above): distances and directions agree, dR does not.
    mirrored = torch.tensor([[100.0, 100.0], [100.0, 150.0]])
    assert pair_compatibility(xy, theta, mirrored, theta, LSS_R)[0, 1] < 1e-6


def test_compatibility_is_never_subnormal() -> None:
    # Far-apart, unrelated pairs: ρ would underflow into subnormal floats (slow on CPUs); each
    # factor is floored at Z(-28), so ρ is a normal float, at most ~7e-13 too high, or the 0 of
    # the diagonal.
    rng = np.random.default_rng(13)
    xy_a, xy_b = (torch.tensor(rng.uniform(0, 500, (40, 2)), dtype=torch.float32) for _ in range(2))
    theta_a, theta_b = (torch.tensor(rng.uniform(0, 2 * math.pi, 40), dtype=torch.float32) for _ in range(2))
    rho = pair_compatibility(xy_a, theta_a, xy_b, theta_b, LSS_R)
    off = rho[~torch.eye(40, dtype=torch.bool)]
    assert off.min() >= torch.finfo(torch.float32).tiny and rho.diagonal().eq(0).all()
    assert off.median() < 1e-12


# --------------------------------------------------------------------------- relaxation by hand


def test_one_relaxation_step_by_hand() -> None:
    lam0 = torch.tensor([0.8, 0.6, 0.4])
    rho = torch.ones(3, 3) - torch.eye(3)
    one = relax(lam0, rho, torch.ones(3, dtype=torch.bool), torch.tensor(3), replace(LSS_R, n_rel=1))
    # λ_0 = 0.5·0.8 + 0.5·(0.6 + 0.4)/2, and so on.
    torch.testing.assert_close(one, torch.tensor([0.65, 0.6, 0.55]))


def test_a_perfectly_consistent_set_keeps_its_similarities() -> None:
    lam0 = torch.full((5,), 0.7)
    rho = torch.ones(5, 5) - torch.eye(5)
    out = relax(lam0, rho, torch.ones(5, dtype=torch.bool), torch.tensor(5), LSS_R)
    torch.testing.assert_close(out, lam0)


def test_an_inconsistent_pair_is_penalised_and_supports_nobody() -> None:
    lam0 = torch.tensor([0.7, 0.7, 0.7, 0.9])
    rho = torch.ones(4, 4) - torch.eye(4)
    rho[3, :] = 0.0
    rho[:, 3] = 0.0  # pair 3 agrees with no other
    out = relax(lam0, rho, torch.ones(4, dtype=torch.bool), torch.tensor(4), LSS_R)
    # Pair 3 halves at each of the 5 steps. The others get support from 2 of their n_R - 1 = 3
    # fellows, so each step keeps 1/2 + 1/2·2/3 = 5/6 of them: a set of 4 with one outlier is
    # itself less credible than a set of 3 consistent pairs (which would keep its λ).
    assert float(out[3]) == pytest.approx(0.9 * 0.5**5)
    torch.testing.assert_close(out[:3], torch.full((3,), 0.7 * (5 / 6) ** 5))


def test_pairs_outside_the_set_stay_zero_and_do_not_support() -> None:
    lam0 = torch.tensor([0.7, 0.7, 0.5])
    rho = torch.ones(3, 3) - torch.eye(3)
    in_set = torch.tensor([True, True, False])
    out = relax(lam0, rho, in_set, torch.tensor(2), LSS_R)
    torch.testing.assert_close(out, torch.tensor([0.7, 0.7, 0.0]))


def test_lss_r_selects_by_efficiency_not_by_similarity() -> None:
    # Two fingers with 5 valid cylinders each: n_R = 5, n_P = 4. Pairs on the diagonal of Γ;
    # the best one (λ = 0.95) joins minutiae that are geometrically inconsistent with the rest.
    rng = np.random.default_rng(4)
    xy = rng.uniform(120, 280, (5, 2))
    theta = rng.uniform(0, 2 * math.pi, 5)
    t = FingerTemplate.from_arrays(np.c_[xy, theta], width=SIZE, height=SIZE)
    u_xy = xy.copy()
    u_xy[0] += [60.0, 40.0]  # minutia 0 moved: every distance from it changes
    u = FingerTemplate.from_arrays(np.c_[u_xy, theta], width=SIZE, height=SIZE)
    loose = replace(LSS_R, min_vc=0.0, min_m=0)
    a, b = encode_fingers([t], loose), encode_fingers([u], loose)
    lam = torch.zeros(1, 1, 5, 5)
    lam[0, 0].diagonal().copy_(torch.tensor([0.95, 0.8, 0.8, 0.8, 0.8]))
    got = float(lss_r_scores(lam, a, b, loose)[0, 0])
    # The four consistent pairs keep ~0.8·(1/2 + 1/2·3/4)-ish support; pair 0 decays to ~0.03.
    ref = reference_lss_r_from_gamma(
        lam[0, 0].double().numpy(), geometry_of(t, a, 0), geometry_of(u, b, 0), loose
    )
    assert got == pytest.approx(ref, abs=TOL)
    lss = (0.95 + 3 * 0.8) / 4
    assert got < 0.8 < lss


# --------------------------------------------------------------------------- against the reference


def test_full_literal_pipeline_on_random_templates() -> None:
    # Reference cylinders, Γ and LSS-R, all literal, against the batched kernels.
    rng = np.random.default_rng(5)
    probes = [random_template(rng, n) for n in (12, 18)]
    gallery = [random_template(rng, 9), random_template(rng, 15), rotated(probes[1], 0.25, (8.0, -6.0))]
    # The float variant's Γ is itself only within ~1e-3 of the reference's (see test_mcc.py).
    for params, tol in ((LSS_R, TOL), (LSS_R_FLOAT, 2e-3)):
        fast = score_fingers(encode_fingers(probes, params), encode_fingers(gallery, params), params)
        want = [[reference_score(a, b, params) for b in gallery] for a in probes]
        torch.testing.assert_close(fast.double(), torch.tensor(want, dtype=torch.float64), atol=tol, rtol=0)
        assert fast[1, 2] > 0.95 and fast[0].max() < 0.1


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n_a=st.integers(0, 30),
    n_b=st.integers(0, 30),
    side=st.sampled_from([60, 220]),
    genuine=st.booleans(),
)
def test_consolidation_matches_reference_on_random_templates(
    seed: int, n_a: int, n_b: int, side: int, genuine: bool
) -> None:
    rng = np.random.default_rng(seed)
    a = random_template(rng, n_a, side)
    b = rotated(a, rng.uniform(-0.5, 0.5), (5.0, 3.0)) if genuine and n_a else random_template(rng, n_b, side)
    assert_consolidation_matches_reference([a], [b], LSS_R)


@pytest.mark.parametrize("params", [LSS_R, LSS_R_FLOAT], ids=["binary", "float"])
def test_consolidation_matches_reference_on_synthetic_impressions(params: MccParams) -> None:
    rng = np.random.default_rng(6)
    realistic = DIFFICULTIES["realistic"]
    masters = [master_finger(rng, position) for position in (2, 7)]
    probes = [impression(rng, m, difficulty=realistic) for m in masters]
    gallery = [impression(rng, m, difficulty=realistic) for m in masters]
    scores = assert_consolidation_matches_reference(probes, gallery, params)
    assert scores.diagonal().min() > scores[0, 1] and scores.diagonal().min() > scores[1, 0]


# --------------------------------------------------------------------------- properties


def test_without_relaxation_lss_r_is_lss() -> None:
    # n_rel = 0 leaves λ untouched: every efficiency is 1 and the tie rule keeps the top n_P by λ.
    rng = np.random.default_rng(7)
    probes = encode_fingers([random_template(rng, 25) for _ in range(2)], LSS)
    gallery = encode_fingers([random_template(rng, n) for n in (20, 30, 24)], LSS)
    none = replace(LSS_R, n_rel=0)
    assert bool((probes.valid.sum(-1) >= 12).all() and (gallery.valid.sum(-1) >= 12).all())
    torch.testing.assert_close(score_fingers(probes, gallery, none), score_fingers(probes, gallery, LSS))


def test_identical_and_rigidly_moved_fingers_score_high_and_alike() -> None:
    t = random_template(np.random.default_rng(8), 35, side=240)
    # Not 1: one of the n_R = 35 top pairs is an off-diagonal stray (one cylinder has no matchable
    # self-pair, its cells being empty), so the 34 true pairs share support over n_R - 1 = 34 and
    # keep about (1/2 + 1/2·33/34)^5 ≈ 0.93 of their λ; see test_an_inconsistent_pair_....
    itself = score(t, t)
    assert itself == pytest.approx((0.5 + 0.5 * 33 / 34 * 0.9989) ** 5, abs=2e-3)
    for degrees in (-60, -20, 15, 45):
        assert score(t, rotated(t, math.radians(degrees), (-20.0, 31.0))) == pytest.approx(itself, abs=1e-2)


def test_lss_r_pushes_impostor_scores_down() -> None:
    rng = np.random.default_rng(9)
    probes = encode_fingers([random_template(rng, 30, side=240) for _ in range(4)], LSS)
    gallery = encode_fingers([random_template(rng, 30, side=240) for _ in range(4)], LSS)
    lss, lss_r = score_fingers(probes, gallery, LSS), score_fingers(probes, gallery, LSS_R)
    assert (lss_r < lss).all() and lss_r.max() < 0.1 < lss.min()


def test_absent_empty_and_unmatchable_fingers_score_zero() -> None:
    rng = np.random.default_rng(10)
    real = random_template(rng, 20)
    empty = FingerTemplate.from_arrays(np.zeros((0, 3)), width=SIZE, height=SIZE)
    probes = encode_fingers([None, empty, real], LSS_R)
    scores = score_fingers(probes, encode_fingers([real, None], LSS_R), LSS_R)
    assert scores[:2].eq(0).all() and scores[:, 1].eq(0).all() and scores[2, 0] > 0.99
    # No matchable pair at all (every direction differs by more than delta_theta): score 0.
    strict = replace(LSS_R, delta_theta=1e-6)
    upside_down = rotated(real, math.pi)
    assert score(real, upside_down, strict) == 0.0


def test_batching_and_chunking_do_not_change_scores() -> None:
    rng = np.random.default_rng(11)
    probes = [random_template(rng, n) for n in (14, 22)]
    gallery = [random_template(rng, int(n)) for n in rng.integers(5, 28, 6)] + [rotated(probes[0], 0.3)]
    p_cyl, g_cyl = encode_fingers(probes, LSS_R), encode_fingers(gallery, LSS_R)
    whole = score_fingers(p_cyl, g_cyl, LSS_R)
    torch.testing.assert_close(score_fingers(p_cyl, g_cyl, LSS_R, chunk_bytes=1), whole, atol=1e-6, rtol=0)
    alone = torch.tensor([[score(a, b) for b in gallery] for a in probes])
    torch.testing.assert_close(whole, alone, atol=1e-5, rtol=0)


def test_cpu_blocks_and_the_whole_chunk_at_once_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    # On the CPU, LSS-R relaxes the gallery in blocks of fingers sorted by n_R, each with its own
    # pair-set size K and cut Mg; elsewhere the whole chunk goes at once with K = min(Mp, Mg). Only
    # rounding may tell them apart.
    rng = np.random.default_rng(14)
    realistic = DIFFICULTIES["realistic"]
    masters = [master_finger(rng, position) for position in (1, 4, 6)]
    probes = [impression(rng, m, difficulty=realistic) for m in masters] + [random_template(rng, 9)]
    gallery = [impression(rng, m, difficulty=realistic) for m in masters for _ in range(2)]
    gallery += [random_template(rng, n) for n in (3, 12, 30)] + [None]
    p_cyl, g_cyl = encode_fingers(probes, LSS_R), encode_fingers(gallery, LSS_R)
    blocked = score_fingers(p_cyl, g_cyl, LSS_R)
    monkeypatch.setattr(similarity, "_CPU_RELAX_BLOCK_BYTES", 1)  # one finger per block
    one_by_one = score_fingers(p_cyl, g_cyl, LSS_R)
    n_b, last_b = g_cyl.valid.sum(-1)[None], similarity._last_valid(g_cyl.valid)[None]
    blocks = similarity._cpu_blocks(p_cyl.valid.sum(-1), n_b, last_b, p_cyl.max_minutiae, g_cyl.max_minutiae)
    assert len(blocks) == len(gallery) and len({k for _, k, _ in blocks}) > 3
    monkeypatch.setattr(similarity, "_relaxes_in_blocks", lambda device: False)
    whole = score_fingers(p_cyl, g_cyl, LSS_R)
    torch.testing.assert_close(one_by_one, blocked, atol=1e-6, rtol=0)
    torch.testing.assert_close(whole, blocked, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_reference() -> None:
    rng = np.random.default_rng(12)
    probes = [random_template(rng, n) for n in (12, 25)]
    gallery = [random_template(rng, n) for n in (9, 18, 25)] + [rotated(probes[0], 0.4)]
    for params in (LSS_R, LSS_R_FLOAT):
        cpu = score_fingers(encode_fingers(probes, params), encode_fingers(gallery, params), params)
        cuda = score_fingers(
            encode_fingers(probes, params, "cuda"), encode_fingers(gallery, params, "cuda"), params
        )
        assert cuda.device.type == "cuda"
        torch.testing.assert_close(cuda.cpu(), cpu, atol=2e-3, rtol=0)
    assert_consolidation_matches_reference(probes, gallery, LSS_R, "cuda")
