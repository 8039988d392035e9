"""Hand-run speed check: ``python -m gpu_kernels.bench [--subjects 300] [--minutiae 40] [--device cpu]``.

Scores one ten-print probe against a gallery of random ten-prints (uniform minutiae, every
finger present) and prints the encoding time and the median of five scoring runs. Not a test:
timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from gpu_kernels.fusion import encode_tenprints, score_tenprints
from gpu_kernels.params import MccParams
from minutiae.template import FingerTemplate, TenPrintTemplates


def _random_tenprint(rng: np.random.Generator, minutiae: int) -> TenPrintTemplates:
    fingers = {}
    for position in range(1, 11):
        xy = rng.uniform(40, 360, (minutiae, 2))
        theta = rng.uniform(0, 2 * math.pi, minutiae)
        fingers[position] = FingerTemplate.from_arrays(
            np.c_[xy, theta], width=400, height=400, finger_position=position
        )
    return TenPrintTemplates(fingers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=300)
    parser.add_argument("--minutiae", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--float", action="store_true", help="float variant instead of bit-based")
    args = parser.parse_args()
    device = torch.device(args.device)
    params = MccParams(binary=not args.float)
    rng = np.random.default_rng(0)

    start = time.perf_counter()
    gallery = encode_tenprints(
        [_random_tenprint(rng, args.minutiae) for _ in range(args.subjects)], params, device
    )
    probe = encode_tenprints([_random_tenprint(rng, args.minutiae)], params, device)
    _sync(device)
    encoded = time.perf_counter() - start

    score_tenprints(probe, gallery, params)  # warm-up
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        score_tenprints(probe, gallery, params)
        _sync(device)
        runs.append(time.perf_counter() - start)
    print(
        f"device={device} threads={torch.get_num_threads()} subjects={args.subjects} "
        f"minutiae/finger={args.minutiae} binary={params.binary}\n"
        f"encode gallery: {encoded:.2f} s ({gallery.nbytes / 1e6:.1f} MB)\n"
        f"score 1 probe x {args.subjects} subjects: median {statistics.median(runs):.3f} s "
        f"(runs: {', '.join(f'{r:.3f}' for r in runs)})"
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
