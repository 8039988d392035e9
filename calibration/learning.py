"""Learning a node's impostor tails from its own gallery, without labels.

The shipped calibration was fitted on the project's synthetic ten-prints; a deployment's prints
differ (sensors, capture, population), and its impostor scores with them. Labels are not needed
to measure impostors: two different enrolled subjects are, but for the few duplicates a real
gallery holds, two different people. So a node samples pairs of its own enrolled subjects,
scores them as a search would (per-finger log-likelihood ratios), and fits one impostor tail per
number of fingers compared (:func:`calibration.tails.fit_tail`) on those pairs.

How the sample is drawn, and why:

- **Each unordered pair once.** Up to ``probe_subjects`` enrolled subjects are drawn as
  pseudo-probes (each at most once) and compared with every other subject (or a random
  ``max_candidates`` of them); a pair of two pseudo-probes is kept in one direction only. So no
  subject contributes more than one pseudo-probe's row and one candidate entry per other
  pseudo-probe, and a tail fit, which treats its points as independent, is not fed copies.
- **One random finger subset per pair and finger count**, as a booking with n usable fingers
  meets the gallery on n of them (the same draw as the shipped calibration's fitting).
- **Duplicates are excluded and reported.** A pair scoring, on all its common fingers, above the
  score the prior calibration gives impostors a one-in-a-billion chance of reaching is the same
  person twice: it is left out of every tail and listed (:attr:`ImpostorSample.duplicates`) for
  the gallery administrator. The prior is the conservative reference here: on a deployment's own
  prints impostors score lower than on the prior's, not higher, and a real duplicate scores far
  above any impostor.
- **Rolled against rolled.** Gallery pairs are enrolment impressions on both sides; a booking's
  probe is often plain (fewer minutiae, less area). Impostor scores of fewer minutiae spread less,
  so tails from gallery pairs sit at or above those of plain probes: thresholds learned from them
  hold the stated FPIR for plain probes with room, and cost mates.

The searches themselves (traffic, :class:`TrafficSample`) are the probes' own distribution, plain
and rolled as they come. Every candidate a search returns is an impostor of that probe, except a
mate; a best candidate that stands far apart from the second is taken for the mate and left out
(:meth:`nodes.gallery.learner.CalibrationLearner.observe` says how far, and why not "every
HIT"). A search returns only its top ``k``, so it
tells how many impostors scored above a level only where its ``k``-th candidate scored below that
level: the tail is fitted peaks-over-threshold above a level ``u`` that nine searches in ten
complete (their ``k``-th candidate below it), with ``r(u)`` = the exceedances of those searches
over the subjects they searched. How the two sources combine (``from_traffic``): per finger
count, a traffic tail with enough evidence (``min_searches`` searches and ``min_exceedances``
exceedances) replaces the gallery's; below that, the gallery's stands; without either, the
current one. It is off by default, because measured it errs far on the safe side: a mate the
matcher scores weakly does not stand apart from the impostors, stays in, and fattens the tail
(on the ``sparse`` preset, with one mate in six below the hit threshold, the ten-finger hit
threshold rose from 0.13 to 4.76 where the set's own non-mated searches put it near -3.6). The
shortlist is assumed to keep the impostors that matter (a high impostor it dropped would make
the traffic tail a little light; its mate recall, 97-99.9 %, bounds how often).

How a learned calibration is adopted (:func:`adopt`): only with enough evidence
(``min_subjects`` distinct subjects and ``min_pairs`` pairs per finger count, no fewer than the
shipped calibration rests on), only within bounds (each threshold moves at most ``max_step`` per
update at the node's gallery size, and stays within ``max_below_prior`` / ``max_above_prior`` of
the prior's), never when pinned, and only when the result is a calibration that can be trusted at
every finger count and gallery size (:meth:`calibration.thresholds.Thresholds.problems`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field

from calibration.tails import CalibrationError, fit_gpd, fit_tail, sums_by_fingers
from calibration.thresholds import TailModel, Thresholds

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Per-pair impostor rate above which the prior says a pair is the same person twice.
DUPLICATE_RATE = 1e-9


class LearningPolicy(BaseModel):
    """When and how far a node's thresholds follow its own data (see the module docstring)."""

    enabled: bool = Field(default=True, description="learn impostor tails from the node's own gallery")
    pinned: bool = Field(default=False, description="thresholds never move from the configured ones")
    interval_s: float = Field(default=600.0, gt=0.0, description="seconds between learning passes")
    min_subjects: int = Field(
        default=200, ge=2, description="fewest enrolled subjects a gallery needs to learn from"
    )
    min_pairs: int = Field(
        default=30_000,
        ge=1000,
        description="fewest impostor pairs per finger count a learned tail rests on (the shipped "
        "calibration rests on about 32,000)",
    )
    probe_subjects: int = Field(default=400, ge=2, description="pseudo-probes drawn per learning pass")
    max_candidates: int = Field(
        default=5000, ge=10, description="subjects each pseudo-probe is compared with"
    )
    max_step: float = Field(
        default=4.0, gt=0.0, description="most a threshold moves per update (log-likelihood ratio units)"
    )
    max_below_prior: float = Field(
        default=30.0, ge=0.0, description="lowest a threshold goes, below the prior calibration's"
    )
    max_above_prior: float = Field(
        default=10.0, ge=0.0, description="highest a threshold goes, above the prior calibration's"
    )
    from_traffic: bool = Field(
        default=False,
        description="let tails from the node's own searches replace the gallery's (off: weak mates "
        "among the searches fatten them; see docs/accuracy.md)",
    )
    min_searches: int = Field(
        default=500, ge=10, description="fewest searches of a finger count its traffic tail rests on"
    )
    min_exceedances: int = Field(
        default=100, ge=10, description="fewest impostor scores above the traffic tail's start"
    )
    max_searches: int = Field(
        default=200_000, ge=100, description="searches kept per finger count (the newest)"
    )
    max_pairs: int = Field(
        default=2_000_000, ge=1000, description="gallery pairs kept per finger count (the newest)"
    )
    seed: int = 0


