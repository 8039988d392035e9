"""``python -m cli`` is the ``fedprint`` command (the demo starts services this way)."""

from cli.app import app

app()
