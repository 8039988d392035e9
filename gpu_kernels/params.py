"""Parameters of Minutia Cylinder-Code matching and of ten-finger fusion, with the reason for each value.

MCC values are those of R. Cappelli, M. Ferrara, D. Maltoni, "Minutia Cylinder-Code: a new
representation and matching technique for fingerprint recognition", IEEE TPAMI 32(12), 2010
(Table 1 and Section 6), tuned there on FVC2006 at 500 ppi. Pixel distances assume 500 ppi.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class MccParams:
    """Everything that shapes a cylinder and the LSS global score.

    Two cylinder sets can be compared only if they were encoded with equal parameters
    (``CylinderSet.params``); the scorer checks it.
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

    def __post_init__(self) -> None:
        if (self.ns * self.ns) % 8 or (self.ns * self.ns * self.nd) % 8:
            # Cells and validity are bit-packed 8 to a byte.
            raise ValueError(f"ns*ns={self.ns * self.ns} and ns*ns*nd must be multiples of 8")
        if not 1 <= self.min_np <= self.max_np:
            raise ValueError(f"need 1 <= min_np <= max_np, got {self.min_np}, {self.max_np}")

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

    # Score a missing comparison is assumed to have: a typical impostor LSS, so absent fingers
    # count as weak evidence against a match rather than as no evidence. To be recalibrated on
    # synthetic impostor data.
    prior: float = 0.05
    # Weight of the prior in "fingers": 2 means one perfect finger alone fuses to (1+0.1)/3 ≈ 0.37,
    # while ten perfect fingers fuse to ≈ 0.84.
    strength: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.prior <= 1.0 or self.strength < 0.0:
            raise ValueError(f"need prior in [0, 1] and strength >= 0, got {self.prior}, {self.strength}")
