"""``fedprint bench matcher``: throughput of MCC matching against gallery size and batch size,
exhaustive and shortlisted, compared with the device's own matrix-multiply roofline.

What is measured, and how:

- **Data.** ``base_subjects`` synthetic persons (:mod:`synthetic.fingers`: a master per finger
  and two independent impressions, one enrolled, one probed). Galleries larger than the base are
  the base tiled (rows repeat): exhaustive throughput does not depend on what the cylinders
  hold, only on their shapes, and encoding 10^5 distinct subjects would take hours on a CPU.
  Accuracy figures (shortlist recall) use the distinct base subjects only.
- **A match** is one finger-to-finger comparison (one ten-print against one subject is 10), the
  unit of Cappelli et al.'s GPU MCC figures. ``matches_per_second`` is exhaustive bit-MCC at
  the largest gallery size and the largest probe batch of the sweep.
- **Reference**: :func:`gpu_kernels.reference.reference_lss_from_cylinders`, the literal
  per-pair, per-cell implementation the tests check the kernels against, timed on a few pairs
  of the same cylinders. ``unbatched_matches_per_second`` is the batched kernel called once
  per pair (what a naive port would do), for a less flattering comparison.
- **Roofline**: the best rate of this device's product of 0/1 matrices on the shape of the
  scoring products, in the arithmetic the scorer uses here (``arithmetic``: float32, or int8
  accumulating in int32, see :mod:`gpu_kernels.products`), measured in the same run, and the
  float32 rate beside it. ``achieved_flops`` counts the product work the scorer really does
  (:func:`gpu_kernels.similarity.score_flops`: valid cylinders only) divided by the whole
  scoring time, so ``roofline_fraction`` says how much of the time the arithmetic units do
  useful products; ``flops_per_match`` is that work per finger comparison.
- **Shortlist**: faiss over compact subject codes (:mod:`gpu_kernels.shortlist`), then full
  MCC on the shortlist. Recall is against exhaustive rank-1 hits on the base subjects; at
  sizes beyond the base it is projected from each genuine probe's code-score rank among the
  base impostors (see :func:`_projected_recall`). Shortlist time is measured at every size.
"""

from __future__ import annotations

import functools
import math
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpu_kernels import MccParams, TenPrintCylinders, encode_tenprints, score_tenprints
from gpu_kernels.params import Consolidation
from gpu_kernels.products import bit_operand_dtype, bit_product
from gpu_kernels.reference import (
    ReferenceCylinders,
    reference_lss_from_cylinders,
    reference_lss_r_from_cylinders,
)
from gpu_kernels.shortlist import (
    ShortlistIndex,
    enrolment_descriptors,
    score_shortlisted,
    subject_descriptors,
)
from gpu_kernels.similarity import score_fingers, score_flops
from minutiae.template import TenPrintTemplates

GIB = 1 << 30


@dataclass
class MatcherBenchConfig:
    """What to sweep. The defaults finish in about three minutes on two CPU cores."""

    #: Distinct synthetic subjects encoded (gallery and probe impressions).
    base_subjects: int = 24
    #: Gallery sizes, subjects (log scale); larger than the base means tiled.
    gallery_sizes: Sequence[int] = (30, 100, 300)
    #: Probe batch sizes swept at ``batch_gallery`` subjects.
    batch_sizes: Sequence[int] = (1, 4, 16)
    batch_gallery: int = 100
    #: Probes per search in the gallery-size sweep.
    probe_count: int = 8
    #: Gallery sizes at which only the shortlist runs (exhaustive is projected from its rate).
    shortlist_only_sizes: Sequence[int] = (10_000, 100_000)
    #: Shortlist length: max(shortlist_min, shortlist_fraction x gallery size).
    shortlist_fraction: float = 0.01
    shortlist_min: int = 50
    #: Probes per shortlist search (its cost is per probe, and large sizes are slow exhaustively).
    shortlist_probe_count: int = 2
    #: Finger pairs timed with the literal reference.
    reference_pairs: int = 2
    #: Finger pairs timed one call each (unbatched kernel).
    unbatched_pairs: int = 40
    devices: Sequence[str] = field(
        default_factory=lambda: ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    )
    seed: int = 7
    #: Global score of the matcher under test (the reference follows it).
    consolidation: Consolidation = "lss_r"


