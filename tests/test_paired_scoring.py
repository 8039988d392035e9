"""Paired scoring: each probe finger against its own gallery fingers (a shortlist) in one batched
pass, with exactly the scores all-pairs scoring gives those pairs.

Tolerance 1e-5: the paired products and relaxation sum in a different order (batched, other
chunk widths), which float32 may round differently on different CPUs; pair selections are exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_kernels import MccParams, encode_fingers, score_fingers, score_fingers_paired, similarity
from minutiae.template import FingerTemplate
from synthetic.fingers import DIFFICULTIES, impression, master_finger
from tests.test_mcc import random_template

# Floating-point kernels: CI runs these again with AVX2 and with no vector extensions.
pytestmark = pytest.mark.kernels

TOL = 1e-5


def fingers(seed: int) -> tuple[list[FingerTemplate | None], list[FingerTemplate | None]]:
    """Four probes (three mated, one random) and a gallery of their mates, other impressions,
    random templates of very different sizes and an absent finger."""
    rng = np.random.default_rng(seed)
    realistic = DIFFICULTIES["realistic"]
    masters = [master_finger(rng, position) for position in (1, 2, 7)]
    probes: list[FingerTemplate | None] = [impression(rng, m, difficulty=realistic) for m in masters]
    probes.append(random_template(rng, 14))
    gallery: list[FingerTemplate | None] = [impression(rng, m, difficulty=realistic) for m in masters]
    gallery += [random_template(rng, n) for n in (2, 9, 25, 40)] + [None]
    return probes, gallery


# Each probe's own candidates: its mate, strangers, repeats, and the absent finger.
ROWS = torch.tensor([[0, 3, 7, 4], [1, 1, 5, 6], [2, 0, 6, 3], [7, 4, 5, 2]])


@pytest.mark.parametrize(
    "params",
    [
        MccParams(consolidation="lss_r"),
        MccParams(consolidation="lss"),
        MccParams(binary=False, consolidation="lss_r"),
    ],
    ids=["binary-lss_r", "binary-lss", "float-lss_r"],
)
def test_paired_scores_are_the_all_pairs_scores_of_those_pairs(params: MccParams) -> None:
    probes, gallery = fingers(seed=21)
    p_cyl, g_cyl = encode_fingers(probes, params), encode_fingers(gallery, params)
    want = torch.gather(score_fingers(p_cyl, g_cyl, params), 1, ROWS)
    paired = score_fingers_paired(p_cyl, g_cyl, ROWS, params)
    assert paired.shape == (4, 4) and paired.dtype == torch.float32
    torch.testing.assert_close(paired, want, atol=TOL, rtol=0)
    # The pairs are the right ones: mates (column 0 of probes 0-2) above every stranger, a repeated
    # candidate scores twice the same, the absent finger 0.
    assert (paired[:3, 0] > paired[:3, 2:].max(dim=1).values).all() and paired[0, 0] > paired[0, 1]
    assert paired[1, 0] == paired[1, 1] and paired[0, 2] == 0 and paired[3, 0] == 0
    # A lone probe (no batched product: the 2-D arithmetic) gets its row of the same scores.
    alone = score_fingers_paired(p_cyl.select(slice(1, 2)), g_cyl, ROWS[1:2], params)
    torch.testing.assert_close(alone, want[1:2], atol=TOL, rtol=0)
    # One candidate per chunk: the same scores, chunk by chunk.
    one_by_one = score_fingers_paired(p_cyl, g_cyl, ROWS, params, chunk_bytes=1)
    torch.testing.assert_close(one_by_one, want, atol=TOL, rtol=0)


def test_batched_float16_products_give_the_float32_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpu_kernels.products import OVERRIDE

    params = MccParams()
    probes, gallery = fingers(seed=25)
    p_cyl, g_cyl = encode_fingers(probes, params), encode_fingers(gallery, params)
    scores = {}
    for choice in ("float32", "float16"):
        monkeypatch.setenv(OVERRIDE, choice)
        scores[choice] = score_fingers_paired(p_cyl, g_cyl, ROWS, params)
    # Exact counts either way, and the same code after the products: equal to the bit.
    assert torch.equal(scores["float16"], scores["float32"])


def test_a_micro_batch_is_one_pass_not_a_loop_over_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    params = MccParams()
    probes, gallery = fingers(seed=22)
    p_cyl, g_cyl = encode_fingers(probes, params), encode_fingers(gallery, params)
    passes: list[int] = []
    local = similarity._local

    def counted(a: similarity._Operands, b: similarity._Operands, *args: object, **kwargs: object) -> object:
        passes.append(int(b.values.shape[0]))
        return local(a, b, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(similarity, "_local", counted)
    score_fingers_paired(p_cyl, g_cyl, ROWS, params)
    assert passes == [ROWS.numel()]  # every probe's candidates in one product batch


def test_rows_must_give_each_probe_its_candidates() -> None:
    params = MccParams()
    probes, gallery = fingers(seed=23)
    p_cyl, g_cyl = encode_fingers(probes, params), encode_fingers(gallery, params)
    with pytest.raises(ValueError, match=r"\[P, K\]"):
        score_fingers_paired(p_cyl, g_cyl, ROWS[:3], params)
    empty = score_fingers_paired(p_cyl, g_cyl, torch.zeros((4, 0), dtype=torch.int64), params)
    assert empty.shape == (4, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paired_scores_on_cuda_from_a_gallery_in_host_memory() -> None:
    params = MccParams()
    probes, gallery = fingers(seed=24)
    p_cyl, g_cyl = encode_fingers(probes, params), encode_fingers(gallery, params)
    cpu = score_fingers_paired(p_cyl, g_cyl, ROWS, params)
    cuda = score_fingers_paired(p_cyl.to("cuda"), g_cyl, ROWS, params)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=0)
