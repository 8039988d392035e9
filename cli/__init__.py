"""The ``fedprint`` command line: one verb per job, the demo, and the bench command group.

The top layer: it wires the layers below into commands and prints their results.
"""
