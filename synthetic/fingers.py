"""Synthetic fingers: master minutiae sets shaped by ridge flow, and impressions of them.

A *master* is the finger itself: every minutia the finger has, in a canonical pose.
An *impression* is what one capture of that finger yields: the master moved, rotated,
elastically distorted, cut to the contact area, with minutiae lost and spurious ones
added, and every position and angle perturbed. Two impressions of one finger are never
identical, and neither is the master; that is what makes the data honest for matching.

What is modelled (ridge-count consistency and images are not):

- the finger is an ellipse of about 300x380 px (500 ppi) in a 400x500 image;
- the ridge orientation field follows the Sherlock-Monro zero-pole model: each core adds
  half the angle of ``z - core``, each delta subtracts half the angle of ``z - delta``,
  giving loops (one core, one delta), whorls (two cores, two deltas), tented arches
  (core above a close delta) and plain arches (a smooth bump, no singularity);
- pattern classes follow per-finger frequencies (:data:`PATTERN_FREQUENCIES`), and master
  minutia counts depend on the finger (about 45-70 on average, 25-90 in all);
- impressions follow a :class:`Difficulty` preset (``easy``, ``realistic``, ``hard``), rolled
  or plain (a plain touch covers less of the finger);
- minutiae are spread with a minimum spacing (real minutiae are rarely closer than
  about a ridge period, ~10 px at 500 ppi) and point along the local ridge orientation.

All angles follow :mod:`minutiae.template`: radians, counter-clockwise as viewed, y down.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from minutiae.template import FingerTemplate, MinutiaKind

IMAGE_WIDTH = 400
IMAGE_HEIGHT = 500
RESOLUTION_PPI = 500

#: Finger ellipse semi-axes (x, y) in pixels for a thumb; other fingers are scaled down.
FINGER_SEMI_AXES = (150.0, 190.0)
#: Relative finger size by FGP position (index 0 unused): thumbs largest, little fingers smallest.
_FINGER_SCALE = (1.0, 1.0, 0.93, 0.95, 0.9, 0.8, 1.0, 0.93, 0.95, 0.9, 0.8)
#: Master minutiae per finger: rolled prints of real fingers show roughly 20 to 80 (more on
#: thumbs, fewer on little fingers); a master holds what a full roll could show.
MIN_MINUTIAE, MAX_MINUTIAE = 25, 90
#: Mean master count by FGP position (index 0 unused); spread :data:`MINUTIAE_SD`.
_MEAN_MINUTIAE = (0, 68, 58, 58, 56, 48, 68, 58, 58, 56, 48)
MINUTIAE_SD = 10.0
#: Minimum distance between master minutiae, about one ridge period at 500 ppi.
MIN_SPACING = 10.0
#: An impression with fewer minutiae is captured again (a booking officer re-rolls a bad print).
MIN_IMPRESSION_MINUTIAE = 12
#: The two minutia types masters and spurious minutiae get (uint8 codes, as templates hold them).
_KIND_CODES = np.array([MinutiaKind.RIDGE_ENDING, MinutiaKind.BIFURCATION], np.uint8)
#: A type after an ending/bifurcation confusion, indexed by the type (OTHER stays OTHER).
_CONFUSED = np.array([MinutiaKind.OTHER, MinutiaKind.BIFURCATION, MinutiaKind.RIDGE_ENDING], np.uint8)


@dataclass(frozen=True)
class Difficulty:
    """How much an impression differs from its master: the knobs of :func:`impression`.

    Ranges are uniform draws per impression; ``*_bad`` terms are added in proportion to
    ``1 - quality``, so poor captures lose more and gain more noise.
    """

    name: str
    drop: tuple[float, float]  # share of minutiae an extractor misses on a good capture
    drop_bad: float
    spurious: float  # Poisson mean of false minutiae on a good capture
    spurious_bad: float
    position_noise: float  # px, σ on a good capture
    angle_noise_deg: float  # σ on a good capture
    distortion: tuple[float, float]  # px of elastic displacement at the contact border
    rotation_deg: float  # σ, clipped at 2.5σ
    translation: float  # px σ, clipped at 2.5σ
    rolled_area: tuple[float, float]  # contact ellipse scale of a rolled impression
    plain_area: tuple[float, float]  # contact ellipse scale of a plain (flat) impression
    contact_offset: float  # px σ of the contact centre from the finger centre
    type_flip: float
    quality: tuple[float, float]  # per-impression quality range drawn by the population


#: Presets for ``--difficulty``. ``realistic`` is tuned so that this project's single-finger MCC
#: (LSS-R, the nodes' matcher) lands at an EER of a few per cent (rolled gallery against plain
#: probes), the range open matchers show on public benchmarks; ``easy`` is the generator of
#: version 1, ``hard`` a poor-capture booking station. Version 3 made ``realistic`` harder when
#: the matcher moved from LSS to LSS-R: the version-2 preset let LSS-R reach 0.6 % EER, so the
#: elastic distortion, localisation noise and spurious minutiae went up to typical extractor
#: and rolled-versus-plain figures (100 subjects: 0.6 % -> about 2-3 %).
DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(
        name="easy",
        drop=(0.10, 0.15),
        drop_bad=0.10,
        spurious=1.0,
        spurious_bad=3.0,
        position_noise=2.0,
        angle_noise_deg=5.0,
        distortion=(3.0, 8.0),
        rotation_deg=8.0,
        translation=12.0,
        rolled_area=(0.85, 1.05),
        plain_area=(0.85, 1.05),
        contact_offset=15.0,
        type_flip=0.05,
        quality=(0.5, 1.0),
    ),
    "realistic": Difficulty(
        name="realistic",
        drop=(0.14, 0.20),
        drop_bad=0.10,
        spurious=2.5,
        spurious_bad=4.0,
        position_noise=3.0,
        angle_noise_deg=6.0,
        distortion=(5.0, 12.0),
        rotation_deg=10.0,
        translation=12.0,
        rolled_area=(0.85, 1.05),
        plain_area=(0.75, 0.95),
        contact_offset=20.0,
        type_flip=0.08,
        quality=(0.45, 1.0),
    ),
    "hard": Difficulty(
        name="hard",
        drop=(0.15, 0.25),
        drop_bad=0.15,
        spurious=3.0,
        spurious_bad=5.0,
        position_noise=3.0,
        angle_noise_deg=7.0,
        distortion=(5.0, 12.0),
        rotation_deg=12.0,
        translation=15.0,
        rolled_area=(0.8, 1.0),
        plain_area=(0.6, 0.8),
        contact_offset=25.0,
        type_flip=0.12,
        quality=(0.35, 0.95),
    ),
}
#: Presets no calibration shipped with the project was fitted on (it was fitted on ``realistic``
#: and ``hard``), for checking that a node's thresholds hold on prints unlike those: a
#: ``smudged`` station (heavy localisation noise, many false minutiae, strong distortion, types
#: often confused) and a ``sparse`` one (small contact areas and many missed minutiae, so fewer
#: and smaller templates).
DIFFICULTIES["smudged"] = Difficulty(
    name="smudged",
    drop=(0.18, 0.26),
    drop_bad=0.12,
    spurious=6.0,
    spurious_bad=8.0,
    position_noise=4.5,
    angle_noise_deg=10.0,
    distortion=(8.0, 16.0),
    rotation_deg=14.0,
    translation=15.0,
    rolled_area=(0.8, 1.0),
    plain_area=(0.65, 0.85),
    contact_offset=25.0,
    type_flip=0.25,
    quality=(0.35, 0.95),
)
DIFFICULTIES["sparse"] = Difficulty(
    name="sparse",
    drop=(0.30, 0.42),
    drop_bad=0.15,
    spurious=1.5,
    spurious_bad=3.0,
    position_noise=2.5,
    angle_noise_deg=6.0,
    distortion=(4.0, 10.0),
    rotation_deg=10.0,
    translation=15.0,
    rolled_area=(0.7, 0.9),
    plain_area=(0.5, 0.7),
    contact_offset=25.0,
    type_flip=0.08,
    quality=(0.3, 0.9),
)
REALISTIC = DIFFICULTIES["realistic"]


class PatternClass(enum.Enum):
    """Henry pattern classes the orientation model can produce."""

    ARCH = "arch"
    TENTED_ARCH = "tented_arch"
    LEFT_LOOP = "left_loop"
    RIGHT_LOOP = "right_loop"
    WHORL = "whorl"


@dataclass(frozen=True)
class RidgeFlow:
    """A ridge orientation field: singular points in image coordinates, and the pattern they make."""

    pattern: PatternClass
    cores: tuple[tuple[float, float], ...]
    deltas: tuple[tuple[float, float], ...]
    centre: tuple[float, float]

    def orientation(self, x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Ridge orientation (radians mod π, counter-clockwise as viewed) at image points ``[N]``."""
        if self.pattern is PatternClass.ARCH:
            # Ridges v = h·exp(-u²/2s²) (v upwards): the slope of that bump is the orientation.
            cx, cy = self.centre
            u = x - cx
            h = 80.0 * np.exp(-(((y - cy) / 140.0) ** 2))
            s = 90.0
            slope = -u / s**2 * h * np.exp(-(u**2) / (2 * s**2))
            return np.arctan(slope)
        # Angles in the viewed frame (y up), so they come out counter-clockwise as viewed: the
        # argument of (x - cx) + i(cy - y), taken with arctan2 rather than complex arithmetic.
        theta = np.zeros_like(x)
        for cx, cy in self.cores:
            theta += 0.5 * np.arctan2(cy - y, x - cx)
        for dx, dy in self.deltas:
            theta -= 0.5 * np.arctan2(dy - y, x - dx)
        return np.mod(theta, math.pi)


