"""The ten finger positions of a search run side by side on the CPU, each on a worker with one
torch thread, and give what one position after the other gives."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from gpu_kernels import MccParams, encode_tenprints, score_tenprints
from gpu_kernels.positions import map_positions
from gpu_kernels.similarity import score_fingers
from minutiae.template import FingerTemplate, TenPrintTemplates
from synthetic.fingers import impression, master_finger

CPU = torch.device("cpu")


@pytest.fixture
def two_threads() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_positions_come_back_in_order_from_single_threaded_workers(two_threads: object) -> None:
    seen = map_positions(lambda f: (f, torch.get_num_threads(), threading.current_thread().name), CPU)
    assert [f for f, _, _ in seen] == list(range(10))
    assert all(threads == 1 and name.startswith("fedprint-positions") for _, threads, name in seen)
    # The rest of the process keeps its threads, now and in threads started later.
    assert torch.get_num_threads() == 2
    later: list[int] = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [2]


def test_one_thread_or_another_device_goes_in_order() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        names = map_positions(lambda f: threading.current_thread().name, CPU)
    finally:
        torch.set_num_threads(before)
    assert set(names) == {threading.current_thread().name}
    assert map_positions(lambda f: f, torch.device("meta"), positions=3) == [0, 1, 2]


def test_a_failing_position_fails_the_search(two_threads: object) -> None:
    def score(f: int) -> int:
        if f == 7:
            raise ValueError("position 7")
        return f

    with pytest.raises(ValueError, match="position 7"):
        map_positions(score, CPU)


def test_side_by_side_scores_equal_one_position_at_a_time(two_threads: object) -> None:
    params = MccParams()
    rng = np.random.default_rng(11)
    masters = [{f: master_finger(rng, f) for f in range(1, 11)} for _ in range(6)]

    def captures(subjects: list[dict[int, FingerTemplate]]) -> list[TenPrintTemplates]:
        return [TenPrintTemplates({f: impression(rng, m) for f, m in one.items()}) for one in subjects]

    gallery = encode_tenprints(captures(masters), params)
    probes = encode_tenprints(captures(masters[:3]), params)
    together = score_tenprints(probes, gallery, params).per_finger
    alone = torch.stack([score_fingers(probes.fingers[f], gallery.fingers[f], params) for f in range(10)], -1)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
