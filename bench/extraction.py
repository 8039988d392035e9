"""``fedprint bench extraction``: how well an extractor reads the generator's minutiae back from images.

For each of N synthetic fingers (FGP positions 1-10 in turn, seeded): the master is rendered
(:func:`synthetic.render.render_master`) and two impressions of it are taken
(:func:`synthetic.render.render_impression`: rotated, moved, cut to a contact area). Each
impression is extracted, and:

- **accuracy**: extracted minutiae are paired one-to-one with the impression's true minutiae by
  the Hungarian assignment on distance, a pair allowed only within ``tolerance_px`` and
  ``tolerance_deg``; *paired* and *missed* are shares of the true minutiae, *spurious* the share
  of extracted minutiae left unpaired;
- **time**: wall-clock seconds of the extractor per image, and ten times that per ten-print (the
  extractor takes one image per network call, so a ten-print costs ten);
- **matching**: the project's single-finger MCC (LSS-R, :func:`gpu_kernels.score_fingers`)
  scores every first impression against every second one; same finger = genuine, others =
  impostor; the EER on extracted minutiae stands beside the EER on the true minutiae of the
  very same impressions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy.optimize import linear_sum_assignment

from evaluation.metrics import equal_error_rate
from extraction import Extractor, LeaderExtractor
from gpu_kernels import MccParams, encode_fingers, score_fingers
from minutiae.template import FingerTemplate
from synthetic.fingers import master_with_flow
from synthetic.render import RenderedFinger, render_impression, render_master

Progress = Callable[[str, int, int], None]

#: Pairing tolerance: about one and a half ridge periods, and the angle tolerance common in
#: extractor evaluations (e.g. FVC-onGoing's minutiae extraction benchmark uses similar bounds).
TOLERANCE_PX = 15.0
TOLERANCE_DEG = 30.0


def _noop(stage: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class ExtractionBenchConfig:
    """What the benchmark renders and how it pairs."""

    fingers: int = 100
    seed: int = 0
    tolerance_px: float = TOLERANCE_PX
    tolerance_deg: float = TOLERANCE_DEG
    device: str = "cpu"
    #: Contact area of each impression relative to the finger (rolled prints cover most of it,
    #: plain and partial ones much less), and the elastic distortion at its border, px.
    contact: tuple[float, float] = (0.75, 0.95)
    distortion: tuple[float, float] = (5.0, 12.0)


@dataclass(frozen=True)
class Pairing:
    """One-to-one pairs of true and extracted minutiae: index arrays into each, and the counts."""

    truth_index: npt.NDArray[np.int64]
    extracted_index: npt.NDArray[np.int64]
    true_count: int
    extracted_count: int

    @property
    def paired(self) -> int:
        """Number of pairs."""
        return len(self.truth_index)


def pair_minutiae(
    truth: FingerTemplate,
    extracted: FingerTemplate,
    tolerance_px: float = TOLERANCE_PX,
    tolerance_deg: float = TOLERANCE_DEG,
) -> Pairing:
    """Pairs true with extracted minutiae one-to-one, minimising total distance (Hungarian),
    a pair allowed only within ``tolerance_px`` and ``tolerance_deg`` (directions, not axes)."""
    t, e = truth.minutiae.astype(np.float64), extracted.minutiae.astype(np.float64)
    empty = np.zeros(0, np.int64)
    if len(t) == 0 or len(e) == 0:
        return Pairing(empty, empty, len(t), len(e))
    dist = np.hypot(t[:, None, 0] - e[None, :, 0], t[:, None, 1] - e[None, :, 1])
    dtheta = np.abs(np.angle(np.exp(1j * (t[:, None, 2] - e[None, :, 2]))))
    allowed = (dist <= tolerance_px) & (dtheta <= math.radians(tolerance_deg))
    # Disallowed pairs get a cost no allowed set can reach, then are dropped from the answer.
    cost = np.where(allowed, dist, 1e6)
    rows, cols = linear_sum_assignment(cost)
    ok = allowed[rows, cols]
    return Pairing(rows[ok].astype(np.int64), cols[ok].astype(np.int64), len(t), len(e))


def render_set(
    fingers: int,
    seed: int,
    progress: Progress = _noop,
    contact: tuple[float, float] = (0.75, 0.95),
    distortion: tuple[float, float] = (5.0, 12.0),
) -> list[tuple[RenderedFinger, RenderedFinger]]:
    """Two rendered impressions of each of ``fingers`` synthetic fingers, deterministic by ``seed``."""
    out = []
    for i in range(fingers):
        rng = np.random.default_rng([seed, i])
        master = master_with_flow(rng, 1 + i % 10)
        rendered = render_master(master.flow, master.template, seed=int(rng.integers(2**31)))
        imps = [render_impression(rendered, rng, contact=contact, distortion=distortion) for _ in range(2)]
        out.append((imps[0], imps[1]))
        progress("render", i + 1, fingers)
    return out


def _eer(
    a: list[FingerTemplate], b: list[FingerTemplate], params: MccParams, device: str
) -> tuple[float, Any]:
    scores = score_fingers(encode_fingers(a, params, device), encode_fingers(b, params, device), params).cpu()
    s = scores.numpy().astype(np.float64)
    genuine = np.diag(s)
    impostor = s[~np.eye(len(s), dtype=bool)]
    point = equal_error_rate(genuine, impostor)
    return (point.false_accept + point.false_reject) / 2.0, s


def run_extraction_bench(
    config: ExtractionBenchConfig, extractor: Extractor | None = None, progress: Progress = _noop
) -> dict[str, Any]:
    """Renders, extracts, pairs and matches as the module doc says; returns the JSON-ready result."""
    if config.fingers < 2:
        raise ValueError("the EER needs at least two fingers")
    extractor = extractor or LeaderExtractor()
    t0 = time.perf_counter()
    pairs = render_set(config.fingers, config.seed, progress, config.contact, config.distortion)
    render_seconds = time.perf_counter() - t0
    images = [imp for pair in pairs for imp in pair]

    extracted: list[FingerTemplate] = []
    qualities: list[int] = []
    seconds: list[float] = []
    for k, imp in enumerate(images):
        start = time.perf_counter()
        (finger,) = extractor.extract([imp.image], imp.ppi)
        seconds.append(time.perf_counter() - start)
        extracted.append(finger.template)
        qualities.append(finger.quality)
        progress("extract", k + 1, len(images))

    true_count = extracted_count = paired = 0
    for imp, ext in zip(images, extracted, strict=True):
        p = pair_minutiae(imp.truth, ext, config.tolerance_px, config.tolerance_deg)
        true_count += p.true_count
        extracted_count += p.extracted_count
        paired += p.paired

    progress("match", 0, 2)
    params = MccParams()
    truth_a, truth_b = [p[0].truth for p in pairs], [p[1].truth for p in pairs]
    eer_true, s_true = _eer(truth_a, truth_b, params, config.device)
    progress("match", 1, 2)
    eer_ext, s_ext = _eer(extracted[0::2], extracted[1::2], params, config.device)
    progress("match", 2, 2)

    per_image = float(np.mean(seconds))
    n = config.fingers
    return {
        "fingers": n,
        "images": len(images),
        "seed": config.seed,
        "device": config.device,
        "extractor": extractor.name,
        "extractor_version": extractor.version,
        "ppi": images[0].ppi,
        "image_size": list(images[0].image.shape[::-1]),
        "contact": list(config.contact),
        "distortion_px": list(config.distortion),
        "tolerance_px": config.tolerance_px,
        "tolerance_deg": config.tolerance_deg,
        "pairing": "Hungarian on distance, pairs within both tolerances",
        "true_minutiae": true_count,
        "extracted_minutiae": extracted_count,
        "paired": paired,
        "missed": true_count - paired,
        "spurious": extracted_count - paired,
        "paired_rate": paired / max(true_count, 1),
        "missed_rate": (true_count - paired) / max(true_count, 1),
        "spurious_rate": (extracted_count - paired) / max(extracted_count, 1),
        "mean_finger_quality": float(np.mean(qualities)),
        "seconds_per_finger": per_image,
        "seconds_per_finger_p95": float(np.percentile(seconds, 95)),
        "seconds_per_tenprint": 10.0 * per_image,
        "render_seconds_per_finger": render_seconds / n,
        "matcher": f"MCC {params.consolidation}",
        "genuine_pairs": n,
        "impostor_pairs": n * (n - 1),
        "eer_extracted": eer_ext,
        "eer_true": eer_true,
        "genuine_score_median_extracted": float(np.median(np.diag(s_ext))),
        "genuine_score_median_true": float(np.median(np.diag(s_true))),
        "scores": {
            "true": {
                "genuine": np.diag(s_true).tolist(),
                "impostor_mean": float(s_true[~np.eye(n, dtype=bool)].mean()),
            },
            "extracted": {
                "genuine": np.diag(s_ext).tolist(),
                "impostor_mean": float(s_ext[~np.eye(n, dtype=bool)].mean()),
            },
        },
        "_score_matrices": {"true": s_true, "extracted": s_ext},
    }


def plot_scores(result: dict[str, Any], path: Path) -> None:
    """Genuine and impostor score histograms, true minutiae beside extracted ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, eer in zip(axes, ("true", "extracted"), ("eer_true", "eer_extracted"), strict=True):
        s = np.asarray(result["_score_matrices"][key])
        off = ~np.eye(len(s), dtype=bool)
        bins = np.linspace(0.0, max(float(s.max()), 1e-3), 40)
        ax.hist(s[off], bins=bins, density=True, alpha=0.6, label="impostor")
        ax.hist(np.diag(s), bins=bins, density=True, alpha=0.6, label="genuine")
        ax.set_title(f"{key} minutiae: EER {100 * result[eer]:.2f} %")
        ax.set_xlabel("MCC score")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{result['extractor']} {result['extractor_version']} on {result['fingers']} rendered fingers: "
        f"paired {100 * result['paired_rate']:.1f} % at "
        f"{result['tolerance_px']:g} px / {result['tolerance_deg']:g}°"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """The result without its in-memory score matrices (the JSON keeps genuine scores only)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def torch_device_available(name: str) -> bool:
    """Whether ``name`` (``cpu``, ``cuda``) can run the matcher here."""
    return name == "cpu" or (name.startswith("cuda") and torch.cuda.is_available())