#: Pattern class frequencies (arch, tented arch, whorl, ulnar loop, radial loop) by finger
#: (thumb, index, middle, ring, little), rounded from published ten-print surveys (NIST SD4's
#: natural mix and the FBI's per-finger tables): whorls peak on thumbs and ring fingers, radial
#: loops and arches on index fingers, ulnar loops dominate middle and little fingers.
PATTERN_FREQUENCIES: dict[str, tuple[float, float, float, float, float]] = {
    "thumb": (0.03, 0.01, 0.43, 0.51, 0.02),
    "index": (0.10, 0.07, 0.33, 0.32, 0.18),
    "middle": (0.07, 0.03, 0.20, 0.68, 0.02),
    "ring": (0.02, 0.01, 0.46, 0.50, 0.01),
    "little": (0.02, 0.01, 0.14, 0.82, 0.01),
}
_FINGER_NAMES = (
    "",
    "thumb",
    "index",
    "middle",
    "ring",
    "little",
    "thumb",
    "index",
    "middle",
    "ring",
    "little",
)


def _normalised(weights: tuple[float, ...]) -> npt.NDArray[np.float64]:
    w = np.array(weights)
    out: npt.NDArray[np.float64] = w / w.sum()
    return out


# Normalised once per finger rather than for every master: the same probabilities, less work.
_PATTERN_WEIGHTS = {
    position: _normalised(PATTERN_FREQUENCIES[_FINGER_NAMES[position]]) for position in range(1, 11)
}