# --------------------------------------------------------------------------- data


def synthetic_pairs(subjects: int, seed: int) -> tuple[list[TenPrintTemplates], list[TenPrintTemplates]]:
    """Enrolled and probe ten-prints of ``subjects`` synthetic persons (row i mates row i)."""
    from synthetic.fingers import impression, master_finger

    gallery: list[TenPrintTemplates] = []
    probes: list[TenPrintTemplates] = []
    for s in range(subjects):
        rng = np.random.default_rng([seed, s])
        masters = [master_finger(rng, position) for position in range(1, 11)]
        for out in (gallery, probes):
            out.append(
                TenPrintTemplates(
                    {
                        m.finger_position: impression(rng, m, quality=float(rng.uniform(0.5, 1.0)))
                        for m in masters
                    }
                )
            )
    return gallery, probes


def tiled(cylinders: TenPrintCylinders, size: int) -> TenPrintCylinders:
    """``size`` subjects made of ``cylinders`` repeated (row r is base row r mod len)."""
    return cylinders.select(torch.arange(size) % len(cylinders))


# --------------------------------------------------------------------------- timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(
    fn: Callable[[], object], device: torch.device, *, repeats: int = 1, warm_up: bool = True
) -> float:
    """Best wall time of ``repeats`` runs, after one warm-up run if ``warm_up`` (best, because
    machines are shared; long runs skip the warm-up, the first short one has paid for it)."""
    if warm_up:
        fn()
        _sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def product_roofline(rows: int, inner: int, cols: int, device: torch.device, dtype: torch.dtype) -> float:
    """Best rate, operations/s (2 per multiply-add), of :func:`gpu_kernels.products.bit_product`
    on 0/1 operands ``[rows, inner]`` and ``[cols, inner]`` of ``dtype``."""
    generator = torch.Generator().manual_seed(0)
    a = (torch.rand(rows, inner, generator=generator) < 0.4).to(device=device, dtype=dtype)
    b = (torch.rand(cols, inner, generator=generator) < 0.4).to(device=device, dtype=dtype)
    seconds = _timed(lambda: bit_product(a, b), device, repeats=5)
    return 2.0 * rows * inner * cols / seconds


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


# --------------------------------------------------------------------------- the benchmark


def _finger_flops(probes: TenPrintCylinders, gallery: TenPrintCylinders, params: MccParams) -> int:
    return sum(score_flops(p, g, params) for p, g in zip(probes.fingers, gallery.fingers, strict=True))


def _reference_rate(
    probes: TenPrintCylinders, gallery: TenPrintCylinders, params: MccParams, pairs: int
) -> float:
    """Finger matches/s of the literal reference on ``pairs`` same-position finger pairs."""

    def ref(cyl: TenPrintCylinders, row: int, f: int) -> ReferenceCylinders:
        c = cyl.fingers[f]
        m = int(c.counts[row])
        values = c.unpacked_values()[row, :m].reshape(m, params.ns, params.ns, params.nd).double().numpy()
        cells = c.unpacked_cell_valid()[row, :m].reshape(m, params.ns, params.ns).bool().numpy()
        return ReferenceCylinders(
            values,
            cells,
            c.valid[row, :m].numpy(),
            c.theta[row, :m].double().numpy(),
            c.xy[row, :m].double().numpy(),
        )

    cases = [
        (ref(probes, i % len(probes), i % 10), ref(gallery, (i + 1) % len(gallery), i % 10))
        for i in range(pairs)
    ]
    literal = (
        reference_lss_r_from_cylinders if params.consolidation == "lss_r" else reference_lss_from_cylinders
    )
    start = time.perf_counter()
    for a, b in cases:
        literal(a, b, params)
    return pairs / (time.perf_counter() - start)