@dataclass(frozen=True)
class Duplicate:
    """Two enrolled subjects that score as the same person: ``score`` on ``fingers`` fingers."""

    first: str
    second: str
    score: float
    fingers: int


@dataclass
class ImpostorSample:
    """Fused impostor scores of gallery pairs, by fingers compared (1-10), and what was left out;
    at most ``max_pairs`` per finger count, the newest (a node learns for as long as it runs)."""

    max_pairs: int = 2_000_000
    sums: list[list[FloatArray]] = field(default_factory=lambda: [[] for _ in range(10)])
    subjects: set[str] = field(default_factory=set)
    duplicates: list[Duplicate] = field(default_factory=list)

    def scores(self, fingers: int) -> FloatArray:
        """Every impostor score for ``fingers`` fingers compared."""
        parts = self.sums[fingers - 1]
        return np.concatenate(parts) if parts else np.zeros(0)

    def pairs(self, fingers: int) -> int:
        return sum(int(p.size) for p in self.sums[fingers - 1])

    def add(
        self,
        llr: FloatArray,
        first: IntArray,
        second: IntArray,
        names: Sequence[str],
        prior: Thresholds,
        rng: np.random.Generator,
    ) -> None:
        """Adds impostor pairs: ``llr [pairs, 10]`` per-finger log-likelihood ratios (NaN where
        a finger is not on both sides) of the subject pairs ``names[first[i]]``,
        ``names[second[i]]``. Pairs the prior calls the same person twice go to
        :attr:`duplicates` instead."""
        if not llr.shape[0]:
            return
        common = (~np.isnan(llr)).sum(1)
        total = np.nansum(llr, axis=1)
        limits = np.array([duplicate_level(prior, f) for f in range(1, 11)])
        duplicate = (common > 0) & (total >= limits[np.clip(common, 1, 10) - 1])
        for i in np.flatnonzero(duplicate):
            self.duplicates.append(
                Duplicate(names[first[i]], names[second[i]], float(total[i]), int(common[i]))
            )
        for f, sums in enumerate(sums_by_fingers(llr[~duplicate], rng), start=1):
            if sums.size:
                kept = self.sums[f - 1]
                kept.append(sums)
                while len(kept) > 1 and self.pairs(f) - kept[0].size >= self.max_pairs:
                    kept.pop(0)
        self.subjects.update(names[int(r)] for r in np.unique(np.concatenate([first, second])))


