"""Which certificate a client command presents: its role's identity in the PKI directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedprint.pki import TlsFiles

TlsDirOption = Annotated[
    Path,
    typer.Option(help="mTLS: the directory `fedprint certs` wrote; each command uses its role's identity"),
]
InsecureOption = Annotated[
    bool, typer.Option("--insecure", help="plaintext, no certificates: only against services run --insecure")
]


def identity(directory: Path, name: str, insecure: bool) -> TlsFiles | None:
    """The identity ``name`` in the PKI directory (None with --insecure); a clear error when absent."""
    if insecure:
        return None
    files = TlsFiles.in_dir(directory, name)
    for path in (files.ca, files.cert, files.key):
        if not path.is_file():
            raise typer.BadParameter(
                f"{path} does not exist: run `fedprint certs {directory}` (with --ori for agencies), "
                "or pass --tls-dir"
            )
    return files
