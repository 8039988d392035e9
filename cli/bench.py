"""The ``fedprint bench`` command group (registered by :mod:`cli.app`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.progress import stage_progress

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks of the matching engine and of the federation.")
console = Console()


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@bench_app.command()
def matcher(
    json_out: Annotated[Path, typer.Option("--json", help="write the results here; the PNG goes beside it")],
    sizes: Annotated[str, typer.Option(help="gallery sizes, subjects, comma-separated")] = "30,100,300",
    shortlist_sizes: Annotated[
        str, typer.Option(help="sizes where only the shortlist runs (exhaustive projected)")
    ] = "10000,100000",
    batches: Annotated[str, typer.Option(help="probe batch sizes to sweep")] = "1,4,16",
    probes: Annotated[int, typer.Option(help="probes per search in the gallery sweep")] = 8,
    base: Annotated[int, typer.Option(help="distinct synthetic subjects encoded")] = 24,
    shortlist_fraction: Annotated[float, typer.Option(help="shortlist length / gallery size")] = 0.01,
    device: Annotated[
        list[str] | None, typer.Option(help="cpu, cuda (repeatable); default: cpu and cuda if present")
    ] = None,
    consolidation: Annotated[str, typer.Option(help="lss_r (the nodes' default) or lss")] = "lss_r",
) -> None:
    """Throughput against gallery and batch size, exhaustive vs shortlist, against the product roofline."""
    from bench.matcher import MatcherBenchConfig, plot_throughput, run_matcher_bench, table_rows

    if consolidation not in ("lss", "lss_r"):
        raise typer.BadParameter(f"--consolidation must be lss or lss_r, not {consolidation!r}")

    config = MatcherBenchConfig(
        base_subjects=base,
        gallery_sizes=_ints(sizes),
        shortlist_only_sizes=_ints(shortlist_sizes),
        batch_sizes=_ints(batches),
        batch_gallery=min(_ints(sizes)[-1], 100),
        probe_count=probes,
        shortlist_fraction=shortlist_fraction,
        consolidation="lss_r" if consolidation == "lss_r" else "lss",
    )
    if device:
        config.devices = device
    with console.status("benchmarking") as status:
        result = run_matcher_bench(config, progress=lambda text: status.update(text))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    png = json_out.with_suffix(".png")
    plot_throughput(result, png)

    table = Table(title="finger matches per second")
    for column in ("device", "subjects", "exhaustive", "shortlist+MCC", "shortlist", "speed-up"):
        table.add_column(column)
    for row in table_rows(result):
        table.add_row(*row)
    console.print(table)
    console.print(
        f"{result['device']}: {result['matches_per_second']:,.0f} matches/s, reference "
        f"{result['reference_matches_per_second']:,.2f} ({result['speedup_vs_reference']:,.0f}x), "
        f"{result['flops_per_match'] / 1e6:.1f} MOP/match in {result['arithmetic']}, roofline fraction "
        f"{result['roofline_fraction']:.2f} ({result['achieved_flops'] / 1e9:.1f} of "
        f"{result['roofline_flops'] / 1e9:.1f} GOP/s; float32 peak "
        f"{result['float32_roofline_flops'] / 1e9:.1f}); "
        f"shortlist recall {result['shortlist']['recall_vs_exhaustive_rank1_at_base']:.3f} at base, "
        f"{result['shortlist']['projected_recall_at_fraction']:.3f} projected; "
        f"{result['device_bytes_per_subject']} device B/subject, "
        f"{result['host_bytes_per_subject']:,.0f} host B/subject"
    )
    console.print(f"wrote {json_out} and {png}")


@bench_app.command()
def federation(
    json_out: Annotated[Path, typer.Option("--json", help="write the results here")],
    bookings: Annotated[int, typer.Option(help="bookings to submit")] = 120,
    concurrency: Annotated[int, typer.Option(help="bookings in flight at once")] = 16,
    persons: Annotated[int, typer.Option(help="synthetic persons behind the two galleries")] = 300,
    shards: Annotated[
        int, typer.Option(min=1, help="partitions per node: >1 runs each node as a router and its shards")
    ] = 1,
    chaos: Annotated[
        bool,
        typer.Option(
            "--chaos",
            help="SIGKILL and restart a gallery node, ICE and the coordinator during the run, then "
            "count lost bookings, bookings not final and IDENT hits not notified exactly once",
        ),
    ] = False,
    chaos_seed: Annotated[int, typer.Option(help="seed of the chaos schedule (with --chaos)")] = 0,
    settle_timeout: Annotated[
        float, typer.Option(help="seconds the federation may take to settle after a --chaos run")
    ] = 300.0,
) -> None:
    """Bookings through the four services (processes, mTLS): latency, throughput, errors, losses."""
    import asyncio

    from bench.chaos import ChaosConfig
    from bench.federation import FederationBenchConfig, run_federation_bench

    config = FederationBenchConfig(
        bookings=bookings,
        concurrency=concurrency,
        persons=persons,
        shards=shards,
        chaos=ChaosConfig(seed=chaos_seed, settle_timeout_s=settle_timeout) if chaos else None,
    )
    with console.status("starting the federation and submitting bookings"):
        result = asyncio.run(run_federation_bench(config))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(
        f"{result['bookings']} bookings at concurrency {result['concurrency']}, "
        f"{result['shards']} shard(s) per node: "
        f"p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, "
        f"{result['bookings_per_second']:.2f} bookings/s, {result['errors']} errors, {result['lost']} lost"
    )
    if chaos:
        kills = ", ".join(f"{name} x{n}" for name, n in sorted(result["chaos"]["kills"].items()))
        console.print(
            f"chaos (seed {chaos_seed}): killed {kills}; settled in {result['chaos']['settle_s']:.1f} s: "
            f"lost: {result['lost']}, not final: {result['not_final']}, IDENT hits "
            f"{result['ident_hits']}: notified once {result['ident_hits_notified_once']}, never "
            f"{result['notified_zero']}, more than once {result['notified_more_than_once']}"
        )
    console.print(f"wrote {json_out}")


@bench_app.command()
def batching(
    json_out: Annotated[Path, typer.Option("--json", help="write the results here")],
    persons: Annotated[int, typer.Option(help="synthetic persons behind the IAFIS gallery")] = 200,
    requests: Annotated[int, typer.Option(help="single-probe Identify calls per setting")] = 64,
    concurrency: Annotated[int, typer.Option(help="calls in flight at once")] = 16,
    max_batches: Annotated[
        str, typer.Option(help="max_batch settings; 1 is the unbatched baseline")
    ] = "1,4,16",
    max_wait_ms: Annotated[float, typer.Option(help="wait limit of the batched settings")] = 5.0,
    torch_threads: Annotated[int | None, typer.Option(help="torch CPU threads of the node")] = None,
    shortlist_min: Annotated[
        int | None, typer.Option(help="gallery size from which the node shortlists (default: the node's)")
    ] = None,
    candidates: Annotated[
        int | None, typer.Option(help="shortlisted subjects per probe (default: the node's)")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="data set (manifest.csv) whose gallery captures are enrolled and probes sent"),
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="keep the node's store and cache here between runs (with --data)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the population, or of the probes drawn from --data")] = 5,
) -> None:
    """One gallery node under concurrent Identify calls, with and without micro-batching."""
    import asyncio

    from bench.batching import BatchingBenchConfig, run_batching_bench
    from fedprint.logging import configure
    from nodes.gallery.config import BatchingConfig, ShortlistConfig

    # The node runs in this process; its per-call log lines would bury the table.
    configure("warning")

    settings = tuple(
        BatchingConfig(max_batch=b, max_wait_ms=0.0 if b == 1 else max_wait_ms) for b in _ints(max_batches)
    )
    config = BatchingBenchConfig(
        persons=persons,
        data=data,
        workdir=workdir,
        seed=seed,
        requests=requests,
        concurrency=concurrency,
        settings=settings,
        torch_threads=torch_threads,
        shortlist=ShortlistConfig(
            min_gallery=shortlist_min or ShortlistConfig().min_gallery,
            candidates=candidates or ShortlistConfig().candidates,
        ),
    )
    with console.status("benchmarking") as status:
        result = asyncio.run(run_batching_bench(config, progress=lambda text: status.update(text)))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    tier = f", {result['shortlist_candidates']} shortlisted" if result["shortlist_candidates"] else ""
    table = Table(
        title=f"{result['gallery_size']} subjects{tier}, {requests} calls at concurrency {concurrency}"
    )
    one_call = f"one call of {result['one_call_probes']} ms"
    for column in (
        "max_batch",
        "wait ms",
        "probes/s",
        "x unbatched",
        "p50 ms",
        "p99 ms",
        "mean batch",
        one_call,
    ):
        table.add_column(column)
    for row in result["settings"]:
        table.add_row(
            str(row["max_batch"]),
            f"{row['max_wait_ms']:g}",
            f"{row['probes_per_second']:.2f}",
            f"{row['throughput_vs_unbatched']:.2f}",
            f"{row['p50_ms']:.0f}",
            f"{row['p99_ms']:.0f}",
            f"{row['mean_batch']:.1f}",
            f"{row['one_call_ms']:.0f}" + ("" if row["one_call_within_deadline"] else " (late)"),
        )
    console.print(table)
    console.print(f"wrote {json_out}")


@bench_app.command()
def shortlist(
    data: Annotated[Path, typer.Argument(help="data set directory with manifest.csv")],
    json_out: Annotated[Path, typer.Option("--json", help="write the results here")],
    workdir: Annotated[
        Path, typer.Option(help="where the encoded gallery is kept (reused by later runs)")
    ] = Path(".fedprint-bench"),
    candidates: Annotated[str, typer.Option(help="shortlist lengths K to sweep")] = "100,300,1000,3000",
    probes: Annotated[int, typer.Option(help="mated probes sampled for recall@K")] = 400,
    scored_probes: Annotated[int, typer.Option(help="of those, probes fully scored through both tiers")] = 40,
    exhaustive_sample: Annotated[
        int, typer.Option(help="gallery subjects exhaustive MCC is timed on")
    ] = 2000,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
) -> None:
    """Recall and speed-up of the faiss shortlist + full MCC against exhaustive MCC, on any data set."""
    import torch

    from bench.shortlist import ShortlistBenchConfig, run_shortlist_bench

    if threads is not None:
        torch.set_num_threads(threads)
    config = ShortlistBenchConfig(
        workdir=workdir,
        candidates=tuple(_ints(candidates)),
        probes=probes,
        scored_probes=scored_probes,
        exhaustive_sample=exhaustive_sample,
        device=device,
    )
    with stage_progress(console) as on_progress:
        result = run_shortlist_bench(data, config, on_progress)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(
        title=f"shortlist over {result['gallery_size']:,} subjects, {result['probe_count']} mated probes"
    )
    table.add_column("K")
    table.add_column("mates kept", justify="right")
    for k, value in result["recall_at"].items():
        table.add_row(k, f"{value:.2%}")
    console.print(table)
    console.print(
        f"K={result['chosen_candidates']}: rank-1 through the tiers {result['rank1_through_tiers']:.2%} "
        f"({result['scored_probes']} probes); {result['tiers_ms_per_probe']:,.0f} ms/probe vs exhaustive "
        f"{result['exhaustive_ms_per_probe']:,.0f} ms/probe = {result['speedup']:.1f}x; "
        f"{result['device_bytes_per_subject']} device B/subject "
        f"({result['subjects_per_80gb_device']:,} subjects per 80 GB), "
        f"{result['host_bytes_per_subject']:,.0f} host B/subject on disk"
    )
    console.print(f"wrote {json_out}")


@bench_app.command("operating-point")
def operating_point(
    data: Annotated[Path, typer.Argument(help="a labelled data set (manifest.csv beside the templates)")],
    json_out: Annotated[Path, typer.Option("--json", help="write the report here")],
    shortlist: Annotated[int, typer.Option(help="the node's shortlist length K")] = 200,
    learning_passes: Annotated[
        int, typer.Option(min=0, help="learning passes over the gallery before searching (0: prior only)")
    ] = 6,
    mated: Annotated[int | None, typer.Option(help="most mated probes to search (default: all)")] = None,
    nonmated: Annotated[
        int | None, typer.Option(help="most non-mated probes to search (default: all)")
    ] = None,
    device: Annotated[str, typer.Option(help="the node's torch device")] = "auto",
    traffic_share: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.9,
            help="share of the probes searched first, as traffic the node learns from (0: none)",
        ),
    ] = 0.0,
) -> None:
    """What a real node decides on a labelled data set at its own thresholds: FNIR and FPIR at hit
    and review, after it learned from its gallery and a first share of the searches, counted on
    the rest, beside the prior calibration's."""
    import asyncio

    from bench.operating_point import OperatingPointConfig, run_operating_point

    config = OperatingPointConfig(
        data=data,
        shortlist=shortlist,
        learning_passes=learning_passes,
        mated=mated,
        nonmated=nonmated,
        device=device,
        traffic_share=traffic_share,
    )
    with console.status("starting a node") as status:
        result = asyncio.run(run_operating_point(config, progress=lambda text: status.update(text)))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(
        title=f"{data}: {result['gallery_size']} enrolled, {result['mated_searches']} mated and "
        f"{result['nonmated_searches']} non-mated searches"
    )
    for column in ("thresholds", "FNIR at hit", "FNIR at review", "FPIR at hit", "FPIR at review"):
        table.add_column(column)

    def pct(rate: dict[str, float]) -> str:
        return f"{100 * rate['value']:.2f} % ({100 * rate['low']:.2f}-{100 * rate['high']:.2f})"

    for name, key in (("node's own (learned)", "at_node_thresholds"), ("prior alone", "at_prior_thresholds")):
        r = result[key]
        table.add_row(
            name,
            pct(r["fnir_at_hit"]),
            pct(r["fnir_at_review"]),
            pct(r["fpir_at_hit"]),
            pct(r["fpir_at_review"]),
        )
    console.print(table)
    own = result["at_own_fpir_quantile"]
    if own["fnir"] is not None:
        console.print(
            f"at the data set's own FPIR 1e-3 quantile ({own['threshold']:.3f}): FNIR {pct(own['fnir'])}"
        )
    t = result["thresholds"]
    console.print(
        f"ten-finger hit {t['hit_10_fingers']:.3f} (prior {t['prior_hit_10_fingers']:.3f}); {t['source']}; "
        f"mates not returned {pct(result['mates_not_returned'])}; "
        f"{result['seconds_per_probe']:.3f} s per probe"
    )
    console.print(f"wrote {json_out}")


