"""Generator statistics as one PNG: ``python -m evaluation.figures DATA REPORT.json OUT.png --seed S``.

Panels: minutiae per template (gallery rolled vs probe plain) read from the data set, the
pattern-class mix per finger of the masters the generator made for ``--seed``, and the genuine
and impostor single-finger score histograms from an ``fedprint eval`` report.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from minutiae.dataset import read_dataset
from synthetic.fingers import PatternClass
from synthetic.population import person_master_fingers

_FINGERS = ("thumb", "index", "middle", "ring", "little")


def generator_statistics(data: Path, report: Path, out: Path, *, seed: int, persons: int = 500) -> None:
    """Writes the three-panel statistics PNG to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = read_dataset(data)
    rolled = [t.count for c in dataset.gallery for t in c.tenprint.fingers.values()]
    plain = [t.count for c in dataset.probes for t in c.tenprint.fingers.values()]
    mix: dict[str, Counter[PatternClass]] = {f: Counter() for f in _FINGERS}
    for person in range(persons):
        for m in person_master_fingers(seed, person):
            mix[_FINGERS[(m.template.finger_position - 1) % 5]][m.flow.pattern] += 1
    hist = json.loads(report.read_text())["histograms"]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    bins = np.arange(0, 101, 4)
    axes[0].hist([rolled, plain], bins=bins, label=["gallery (rolled)", "probe (plain)"])
    axes[0].set_title(f"minutiae per template (mean {np.mean(rolled):.0f} / {np.mean(plain):.0f})")
    axes[0].set_xlabel("minutiae")
    axes[0].legend()
    bottom = np.zeros(len(_FINGERS))
    for pattern in PatternClass:
        share = np.array([mix[f][pattern] / max(1, sum(mix[f].values())) for f in _FINGERS])
        axes[1].bar(_FINGERS, share, bottom=bottom, label=pattern.value)
        bottom += share
    axes[1].set_title(f"pattern class by finger ({persons} persons, both hands)")
    axes[1].legend(fontsize=7, loc="lower right")
    for name in ("genuine", "impostor"):
        edges = np.array(hist[name]["edges"])
        counts = np.array(hist[name]["counts"], dtype=np.float64)
        axes[2].stairs(
            counts / max(1.0, counts.sum()), edges, label=f"{name} ({int(counts.sum())})", fill=False
        )
    axes[2].set_title("single-finger MCC scores (share per bin)")
    axes[2].set_xlabel("MCC score (LSS-R); the last bin holds the tail")
    axes[2].set_yscale("log")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, required=True, help="the seed `fedprint synth` used")
    args = parser.parse_args()
    generator_statistics(args.data, args.report, args.out, seed=args.seed)


if __name__ == "__main__":
    main()