def _unbatched_rate(
    probes: TenPrintCylinders, gallery: TenPrintCylinders, params: MccParams, pairs: int, device: torch.device
) -> float:
    """Finger matches/s of the batched kernel called once per finger pair."""
    cases = [
        (
            probes.fingers[i % 10].select(slice(i % len(probes), i % len(probes) + 1)),
            gallery.fingers[i % 10].select(slice((i + 1) % len(gallery), (i + 1) % len(gallery) + 1)),
        )
        for i in range(pairs)
    ]

    def run() -> None:
        for a, b in cases:
            score_fingers(a, b, params)

    return pairs / _timed(run, device)


def _rank1_rows(scores: torch.Tensor) -> torch.Tensor:
    return scores.argmax(dim=1).cpu()


def _projected_recall(code_scores: torch.Tensor, shortlist_fraction: float, hits: torch.Tensor) -> float:
    """Share of exhaustive rank-1 hits whose mate would make a shortlist of ``fraction`` of a
    large gallery: ``code_scores: [B, B]`` probe x base-gallery code similarities (mates on the
    diagonal), ``hits: bool [B]`` probes exhaustive MCC ranks first correctly.

    A mate is kept if the share of impostors scoring above it is below the fraction (the
    law-of-large-numbers limit of "fewer than K of G impostors above it"); the share is each
    probe's own empirical one over the B-1 base impostors.
    """
    b = code_scores.shape[0]
    mate = code_scores.diagonal()
    above = (code_scores > mate[:, None]).sum(1).double() / max(1, b - 1)
    kept = above < shortlist_fraction
    n_hits = int(hits.sum())
    return float((kept & hits).sum()) / n_hits if n_hits else float("nan")