def _pattern_for(rng: np.random.Generator, position: int) -> PatternClass:
    # Loops lean ulnar: a right-hand ulnar loop opens towards the little finger, i.e. to the
    # right as viewed (a right loop); on the left hand (FGP 6-10) it is a left loop.
    right_hand = 1 <= position <= 5
    ulnar, radial = (
        (PatternClass.RIGHT_LOOP, PatternClass.LEFT_LOOP)
        if right_hand
        else (PatternClass.LEFT_LOOP, PatternClass.RIGHT_LOOP)
    )
    classes = [PatternClass.ARCH, PatternClass.TENTED_ARCH, PatternClass.WHORL, ulnar, radial]
    return classes[int(rng.choice(len(classes), p=_PATTERN_WEIGHTS[position]))]


def ridge_flow(rng: np.random.Generator, pattern: PatternClass, centre: tuple[float, float]) -> RidgeFlow:
    """Places the singular points of ``pattern`` around the finger centre."""
    cx, cy = centre
    core = (cx + rng.normal(0, 12), cy - 30 + rng.normal(0, 15))
    if pattern is PatternClass.ARCH:
        return RidgeFlow(pattern, (), (), (cx, cy + rng.normal(0, 20)))
    if pattern is PatternClass.TENTED_ARCH:
        delta = (core[0] + rng.normal(0, 8), core[1] + rng.uniform(60, 90))
        return RidgeFlow(pattern, (core,), (delta,), centre)
    if pattern in (PatternClass.LEFT_LOOP, PatternClass.RIGHT_LOOP):
        # A left loop opens to the left, so its delta sits below and to the right of the core.
        side = 1.0 if pattern is PatternClass.LEFT_LOOP else -1.0
        delta = (core[0] + side * rng.uniform(80, 130), core[1] + rng.uniform(90, 140))
        return RidgeFlow(pattern, (core,), (delta,), centre)
    spread = rng.uniform(12, 30)
    tilt = rng.uniform(0, math.pi)
    cores = (
        (core[0] + spread * math.cos(tilt), core[1] + spread * math.sin(tilt)),
        (core[0] - spread * math.cos(tilt), core[1] - spread * math.sin(tilt)),
    )
    deltas = (
        (core[0] - rng.uniform(90, 130), core[1] + rng.uniform(90, 140)),
        (core[0] + rng.uniform(90, 130), core[1] + rng.uniform(90, 140)),
    )
    return RidgeFlow(pattern, cores, deltas, centre)