def duplicate_level(prior: Thresholds, fingers: int) -> float:
    """The score on ``fingers`` fingers that the prior gives an impostor pair a
    :data:`DUPLICATE_RATE` chance to reach; without tails, the prior's hit threshold."""
    tail = prior.tail(fingers)
    return tail.score_at(DUPLICATE_RATE) if tail is not None else prior.hit


@dataclass
class _Searches:
    """The searches of one finger count: impostor scores returned, ``k``-th score, subjects searched."""

    scores: list[FloatArray] = field(default_factory=list)
    kth: list[float] = field(default_factory=list)
    searched: list[int] = field(default_factory=list)


class TrafficSample:
    """Impostor scores of the node's own searches, by the fingers compared (see the module
    docstring): the newest ``max_searches`` searches per finger count."""

    def __init__(self, policy: LearningPolicy) -> None:
        self.policy = policy
        self._by_fingers = [_Searches() for _ in range(10)]
        self._lock = threading.Lock()

    def add(self, fingers: int, impostors: FloatArray, kth: float, searched: int) -> None:
        """One search comparing ``fingers`` fingers: the fused scores of the candidates it
        returned that are taken for impostors, the score of its ``k``-th candidate (-inf when
        it returned fewer than ``k``: then every subject above any level was returned), and
        the subjects it searched."""
        if not 1 <= fingers <= 10 or searched < 1:
            return
        with self._lock:
            kept = self._by_fingers[fingers - 1]
            kept.scores.append(np.asarray(impostors, np.float64))
            kept.kth.append(float(kth))
            kept.searched.append(int(searched))
            if len(kept.kth) > self.policy.max_searches:
                del kept.scores[0], kept.kth[0], kept.searched[0]

    def searches(self, fingers: int) -> int:
        return len(self._by_fingers[fingers - 1].kth)

    def impostors(self, fingers: int) -> list[FloatArray]:
        """The impostor scores kept of each search comparing ``fingers`` fingers, oldest first."""
        with self._lock:
            return list(self._by_fingers[fingers - 1].scores)

    def tail(self, fingers: int, below: TailModel) -> TailModel:
        """The impostor tail of the searches comparing ``fingers`` fingers, its body below the
        fitted tail taken from ``below`` (the gallery's or the current tail); CalibrationError
        when they are too few."""
        with self._lock:
            kept = self._by_fingers[fingers - 1]
            kth, searched = np.array(kept.kth), np.array(kept.searched, np.float64)
            scores = list(kept.scores)
        if kth.size < self.policy.min_searches:
            raise CalibrationError(
                f"{kth.size} searches on {fingers} fingers are too few: need {self.policy.min_searches}"
            )
        start = float(np.quantile(kth, 0.9))
        complete = np.flatnonzero(kth < start)
        excess = np.concatenate([scores[i][scores[i] >= start] for i in complete] or [np.zeros(0)]) - start
        pairs = float(searched[complete].sum())
        if excess.size < self.policy.min_exceedances or pairs <= excess.size:
            raise CalibrationError(
                f"{excess.size} impostor scores of {fingers}-finger searches above {start:.2f}: "
                f"need {self.policy.min_exceedances}"
            )
        rate = excess.size / pairs
        scale, shape = fit_gpd(excess)
        body = [(s, r) for s, r in below.body if s < start and r > rate]
        if not body:
            body = [(start - scale, min(0.5, rate * math.e))]
        return TailModel(
            body=[*body, (start, rate)],
            exceedance=rate,
            threshold=start,
            scale=scale,
            shape=shape,
            pairs=int(pairs),
            tail_pairs=int(excess.size),
        )