@bench_app.command()
def extraction(
    json_out: Annotated[Path, typer.Option("--json", help="write the results here; the PNG goes beside it")],
    fingers: Annotated[int, typer.Option(help="synthetic fingers rendered (two impressions each)")] = 100,
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
    tolerance_px: Annotated[float, typer.Option(help="pairing distance tolerance, pixels at 500 ppi")] = 15.0,
    tolerance_deg: Annotated[float, typer.Option(help="pairing direction tolerance, degrees")] = 30.0,
    device: Annotated[str, typer.Option(help="matcher device: cpu or cuda")] = "cpu",
    contact: Annotated[
        str,
        typer.Option(help="impression contact area relative to the finger, low,high (plain prints: 0.4,0.6)"),
    ] = "0.75,0.95",
    distortion: Annotated[
        str, typer.Option(help="elastic distortion at the contact border, px, low,high")
    ] = "5,12",
) -> None:
    """Extraction accuracy on rendered synthetic fingers, time per ten-print, and EER extracted vs true."""
    from bench.extraction import (
        ExtractionBenchConfig,
        plot_scores,
        run_extraction_bench,
        to_json,
        torch_device_available,
    )

    if not torch_device_available(device):
        raise typer.BadParameter(f"device {device!r} is not available here")

    def span(text: str, name: str) -> tuple[float, float]:
        parts = [float(x) for x in text.split(",")]
        if len(parts) != 2 or parts[0] > parts[1] or parts[0] < 0:
            raise typer.BadParameter(f"--{name} takes low,high with 0 <= low <= high, not {text!r}")
        return parts[0], parts[1]

    config = ExtractionBenchConfig(
        fingers=fingers,
        seed=seed,
        tolerance_px=tolerance_px,
        tolerance_deg=tolerance_deg,
        device=device,
        contact=span(contact, "contact"),
        distortion=span(distortion, "distortion"),
    )
    with stage_progress(console) as on_progress:
        result = run_extraction_bench(config, progress=on_progress)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(to_json(result), indent=2) + "\n")
    png = json_out.with_suffix(".png")
    plot_scores(result, png)

    table = Table(
        title=f"{result['extractor']} {result['extractor_version']}, {fingers} fingers x 2 impressions"
    )
    for column in ("measure", "value"):
        table.add_column(column)
    tol = f"{tolerance_px:g} px, {tolerance_deg:g}°"
    table.add_row(f"paired ({tol})", f"{100 * result['paired_rate']:.1f} % of {result['true_minutiae']}")
    table.add_row("missed", f"{100 * result['missed_rate']:.1f} %")
    table.add_row("spurious", f"{100 * result['spurious_rate']:.1f} % of {result['extracted_minutiae']}")
    table.add_row("seconds per finger", f"{result['seconds_per_finger']:.3f}")
    table.add_row("seconds per ten-print", f"{result['seconds_per_tenprint']:.2f}")
    table.add_row("EER, extracted minutiae", f"{100 * result['eer_extracted']:.2f} %")
    table.add_row("EER, true minutiae", f"{100 * result['eer_true']:.2f} %")
    table.add_row(
        "median genuine score, extracted / true",
        f"{result['genuine_score_median_extracted']:.3f} / {result['genuine_score_median_true']:.3f}",
    )
    console.print(table)
    console.print(f"wrote {json_out} and {png}")
