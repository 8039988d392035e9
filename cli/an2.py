"""``fedprint an2``: ANSI/NIST-ITL transactions. ``show FILE`` prints one's records; ``make OUT``
builds one from a synthetic booking."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from minutiae.an2 import (
    Charge,
    Compression,
    FingerImage,
    Transaction,
    TransactionError,
    encode_image,
    placeholder_image,
    read_transaction,
    write_transaction,
)


def transaction_summary(t: Transaction) -> dict[str, Any]:
    """The transaction as plain JSON-able data (image bytes as their length)."""
    return {
        "version": t.version,
        "tot": t.tot,
        "date": t.date.isoformat(),
        "dai": t.dai,
        "ori": t.ori,
        "tcn": t.tcn,
        "records": [{"type": rtype, "idc": idc} for rtype, idc in t.records],
        "charges": [dataclasses.asdict(c) for c in t.charges],
        "images": [
            {
                "position": i.position,
                "compression": i.compression,
                "width": i.width,
                "height": i.height,
                "ppi": i.ppi,
                "impression": i.impression,
                "bytes": len(i.data),
            }
            for i in t.images
        ],
        "minutiae": [{"position": m.finger_position, "count": m.count} for m in t.templates],
    }


def _load_image(spec: str) -> tuple[int, np.ndarray[Any, np.dtype[np.uint8]]]:
    position, sep, path = spec.partition("=")
    if not sep or not position.isdigit():
        raise typer.BadParameter(f"{spec!r}: give POSITION=PATH, e.g. 2=right_index.png")
    from PIL import Image

    try:
        with Image.open(path) as image:
            return int(position), np.asarray(image.convert("L"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise typer.BadParameter(f"{path}: {error}") from error


def register(app: typer.Typer, console: Console) -> None:
    """Adds the ``an2`` command group to ``app``."""
    an2_app = typer.Typer(no_args_is_help=True, help="ANSI/NIST-ITL transactions: show one, make one.")
    app.add_typer(an2_app, name="an2")

    @an2_app.command()
    def show(
        file: Annotated[Path, typer.Argument(help="an ANSI/NIST-ITL transaction (.an2, .eft)")],
        json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
    ) -> None:
        """Reads a transaction (decoding every image) and prints its records, or exactly what is
        wrong with it: the record and the field."""
        try:
            t = read_transaction(file.read_bytes())
        except TransactionError as error:
            if json_out:
                print(
                    json.dumps(
                        {"error": {"record": error.record, "field": error.field, "message": error.message}}
                    )
                )
            else:
                console.print(f"[red]{error}[/red]")
            raise typer.Exit(1) from None
        summary = transaction_summary(t)
        if json_out:
            print(json.dumps(summary, indent=2))
            return
        header = Table("field", "value", title="Type-1 header")
        for name in ("version", "tot", "date", "dai", "ori", "tcn"):
            header.add_row(name.upper(), str(summary[name]))
        header.add_row("CNT", ", ".join(f"{r['type']}/{r['idc']}" for r in summary["records"]))
        console.print(header)
        charges = Table("NCIC code", "literal", "counts", title="Type-2 charges (2.047 ASL, 2.901 NCI)")
        for c in t.charges:
            charges.add_row(c.code, c.literal, str(c.counts))
        console.print(charges)
        images = Table("FGP", "compression", "size", "ppi", "IMP", "bytes", title="images (Type-4/14)")
        for i in t.images:
            images.add_row(
                str(i.position),
                i.compression,
                f"{i.width}x{i.height}",
                str(i.ppi),
                str(i.impression),
                f"{len(i.data):,}",
            )
        console.print(images)
        if t.templates:
            minutiae = Table("FGP", "minutiae", title="Type-9 minutiae")
            for m in t.templates:
                minutiae.add_row(str(m.finger_position), str(m.count))
            console.print(minutiae)

    @an2_app.command()
    def make(
        out: Annotated[Path, typer.Argument(help="transaction file to write")],
        seed: Annotated[int, typer.Option(help="population seed (as `fedprint synth`)")] = 7,
        booking: Annotated[int, typer.Option(min=0, help="which booking of that population (0 first)")] = 0,
        record: Annotated[int, typer.Option(help="image record type: 4 (WSQ only) or 14")] = 14,
        compression: Annotated[str, typer.Option(help="WSQ or PNG")] = "WSQ",
        image: Annotated[
            list[str] | None,
            typer.Option(help="POSITION=PATH: an image file for that finger (repeatable), taken as 500 ppi"),
        ] = None,
    ) -> None:
        """Builds a transaction from a synthetic booking: TCN, ORI, date and charges from the
        population generator; one image per printed finger.

        Without ``--image``, the images are PLACEHOLDERS: concentric sine rings, not fingerprints
        (the ridge renderer will replace them), sized like the booking's templates; their Type-9
        records carry the generator's minutiae of the booking, which the placeholders do not show.
        With ``--image``, only the given fingers are written, without Type-9."""
        from synthetic.population import generate_population

        if record not in (4, 14):
            raise typer.BadParameter("--record is 4 or 14")
        codec = compression.upper()
        if codec not in ("WSQ", "PNG"):
            raise typer.BadParameter("--compression is WSQ or PNG")
        method: Compression = "WSQ" if codec == "WSQ" else "PNG"
        source = generate_population(seed=seed, persons=5, bookings=booking + 1).bookings[booking].booking
        from minutiae.iso19794_2 import decode_template

        templates = {
            f.position: decode_template(f.template.data)
            for f in source.tenprint.fingers
            if f.WhichOneof("data") == "template"
        }
        pixels = dict(_load_image(spec) for spec in image or [])
        written_templates = []
        if not pixels:
            for position, template in templates.items():
                pixels[position] = placeholder_image(
                    position, width=template.width, height=template.height, seed=seed
                )
                written_templates.append(template)
        try:
            images = [
                FingerImage(position, encode_image(p, method), method, p.shape[1], p.shape[0])
                for position, p in sorted(pixels.items())
            ]
        except TransactionError as error:
            raise typer.BadParameter(f"--image: {error}") from None
        t = Transaction(
            tcn=source.tcn,
            ori=source.ori,
            date=source.booking_time.ToDatetime().date(),
            charges=tuple(Charge(c.ncic_code, c.literal, c.counts or 1) for c in source.charges),
            images=tuple(images),
            templates=tuple(written_templates),
        )
        kind: Literal[4, 14] = 4 if record == 4 else 14
        try:
            data = write_transaction(t, image_record=kind)
        except TransactionError as error:
            console.print(f"[red]{error}[/red]")
            raise typer.Exit(1) from None
        out.write_bytes(data)
        label = "placeholder " if not image else ""
        console.print(
            f"{out}: TCN {t.tcn}, ORI {t.ori}, {len(t.charges)} charges, {len(images)} {label}"
            f"{method} images in Type-{record}, {len(written_templates)} Type-9; {len(data):,} bytes"
        )