def learn_tails(sample: ImpostorSample, policy: LearningPolicy) -> list[TailModel]:
    """One tail per finger count from ``sample``; :class:`CalibrationError` when the sample is
    too thin (fewer subjects or pairs than ``policy`` asks)."""
    if len(sample.subjects) < policy.min_subjects:
        raise CalibrationError(
            f"{len(sample.subjects)} subjects are too few to learn from: need {policy.min_subjects}"
        )
    tails = []
    for fingers in range(1, 11):
        n = sample.pairs(fingers)
        if n < policy.min_pairs:
            raise CalibrationError(
                f"{n} impostor pairs on {fingers} fingers are too few to learn from: need {policy.min_pairs}"
            )
        tails.append(fit_tail(sample.scores(fingers)))
    return tails


def shifted(tail: TailModel, by: float) -> TailModel:
    """``tail`` moved ``by`` along the score axis: every threshold it gives moves by ``by``."""
    return tail.model_copy(
        update={"body": [(s + by, r) for s, r in tail.body], "threshold": tail.threshold + by}
    )


@dataclass(frozen=True)
class Adoption:
    """What :func:`adopt` made of a learned calibration: the thresholds the node now uses, and
    per finger count how far its hit threshold moved at the gallery size (and whether a bound
    held it back)."""

    thresholds: Thresholds
    moves: list[float]
    held: list[bool]


def adopt(
    prior: Thresholds,
    current: Thresholds,
    learned: list[TailModel],
    gallery_size: int,
    policy: LearningPolicy,
    source: str,
) -> Adoption:
    """The calibration a node moves to from ``current`` given ``learned`` tails, within the
    policy's bounds at ``gallery_size``. Per finger count, the learned tail is taken, shifted as
    little as needed for its hit and review thresholds to lie within ``max_step`` of the current
    ones and within the prior's bounds; where no shift can do both (the learned tail's shape is
    far from the current one), the current tail moves ``max_step`` toward it instead, and the
    next updates carry on. :class:`CalibrationError` when the result would not be trustworthy
    (:meth:`Thresholds.problems`), or when either calibration has no tails."""
    if not prior.tails or not current.tails:
        raise CalibrationError("only a calibration with impostor tails can learn")
    tails, moves, held = [], [], []
    for fingers in range(1, 11):
        now, was, base = learned[fingers - 1], current.tail(fingers), prior.tail(fingers)
        assert was is not None and base is not None

        def at(tail: TailModel, fpir: float) -> float:
            return tail.threshold_for(fpir, gallery_size)

        hit_now, hit_was = at(now, prior.hit_fpir), at(was, prior.hit_fpir)
        hit_base = at(base, prior.hit_fpir)
        rev_now, rev_was = at(now, prior.review_fpir), at(was, prior.review_fpir)
        # Shifts of the learned tail that keep both thresholds within a step of the current ones
        # and the hit threshold within the prior's bounds.
        low = max(hit_was - hit_now, rev_was - rev_now) - policy.max_step
        high = min(hit_was - hit_now, rev_was - rev_now) + policy.max_step
        low = max(low, hit_base - policy.max_below_prior - hit_now)
        high = min(high, hit_base + policy.max_above_prior - hit_now)
        if low <= high:
            by = min(max(0.0, low), high)
            tails.append(shifted(now, by))
            moves.append(hit_now + by - hit_was)
            held.append(by != 0.0)
        else:
            wanted = hit_now - hit_was
            step = max(-policy.max_step, min(policy.max_step, wanted))
            floor, ceiling = hit_base - policy.max_below_prior, hit_base + policy.max_above_prior
            step = max(floor - hit_was, min(ceiling - hit_was, step))
            tails.append(shifted(was, step))
            moves.append(step)
            held.append(True)
    thresholds = prior.model_copy(update={"tails": tails, "source": source})
    thresholds = thresholds.for_gallery(gallery_size)
    found = thresholds.problems()
    if found:
        raise CalibrationError("the learned calibration is not trustworthy: " + "; ".join(found[:3]))
    return Adoption(thresholds, moves, held)
