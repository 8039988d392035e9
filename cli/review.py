"""``fedprint review {list,show,confirm,reject}``: an examiner's work on borderline matches,
as the examiner's certificate (``examiner`` in the PKI directory).

``show`` claims the review and draws, per finger, the booking's minutiae beside the
candidate's with the pairs that carried the score joined by lines (a PNG), so a person can
see why the matcher scored what it did before confirming or rejecting.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from cli.identity import InsecureOption, TlsDirOption, identity
from fedprint.records.v1 import records_pb2 as rec
from fedprint.review.v1 import review_pb2 as rv
from fedprint.review.v1 import review_pb2_grpc as rv_grpc
from fedprint.rpc import open_channel
from fedprint.tenprint import decode_tenprint
from gpu_kernels import MccParams
from gpu_kernels.cylinders import encode_fingers
from gpu_kernels.similarity import MatchedPairs, matched_pairs
from minutiae.template import FingerTemplate

AddressOption = Annotated[str, typer.Option(help="the coordinator's host:port")]
NoteOption = Annotated[str, typer.Option(help="why, in the examiner's words")]
STATES = {"open": rv.OPEN, "claimed": rv.CLAIMED, "confirmed": rv.CONFIRMED, "rejected": rv.REJECTED}


@dataclass(frozen=True)
class FingerComparison:
    """One finger of a review: both templates and the pairs behind its score."""

    position: int
    probe: FingerTemplate
    candidate: FingerTemplate
    matched: MatchedPairs


def compare_fingers(case: rv.ReviewCase, params: MccParams | None = None) -> list[FingerComparison]:
    """Every finger present in both ten-prints of a review, with the matcher's pairs."""
    params = params or MccParams()
    probe = decode_tenprint(case.probe, "probe").templates.fingers
    candidate = decode_tenprint(case.candidate_tenprint, "candidate").templates.fingers
    out = []
    for position in sorted(set(probe) & set(candidate)):
        a, b = encode_fingers([probe[position]], params), encode_fingers([candidate[position]], params)
        out.append(
            FingerComparison(position, probe[position], candidate[position], matched_pairs(a, b, params))
        )
    return out