def _spaced_points(
    rng: np.random.Generator, count: int, centre: tuple[float, float], axes: tuple[float, float]
) -> npt.NDArray[np.float64]:
    """Up to ``count`` points uniform in the ellipse, none closer than :data:`MIN_SPACING` (dart throwing).

    A candidate is dropped when it falls too close to any earlier candidate, kept or not:
    slightly stricter than classic dart throwing, but one vectorised step instead of a loop,
    and at these densities three candidates per wanted point leave plenty.
    """
    candidates = 3 * count
    r = np.sqrt(rng.uniform(0, 1, candidates))
    phi = rng.uniform(0, 2 * math.pi, candidates)
    x = centre[0] + axes[0] * r * np.cos(phi)
    y = centre[1] + axes[1] * r * np.sin(phi)
    # Only pairs less than MIN_SPACING apart in x can be close, a few per candidate: sort by x
    # and test those pairs alone instead of the full candidates x candidates matrix. The
    # distance test is the same expression on the same pairs, so the points are too.
    order = np.argsort(x)
    xs = x[order]
    first = np.arange(1, candidates + 1)  # sorted index of each candidate's first right neighbour
    # The slack keeps every pair whose rounded x difference is below MIN_SPACING.
    width = np.searchsorted(xs, xs + (MIN_SPACING + 1e-6), side="right") - first
    a = np.repeat(np.arange(candidates), width)
    b = np.arange(len(a)) - np.repeat(np.cumsum(width) - width - first, width)
    i, j = order[a], order[b]
    dx, dy = x[i] - x[j], y[i] - y[j]
    close = dx * dx + dy * dy < MIN_SPACING**2
    keep = np.ones(candidates, bool)
    keep[np.maximum(i[close], j[close])] = False  # the later candidate of a close pair goes
    chosen: npt.NDArray[np.float64] = np.column_stack([x[keep], y[keep]])[:count]
    return chosen


@dataclass(frozen=True)
class MasterFinger:
    """A synthetic finger: its master minutiae and the ridge flow (pattern, core, delta) that shaped them."""

    template: FingerTemplate
    flow: RidgeFlow


def master_with_flow(rng: np.random.Generator, position: int) -> MasterFinger:
    """The master minutiae of one synthetic finger at FGP ``position`` (1-10), with its ridge flow."""
    scale = _FINGER_SCALE[position] * rng.uniform(0.92, 1.05)
    axes = (FINGER_SEMI_AXES[0] * scale, FINGER_SEMI_AXES[1] * scale)
    centre = (IMAGE_WIDTH / 2 + rng.normal(0, 6), IMAGE_HEIGHT / 2 + rng.normal(0, 6))
    flow = ridge_flow(rng, _pattern_for(rng, position), centre)
    mean = _MEAN_MINUTIAE[position]
    count = min(max(round(rng.normal(mean, MINUTIAE_SD)), MIN_MINUTIAE), MAX_MINUTIAE)
    pts = _spaced_points(rng, count, centre, axes)
    n = len(pts)
    # A minutia points along its ridge one way or the other; the field only fixes the axis.
    theta = flow.orientation(pts[:, 0], pts[:, 1]) + math.pi * rng.integers(0, 2, n) + rng.normal(0, 0.05, n)
    # Ridge endings slightly outnumber bifurcations in extracted minutiae of real prints.
    kinds = np.where(rng.uniform(size=n) < 0.55, _KIND_CODES[0], _KIND_CODES[1])
    template = FingerTemplate.from_arrays(
        np.column_stack([pts, theta]),
        width=IMAGE_WIDTH,
        height=IMAGE_HEIGHT,
        kinds=kinds,
        quality=rng.integers(60, 101, n),
        resolution_ppi=RESOLUTION_PPI,
        finger_position=position,
    )
    return MasterFinger(template, flow)


