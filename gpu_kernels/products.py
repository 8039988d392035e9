"""Exact products of 0/1 matrices, in whichever arithmetic is fastest on the device.

Bit-based MCC multiplies 0/1 cell values, validity masks and per-cell energies (at most Nd set
bits); every product is a count no larger than the cylinder's C cells, and so is every partial
sum on the way to it. Three arithmetics count exactly:

- float32 (integers up to 2^24);
- int8 accumulating in int32 (``torch._int_mm``);
- float16, because every partial sum is an integer of at most C = 1,536 and float16 holds every
  integer up to 2,048, so no accumulation order can round. This is what tensor cores run.

bfloat16 is not a candidate: it holds integers only up to 256.

Which is fastest depends on the machine, not on the device type. One AVX-512 CPU with AMX here
ran int8 at ~480 GOP/s, float16 at ~68 and float32 at ~40 GFLOP/s (one thread, 256 x 1536 x
1024); an AVX2-only CPU reached ~1 GOP/s in int8 against ~87 GFLOP/s in float32. So the choice
is measured once per device, on a product of the size scoring runs (:func:`bit_operand_dtype`),
and can be pinned with ``FEDPRINT_BIT_PRODUCTS=float32|float16|int8``.

Batched products (a stack of B independent ``[m, k] @ [k, n]``, as paired scoring runs them) are
float32 or float16, measured the same way: torch has no batched int8 product (``torch.bmm`` on
int8 returns int8, which overflows), and a Python loop of ``torch._int_mm`` over the batch is
what batching is there to avoid.
"""

from __future__ import annotations

import functools
import os
import threading
import time

import torch
from torch import Tensor

#: Environment variable that pins the arithmetic of bit products (``float32``, ``float16``, ``int8``).
OVERRIDE = "FEDPRINT_BIT_PRODUCTS"
_CHOICES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
#: Largest count float16 products are used for: every integer up to 2^11 is a float16.
FLOAT16_EXACT_UP_TO = 2048
_MEASURING = threading.Lock()


def bit_operand_dtype(device: torch.device, *, batched: bool = False, max_count: int = 1536) -> torch.dtype:
    """The dtype to unpack 0/1 operands into on ``device``: the fastest exact arithmetic there
    (``torch.int8``, ``torch.float16`` or ``torch.float32``), measured once per device and
    remembered. ``batched``: for batched products (B > 1 in :func:`bit_product`), float32 or
    float16. ``max_count``: the largest count a product may reach (the cylinder's C cells; the
    default is C of the default cylinders); float16 is chosen only where it holds that count
    exactly."""
    pinned = os.environ.get(OVERRIDE, "").strip().lower()
    if pinned:
        if pinned not in _CHOICES:
            raise ValueError(f"{OVERRIDE}={pinned!r}: use one of {', '.join(_CHOICES)}")
        chosen = _CHOICES[pinned]
        if batched and chosen == torch.int8:
            chosen = torch.float32
    else:
        # Once per device, by whichever thread asks first: scoring threads that measured at once
        # would time each other, and could each keep a different answer.
        with _MEASURING:
            chosen = _measured(str(device), batched)
    if chosen == torch.float16 and max_count > FLOAT16_EXACT_UP_TO:
        return torch.float32
    return chosen


@functools.cache
def _measured(device_name: str, batched: bool) -> torch.dtype:
    device = torch.device(device_name)
    generator = torch.Generator().manual_seed(0)
    # The shapes scoring runs: a probe's cylinders against a chunk of gallery cylinders (batched:
    # 8 probes, each against its own candidates).
    shape_a, shape_b = ((8, 64, 1536), (8, 512, 1536)) if batched else ((256, 1536), (1024, 1536))
    a = (torch.rand(*shape_a, generator=generator) < 0.4).to(device)
    b = (torch.rand(*shape_b, generator=generator) < 0.4).to(device)
    candidates = (torch.float32, torch.float16) if batched else (torch.float32, torch.float16, torch.int8)
    first: dict[torch.dtype, float] = {}
    for dtype in candidates:
        try:
            first[dtype] = _timed(a.to(dtype), b.to(dtype), device)
        except RuntimeError:  # no such product on this device or build
            continue
    # Only the contenders are timed again: an arithmetic the device emulates can be 100x slower.
    best_first = min(first.values())
    timings = {
        dtype: min(seconds, *(_timed(a.to(dtype), b.to(dtype), device) for _ in range(2)))
        for dtype, seconds in first.items()
        if seconds <= 3 * best_first
    }
    return min(timings, key=lambda d: timings[d])


def _timed(a: Tensor, b: Tensor, device: torch.device) -> float:
    start = time.perf_counter()
    bit_product(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bit_product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` as float32 for operands ``a: [m, k]``, ``b: [n, k]`` of one dtype: float32
    (any values); int8 holding small non-negative integers (exact, accumulated in int32); or
    float16 holding 0/1 values or counts whose products sum to at most
    :data:`FLOAT16_EXACT_UP_TO` (exact: see the module doc).

    Batched: ``a: [B, m, k]``, ``b: [B, n, k]`` -> ``[B, m, n]``, one product per batch entry.
    A batch of one is the 2-D product (int8 where chosen); larger batches compute in float32,
    or float16 when the operands are float16.
    """
    if a.dim() == 3:
        if a.shape[0] == 1:
            return bit_product(a[0], b[0])[None]
        if a.dtype == torch.float16:
            return torch.bmm(a, b.mT).to(torch.float32)
        return torch.bmm(a.to(torch.float32), b.to(torch.float32).mT)
    if a.dtype == torch.int8:
        try:
            return torch._int_mm(a, b.T).to(torch.float32)
        except RuntimeError:  # shapes the device's int8 kernel refuses (CUDA: m <= 16, ...)
            return a.to(torch.float32) @ b.to(torch.float32).T
    if a.dtype == torch.float16:
        return (a @ b.T).to(torch.float32)
    return a @ b.T
