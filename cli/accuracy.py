"""The accuracy verbs of ``fedprint``: ``synth``, ``match`` and ``eval``.

Kept out of :mod:`cli.app` so that file stays a list of verbs; :func:`register` adds them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from cli.progress import stage_progress

DIFFICULTY_HELP = "impression damage preset: easy, realistic, hard, smudged or sparse"


def register(app: typer.Typer, console: Console) -> None:
    """Adds ``synth``, ``match`` and ``eval`` to ``app``, printing to ``console``."""

    @app.command()
    def synth(
        out: Annotated[Path, typer.Argument(help="directory to write the population to")],
        subjects: Annotated[
            int, typer.Option("--subjects", "--persons", help="synthetic persons (subjects)")
        ] = 600,
        bookings: Annotated[int, typer.Option(help="bookings to draw")] = 60,
        seed: Annotated[int, typer.Option(help="random seed; same seed, same files")] = 1,
        difficulty: Annotated[str, typer.Option(help=DIFFICULTY_HELP)] = "realistic",
        population: Annotated[
            bool, typer.Option(help="also write galleries, records and bookings (held in memory)")
        ] = True,
        evaluation: Annotated[
            bool, typer.Option(help="also write OUT/evaluation, a data set in the standard layout")
        ] = True,
        unenrolled: Annotated[
            float, typer.Option(help="share of evaluation subjects with probes but no gallery capture")
        ] = 0.0,
        plain_probes: Annotated[
            bool,
            typer.Option(
                "--plain-probes/--rolled-probes",
                help="plain probes (accuracy figures) or rolled (booking-like, for calibration)",
            ),
        ] = True,
        plain_share: Annotated[
            float | None,
            typer.Option(
                min=0.0, max=1.0, help="share of probes that are plain, the rest rolled (overrides)"
            ),
        ] = None,
        workers: Annotated[
            int | None,
            typer.Option(min=1, help="processes for the evaluation set (default: CPU count); same files"),
        ] = None,
    ) -> None:
        """Writes a deterministic synthetic population and an evaluation data set."""
        from synthetic.evaluation_set import write_evaluation_set
        from synthetic.fingers import DIFFICULTIES
        from synthetic.population import generate_population, write_population

        if difficulty not in DIFFICULTIES:
            raise typer.BadParameter(f"difficulty must be one of {', '.join(DIFFICULTIES)}")
        started = time.perf_counter()
        if population:
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("population", total=None)
                made = generate_population(
                    seed=seed,
                    persons=subjects,
                    bookings=bookings,
                    difficulty=difficulty,
                    on_progress=lambda done, total: progress.update(task, completed=done, total=total),
                )
            write_population(made, out)
            console.print(
                f"wrote {len(made.iafis)} IAFIS and {len(made.ident)} IDENT subjects, "
                f"{len(made.bookings)} bookings to {out}"
            )
        if evaluation:
            columns = (*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console) as progress:
                task = progress.add_task("evaluation set", total=subjects)
                files = write_evaluation_set(
                    out / "evaluation",
                    seed=seed,
                    subjects=subjects,
                    difficulty=difficulty,
                    unenrolled_share=unenrolled,
                    plain_probes=plain_probes,
                    plain_share=plain_share,
                    workers=workers,
                    on_progress=lambda done, total: progress.update(task, completed=done),
                )
            console.print(f"wrote {files} templates of {subjects} subjects to {out / 'evaluation'}")
        console.print(f"{time.perf_counter() - started:.1f} s, difficulty {difficulty}, seed {seed}")

    @app.command()
    def match(
        a: Annotated[Path, typer.Argument(help="template file (.xyt, or ISO/IEC 19794-2)")],
        b: Annotated[Path, typer.Argument(help="template file (.xyt, or ISO/IEC 19794-2)")],
        json_out: Annotated[
            bool, typer.Option("--json", help="print JSON instead of a line of text")
        ] = False,
    ) -> None:
        """Prints the 1:1 MCC score (LSS, 0-1) of two single-finger template files."""
        from gpu_kernels import MccParams, encode_fingers, score_fingers
        from minutiae.dataset import read_template
        from minutiae.template import TemplateError

        try:
            ta, tb = read_template(a), read_template(b)
        except (TemplateError, OSError) as e:
            raise typer.BadParameter(str(e)) from e
        params = MccParams()
        score = float(score_fingers(encode_fingers([ta], params), encode_fingers([tb], params), params)[0, 0])
        if json_out:
            typer.echo(
                json.dumps({"a": str(a), "b": str(b), "score": score, "minutiae": [ta.count, tb.count]})
            )
        else:
            typer.echo(f"{score:.4f}")

    @app.command("eval")
    def eval_command(
        data: Annotated[
            list[Path], typer.Argument(help="data set directories with manifest.csv (several are merged)")
        ],
        json_out: Annotated[
            Path | None, typer.Option("--json", help="write the report here; the DET plot goes beside it")
        ] = None,
        impostor_pairs: Annotated[int, typer.Option(help="single-finger impostor pairs to sample")] = 100_000,
        searches: Annotated[
            int | None, typer.Option(help="1:N searches to run (a seeded sample); all probes if unset")
        ] = None,
        seed: Annotated[int, typer.Option(help="seed of the impostor and search samples")] = 0,
        device: Annotated[str, typer.Option(help="torch device")] = "cpu",
        threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
        calibrate: Annotated[
            Path | None,
            typer.Option(help="write calibrated thresholds into this node config YAML (created if absent)"),
        ] = None,
        hit_fpir: Annotated[float, typer.Option(help="FPIR of the calibrated hit threshold")] = 1e-3,
        review_fpir: Annotated[float, typer.Option(help="FPIR of the calibrated review threshold")] = 1e-2,
        shortlist: Annotated[
            int | None,
            typer.Option(help="search 1:N as a large node does: faiss shortlist of this many, then full MCC"),
        ] = None,
        fusion: Annotated[
            str,
            typer.Option(
                help="primary ten-print fusion: evidence (LLR sum) or mean; the other is reported too"
            ),
        ] = "evidence",
        fusion_model: Annotated[
            Path | None, typer.Option(help="evidence model JSON to use instead of the shipped one")
        ] = None,
        fit_fusion: Annotated[
            Path | None,
            typer.Option(
                help="fit the evidence model on this data set's 1:1 pairs, write it here, search with it"
            ),
        ] = None,
        gallery_sizes: Annotated[
            str | None,
            typer.Option(
                help="comma-separated smaller gallery sizes to search again (seeded subsets), checking "
                "the calibration's predicted FPIR against the measured one at each size"
            ),
        ] = None,
        check_thresholds: Annotated[
            Path | None,
            typer.Option(help="calibration YAML checked by --gallery-sizes (default: the shipped one)"),
        ] = None,
    ) -> None:
        """1:1 and 1:N accuracy of the MCC matcher on a data set; optionally calibrates thresholds."""
        import torch

        from calibration.evidence_fit import impostor_sums_by_fingers
        from calibration.tails import CalibrationError, fit_tail
        from calibration.thresholds import calibrated_thresholds, write_thresholds
        from evaluation.calibrate import calibrate as derive
        from evaluation.run import FUSION_NAMES, EvalOptions, det_plot, evaluate, summary
        from gpu_kernels import EvidenceModel
        from gpu_kernels.evidence import DEFAULT_MIN_COHORT, SHIPPED_MODEL, model_digest
        from minutiae.dataset import DatasetError, merge_datasets, read_dataset

        if fusion not in FUSION_NAMES:
            raise typer.BadParameter(f"--fusion must be one of {', '.join(FUSION_NAMES)}")
        if calibrate is not None and fit_fusion is not None:
            # The tails must come from impostor pairs the LLR curves never saw: a model's own
            # training pairs sit where it put them, and their tail understates everyone else's.
            raise typer.BadParameter(
                "--calibrate and --fit-fusion fit on the same pairs: fit the evidence model first, "
                "then calibrate with it (--fusion-model) on other data"
            )
        if threads is not None:
            torch.set_num_threads(threads)
        if json_out is not None:
            # Now, not after a run of many minutes: a report that cannot be written fails first.
            json_out.parent.mkdir(parents=True, exist_ok=True)
        try:
            dataset = merge_datasets([read_dataset(d) for d in data])
            model = None if fusion_model is None else EvidenceModel.load(fusion_model)
            sizes = tuple(int(v) for v in gallery_sizes.split(",")) if gallery_sizes else ()
            # The calibration a node would judge by: the operating point, always reported.
            operating = (
                calibrated_thresholds(check_thresholds) if check_thresholds else calibrated_thresholds()
            )
            checked = operating if sizes else None
        except (DatasetError, OSError, ValueError, KeyError) as e:
            raise typer.BadParameter(str(e)) from e
        options = EvalOptions(
            impostor_pairs=impostor_pairs,
            searches=searches,
            seed=seed,
            device=device,
            shortlist=shortlist,
            fusions=(fusion, *(name for name in FUSION_NAMES if name != fusion)),
            model=model,
            fit_fusion=fit_fusion is not None,
            gallery_sizes=sizes,
            calibration=checked,
            operating=operating,
            # A tail fit takes its impostor pairs from blocks where each probe finger meets a
            # search-sized cohort.
            min_block=(model.min_cohort if model else DEFAULT_MIN_COHORT) + 1 if calibrate is not None else 1,
        )
        started = time.perf_counter()
        with stage_progress(console) as on_progress:
            result = evaluate(dataset, options, progress=on_progress)
        named = ", ".join(str(d) for d in data)
        report: dict[str, Any] = {"dataset": named, **summary(result)}
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        if fit_fusion is not None:
            result.model.save(fit_fusion)
            report["fitted_model"] = str(fit_fusion)
        if calibrate is not None:
            sums = impostor_sums_by_fingers(result.pairs, result.model)
            try:
                thresholds = derive(
                    result.outcomes,
                    hit_fpir=hit_fpir,
                    review_fpir=review_fpir,
                    source=f"fedprint eval --calibrate on {named} ({sums[-1].size} impostor "
                    f"ten-print pairs, tail model)",
                    tails=[fit_tail(x) for x in sums],
                    gallery_size=result.gallery_size,
                ).model_copy(update={"evidence_model": model_digest(fusion_model or SHIPPED_MODEL)})
            except CalibrationError as e:
                raise typer.BadParameter(str(e)) from e
            if problems := thresholds.problems():
                shown = "; ".join(problems[:5]) + (
                    f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
                )
                raise typer.BadParameter(f"the calibration is not written: {shown}")
            write_thresholds(calibrate, thresholds)
            report["calibrated"] = {"config": str(calibrate), **thresholds.model_dump(mode="json")}
        console.print(_table(report))
        if calibrate is not None:
            c = report["calibrated"]
            console.print(f"calibrated hit {c['hit']:.4f}, review {c['review']:.4f} -> {calibrate}")
        if json_out is not None:
            plot = json_out.with_suffix(".det.png")
            det_plot(result, plot)
            report["det_plot"] = plot.name
            json_out.write_text(json.dumps(report, indent=2) + "\n")
            console.print(f"wrote {json_out} and {plot}")


def _fmt(value: Any) -> str:
    return "n/a (too few comparisons)" if value is None else f"{value:.4%}"


def _table(report: dict[str, Any]) -> Table:
    table = Table(title=f"accuracy on {report['dataset']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    if (op := report.get("operating_point")) is not None:
        # First: what a node decides at its own thresholds.
        for band in ("hit", "review"):
            figures = op[band]
            if figures["fnir"] is None or figures["fpir"] is None:
                continue
            table.add_row(
                f"at the node's {band} thresholds (gallery {op['gallery_size']}): FNIR / FPIR",
                f"{figures['fnir']:.2%} [{figures['fnir_ci'][0]:.2%}, {figures['fnir_ci'][1]:.2%}] / "
                f"{figures['fpir']:.3%} ({figures['nonmated_at_or_above']} of "
                f"{figures['nonmated_searches']}; stated {figures['stated_fpir']:g})",
            )
    table.add_row("genuine / impostor pairs (1:1)", f"{report['genuine_pairs']} / {report['impostor_pairs']}")
    table.add_row("EER (1:1 single finger)", _fmt(report.get("eer")))
    for rate, value in report["fnmr_at_fmr"].items():
        table.add_row(f"FNMR at FMR {rate}", _fmt(value))
    table.add_row(
        "gallery / mated / non-mated searches (1:N)",
        f"{report['gallery_size']} / {report['mated_searches']} / {report['nonmated_searches']}",
    )
    table.add_row("1:N search", report["search_tiers"])
    if report.get("shortlist_mate_recall") is not None:
        table.add_row("mates kept by the shortlist", _fmt(report["shortlist_mate_recall"]))
    for name, figures in report["fusions"].items():
        marker = " (primary)" if name == report["fusion"] else ""
        table.add_row(f"rank-1 identification rate, {name} fusion{marker}", _fmt(figures.get("rank1")))
        for rate, value in figures["fnir_at_fpir"].items():
            detail = figures["fnir_at_fpir_detail"].get(rate)
            note = ""
            if detail is not None:
                low, high = detail["fnir_ci"]
                note = f" [{low:.2%}, {high:.2%}], {detail['nonmated_at_or_above']} non-mated at/above"
                note += " (thin: fewer than 10)" if detail["thin"] else ""
            table.add_row(f"FNIR at FPIR {rate}, {name} fusion", _fmt(value) + note)
    for row in report.get("calibration_check", []):
        low, high = row["measured_fpir_ci"]
        table.add_row(
            f"gallery {row['gallery_size']}: FPIR predicted {row['predicted_fpir']:g}",
            f"measured {row['measured_fpir']:.4%} [{low:.3%}, {high:.3%}] of {row['nonmated_searches']}",
        )
    tail = report["single_finger_tail"]
    for kind in ("raw", "normalised"):
        few, many = tail[kind]["few_minutiae"], tail[kind]["many_minutiae"]
        table.add_row(
            f"impostor finger p{tail['quantile'] * 100:g} {kind}, <=12 / >=30 minutiae",
            "n/a" if few is None or many is None else f"{few:.4f} / {many:.4f}",
        )
    return table