def master_finger(rng: np.random.Generator, position: int) -> FingerTemplate:
    """The master minutiae of one synthetic finger at FGP ``position`` (1-10), in a 400x500 image."""
    return master_with_flow(rng, position).template


def _smooth_field(rng: np.random.Generator) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Random low-frequency sine components (wave vectors, phases) for an elastic displacement field."""
    k = rng.normal(0, 1.0 / 120.0, size=(3, 2, 2))  # 3 components x 2 output axes x 2 input axes
    phase = rng.uniform(0, 2 * math.pi, size=(3, 2))
    return k, phase


def _displace(
    xy: npt.NDArray[np.float64],
    centre: npt.NDArray[np.float64],
    radius: float,
    amplitude: float,
    field: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]],
) -> npt.NDArray[np.float64]:
    """Elastic distortion: a smooth field whose strength grows with the squared distance from the centre.

    Skin hardly moves where the finger presses hardest (the centre) and stretches most at the
    borders of the contact area, as in Cappelli, Maio and Maltoni's distortion model.
    """
    k, phase = field
    rel = xy - centre
    growth = np.minimum((np.hypot(rel[:, 0], rel[:, 1]) / radius) ** 2, 1.5)
    waves = np.sin(np.einsum("cai,ni->nca", k, rel) + phase)  # [N, component, axis]
    # The mean of the three components, added in order: the same sum as a reduction over
    # the middle axis, without its strided loop.
    wave = (waves[:, 0] + waves[:, 1] + waves[:, 2]) / 3.0
    out: npt.NDArray[np.float64] = xy + amplitude * growth[:, None] * wave
    return out


def impression(
    rng: np.random.Generator,
    master: FingerTemplate,
    *,
    quality: float = 0.8,
    difficulty: Difficulty | None = None,
    plain: bool = False,
) -> FingerTemplate:
    """One capture of ``master``: moved, rotated, distorted, cropped, with missing and spurious minutiae.

    ``quality`` in [0, 1] (1 = excellent) scales the damage within ``difficulty`` (default
    ``easy``, the version-1 behaviour): more minutiae dropped, more spurious ones, more
    position and angle noise, a smaller contact area. A ``plain`` (flat, unrolled) impression
    touches a smaller area than a rolled one, so it keeps fewer minutiae. Rotation,
    translation and the elastic distortion (growing away from the contact centre) do not
    depend on quality. Everything stays inside the image; minutiae come out in a shuffled
    order, as an extractor would list them. A capture with fewer than
    :data:`MIN_IMPRESSION_MINUTIAE` minutiae is taken again.
    """
    difficulty = difficulty or DIFFICULTIES["easy"]
    if not 0.0 <= quality <= 1.0:
        raise ValueError(f"quality {quality} outside [0, 1]")
    best: FingerTemplate | None = None
    for _ in range(10):
        attempt = _one_impression(rng, master, quality, difficulty, plain)
        if attempt.count >= MIN_IMPRESSION_MINUTIAE:
            return attempt
        if best is None or attempt.count > best.count:
            best = attempt
    assert best is not None
    if best.count == 0:
        raise ValueError("the master has too few minutiae to make an impression")
    return best


def _one_impression(
    rng: np.random.Generator, master: FingerTemplate, quality: float, d: Difficulty, plain: bool
) -> FingerTemplate:
    # Hot path (twenty calls per person): scalars stay Python floats and small arrays are built
    # with as few numpy calls as the same arithmetic allows; the random draws and their order
    # are fixed, since they define the output of a seed.
    bad = 1.0 - quality
    w, h = master.width, master.height
    xy = master.minutiae[:, :2].astype(np.float64)
    theta = master.minutiae[:, 2].astype(np.float64)
    n = len(xy)
    centre = xy.mean(axis=0) if n else np.array([w / 2, h / 2])
    spread = np.sqrt(((xy - centre) ** 2).sum(axis=1).max()) if n else 1.0

    # A second point a few pixels along each minutia's direction, carried through the same
    # mapping, gives the new direction including the local rotation of the distortion.
    ahead = xy + 6.0 * np.stack([np.cos(theta), -np.sin(theta)], axis=1)

    # Where the finger touches: the skin is pinned there and stretches most at the border.
    contact_offset = rng.normal(0, d.contact_offset, 2)
    pressed = centre + contact_offset
    field = _smooth_field(rng)
    amplitude = rng.uniform(*d.distortion)
    max_rotation = math.radians(2.5 * d.rotation_deg)
    rotation = min(max(float(rng.normal(0, math.radians(d.rotation_deg))), -max_rotation), max_rotation)
    limit = 2.5 * d.translation
    shift = np.minimum(np.maximum(rng.normal(0, d.translation, 2), -limit), limit)
    c, s = math.cos(rotation), math.sin(rotation)
    # Counter-clockwise as viewed, with y down: x' = c·dx + s·dy, y' = -s·dx + c·dy.
    rot_t = np.array([[c, s], [-s, c]]).T

    # One displacement call for minutiae and their ahead points. The rotation stays one
    # product per half: BLAS may round a row differently in a taller matrix.
    moved = _displace(np.concatenate([xy, ahead]), pressed, spread, amplitude, field) - centre
    new_xy = moved[:n] @ rot_t + centre + shift
    step = moved[n:] @ rot_t + centre + shift - new_xy

    # Contact area: an ellipse around the moved finger centre, smaller for poorer captures.
    contact_centre = centre + shift + contact_offset
    contact_scale = rng.uniform(*(d.plain_area if plain else d.rolled_area)) - 0.15 * bad
    axes = np.array([spread * 0.85, spread * 1.05]) * contact_scale
    rel = (new_xy - contact_centre) / axes
    keep = (rel**2).sum(axis=1) <= 1.0
    drop_rate = rng.uniform(*d.drop) + d.drop_bad * bad
    keep &= rng.uniform(size=n) >= drop_rate

    step = step[keep]
    new_xy, new_theta = new_xy[keep], np.arctan2(-step[:, 1], step[:, 0])
    # Extractors confuse endings and bifurcations (ink, pressure): flip a few types.
    kinds = master.kinds[keep]
    flip = rng.uniform(size=len(kinds)) < d.type_flip + 0.10 * bad
    kinds = np.where(flip, _CONFUSED[kinds], kinds)

    spurious = int(rng.poisson(d.spurious + d.spurious_bad * bad))
    r = np.sqrt(rng.uniform(0, 1, spurious))
    phi = rng.uniform(0, 2 * math.pi, spurious)
    fake_xy = contact_centre + np.stack([axes[0] * r * np.cos(phi), axes[1] * r * np.sin(phi)], axis=1)
    fake_theta = rng.uniform(0, 2 * math.pi, spurious)
    fake_kinds = _KIND_CODES[rng.integers(0, 2, spurious)]  # the draw rng.choice(_KIND_CODES) makes

    all_xy = np.concatenate([new_xy, fake_xy])
    all_theta = np.concatenate([new_theta, fake_theta])
    all_kinds = np.concatenate([kinds, fake_kinds])
    m = len(all_xy)
    all_xy = all_xy + rng.normal(0, d.position_noise * (1.0 + bad), (m, 2))
    all_theta = all_theta + rng.normal(0, math.radians(d.angle_noise_deg * (1.0 + bad)), m)

    x, y = all_xy[:, 0], all_xy[:, 1]
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    chosen = np.flatnonzero(inside)[rng.permutation(int(np.count_nonzero(inside)))]
    all_xy, all_theta, all_kinds = all_xy[chosen], all_theta[chosen], all_kinds[chosen]

    # Minutia quality falls towards the border of the print, where contact is weakest.
    rel = all_xy - contact_centre
    dist = np.hypot(rel[:, 0], rel[:, 1]) / max(float(axes.max()), 1.0)
    q = 100.0 * (0.45 + 0.5 * quality) * (1.0 - 0.4 * np.minimum(dist, 1.0) ** 2)
    q = np.minimum(np.maximum(q + rng.normal(0, 8, len(q)), 1), 100)

    return FingerTemplate.from_arrays(
        np.column_stack([all_xy, all_theta]),
        width=w,
        height=h,
        kinds=all_kinds,
        quality=np.rint(q).astype(np.uint8),
        resolution_ppi=master.resolution_ppi,
        finger_position=master.finger_position,
        finger_quality=round(100 * quality),
    )
