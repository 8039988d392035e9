"""The ten finger positions of a ten-print search, scored side by side on the CPU.

A search scores each finger position on its own (same-position fingers only) and fuses the ten
at the end. On a CPU with T torch threads, one position at a time with T-way intra-op
parallelism leaves cores idle: much of the work is many small elementwise passes, gathers and
top-k selections, below the size at which torch splits an operation, or bound by memory. So
:func:`map_positions` runs the positions on T worker threads of one torch thread each: the
threads' torch operations release the interpreter lock, and each core stays busy with a
position of its own. Measured on a 2-core AVX-512 CPU, one probe against its 500 shortlisted
subjects: 367-402 ms per probe with two single-threaded workers against 423-580 ms one
position at a time with two torch threads (alternating runs; the machine is shared and noisy).

Elsewhere (CUDA, or a single torch thread) the positions go one after the other: a GPU
overlaps its kernels by itself, and one thread has nothing to share.

How the workers get one thread each: with torch's OpenMP backend a thread's own thread count
is fixed when that thread first asks for it (as any parallel operation does), from a
process-wide setting that
``torch.set_num_threads`` changes for every thread that starts later. So the pool is started
with that setting at 1, each worker asks once to fix its count, and then the setting is
put back for the rest of the process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

T = TypeVar("T")

_STARTING = threading.Lock()
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def map_positions(score: Callable[[int], T], device: torch.device, positions: int = 10) -> list[T]:
    """``[score(0), ..., score(positions - 1)]``: side by side on single-threaded workers when
    ``device`` is the CPU and torch has more than one thread here (see the module doc),
    otherwise in order. The calling thread waits for all of them; an exception in one is raised
    here, after the others have finished."""
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    if workers <= 1 or positions <= 1:
        return [score(f) for f in range(positions)]
    pool = _pool(workers)
    futures = [pool.submit(score, f) for f in range(positions)]
    # All of them first, so that a failure leaves nothing of this search running behind it.
    wait(futures)
    return [future.result() for future in futures]


def _pool(workers: int) -> ThreadPoolExecutor:
    """The process-wide pool of ``workers`` threads, each with one torch thread, started on
    first use."""
    # Keyed by process too: a forked child inherits the dictionary but not the threads.
    key = (os.getpid(), workers)
    with _STARTING:
        if key not in _POOLS:
            _POOLS[key] = _start(workers)
        return _POOLS[key]


def _start(workers: int) -> ThreadPoolExecutor:
    restore = torch.get_num_threads()
    ready = threading.Barrier(workers)

    def pin() -> None:
        # Asking is what fixes a thread's count (a tiny operation would not: torch runs it
        # serially without looking).
        if torch.get_num_threads() != 1:
            raise RuntimeError("a position worker did not start with one torch thread")
        ready.wait()

    torch.set_num_threads(1)
    try:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="fedprint-positions")
        # One task per worker, held at the barrier until all have started.
        for started in [pool.submit(pin) for _ in range(workers)]:
            started.result()
    finally:
        torch.set_num_threads(restore)
    return pool
