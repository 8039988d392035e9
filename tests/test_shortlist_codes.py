"""The shortlist codes (:mod:`gpu_kernels.shortlist`): what lets a plain, partial probe find its
rolled mate among the few subjects the faiss tier passes to full MCC."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gpu_kernels import MccParams, encode_fingers, encode_tenprints
from gpu_kernels.cylinders import pack_bits
from gpu_kernels.fusion import TenPrintCylinders
from gpu_kernels.shortlist import (
    CODE_DIMS,
    ShortlistIndex,
    central_cylinders,
    enrolment_descriptors,
    faiss_gpu_available,
    finger_descriptors,
    subject_codes,
    subject_descriptors,
)
from minutiae.template import TenPrintTemplates
from synthetic.fingers import DIFFICULTIES, impression
from synthetic.population import person_masters

PARAMS = MccParams()
HARD = DIFFICULTIES["hard"]
SUBJECTS = 40


@pytest.fixture(scope="module")
def hard_set() -> tuple[TenPrintCylinders, TenPrintCylinders]:
    """``hard`` preset: a rolled ten-print per subject enrolled; each probe is plain and lacks
    three fingers, as a poor booking station takes them."""
    gallery, probes = [], []
    for person in range(SUBJECTS):
        masters = person_masters(5, person)
        rng = np.random.default_rng([5, 99, person])
        gallery.append(
            TenPrintTemplates(
                {
                    m.finger_position: impression(rng, m, quality=rng.uniform(*HARD.quality), difficulty=HARD)
                    for m in masters
                }
            )
        )
        kept = set(rng.choice(10, 7, replace=False).tolist())
        probes.append(
            TenPrintTemplates(
                {
                    m.finger_position: impression(
                        rng, m, quality=rng.uniform(*HARD.quality), difficulty=HARD, plain=True
                    )
                    for i, m in enumerate(masters)
                    if i in kept
                }
            )
        )
    return encode_tenprints(gallery, PARAMS), encode_tenprints(probes, PARAMS)


@pytest.fixture(scope="module")
def index(hard_set: tuple) -> ShortlistIndex:
    gallery, _ = hard_set
    return ShortlistIndex.build(enrolment_descriptors(gallery), gallery.present)


def test_plain_partial_probes_find_their_rolled_mates_at_the_top(
    hard_set: tuple, index: ShortlistIndex
) -> None:
    _, probes = hard_set
    assert (probes.present.sum(1) == 7).all()
    first = index.candidates(probes, 1)[:, 0]
    # The codes rank 35 of the 40 mates first. Version 1's (4x4 blocks, mean over cylinders, no
    # whitening) ranked 27 first: this fails on a return to them.
    assert (first == torch.arange(SUBJECTS)).float().mean() >= 0.8


def test_cells_outside_a_partial_print_do_not_count_as_empty() -> None:
    """A print that lost half of every cylinder's cells (a smaller contact area) keeps the
    descriptor of the half it still has: the numbers are shares of valid cells."""
    master = person_masters(2, 0)[0]
    template = impression(np.random.default_rng(0), master, quality=0.9, difficulty=HARD)
    full = encode_fingers([template], PARAMS)
    ns, nd = PARAMS.ns, PARAMS.nd
    keep = torch.zeros(ns, ns, dtype=torch.bool)
    keep[:, : ns // 2] = True  # the first half of the columns of each cylinder's cell grid
    cells = full.unpacked_cell_valid().bool() & keep.reshape(-1)
    values = full.unpacked_values().bool() & keep[..., None].expand(ns, ns, nd).reshape(-1)
    half = dataclasses.replace(full, values=pack_bits(values), cell_valid=pack_bits(cells))

    blocks = ns // 2  # the default pooling of 2x2 cells: 8x8 blocks
    whole = finger_descriptors(full).reshape(blocks, blocks, nd)
    cut = finger_descriptors(half).reshape(blocks, blocks, nd)
    assert torch.allclose(cut[:, : blocks // 2], whole[:, : blocks // 2])
    assert (cut[:, blocks // 2 :] == 0).all() and whole[:, blocks // 2 :].sum() > 0


def test_an_enrolled_finger_pools_its_whole_and_its_central_cylinders() -> None:
    """The central view keeps the cylinders near the middle of the finger's minutiae, as a plain
    touch would; an enrolled finger's descriptor is the mean of both views."""
    master = person_masters(3, 0)[1]
    finger = encode_fingers(
        [impression(np.random.default_rng(1), master, quality=0.9, difficulty=HARD)], PARAMS
    )
    central = central_cylinders(finger)[0]
    valid = finger.valid[0]
    xy = finger.xy[0][valid]
    distance = torch.linalg.vector_norm(xy - xy.mean(0), dim=-1)
    assert torch.equal(central[valid], distance <= 0.7 * distance.max())
    assert not central[~valid].any() and 4 <= int(central.sum()) < int(valid.sum())

    only_central = dataclasses.replace(finger, valid=central[None])
    expected = (finger_descriptors(finger) + finger_descriptors(only_central)) / 2
    assert torch.allclose(finger_descriptors(finger, central=True), expected, atol=1e-6)
    # Too few central cylinders: the central view is the whole finger.
    sparse = dataclasses.replace(finger, valid=finger.valid & (torch.arange(finger.max_minutiae) < 5))
    assert torch.equal(central_cylinders(sparse), sparse.valid)


def test_codes_are_unit_per_present_finger_and_fit_two_kilobytes(
    hard_set: tuple, index: ShortlistIndex
) -> None:
    gallery, probes = hard_set
    assert index.bytes_per_subject == 10 * CODE_DIMS <= 2048
    assert index.projection.shape == (10, index.centre.shape[-1], CODE_DIMS)
    codes = subject_codes(subject_descriptors(probes), probes.present, index.centre, index.projection)
    norms = torch.linalg.vector_norm(codes.reshape(SUBJECTS, 10, CODE_DIMS), dim=-1)
    # An absent finger adds nothing to any similarity; a present one adds a cosine.
    assert torch.allclose(norms, probes.present.float(), atol=1e-5)
    # The smaller 960-byte code stays available.
    assert (
        ShortlistIndex.build(enrolment_descriptors(gallery), gallery.present, dims=96).bytes_per_subject
        == 960
    )


def test_an_index_built_for_cuda_stays_on_the_host_without_faiss_gpu(
    hard_set: tuple[TenPrintCylinders, TenPrintCylinders],
) -> None:
    gallery, probes = hard_set
    host = ShortlistIndex.build(enrolment_descriptors(gallery), gallery.present)
    wanted_on_gpu = ShortlistIndex.build(enrolment_descriptors(gallery), gallery.present, device="cuda")
    if faiss_gpu_available():
        assert wanted_on_gpu.searched_on.startswith("cuda")
    else:
        assert wanted_on_gpu.searched_on == "cpu"
    # Wherever faiss searches, the same codes vote the same candidates.
    voted = [index.candidates(probes, 5).sort().values for index in (host, wanted_on_gpu)]
    assert torch.equal(*voted)
