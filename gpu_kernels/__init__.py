"""Batched fingerprint matching kernels: Minutia Cylinder-Code (MCC) with LSS or LSS-R, and ten-finger fusion.

Device-agnostic PyTorch: everything runs on the device the caller puts the cylinders on.

    params = MccParams()                                      # the paper's values, bit-based
    gallery = encode_tenprints(gallery_tenprints, params, "cuda")
    probe = encode_tenprints([booking_tenprint], params, "cuda")
    scores = score_tenprints(probe, gallery, params)          # .fused: [1, G], .per_finger: [1, G, 10]

Single fingers: ``encode_fingers`` -> ``CylinderSet``; ``score_fingers`` -> ``[P, G]`` scores,
consolidated by LSS or LSS-R (``MccParams.consolidation``), and ``score_fingers_paired`` ->
``[P, K]`` for each probe against its own K gallery fingers (a shortlist); ``local_similarities``
exposes every cylinder-pair similarity for inspection, ``lss_scores`` / ``lss_r_scores``
consolidate them.
:mod:`gpu_kernels.reference` is the slow literal version the tests compare against.
"""

from gpu_kernels.cylinders import CylinderSet, encode_fingers
from gpu_kernels.evidence import EvidenceModel, shipped_model
from gpu_kernels.fusion import (
    FINGER_POSITIONS,
    Fusion,
    TenPrintCylinders,
    TenPrintScores,
    encode_tenprints,
    fuse_scores,
    score_tenprints,
)
from gpu_kernels.params import FusionParams, MccParams
from gpu_kernels.similarity import (
    local_similarities,
    lss_pair_count,
    lss_r_scores,
    lss_scores,
    score_fingers,
    score_fingers_paired,
)

__all__ = [
    "FINGER_POSITIONS",
    "CylinderSet",
    "EvidenceModel",
    "Fusion",
    "FusionParams",
    "MccParams",
    "TenPrintCylinders",
    "TenPrintScores",
    "encode_fingers",
    "encode_tenprints",
    "fuse_scores",
    "local_similarities",
    "lss_pair_count",
    "lss_r_scores",
    "lss_scores",
    "score_fingers",
    "score_fingers_paired",
    "score_tenprints",
    "shipped_model",
]