def _device_run(
    device: torch.device,
    config: MatcherBenchConfig,
    gallery_base: TenPrintCylinders,
    probes_base: TenPrintCylinders,
    params: MccParams,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gallery_base = gallery_base.to(device)
    probes_base = probes_base.to(device)
    probe_count = config.probe_count
    probes = tiled(probes_base, probe_count)

    # Roofline on the shape of the largest per-finger product of the scorer.
    mp = probes.fingers[0].max_minutiae
    mg = gallery_base.fingers[0].max_minutiae
    progress(f"{device}: product roofline")
    arithmetic = bit_operand_dtype(device) if params.binary else torch.float32
    shape = (probe_count * mp, params.cells, min(max(config.gallery_sizes), 200) * mg)
    roofline = product_roofline(*shape, device, arithmetic)
    float32_roofline = (
        roofline if arithmetic == torch.float32 else product_roofline(*shape, device, torch.float32)
    )

    progress(f"{device}: reference and unbatched rates")
    reference = _reference_rate(probes_base.to("cpu"), gallery_base.to("cpu"), params, config.reference_pairs)
    unbatched = _unbatched_rate(probes_base, gallery_base, params, config.unbatched_pairs, device)

    # Exhaustive MCC on the distinct base: ground truth for the shortlist.
    exhaustive_base = score_tenprints(probes_base, gallery_base, params).fused
    truth = torch.arange(len(probes_base))
    hits = _rank1_rows(exhaustive_base) == truth
    host_gallery = gallery_base.to("cpu")
    desc_gallery = enrolment_descriptors(host_gallery)
    desc_probes = subject_descriptors(probes_base.to("cpu"))
    base_index = ShortlistIndex.build(desc_gallery, host_gallery.present)
    code_scores = _code_score_matrix(base_index, desc_probes, probes_base.present.cpu())

    # The shortlist's cost is per probe; a few probes measure it (the big sizes would be slow).
    shortlist_probes = tiled(probes_base, min(probe_count, config.shortlist_probe_count))
    gallery_rows: list[dict[str, Any]] = []
    for size in sorted({*config.gallery_sizes, *config.shortlist_only_sizes}):
        exhaustive = size not in config.shortlist_only_sizes or size in config.gallery_sizes
        row: dict[str, Any] = {
            "gallery_size": size,
            "probe_count": probe_count,
            "shortlist_probe_count": len(shortlist_probes),
        }
        progress(f"{device}: gallery {size} subjects")
        if exhaustive:
            gallery = tiled(gallery_base, size)
            seconds = _timed(
                functools.partial(score_tenprints, probes, gallery, params), device, warm_up=not gallery_rows
            )
            flops = _finger_flops(probes, gallery, params)
            row.update(
                exhaustive_seconds=seconds,
                exhaustive_matches_per_second=probe_count * size * 10 / seconds,
                achieved_flops=flops / seconds,
            )
            del gallery
        row.update(_shortlist_run(device, config, host_gallery, desc_gallery, shortlist_probes, size, params))
        gallery_rows.append(row)

    measured = [r for r in gallery_rows if "exhaustive_seconds" in r]
    top = measured[-1]
    rate = top["exhaustive_matches_per_second"]
    for r in gallery_rows:
        # Exhaustive time where it was too long to run: projected from the measured rate.
        projected = "exhaustive_seconds" not in r
        exhaustive_s = (
            r["probe_count"] * r["gallery_size"] * 10 / rate if projected else r["exhaustive_seconds"]
        )
        r["exhaustive_projected"] = projected
        r["shortlist_speedup"] = exhaustive_s / r["shortlist_seconds"]

    batch_rows = []
    batch_gallery = tiled(gallery_base, config.batch_gallery)
    for batch in config.batch_sizes:
        progress(f"{device}: batch {batch}")
        p = tiled(probes_base, batch)
        seconds = _timed(functools.partial(score_tenprints, p, batch_gallery, params), device, warm_up=False)
        batch_rows.append(
            {
                "batch_size": batch,
                "gallery_size": config.batch_gallery,
                "seconds": seconds,
                "matches_per_second": batch * config.batch_gallery * 10 / seconds,
                "achieved_flops": _finger_flops(p, batch_gallery, params) / seconds,
            }
        )
    best_batch = max(batch_rows, key=lambda r: r["matches_per_second"])
    best = top if top["exhaustive_matches_per_second"] >= best_batch["matches_per_second"] else None

    achieved = top["achieved_flops"] if best is not None else best_batch["achieved_flops"]
    matches = top["exhaustive_matches_per_second"] if best is not None else best_batch["matches_per_second"]
    shortlist_recall = {
        "base_subjects": len(gallery_base),
        "exhaustive_rank1_hits": int(hits.sum()),
        "recall_vs_exhaustive_rank1_at_base": _base_recall(code_scores, hits, config),
        "projected_recall_at_fraction": _projected_recall(code_scores, config.shortlist_fraction, hits),
        "shortlist_fraction": config.shortlist_fraction,
        "shortlist_min": config.shortlist_min,
    }
    host_bytes = host_gallery.nbytes / len(host_gallery)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "gallery_size": top["gallery_size"],
        "probe_count": probe_count,
        "matches_per_second": matches,
        "reference_matches_per_second": reference,
        "unbatched_matches_per_second": unbatched,
        "speedup_vs_reference": matches / reference,
        "arithmetic": str(arithmetic).removeprefix("torch."),
        "roofline_flops": roofline,
        "float32_roofline_flops": float32_roofline,
        "achieved_flops": achieved,
        "roofline_fraction": achieved / roofline,
        "flops_per_match": achieved / matches,
        "peak_memory_bytes": _peak_memory(device),
        "device_bytes_per_subject": base_index.bytes_per_subject,
        "host_bytes_per_subject": host_bytes,
        "subjects_per_80gb_device": int(80e9 // base_index.bytes_per_subject),
        "shortlist": shortlist_recall,
        "gallery_sweep": gallery_rows,
        "batch_sweep": batch_rows,
    }


def _code_score_matrix(
    index: ShortlistIndex, desc_probes: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """Code similarities of every probe with every base subject, ``[B, B]`` (rows: probes)."""
    scores, rows = index.search(desc_probes, present, index.size)
    out = torch.empty_like(scores)
    out.scatter_(1, rows, scores)
    return out


def _base_recall(code_scores: torch.Tensor, hits: torch.Tensor, config: MatcherBenchConfig) -> float:
    """Recall of the real shortlist (length as configured for the base size) on the base."""
    b = code_scores.shape[0]
    k = min(b, max(config.shortlist_min, math.ceil(config.shortlist_fraction * b)))
    top = code_scores.topk(k, dim=1).indices
    kept = (top == torch.arange(b)[:, None]).any(1)
    n_hits = int(hits.sum())
    return float((kept & hits).sum()) / n_hits if n_hits else float("nan")


def _shortlist_run(
    device: torch.device,
    config: MatcherBenchConfig,
    host_gallery: TenPrintCylinders,
    desc_gallery: torch.Tensor,
    probes: TenPrintCylinders,
    size: int,
    params: MccParams,
) -> dict[str, Any]:
    """Time of shortlist search (faiss over ``size`` tiled codes, slightly jittered so that rows
    are distinct) plus full MCC of every probe against its shortlist fetched from host memory."""
    rows = torch.arange(size) % len(host_gallery)
    generator = torch.Generator().manual_seed(size)
    jitter = 1e-3 * torch.randn((size, *desc_gallery.shape[1:]), generator=generator)
    index = ShortlistIndex.build(desc_gallery[rows] + jitter, host_gallery.present[rows])
    k = min(size, max(config.shortlist_min, math.ceil(config.shortlist_fraction * size)))
    desc_probes = subject_descriptors(probes.to("cpu"))
    present = probes.present.cpu()

    def run() -> None:
        _, short = index.search(desc_probes, present, k)
        # The tiled gallery is virtual: shortlisted row r is base row r mod B (host memory).
        score_shortlisted(probes, host_gallery, short % len(host_gallery), params)

    seconds = _timed(run, device, warm_up=False)
    return {
        "shortlist_length": k,
        "shortlist_seconds": seconds,
        "shortlist_matches_per_second_equivalent": len(probes) * size * 10 / seconds,
    }


def run_matcher_bench(
    config: MatcherBenchConfig, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Runs the sweeps on every configured device; top-level fields are the last (fastest
    expected: CUDA when present) device's, and ``devices`` holds each device's full result."""
    params = MccParams(consolidation=config.consolidation)
    progress(f"encoding {config.base_subjects} synthetic subjects")
    start = time.perf_counter()
    gallery_t, probes_t = synthetic_pairs(config.base_subjects, config.seed)
    gallery = encode_tenprints(gallery_t, params)
    probes = encode_tenprints(probes_t, params)
    encode_s = time.perf_counter() - start
    runs = {
        name: _device_run(torch.device(name), config, gallery, probes, params, progress)
        for name in config.devices
    }
    headline = runs[list(runs)[-1]]
    return {
        **{k: v for k, v in headline.items() if k not in ("gallery_sweep", "batch_sweep")},
        "unit": "finger matches (one finger template against one); a ten-print search is 10 per subject",
        "consolidation": config.consolidation,
        "encode_seconds_per_finger": encode_s / (20 * config.base_subjects),
        "config": {k: list(v) if isinstance(v, tuple | list) else v for k, v in asdict(config).items()},
        "torch": torch.__version__,
        "devices": runs,
    }


def plot_throughput(result: dict[str, Any], path: Path) -> None:
    """Matches/s against gallery size (log-log), exhaustive and shortlist, one line per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in result["devices"].items():
        rows = run["gallery_sweep"]
        ex = [r for r in rows if not r["exhaustive_projected"]]
        ax.plot(
            [r["gallery_size"] for r in ex],
            [r["exhaustive_matches_per_second"] for r in ex],
            "o-",
            label=f"{name}: exhaustive MCC",
        )
        ax.plot(
            [r["gallery_size"] for r in rows],
            [r["shortlist_matches_per_second_equivalent"] for r in rows],
            "s--",
            label=f"{name}: shortlist + MCC (equivalent)",
        )
        ax.axhline(run["reference_matches_per_second"], linestyle=":", color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gallery size (subjects)")
    ax.set_ylabel("finger matches per second")
    ax.set_title("MCC matcher throughput (dotted: literal reference)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows for the CLI's table: one per (device, gallery size)."""
    out: list[tuple[str, ...]] = []
    for name, run in result["devices"].items():
        for r in run["gallery_sweep"]:
            ex = r.get("exhaustive_matches_per_second")
            out.append(
                (
                    name,
                    str(r["gallery_size"]),
                    f"{ex:,.0f}" if ex else "(projected)",
                    f"{r['shortlist_matches_per_second_equivalent']:,.0f}",
                    str(r["shortlist_length"]),
                    f"{r['shortlist_speedup']:.1f}x",
                )
            )
    return out
