"""The ridge renderer: deterministic, ridges at the generator's period, truth inside the finger."""

from __future__ import annotations

import math

import numpy as np
import pytest

from synthetic.fingers import MasterFinger, master_with_flow
from synthetic.render import RIDGE_PERIOD, render_impression, render_master, ridge_angle


@pytest.fixture(scope="module")
def master() -> MasterFinger:
    return master_with_flow(np.random.default_rng(3), 2)


def test_the_same_seed_renders_the_same_image(master: MasterFinger) -> None:
    a = render_master(master.flow, master.template, seed=5)
    b = render_master(master.flow, master.template, seed=5)
    c = render_master(master.flow, master.template, seed=6)
    assert a.image.dtype == np.uint8 and a.image.shape == (master.template.height, master.template.width)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)  # only the grain differs
    assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() < 15


def test_the_foreground_holds_ridges_at_the_ridge_period(master: MasterFinger) -> None:
    r = render_master(master.flow, master.template, seed=1)
    assert r.mask.mean() > 0.3
    fg = r.image[r.mask].astype(float)
    bg = r.image[~r.mask].astype(float)
    assert fg.std() > 50 and bg.mean() > 200  # contrasted ridges on a light background
    # The radial peak of the foreground's power spectrum: the dominant ridge period.
    ys, xs = np.nonzero(r.mask)
    patch = r.image[ys.min() : ys.max(), xs.min() : xs.max()].astype(float)
    patch = (patch - patch.mean()) * r.mask[ys.min() : ys.max(), xs.min() : xs.max()]
    power = np.abs(np.fft.fftshift(np.fft.fft2(patch))) ** 2
    h, w = power.shape
    fy, fx = np.meshgrid(
        np.fft.fftshift(np.fft.fftfreq(h)), np.fft.fftshift(np.fft.fftfreq(w)), indexing="ij"
    )
    radius = np.hypot(fx, fy)
    bins = np.linspace(0.02, 0.3, 57)
    energy = np.histogram(radius, bins=bins, weights=power)[0]
    peak = 0.5 * (bins[np.argmax(energy)] + bins[np.argmax(energy) + 1])
    assert 0.8 * RIDGE_PERIOD < 1.0 / peak < 1.25 * RIDGE_PERIOD


def test_the_sign_continuous_angle_is_the_flow_orientation(master: MasterFinger) -> None:
    y, x = np.mgrid[0:500:7, 0:400:7].astype(float)
    diff = ridge_angle(master.flow, x, y) - master.flow.orientation(x, y)
    assert np.allclose(np.sin(diff), 0.0, atol=1e-9)  # equal modulo π


def test_an_impression_moves_the_truth_with_the_image(master: MasterFinger) -> None:
    r = render_master(master.flow, master.template, seed=1)
    imp = render_impression(r, np.random.default_rng(4))
    again = render_impression(r, np.random.default_rng(4))
    assert np.array_equal(imp.image, again.image)
    assert 0 < imp.truth.count <= r.truth.count
    t = imp.truth.minutiae
    assert imp.mask[np.rint(t[:, 1]).astype(int), np.rint(t[:, 0]).astype(int)].all()
    # Without distortion the move is rigid and keeps distances: the crop's widest pair is no
    # wider than the master's.
    t = render_impression(r, np.random.default_rng(4), distortion=(0.0, 0.0)).truth.minutiae

    def gaps(m: np.ndarray) -> np.ndarray:
        return np.sort(np.hypot(*(m[:, None, :2] - m[None, :, :2]).transpose(2, 0, 1)).ravel())

    assert gaps(t).max() <= gaps(r.truth.minutiae).max() + 1e-3
    assert math.isfinite(float(t[:, 2].sum()))
