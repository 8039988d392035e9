"""Enrolment cost in the in-memory gallery: time per subject of ``Gallery.add`` when N subjects
arrive 10 at a time, at several gallery sizes, for this code and (optionally) another version
of ``nodes/gallery/gallery.py`` timed in the same process.

Cylinders are encoded once (30 synthetic subjects) and added again under fresh ids, so only the
gallery's own work is timed (encoding and the store are the same for every version)::

    git show main:nodes/gallery/gallery.py > /tmp/gallery_main.py
    OMP_NUM_THREADS=1 python -m bench.gallery_append --against /tmp/gallery_main.py
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nodes.gallery.config import ShortlistConfig
from nodes.gallery.gallery import Gallery
from synthetic.population import generate_population

BATCH = 10


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("gallery_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Gallery


def per_subject_us(gallery_class: Any, batches: list[Any], subjects: int, shortlist: bool) -> float:
    """Microseconds per subject to enrol ``subjects`` in calls of :data:`BATCH`."""
    gallery = gallery_class(torch.device("cpu"), shortlist=ShortlistConfig(enabled=shortlist))
    started = time.perf_counter()
    for b in range(subjects // BATCH):
        gallery.add([f"S{b}-{i}" for i in range(BATCH)], batches[b % len(batches)])
    elapsed = time.perf_counter() - started
    assert len(gallery) == subjects
    return elapsed / subjects * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, help="another version of nodes/gallery/gallery.py")
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    args = parser.parse_args()
    torch.set_num_threads(1)
    population = generate_population(seed=11, persons=80, bookings=1)
    encoder = Gallery(torch.device("cpu"))
    batches = [
        encoder.encode([e.tenprint for e in population.iafis[lo : lo + BATCH]])
        for lo in range(0, 3 * BATCH, BATCH)
    ]
    versions: dict[str, Any] = {"this": Gallery}
    if args.against is not None:
        versions = {"other": _load(args.against), **versions}
    for shortlist in (False, True):
        for size in args.sizes:
            figures = ", ".join(
                f"{name} {per_subject_us(cls, batches, size, shortlist):,.0f} us"
                for name, cls in versions.items()
            )
            print(f"shortlist {'on ' if shortlist else 'off'}  N={size:>6,}: {figures} per subject")


if __name__ == "__main__":
    main()
