"""Fits the evidence fusion (:mod:`gpu_kernels.evidence`) on single-finger comparisons.

``fedprint eval DATA --fit-fusion OUT.json`` calls :func:`fit_evidence_model` with the 1:1 pairs
of the evaluation (genuine pairs and blocked impostor pairs, each probe finger compared with
every gallery finger of its block at the same position, so every probe finger has a cohort of
impostors exactly as it has in a search).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from calibration.tails import sums_by_fingers
from gpu_kernels.evidence import MIN_SLOPE, TAIL_Z, EvidenceModel, cohort_shift, llr_at, normalised_scores

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

#: Lower edges of the valid-cylinder count bins: fine where LSS's chance level moves fast (few
#: cylinders), coarse above.
COUNT_EDGES = (0, 8, 11, 14, 17, 20, 24, 28, 33, 39, 46, 55, 66, 80)
#: Impostor pairs a count cell needs before its own quantiles are trusted; thinner cells pool
#: their neighbours'.
MIN_CELL = 400
#: Impostor pairs behind a cell's 99.9th percentile (the scale above the 99th).
MIN_UPPER_CELL = 4000
#: Impostor and genuine quantiles of z that become the edges of the LLR bins.
_IMPOSTOR_EDGES = (0.0005, 0.005, 0.03, 0.15, 0.4, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999, 0.9997, 0.9999)
_GENUINE_EDGES = (0.02, 0.06, 0.12, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 0.97)
#: Fewest genuine pairs at a position for its own LLR curve (else the curve of all positions).
MIN_GENUINE_PER_POSITION = 200


@dataclass(frozen=True)
class PairScores:
    """Single-finger comparisons, one entry each.

    ``score``: raw MCC score; ``probe_count`` / ``gallery_count``: valid cylinders of the two
    fingers; ``probe_minutiae``: minutiae of the probe finger; ``position``: FGP 1-10;
    ``genuine``: same subject; ``row``: the probe finger the comparison belongs to (its cohort);
    ``probe_subject`` / ``gallery_subject``: the two subjects (indices), so the fingers of one
    subject pair can be fused into a ten-print score.
    """

    score: FloatArray
    probe_count: IntArray
    gallery_count: IntArray
    probe_minutiae: IntArray
    position: IntArray
    genuine: BoolArray
    row: IntArray
    probe_subject: IntArray
    gallery_subject: IntArray

    def __len__(self) -> int:
        return int(self.score.size)

    @staticmethod
    def concat(parts: list[PairScores]) -> PairScores:
        """All entries of ``parts``, in order (rows as the parts number them)."""
        if not parts:
            e = np.zeros(0, dtype=np.int64)
            return PairScores(np.zeros(0), e, e, e, e, np.zeros(0, bool), e, e, e)
        return PairScores(
            np.concatenate([p.score for p in parts]),
            np.concatenate([p.probe_count for p in parts]),
            np.concatenate([p.gallery_count for p in parts]),
            np.concatenate([p.probe_minutiae for p in parts]),
            np.concatenate([p.position for p in parts]),
            np.concatenate([p.genuine for p in parts]),
            np.concatenate([p.row for p in parts]),
            np.concatenate([p.probe_subject for p in parts]),
            np.concatenate([p.gallery_subject for p in parts]),
        )


def _count_tables(
    pairs: PairScores, edges: tuple[int, ...], min_cell: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``(location, scale, upper)`` tables: impostor median, (q99 - median) / z99 and
    (q99.9 - q99) / (z99.9 - z99) per count cell."""
    bins = len(edges)
    impostor = ~pairs.genuine
    pb = (np.searchsorted(edges, pairs.probe_count, side="right") - 1)[impostor]
    gb = (np.searchsorted(edges, pairs.gallery_count, side="right") - 1)[impostor]
    scores = pairs.score[impostor]
    if scores.size < max(min_cell, MIN_UPPER_CELL):
        raise ValueError(
            f"{scores.size} impostor pairs are too few to fit (need {max(min_cell, MIN_UPPER_CELL)})"
        )
    counts = np.zeros((bins, bins), dtype=np.int64)
    np.add.at(counts, (pb, gb), 1)

    def near(i: int, j: int, enough: int) -> FloatArray:
        # A thin cell pools the cells around it, ring by ring, until it has enough pairs: the
        # nearest data there is, rather than one neighbour's figures.
        radius = 0
        while counts[max(0, i - radius) : i + radius + 1, max(0, j - radius) : j + radius + 1].sum() < enough:
            radius += 1
        return scores[(np.abs(pb - i) <= radius) & (np.abs(gb - j) <= radius)]

    location, scale, upper = (np.zeros((bins, bins)) for _ in range(3))
    for i in range(bins):
        for j in range(bins):
            median, q99 = np.quantile(near(i, j, min_cell), [0.5, 0.99])
            wide = near(i, j, MIN_UPPER_CELL)
            q99_wide, q999_wide = np.quantile(wide, [0.99, 0.999])
            location[i, j] = median
            scale[i, j] = max((q99 - median) / TAIL_Z[0], 1e-4)
            upper[i, j] = max((q999_wide - q99_wide) / (TAIL_Z[1] - TAIL_Z[0]), 1e-4)
    # Fewer cylinders never make a lighter tail (LSS averages fewer similarities, so chance
    # scores spread wider): each cell's scales are at least those of every cell with more
    # cylinders on either side.
    for table in (scale, upper):
        for i in range(bins - 1, -1, -1):
            for j in range(bins - 1, -1, -1):
                below = table[i + 1, j] if i + 1 < bins else 0.0
                right = table[i, j + 1] if j + 1 < bins else 0.0
                table[i, j] = max(table[i, j], below, right)
    return location, scale, upper


