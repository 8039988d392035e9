"""``fedprint bench shortlist DATA``: the two-tier search at gallery scale, on any data set.

The gallery of DATA (standard layout) is encoded once into a memory-mapped cylinder file (the
full tier, :mod:`gpu_kernels.cylinder_file`) and into shortlist codes (the device tier,
:mod:`gpu_kernels.shortlist`); both are kept in ``--workdir`` and reused by later runs on the
same data. Then, for a seeded sample of mated probes:

- **recall@K**: the share of probes whose mate is among the K subjects the shortlist votes, for
  every K asked; the chosen K is the smallest reaching the recall target;
- **rank-1 through the tiers**: full MCC of each probe against its K shortlisted subjects, read
  from the cylinder file; a hit is the mate ranked first;
- **speed-up**: the time of that search against the time exhaustive full MCC takes per probe,
  measured on the first ``exhaustive_sample`` gallery subjects in the same run and scaled
  linearly to the gallery (exhaustive MCC is exactly linear in gallery size; the JSON says so).

Why recall of mates stands for "rank-1 hits kept": a probe that exhaustive search ranks its
mate first is ranked the same way by the tiers whenever the mate is shortlisted, because the
shortlisted subjects get exactly the full MCC scores exhaustive search gives them. So the
exhaustive rank-1 hits the tiers lose are at most the mates the shortlist misses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpu_kernels import MccParams, encode_tenprints, score_tenprints
from gpu_kernels.cylinder_file import CylinderFile, CylinderFileWriter
from gpu_kernels.shortlist import DESCRIPTOR_VERSION, ShortlistIndex, enrolment_descriptors
from minutiae.dataset import CaptureRef, capture_refs, enrolled_captures, load_capture

Progress = Callable[[str, int, int], None]
_GPU_BYTES = 80 * 10**9


def _noop(stage: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class ShortlistBenchConfig:
    """What the benchmark samples and sweeps."""

    workdir: Path
    candidates: tuple[int, ...] = (100, 300, 1000, 3000)
    recall_target: float = 0.995
    probes: int = 400
    scored_probes: int = 40
    exhaustive_sample: int = 2000
    encode_chunk: int = 256
    seed: int = 0
    device: str = "cpu"
    params: MccParams = field(default_factory=MccParams)


def _gallery(data: Path, refs: list[CaptureRef], config: ShortlistBenchConfig, progress: Progress) -> Path:
    """Encodes the gallery into ``workdir`` unless a complete encoding of these subjects is there."""
    target = config.workdir / "gallery"
    ids_path = target / "subjects.txt"
    ids = [r.subject_id for r in refs]
    if (
        (target / "meta.json").exists()
        and ids_path.exists()
        and ids_path.read_text().split("\n")[:-1] == ids
        and CylinderFile(target).params.same_cylinders(config.params)
    ):
        _refresh_descriptors(target, config)
        return target
    if target.exists():
        for stale in target.iterdir():
            stale.unlink()
    descriptors: list[np.ndarray[Any, Any]] = []
    with CylinderFileWriter(target, config.params) as writer:
        for lo in range(0, len(refs), config.encode_chunk):
            progress("encoding the gallery", lo, len(refs))
            tenprints = [load_capture(data, r).tenprint for r in refs[lo : lo + config.encode_chunk]]
            cylinders = encode_tenprints(tenprints, config.params, config.device)
            writer.append(cylinders)
            descriptors.append(enrolment_descriptors(cylinders).cpu().numpy())
    progress("encoding the gallery", len(refs), len(refs))
    np.save(target / "descriptors.npy", np.concatenate(descriptors))
    (target / "descriptor_version.txt").write_text(f"{DESCRIPTOR_VERSION}\n")
    # Written last: its presence says the encoding finished.
    ids_path.write_text("".join(f"{s}\n" for s in ids))
    return target


def _refresh_descriptors(target: Path, config: ShortlistBenchConfig) -> None:
    """Recomputes the shortlist descriptors of a kept encoding from its cylinder file when they
    were made by another descriptor version (the cylinders themselves are still good)."""
    version = target / "descriptor_version.txt"
    if version.exists() and version.read_text().strip() == str(DESCRIPTOR_VERSION):
        return
    full = CylinderFile(target)
    parts = [
        enrolment_descriptors(
            full.select(np.arange(lo, min(lo + config.encode_chunk, len(full))), config.device, config.params)
        )
        .cpu()
        .numpy()
        for lo in range(0, len(full), config.encode_chunk)
    ]
    np.save(target / "descriptors.npy", np.concatenate(parts))
    version.write_text(f"{DESCRIPTOR_VERSION}\n")


def run_shortlist_bench(
    data: Path, config: ShortlistBenchConfig, progress: Progress = _noop
) -> dict[str, Any]:
    """Runs the benchmark on the data set at ``data``; returns the JSON report."""
    refs = capture_refs(data)
    gallery_refs = enrolled_captures(refs)
    row_of = {r.subject_id: i for i, r in enumerate(gallery_refs)}
    mated = [r for r in refs if r.role == "probe" and r.subject_id in row_of]
    if not gallery_refs or not mated:
        raise ValueError(f"{data}: need gallery captures and probes of enrolled subjects")
    rng = np.random.default_rng(config.seed)
    picks = sorted(rng.choice(len(mated), min(config.probes, len(mated)), replace=False))
    sample = [mated[i] for i in picks]

    started = time.perf_counter()
    directory = _gallery(data, gallery_refs, config, progress)
    encode_s = time.perf_counter() - started
    full = CylinderFile(directory)
    descriptors = torch.from_numpy(np.load(directory / "descriptors.npy"))
    index = ShortlistIndex.build(descriptors, full.present)
    size = len(full)

    progress("encoding probes", 0, 1)
    probes = encode_tenprints([load_capture(data, r).tenprint for r in sample], config.params, config.device)
    mates = np.array([row_of[r.subject_id] for r in sample])
    k_max = min(max(config.candidates), size)
    started = time.perf_counter()
    rows = index.candidates(probes, k_max)
    shortlist_ms = (time.perf_counter() - started) * 1000 / len(sample)
    rank_in_shortlist = np.where(rows.numpy() == mates[:, None], np.arange(k_max)[None, :], k_max).min(axis=1)
    recall = {k: float(np.mean(rank_in_shortlist < k)) for k in config.candidates if k <= size}
    meeting = [k for k, value in sorted(recall.items()) if value >= config.recall_target]
    chosen = meeting[0] if meeting else max(recall)

    # Full MCC on the chosen shortlist, fetched from the memory-mapped file, for some probes.
    scored = min(config.scored_probes, len(sample))
    hits = kept = 0
    mcc_s = 0.0
    for i in range(scored):
        progress("full MCC on shortlists", i, scored)
        started = time.perf_counter()
        candidates = full.select(rows[i, :chosen], config.device, config.params)
        fused = score_tenprints(probes.select(slice(i, i + 1)), candidates, config.params).fused[0]
        mcc_s += time.perf_counter() - started
        kept += int(rank_in_shortlist[i] < chosen)
        hits += int(int(rows[i, int(torch.argmax(fused))]) == mates[i])
    progress("full MCC on shortlists", scored, scored)

    # Exhaustive full MCC per probe, timed on a slice of the gallery and scaled to all of it.
    n0 = min(config.exhaustive_sample, size)
    timing_probes = probes.select(slice(0, min(4, len(sample))))
    slice_cylinders = full.select(np.arange(n0), config.device, config.params)
    progress("timing exhaustive MCC", 0, 1)
    started = time.perf_counter()
    score_tenprints(timing_probes, slice_cylinders, config.params)
    exhaustive_ms = (time.perf_counter() - started) * 1000 / len(timing_probes) * size / n0
    tiers_ms = shortlist_ms + mcc_s * 1000 / max(scored, 1)

    return {
        "dataset": str(data),
        "device": str(torch.device(config.device)),
        "gallery_size": size,
        "probe_count": len(sample),
        "gallery_encode_s": encode_s,
        "candidates": list(recall),
        "recall_at": {str(k): v for k, v in recall.items()},
        "recall_target": config.recall_target,
        "chosen_candidates": chosen,
        "scored_probes": scored,
        "rank1_through_tiers": hits / scored if scored else None,
        "mates_kept_in_scored": kept / scored if scored else None,
        "shortlist_ms_per_probe": shortlist_ms,
        "full_mcc_on_shortlist_ms_per_probe": mcc_s * 1000 / max(scored, 1),
        "tiers_ms_per_probe": tiers_ms,
        "exhaustive_ms_per_probe": exhaustive_ms,
        "exhaustive_note": f"timed on {n0} subjects x {len(timing_probes)} probes, scaled linearly to {size}",
        "speedup": exhaustive_ms / tiers_ms if tiers_ms > 0 else None,
        "device_bytes_per_subject": index.bytes_per_subject,
        "host_bytes_per_subject": full.nbytes / size,
        "subjects_per_80gb_device": _GPU_BYTES // index.bytes_per_subject,
    }
