"""Calibration: what a gallery node turns fused scores into bands with.

:mod:`calibration.thresholds` holds the thresholds and impostor tail models a node judges by
(the shipped calibration, ``thresholds.yaml``, beside it); :mod:`calibration.tails` fits a tail
to any sample of impostor scores; :mod:`calibration.evidence_fit` fits the evidence model that
turns per-finger scores into log-likelihood ratios; :mod:`calibration.learning` learns a node's
tails from its own gallery, without labels. Nodes use it at run time; the accuracy harness
(:mod:`evaluation`) uses it to write a calibration from labelled data.
"""
