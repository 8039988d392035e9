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


def test_int8_and_float32_products_of_bits_are_the_same_counts() -> None:
    generator = torch.Generator().manual_seed(1)
    for m, k, n in [(1, 256, 7), (5, 1536, 13), (40, 1536, 300)]:
        a = torch.rand(m, k, generator=generator) < 0.5
        b = torch.rand(n, k, generator=generator) < 0.5
        as_float = bit_product(a.float(), b.float())
        as_int8 = bit_product(a.to(torch.int8), b.to(torch.int8))
        assert as_int8.dtype == torch.float32 and torch.equal(as_int8, as_float)
        assert torch.equal(as_float, (a.long() @ b.long().T).float())


def test_the_choice_of_arithmetic_changes_no_score(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    rng = np.random.default_rng(5)
    masters = [master_finger(rng, position) for position in (1, 2, 7)]
    probes = encode_fingers([impression(rng, m, quality=0.7) for m in masters], MccParams())
    gallery = encode_fingers([*masters, *(impression(rng, m, quality=0.5) for m in masters)], MccParams())
    scores = {}
    for choice in ("float32", "int8"):
        monkeypatch.setenv(OVERRIDE, choice)
        assert bit_operand_dtype(torch.device("cpu")) == getattr(torch, choice)
        scores[choice] = score_fingers(probes, gallery, MccParams())
    assert torch.equal(scores["float32"], scores["int8"])
    # The scores are real ones: each probe finds its own master first.
    assert torch.equal(scores["int8"][:, :3].argmax(1), torch.arange(3))


def test_a_misspelt_override_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OVERRIDE, "bfloat16")
    with pytest.raises(ValueError, match="float32, int8"):
        bit_operand_dtype(torch.device("cpu"))
