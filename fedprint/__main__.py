"""``python -m fedprint`` is the ``fedprint`` command."""

from fedprint.cli import app

app()
