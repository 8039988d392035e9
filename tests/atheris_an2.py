"""Coverage-guided fuzzing of the ANSI/NIST-ITL reader with atheris (the optional ``fuzz`` extra).

Run: ``python tests/atheris_an2.py -atheris_runs=N`` or ``-max_total_time=S`` (libFuzzer flags).
Any exception other than :class:`~minutiae.an2.TransactionError` is a finding: libFuzzer stops
and writes the input to ``crash-*``. tests/test_an2.py runs it for a few seconds when installed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys

import atheris

with atheris.instrument_imports():
    import nistitl  # noqa: F401  (instrumented: its parser is what the framing must keep safe)

    from minutiae.an2 import (
        Charge,
        FingerImage,
        Transaction,
        TransactionError,
        encode_image,
        placeholder_image,
        read_transaction,
        write_transaction,
    )


def seeds() -> list[bytes]:
    """Valid transactions (Type-4 and Type-14, WSQ and PNG) for libFuzzer to mutate."""
    images = tuple(
        FingerImage(p, encode_image(placeholder_image(p, width=48, height=56), c), c, 48, 56)  # type: ignore[arg-type]
        for p, c in ((1, "WSQ"), (13, "PNG"))
    )
    t = Transaction(
        tcn="TCN-1",
        ori="XX0010000",
        date=dt.date(2025, 6, 3),
        charges=(Charge("1201", "ROBBERY"),),
        images=images,
    )
    wsq_only = Transaction(**{**t.__dict__, "images": images[:1]})
    return [write_transaction(t, image_record=14), write_transaction(wsq_only, image_record=4)]


def test_one_input(data: bytes) -> None:
    """One fuzz input: a Transaction or a TransactionError, nothing else."""
    with contextlib.suppress(TransactionError):
        read_transaction(data)


if __name__ == "__main__":
    corpus = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else None
    if corpus is not None:
        from pathlib import Path

        for n, seed in enumerate(seeds()):
            (Path(corpus) / f"seed-{n}.an2").write_bytes(seed)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
