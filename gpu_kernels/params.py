"""Parameters of Minutia Cylinder-Code matching and of ten-finger fusion, with the reason for each value.

MCC values are those of R. Cappelli, M. Ferrara, D. Maltoni, "Minutia Cylinder-Code: a new
representation and matching technique for fingerprint recognition", IEEE TPAMI 32(12), 2010
(Table 1 and Section 6), tuned there on FVC2006 at 500 ppi. Pixel distances assume 500 ppi.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

#: How local similarities become a global score: LSS (Local Similarity Sort), or LSS-R (LSS
#: followed by relaxation, which penalises pairs geometrically inconsistent with the others).
Consolidation = Literal["lss", "lss_r"]

# The fields that shape a cylinder. Cylinders encoded with equal values of these can be scored
# under any matching-side settings (min_me, delta_theta, consolidation...), so changing the
# consolidation does not require re-encoding a gallery.
_CYLINDER_FIELDS = (
    "radius",
    "ns",
    "nd",
    "sigma_s",
    "sigma_d",
    "mu_psi",
    "tau_psi",
    "omega",
    "min_vc",
    "min_m",
    "binary",
)


@dataclass(frozen=True)
class MccParams:
    """Everything that shapes a cylinder, the pair matchability rules and the global score.

    Two cylinder sets can be compared only if they were encoded with equal cylinder-shaping
    parameters (``CylinderSet.params``, see :meth:`same_cylinders`); the scorer checks it.
    """

    # Cylinder radius in pixels: about two ridge periods at 500 ppi, the paper's optimum.
    radius: float = 70.0
    # Spatial cells along the cylinder diameter (Ns x Ns): the paper's accuracy/size trade-off.
    ns: int = 16
    # Angular sections (Nd): 6 sections of 60°, the paper's choice.
    nd: int = 6
    # Std-dev of the spatial Gaussian contribution, px; the paper sets 28/3 (cutoff 3σ = 28 px).
    sigma_s: float = 28.0 / 3.0
    # Std-dev of the directional Gaussian contribution, rad (40°), paper's value.
    sigma_d: float = 2.0 * math.pi / 9.0
    # Sigmoid Ψ centre: a cell is "on" when the summed contribution reaches 0.01 (paper).
    mu_psi: float = 0.01
    # Sigmoid Ψ steepness for the float variant (paper).
    tau_psi: float = 400.0
    # Margin, px, by which the minutiae's convex hull is enlarged to decide cell validity (paper).
    omega: float = 50.0
    # A cylinder needs at least this share of its in-disk cells valid (paper's min_VC).
    min_vc: float = 0.75
    # A cylinder needs at least this many other minutiae within R + 3σs (paper's min_M).
    min_m: int = 2
    # Two cylinders are matchable only if this share of in-disk cells is valid in both (min_ME).
    min_me: float = 0.6
    # Two cylinders are matchable only if their minutiae directions differ by at most this (rad).
    delta_theta: float = math.pi / 2.0
    # LSS: fewest and most local similarities averaged into the global score (paper's LSS).
    min_np: int = 4
    max_np: int = 12
    # LSS: sigmoid centre and steepness mapping min(nA, nB) to n_P (paper).
    mu_p: float = 20.0
    tau_p: float = 2.0 / 5.0
    # Bit-based variant (binarised cells, Ψ = step at mu_psi): the paper's compact, fast form and
    # this project's default; False gives the float variant (Ψ = sigmoid).
    binary: bool = True
    # Global score: LSS-R, the most accurate of the paper's consolidations. On realistic synthetic
    # data it cut single-finger EER about six-fold against LSS and pulled impostor scores from a
    # mean of 0.40 (crowding genuine ones, 0.51) to 0.014 (genuine 0.074), which is what lets one
    # calibration carry over between galleries; on the CPU it runs at about 0.9x LSS's throughput.
    consolidation: Consolidation = "lss_r"
    # LSS-R: relaxation iterations (paper's n_rel).
    n_rel: int = 5
    # LSS-R: weight of a pair's own previous similarity against its neighbours' support (paper's w_R).
    w_r: float = 0.5
    # LSS-R: Z centre (px) and steepness on d1, the difference of the two inter-minutia distances
    # (paper's mu_1^rho, tau_1^rho: support falls to one half at 5 px of disagreement).
    mu_rho1: float = 5.0
    tau_rho1: float = -8.0 / 5.0
    # LSS-R: Z centre (rad, 15°) and steepness on d2, the difference of the relative minutia
    # directions (paper's mu_2^rho, tau_2^rho).
    mu_rho2: float = math.pi / 12.0
    tau_rho2: float = -30.0
    # LSS-R: Z centre (rad, 15°) and steepness on d3, the difference of the radial angles of the
    # segment joining the two minutiae, each relative to the first minutia's direction (paper).
    mu_rho3: float = math.pi / 12.0
    tau_rho3: float = -30.0

    def __post_init__(self) -> None:
        if (self.ns * self.ns) % 8 or (self.ns * self.ns * self.nd) % 8:
            # Cells and validity are bit-packed 8 to a byte.
            raise ValueError(f"ns*ns={self.ns * self.ns} and ns*ns*nd must be multiples of 8")
        if not 1 <= self.min_np <= self.max_np:
            raise ValueError(f"need 1 <= min_np <= max_np, got {self.min_np}, {self.max_np}")
        if self.consolidation not in ("lss", "lss_r"):
            raise ValueError(f"consolidation must be 'lss' or 'lss_r', got {self.consolidation!r}")
        if self.n_rel < 0 or not 0.0 <= self.w_r <= 1.0:
            raise ValueError(f"need n_rel >= 0 and w_r in [0, 1], got {self.n_rel}, {self.w_r}")

    def same_cylinders(self, other: MccParams) -> bool:
        """Whether cylinders encoded under ``other`` equal those encoded under these params
        (only the cylinder-shaping fields count, not the matching and consolidation ones)."""
        return all(getattr(self, f) == getattr(other, f) for f in _CYLINDER_FIELDS)

    @property
    def cells(self) -> int:
        """C = Ns·Ns·Nd, the length of a linearised cylinder (1536 with the paper's values)."""
        return self.ns * self.ns * self.nd

    @property
    def spatial_cells(self) -> int:
        """Ns·Ns, the number of spatial cells (validity is per spatial cell)."""
        return self.ns * self.ns

    @property
    def delta_s(self) -> float:
        """Δs = 2R/Ns, the side of a spatial cell in pixels."""
        return 2.0 * self.radius / self.ns

    @property
    def delta_d(self) -> float:
        """Δd = 2π/Nd, the width of an angular section in radians."""
        return 2.0 * math.pi / self.nd


@dataclass(frozen=True)
class FusionParams:
    """Ten-finger fusion: the mean over common fingers, shrunk towards a low prior.

    ``fused = (Σ_common s_f + strength · prior) / (n_common + strength)``; see
    :func:`gpu_kernels.fusion.fuse_scores` for why.
    """

    # Score a missing comparison is assumed to have: a typical impostor score, so absent fingers
    # count as weak evidence against a match rather than as no evidence. 0.015 is the mean
    # single-finger LSS-R impostor score measured on the realistic synthetic preset (0.014).
    prior: float = 0.015
    # Weight of the prior in "fingers": with 2, one finger alone carries a third of the fused
    # score, while ten fingers carry five sixths of it.
    strength: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.prior <= 1.0 or self.strength < 0.0:
            raise ValueError(f"need prior in [0, 1] and strength >= 0, got {self.prior}, {self.strength}")