def normalised_pair_scores(pairs: PairScores, model: EvidenceModel) -> FloatArray:
    """Each pair's count-normalised, cohort-shifted z under ``model`` (the LLR curves' input;
    the cohort is the pair's row)."""
    z = normalised_scores(
        torch.from_numpy(pairs.score.astype(np.float32)),
        torch.from_numpy(pairs.probe_count),
        torch.from_numpy(pairs.gallery_count),
        model,
    ).numpy()
    rows, inverse, sizes = np.unique(pairs.row, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    slot = np.arange(order.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    table = torch.full((rows.size, int(sizes.max(initial=1))), float("nan"))
    table[torch.from_numpy(inverse[order]), torch.from_numpy(slot)] = torch.from_numpy(z[order])
    compared = ~torch.isnan(table)
    shift = cohort_shift(table.unsqueeze(-1), compared.unsqueeze(-1), model.min_cohort, model.cohort_margin)
    shifted: FloatArray = (z - shift[:, 0, 0].numpy()[inverse]).astype(np.float64)
    return shifted


def _pav(values: FloatArray, weights: FloatArray) -> FloatArray:
    """Weighted isotonic (non-decreasing) regression by pooling adjacent violators."""
    blocks: list[list[float]] = []  # [value, weight, length]
    for v, w in zip(values.tolist(), weights.tolist(), strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            total = w1 + w2
            blocks.append([(v1 * w1 + v2 * w2) / total if total else (v1 + v2) / 2, total, n1 + n2])
    return np.concatenate([np.full(int(n), v) for v, _, n in blocks])


def _llr_curve(z: FloatArray, genuine: BoolArray, edges: FloatArray) -> FloatArray:
    """LLR at the centres of the bins between ``edges`` (outer bins open), monotone."""
    bins = edges.size + 1
    index = np.searchsorted(edges, z, side="right")
    g = np.bincount(index[genuine], minlength=bins).astype(np.float64)
    i = np.bincount(index[~genuine], minlength=bins).astype(np.float64)
    # Half a pseudo-count per bin keeps empty bins finite and pulls thin ones towards no evidence.
    ratio = np.log((g + 0.5) / (g.sum() + 0.5 * bins)) - np.log((i + 0.5) / (i.sum() + 0.5 * bins))
    return _pav(ratio, g + i)


def _strictly_increasing(knots: FloatArray, values: FloatArray) -> FloatArray:
    out = values.copy()
    for k in range(1, out.size):
        out[k] = max(out[k], out[k - 1] + MIN_SLOPE * (knots[k] - knots[k - 1]))
    return out


def fit_evidence_model(
    pairs: PairScores,
    *,
    count_edges: tuple[int, ...] = COUNT_EDGES,
    min_cell: int = MIN_CELL,
    min_cohort: int = 20,
    source: str = "",
) -> EvidenceModel:
    """The evidence model of ``pairs`` (which need genuine and impostor entries)."""
    if not pairs.genuine.any() or pairs.genuine.all():
        raise ValueError("fitting needs both genuine and impostor comparisons")
    location, scale, upper = _count_tables(pairs, count_edges, min_cell)
    flat_knots = (0.0, 1.0)
    provisional = EvidenceModel(
        count_edges=count_edges,
        location=tuple(tuple(r) for r in location.tolist()),
        scale=tuple(tuple(r) for r in scale.tolist()),
        upper=tuple(tuple(r) for r in upper.tolist()),
        knots=flat_knots,
        llr=tuple((0.0, 1.0) for _ in range(10)),
        min_cohort=min_cohort,
    )
    z = normalised_pair_scores(pairs, provisional)
    edges = np.unique(
        np.round(
            np.concatenate(
                [
                    np.quantile(z[~pairs.genuine], _IMPOSTOR_EDGES),
                    np.quantile(z[pairs.genuine], _GENUINE_EDGES),
                ]
            ),
            3,
        )
    )
    # Knots at the bin centres; the open outer bins get a centre one neighbouring width out.
    inner = (edges[1:] + edges[:-1]) / 2
    knots = np.concatenate(
        [[edges[0] - (edges[1] - edges[0]) / 2], inner, [edges[-1] + (edges[-1] - edges[-2]) / 2]]
    )
    pooled = _llr_curve(z, pairs.genuine, edges)
    curves = []
    for position in range(1, 11):
        at = pairs.position == position
        if int((pairs.genuine & at).sum()) >= MIN_GENUINE_PER_POSITION and (~pairs.genuine & at).any():
            curve = _llr_curve(z[at], pairs.genuine[at], edges)
        else:
            curve = pooled
        curves.append(tuple(_strictly_increasing(knots, curve).tolist()))
    return EvidenceModel(
        count_edges=count_edges,
        location=provisional.location,
        scale=provisional.scale,
        upper=provisional.upper,
        knots=tuple(knots.tolist()),
        llr=tuple(curves),
        min_cohort=min_cohort,
        source=source,
    )


def impostor_sums_by_fingers(
    pairs: PairScores, model: EvidenceModel, *, draws: int = 1, seed: int = 0
) -> list[FloatArray]:
    """Fused impostor scores over 1, 2, ... 10 fingers compared: for each count n, the sums of
    ``draws`` random n-finger subsets of every impostor subject pair that has n common fingers
    (a booking with n usable fingers meets the gallery on n fingers). One draw by default: a
    tail fit treats its points as independent, and several subsets of one pair are not."""
    llr, genuine = _pair_llrs(pairs, model)
    rng = np.random.default_rng(seed)
    per_draw = [sums_by_fingers(llr[~genuine], rng) for _ in range(draws)]
    # Ten fingers have one subset only: a second draw would copy the first.
    return [np.concatenate([d[n - 1] for d in (per_draw if n < 10 else per_draw[:1])]) for n in range(1, 11)]


def _pair_llrs(pairs: PairScores, model: EvidenceModel) -> tuple[FloatArray, BoolArray]:
    """Per subject pair of the blocks, ``[pairs, 10]`` finger LLRs (NaN where not compared)."""
    if not len(pairs):
        return np.zeros((0, 10)), np.zeros(0, bool)
    z = torch.from_numpy(normalised_pair_scores(pairs, model).astype(np.float32))
    llr = llr_at(z, torch.from_numpy(pairs.position), model).double().numpy()
    subjects = int(max(pairs.probe_subject.max(), pairs.gallery_subject.max())) + 1
    keys, inverse = np.unique(pairs.probe_subject * subjects + pairs.gallery_subject, return_inverse=True)
    table = np.full((keys.size, 10), np.nan)
    table[inverse, pairs.position - 1] = llr
    return table, (keys // subjects) == (keys % subjects)
