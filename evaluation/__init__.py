"""Accuracy harness: data sets in the standard layout, metrics, ``fedprint eval`` and calibration.

Public entry points: :func:`minutiae.dataset.read_dataset`; :mod:`evaluation.metrics` (EER,
FNMR at FMR, FNIR at FPIR, rank-1, Wilson intervals); :func:`evaluation.run.evaluate` and
:func:`~evaluation.run.summary`; :func:`evaluation.calibrate.calibrate` and
:func:`~evaluation.calibrate.write_thresholds`.
"""