def draw_case(case: rv.ReviewCase, comparisons: list[FingerComparison], path: Path) -> None:
    """A PNG: one panel per finger, the booking's minutiae (left) beside the candidate's (right),
    each pair that carried the score joined by a line as dark as the pair is strong."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2
    rows = max(1, (len(comparisons) + columns - 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(12, 4.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, c in zip(axes.flat, comparisons, strict=False):
        gap = 40.0
        shift = c.probe.width + gap
        for template, dx, colour in ((c.probe, 0.0, "tab:blue"), (c.candidate, shift, "tab:red")):
            m = template.minutiae
            x, y, theta = m[:, 0] + dx, m[:, 1], m[:, 2]
            ax.scatter(x, y, s=10, c=colour)
            # Direction ticks, image frame (y down).
            ax.quiver(
                x,
                y,
                8 * np.cos(theta),
                -8 * np.sin(theta),
                color=colour,
                angles="xy",
                scale_units="xy",
                scale=1,
            )
        for i, j, strength in c.matched.pairs:
            a, b = c.probe.minutiae[i], c.candidate.minutiae[j]
            ax.plot([a[0], b[0] + shift], [a[1], b[1]], color="black", alpha=min(1.0, 0.2 + strength), lw=0.8)
        ax.set_xlim(-10, shift + c.candidate.width + 10)
        ax.set_ylim(max(c.probe.height, c.candidate.height) + 10, -10)
        ax.set_aspect("equal")
        ax.set_title(
            f"finger {c.position}: score {c.matched.score:.4f}, {len(c.matched.pairs)} pairs", fontsize=9
        )
    review = case.review
    figure.suptitle(
        f"review {review.review_id}: booking (blue) vs {review.candidate.subject_id} (red), "
        f"fused {review.candidate.fused_score:.4f} (hit {review.thresholds.hit:.4f}, "
        f"review {review.thresholds.review:.4f})"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def register(app: typer.Typer, console: Console) -> None:
    """Adds the ``review`` command group to ``app``."""
    review_app = typer.Typer(
        no_args_is_help=True, help="Examiner review of borderline IAFIS and IDENT matches."
    )
    app.add_typer(review_app, name="review")

    def stub_call(address: str, tls_dir: Path, insecure: bool, call: str, request: object) -> object:
        async def run() -> object:
            async with open_channel(
                address, identity(tls_dir, "examiner", insecure), server="coordinator", insecure=insecure
            ) as ch:
                return await getattr(rv_grpc.ReviewServiceStub(ch), call)(request, timeout=30)

        return asyncio.run(run())

    @review_app.command("list")
    def list_reviews(
        address: AddressOption = "127.0.0.1:50060",
        state: Annotated[str | None, typer.Option(help="open, claimed, confirmed or rejected")] = None,
        overdue: Annotated[
            bool, typer.Option("--overdue", help="only reviews waiting longer than the overdue age")
        ] = False,
        limit: Annotated[int, typer.Option(min=1, max=1000, help="most reviews to list")] = 100,
        tls_dir: TlsDirOption = Path("pki"),
        insecure: InsecureOption = False,
        json_out: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    ) -> None:
        """Reviews oldest first (by default the open and claimed ones), with their age."""
        if state is not None and state not in STATES:
            raise typer.BadParameter(f"state is one of {', '.join(STATES)}")
        request = rv.ListReviewsRequest(
            state=STATES[state] if state else rv.REVIEW_STATE_UNSPECIFIED, overdue=overdue, limit=limit
        )
        response = stub_call(address, tls_dir, insecure, "ListReviews", request)
        assert isinstance(response, rv.ListReviewsResponse)
        if json_out:
            rows = [
                {
                    "review_id": r.review_id,
                    "tcn": r.tcn,
                    "node": r.node,
                    "ori": r.ori,
                    "state": rv.ReviewState.Name(r.state).lower(),
                    "examiner": r.examiner,
                    "age_s": round(r.age_s, 1),
                    "subject_id": r.candidate.subject_id,
                    "fused_score": r.candidate.fused_score,
                    "level": r.level,
                }
                for r in response.reviews
            ]
            console.print_json(json.dumps(rows))
            return
        table = Table(title=f"{len(response.reviews)} reviews")
        for column in ("review (TCN/node)", "ORI", "state", "examiner", "age", "candidate", "fused", "level"):
            table.add_column(column)
        for r in response.reviews:
            table.add_row(
                r.review_id,
                r.ori,
                rv.ReviewState.Name(r.state).lower(),
                r.examiner,
                f"{r.age_s / 60:.1f} min",
                r.candidate.subject_id,
                f"{r.candidate.fused_score:.4f}",
                str(r.level),
            )
        console.print(table)

    @review_app.command("show")
    def show(
        review_id: Annotated[str, typer.Argument(help="the review: <ORI>/<TCN>/iafis or <ORI>/<TCN>/ident")],
        png: Annotated[Path, typer.Option(help="where to draw the side-by-side comparison")] = Path(
            "review.png"
        ),
        address: AddressOption = "127.0.0.1:50060",
        tls_dir: TlsDirOption = Path("pki"),
        insecure: InsecureOption = False,
    ) -> None:
        """Claims a review, prints the evidence and the candidate's record, draws both ten-prints."""
        case = stub_call(
            address, tls_dir, insecure, "ClaimReview", rv.ClaimReviewRequest(review_id=review_id)
        )
        assert isinstance(case, rv.ReviewCase)
        comparisons = compare_fingers(case)
        draw_case(case, comparisons, png)
        review = case.review
        console.print(
            f"review {review.review_id} ({rv.ReviewState.Name(review.state).lower()} by {review.examiner}), "
            f"open {review.age_s / 60:.1f} min; candidate {review.candidate.subject_id}: fused "
            f"{review.candidate.fused_score:.4f} against hit {review.thresholds.hit:.4f} / review "
            f"{review.thresholds.review:.4f}"
        )
        table = Table(title="per finger")
        for column in ("finger", "node score", "pairs"):
            table.add_column(column)
        node_scores = {int(f.position): f.score for f in review.candidate.finger_scores}
        for c in comparisons:
            table.add_row(
                str(c.position), f"{node_scores.get(c.position, 0.0):.4f}", str(len(c.matched.pairs))
            )
        console.print(table)
        if review.node == "iafis":
            history = case.candidate_criminal_history
            charges = sum(len(arrest.charges) for arrest in history.arrests)
            console.print(f"criminal history: {len(history.arrests)} arrests, {charges} charges")
        else:
            record = case.candidate_record
            console.print(
                f"record: status {rec.ImmigrationStatus.Name(record.status)}, "
                f"{len(record.encounters)} encounters, "
                f"{record.prior_removals} prior removals"
            )
        for reason in review.reasons:
            console.print(f"  - {reason}")
        console.print(f"wrote {png}")

    def decide(
        review_id: str, verdict: rv.Verdict.ValueType, note: str, address: str, tls_dir: Path, insecure: bool
    ) -> None:
        request = rv.DecideReviewRequest(review_id=review_id, verdict=verdict, note=note)
        review = stub_call(address, tls_dir, insecure, "DecideReview", request)
        assert isinstance(review, rv.Review)
        console.print(
            f"review {review.review_id}: {rv.ReviewState.Name(review.state).lower()} by {review.examiner}"
        )

    @review_app.command("confirm")
    def confirm(
        review_id: Annotated[str, typer.Argument(help="a review you have claimed (`review show`)")],
        note: NoteOption = "",
        address: AddressOption = "127.0.0.1:50060",
        tls_dir: TlsDirOption = Path("pki"),
        insecure: InsecureOption = False,
    ) -> None:
        """Confirms the match; the policy decides what follows (an IDENT match notifies ICE unless a
        suppression rule applies; an IAFIS match's convictions count toward the threat level)."""
        decide(review_id, rv.CONFIRM, note, address, tls_dir, insecure)

    @review_app.command("reject")
    def reject(
        review_id: Annotated[str, typer.Argument(help="a review you have claimed (`review show`)")],
        note: NoteOption = "",
        address: AddressOption = "127.0.0.1:50060",
        tls_dir: TlsDirOption = Path("pki"),
        insecure: InsecureOption = False,
    ) -> None:
        """Rejects the match: the case closes; no one is notified, no history counts."""
        decide(review_id, rv.REJECT, note, address, tls_dir, insecure)
