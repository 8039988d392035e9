"""Bit products are exact counts in either arithmetic, so the device's choice never changes a score."""

from __future__ import annotations

import pytest
import torch

from gpu_kernels import MccParams
from gpu_kernels.cylinders import encode_fingers
from gpu_kernels.products import OVERRIDE, bit_operand_dtype, bit_product
from gpu_kernels.similarity import score_fingers
from synthetic.fingers import impression, master_finger

# Floating-point kernels: CI runs these again with AVX2 and with no vector extensions.
pytestmark = pytest.mark.kernels


def test_int8_float16_and_float32_products_of_bits_are_the_same_counts() -> None:
    generator = torch.Generator().manual_seed(1)
    for m, k, n in [(1, 256, 7), (5, 1536, 13), (40, 1536, 300)]:
        a = torch.rand(m, k, generator=generator) < 0.5
        b = torch.rand(n, k, generator=generator) < 0.5
        exact = (a.long() @ b.long().T).float()
        for dtype in (torch.float32, torch.float16, torch.int8):
            product = bit_product(a.to(dtype), b.to(dtype))
            assert product.dtype == torch.float32 and torch.equal(product, exact), dtype


def test_float16_counts_stay_exact_up_to_the_largest_cylinder_count() -> None:
    # All ones: every product is k, the largest count a C-cell cylinder can give, and batched
    # float16 products count as exactly as 2-D ones.
    ones = torch.ones(3, 4, 1536, dtype=torch.float16)
    assert torch.equal(bit_product(ones, ones), torch.full((3, 4, 4), 1536.0))
    assert torch.equal(bit_product(ones[0], ones[0]), torch.full((4, 4), 1536.0))


def test_float16_is_never_chosen_where_counts_could_round(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OVERRIDE, "float16")
    assert bit_operand_dtype(torch.device("cpu"), max_count=1536) == torch.float16
    assert bit_operand_dtype(torch.device("cpu"), max_count=4096) == torch.float32
    # Batched products have no int8 form: pinning int8 batches in float32.
    monkeypatch.setenv(OVERRIDE, "int8")
    assert bit_operand_dtype(torch.device("cpu"), batched=True) == torch.float32


def test_the_choice_of_arithmetic_changes_no_score(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    rng = np.random.default_rng(5)
    masters = [master_finger(rng, position) for position in (1, 2, 7)]
    probes = encode_fingers([impression(rng, m, quality=0.7) for m in masters], MccParams())
    gallery = encode_fingers([*masters, *(impression(rng, m, quality=0.5) for m in masters)], MccParams())
    scores = {}
    for choice in ("float32", "float16", "int8"):
        monkeypatch.setenv(OVERRIDE, choice)
        assert bit_operand_dtype(torch.device("cpu")) == getattr(torch, choice)
        scores[choice] = score_fingers(probes, gallery, MccParams())
    assert torch.equal(scores["float32"], scores["int8"])
    assert torch.equal(scores["float32"], scores["float16"])
    # The scores are real ones: each probe finds its own master first.
    assert torch.equal(scores["int8"][:, :3].argmax(1), torch.arange(3))


def test_a_misspelt_override_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OVERRIDE, "bfloat16")
    with pytest.raises(ValueError, match="float32, float16, int8"):
        bit_operand_dtype(torch.device("cpu"))
