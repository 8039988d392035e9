"""The evidence fusion: per-finger scores normalised by minutia counts and by the search's own
cohort, summed as log-likelihood ratios (gpu_kernels.evidence, fitted by calibration.evidence_fit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.evidence_fit import PairScores, fit_evidence_model
from calibration.thresholds import calibrated_thresholds
from gpu_kernels import EvidenceModel, MccParams, encode_tenprints, score_tenprints, shipped_model
from gpu_kernels.evidence import cohort_shift, finger_llr, fuse_evidence, normalised_scores
from minutiae.template import FingerTemplate, TenPrintTemplates
from synthetic.fingers import DIFFICULTIES, impression, master_finger

#: A typical impostor finger score on the realistic preset, and a strong mated one.
IMPOSTOR, MATED = 0.013, 0.06


def _search(per_finger: torch.Tensor, counts: int = 40) -> torch.Tensor:
    """Fused scores of one probe against G candidates with all ten fingers compared."""
    both = torch.ones(per_finger.shape, dtype=torch.bool)
    probe_counts = torch.full((per_finger.shape[0], 10), counts)
    candidate_counts = torch.full(per_finger.shape, counts)
    return fuse_evidence(per_finger, both, probe_counts, candidate_counts, shipped_model())


def test_the_shipped_model_loads_and_survives_a_round_trip(tmp_path: Path) -> None:
    model = shipped_model()
    model.save(tmp_path / "model.json")
    assert EvidenceModel.load(tmp_path / "model.json") == model
    assert model.source


def test_a_model_with_a_falling_llr_curve_is_refused() -> None:
    model = shipped_model().to_json()
    model["llr"][3] = list(reversed(model["llr"][3]))
    with pytest.raises(ValueError, match="increase"):
        EvidenceModel.from_json(model)


@settings(max_examples=40, deadline=None)
@given(
    scores=st.lists(st.floats(0.0, 0.3), min_size=10, max_size=10),
    counts=st.lists(st.integers(0, 120), min_size=10, max_size=10),
    finger=st.integers(0, 9),
    rise=st.floats(1e-3, 0.2),
)
def test_the_fused_score_rises_when_any_one_finger_score_rises(
    scores: list[float], counts: list[int], finger: int, rise: float
) -> None:
    per_finger = torch.tensor([[scores]], dtype=torch.float32)
    higher = per_finger.clone()
    higher[0, 0, finger] += rise
    both = torch.ones((1, 1, 10), dtype=torch.bool)
    c = torch.tensor([counts])
    model = shipped_model()
    before = fuse_evidence(per_finger, both, c, c.unsqueeze(0), model, cohort=False)
    after = fuse_evidence(higher, both, c, c.unsqueeze(0), model, cohort=False)
    assert float(after) > float(before)


def test_a_missing_finger_contributes_nothing_rather_than_a_penalty() -> None:
    per_finger = torch.full((1, 1, 10), MATED)
    counts = torch.full((1, 10), 40)
    all_ten = torch.ones((1, 1, 10), dtype=torch.bool)
    six = all_ten.clone()
    six[..., :4] = False
    model = shipped_model()
    ten_fused = fuse_evidence(per_finger, all_ten, counts, counts.unsqueeze(0), model, cohort=False)
    six_fused = fuse_evidence(per_finger, six, counts, counts.unsqueeze(0), model, cohort=False)
    one_finger_llr = finger_llr(
        normalised_scores(per_finger, counts.unsqueeze(0), counts.unsqueeze(0), model), model
    )[..., 4:]
    torch.testing.assert_close(six_fused, one_finger_llr.sum(-1))
    assert float(ten_fused) > float(six_fused)


def test_a_chance_score_of_few_minutiae_is_weaker_evidence_than_the_same_score_of_many() -> None:
    model = shipped_model()
    score = torch.tensor([[[0.05] * 10]])
    few = normalised_scores(score, torch.full((1, 1, 10), 9), torch.full((1, 1, 10), 35), model)
    many = normalised_scores(score, torch.full((1, 1, 10), 40), torch.full((1, 1, 10), 40), model)
    assert bool((few < many).all())


def test_a_probe_that_scores_high_against_everyone_produces_no_hit() -> None:
    hit = calibrated_thresholds().hit
    gallery = 60
    # The same probe, once scoring like a mate against one candidate only ...
    one_mate = torch.full((1, gallery, 10), IMPOSTOR)
    one_mate[0, 7] = MATED
    assert float(_search(one_mate)[0, 7]) >= hit
    # ... and once scoring that high against every candidate: the cohort takes it all back.
    everyone = torch.full((1, gallery, 10), MATED) + torch.linspace(0, 1e-3, gallery)[None, :, None]
    assert float(_search(everyone).max()) < hit


def test_the_cohort_only_ever_lowers_scores_and_needs_enough_candidates() -> None:
    z = torch.tensor([[[-1.0], [-2.0], [-0.5]] * 10]).reshape(1, 30, 1)
    compared = torch.ones_like(z, dtype=torch.bool)
    assert float(cohort_shift(z, compared, min_cohort=20, margin=1.0)) == 0.0  # an ordinary probe
    high = z + 5.0  # median 4
    assert float(cohort_shift(high, compared, min_cohort=20, margin=1.0)) == pytest.approx(3.0)
    assert float(cohort_shift(high, compared, min_cohort=31, margin=1.0)) == 0.0  # too few for a median


def _tenprint(rng: np.random.Generator, masters: dict[int, FingerTemplate], plain: bool) -> TenPrintTemplates:
    realistic = DIFFICULTIES["realistic"]
    return TenPrintTemplates(
        {f: impression(rng, m, quality=0.85, difficulty=realistic, plain=plain) for f, m in masters.items()}
    )


def test_a_ten_print_mate_with_four_unusable_fingers_still_hits() -> None:
    rng = np.random.default_rng(41)
    people = [{f: master_finger(rng, f) for f in range(1, 11)} for _ in range(30)]
    params = MccParams()
    gallery = encode_tenprints([_tenprint(rng, p, plain=False) for p in people], params)
    probe = _tenprint(rng, people[12], plain=True)
    six = TenPrintTemplates({f: t for f, t in probe.fingers.items() if f > 4})
    scores = score_tenprints(encode_tenprints([six], params), gallery, params)
    assert int(scores.fused[0].argmax()) == 12
    assert float(scores.fused[0, 12]) >= calibrated_thresholds().hit
    assert int(scores.both_present[0, 12].sum()) == 6


def test_fitting_separates_synthetic_genuine_from_impostor_scores() -> None:
    rng = np.random.default_rng(3)
    rows, per_row = 400, 25
    n = rows * per_row
    counts = rng.integers(8, 70, size=n)
    genuine = np.zeros(n, bool)
    genuine[::per_row] = True
    # Impostor scores spread wider for few minutiae, as LSS's do; mates score higher.
    noise = rng.gamma(2.0, 0.004 * (1 + 20 / counts))
    score = np.where(genuine, 0.05 + rng.normal(0, 0.01, n), 0.005 + noise).clip(0, 1)
    pairs = PairScores(
        score=score,
        probe_count=counts,
        gallery_count=rng.integers(8, 70, size=n),
        probe_minutiae=counts,
        position=np.tile(np.repeat(np.arange(1, 11), per_row), rows // 10),
        genuine=genuine,
        row=np.repeat(np.arange(rows), per_row),
        probe_subject=np.repeat(np.arange(rows), per_row),
        gallery_subject=np.tile(np.arange(per_row), rows),
    )
    model = fit_evidence_model(pairs, min_cell=50)
    z = torch.tensor([[[-1.0] * 10, [0.0] * 10, [4.0] * 10]])
    llr = finger_llr(z, model)
    assert bool((llr[0, 0] < llr[0, 1]).all() and (llr[0, 1] < llr[0, 2]).all())
    assert float(llr[0, 2].min()) > 0.0 > float(llr[0, 0].max())
