"""The fast cylinder encoder against the literal reference, on synthetic fingers and on the
degenerate templates that exercise its shortcuts (hulls of 0-3 points, collinear and duplicated
minutiae, minutiae on the image border), and its invariance to batching and chunking.

Cell values, cell validity and cylinder validity must be identical to the reference, as in
tests/test_mcc.py (float32 against float64 could only flip a cell lying within ~1e-5 px of the
enlarged hull or whose sum is within ~1e-9 of mu_psi; none does with these seeds). Batching
must not change a single bit: each cylinder adds the same terms in the same order wherever it
lands.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gpu_kernels import MccParams, encode_fingers
from gpu_kernels.cylinders import CylinderSet, convex_hull, convex_hulls
from gpu_kernels.reference import _hull, reference_cylinders
from minutiae.template import FingerTemplate
from synthetic.fingers import impression, master_finger

# Floating-point kernels: CI runs these again with AVX2 and with no vector extensions.
pytestmark = pytest.mark.kernels

BINARY = MccParams(consolidation="lss")
FLOAT = MccParams(binary=False, consolidation="lss")
W, H = 400, 500


def template(rows: list[list[float]] | np.ndarray) -> FingerTemplate:
    return FingerTemplate.from_arrays(np.asarray(rows, dtype=np.float64).reshape(-1, 3), width=W, height=H)


def edge_cases() -> list[FingerTemplate]:
    """Templates whose hull is empty, a point, a segment, a triangle, or has collinear,
    duplicated or border minutiae."""
    return [
        template(np.zeros((0, 3))),
        template([[200, 250, 1.0]]),
        template([[200, 250, 1.0], [230, 260, 2.0]]),
        template([[200, 250, 1.0], [230, 260, 2.0], [210, 290, 4.0]]),
        # Collinear: a line of 6 minutiae, integer coordinates so orientation tests are exact.
        template([[100 + 20 * i, 150 + 30 * i, 0.5 * i] for i in range(6)]),
        # Duplicated positions (same and different directions) inside a square.
        template(
            [
                [150, 200, 0.1],
                [150, 200, 0.1],
                [150, 200, 2.0],
                [250, 200, 1.0],
                [250, 300, 3.0],
                [150, 300, 5.0],
            ]
        ),
        # Minutiae on the image border and in its corners, and one on a hull edge.
        template(
            [
                [0, 0, 0.0],
                [W - 1, 0, 1.0],
                [W - 1, H - 1, 2.0],
                [0, H - 1, 3.0],
                [0, 250, 4.0],
                [200, 250, 5.0],
            ]
        ),
        template([[0, 40, 0.3], [0, 90, 1.3], [30, 60, 2.3], [0, 140, 3.3], [45, 100, 4.3]]),
    ]


def synthetic_fingers(count: int, seed: int) -> list[FingerTemplate]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        master = master_finger(rng, int(rng.integers(1, 11)))
        out.append(master if i % 3 == 0 else impression(rng, master, quality=float(rng.uniform(0.3, 1.0))))
    return out


def assert_matches_reference(templates: list[FingerTemplate], params: MccParams) -> None:
    fast = encode_fingers(templates, params)
    values = fast.unpacked_values().double().numpy()
    cell_valid = fast.unpacked_cell_valid().bool().numpy()
    for f, t in enumerate(templates):
        n = t.count
        assert not fast.valid[f, n:].any() and not values[f, n:].any() and not cell_valid[f, n:].any()
        if n == 0:
            continue
        ref = reference_cylinders(t, params)
        np.testing.assert_array_equal(cell_valid[f, :n], ref.cell_valid.reshape(n, -1))
        np.testing.assert_array_equal(fast.valid[f, :n].numpy(), ref.valid)
        if params.binary:
            np.testing.assert_array_equal(values[f, :n], ref.values.reshape(n, -1))
        else:
            np.testing.assert_allclose(values[f, :n], ref.values.reshape(n, -1), atol=1e-5)


def assert_same(a: CylinderSet, b: CylinderSet, params: MccParams) -> None:
    """Binary cylinders and every count are exact wherever they are computed; float cell values
    are sums whose order the CPU's vector width and the batch shape may change (one ulp apart
    on an AVX2 machine), so they agree within a few ulps of 1.0."""
    for name in ("cell_valid", "valid", "theta", "xy", "counts"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    if params.binary:
        assert torch.equal(a.values, b.values)
    else:
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- hulls


def test_batched_hulls_match_gift_wrapping() -> None:
    rng = np.random.default_rng(0)
    sets = [t.minutiae[:, :2].astype(np.float64) for t in edge_cases()]
    sets += [rng.uniform(0, 300, (int(k), 2)) for k in rng.integers(1, 60, 30)]
    sets += [np.round(rng.uniform(0, 6, (int(k), 2))) for k in rng.integers(3, 40, 20)]  # many ties
    counts = np.array([len(p) for p in sets], np.int64)
    padded = np.zeros((len(sets), int(counts.max()), 2))
    for f, p in enumerate(sets):
        padded[f, : len(p)] = p * [1, -1]  # right-handed frame, as the encoder calls it
    hulls, sizes = convex_hulls(padded, counts)
    for f, p in enumerate(sets):
        want = _hull([(float(x), float(y)) for x, y in p])
        got = hulls[f, : sizes[f]] * [1, -1]
        assert sorted(map(tuple, got.tolist())) == sorted(want)
        if sizes[f] >= 3:  # counter-clockwise in the right-handed frame: positive area
            x, y = hulls[f, : sizes[f], 0], hulls[f, : sizes[f], 1]
            assert (x * np.roll(y, -1) - np.roll(x, -1) * y).sum() > 0
        np.testing.assert_array_equal(convex_hull(padded[f, : len(p)]), hulls[f, : sizes[f]])


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("params", [BINARY, FLOAT], ids=["binary", "float"])
def test_edge_cases_match_reference(params: MccParams) -> None:
    assert_matches_reference(edge_cases(), params)


def test_synthetic_fingers_match_reference() -> None:
    fingers = synthetic_fingers(6, seed=1)
    assert_matches_reference(fingers, BINARY)
    assert encode_fingers(fingers, BINARY).valid.any(1).all()


# --------------------------------------------------------------------------- batching


def test_batching_and_chunking_change_nothing_but_float_rounding() -> None:
    fingers: list[FingerTemplate | None] = [*synthetic_fingers(24, seed=2), *edge_cases(), None]
    order = np.random.default_rng(3).permutation(len(fingers))
    fingers = [fingers[i] for i in order]
    for params in (BINARY, FLOAT):
        batch = encode_fingers(fingers, params)
        alone = CylinderSet.cat([encode_fingers([t], params) for t in fingers]).padded(batch.max_minutiae)
        assert_same(batch, alone, params)
        assert_same(batch, encode_fingers(fingers, params, chunk_bytes=1 << 20), params)
        few = fingers[:8]  # one finger a chunk and one cylinder a batch
        assert_same(encode_fingers(few, params), encode_fingers(few, params, chunk_bytes=1), params)


def test_dense_random_fingers_match_reference() -> None:
    # Uniform minutiae with random directions: many neighbours per cylinder and long hull edges.
    rng = np.random.default_rng(4)
    fingers = [
        template(np.c_[rng.uniform(40, 360, (n, 2)), rng.uniform(0, 2 * math.pi, n)]) for n in (5, 17, 40)
    ]
    assert_matches_reference(fingers, BINARY)


def test_compacting_keeps_each_fingers_valid_cylinders_in_order() -> None:
    fingers: list[FingerTemplate | None] = [*synthetic_fingers(12, seed=4), *edge_cases(), None]
    cylinders = encode_fingers(fingers, BINARY)
    compact = cylinders.compacted()
    n_valid = cylinders.valid.sum(-1)
    assert compact.max_minutiae == max(1, int(n_valid.max()))
    for f in range(len(fingers)):
        kept = cylinders.valid[f]
        n = int(n_valid[f])
        assert compact.valid[f, :n].all() and not compact.valid[f, n:].any()
        assert torch.equal(compact.values[f, :n], cylinders.values[f][kept])
        assert torch.equal(compact.theta[f, :n], cylinders.theta[f][kept])
    # Picking fingers while compacting is the same as picking, then compacting; also from a view.
    picks = torch.tensor([5, 0, 5, len(fingers) - 1, 3])
    for source in (cylinders, cylinders.padded(cylinders.max_minutiae + 3).select(slice(0, len(fingers)))):
        assert_same(source.compacted(picks), source.select(picks).compacted(), BINARY)
    view = CylinderSet(
        cylinders.values[:, :-1],
        cylinders.cell_valid[:, :-1],
        cylinders.valid[:, :-1],
        cylinders.theta[:, :-1],
        cylinders.xy[:, :-1],
        cylinders.counts,
        BINARY,
    )
    assert not view.values.is_contiguous()
    assert_same(view.compacted(picks), view.select(picks).compacted(), BINARY)
