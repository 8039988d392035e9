"""Exact products of 0/1 matrices, in whichever arithmetic is fastest on the device.

Bit-based MCC multiplies 0/1 cell values and validity masks; every product is a count. A
float32 matrix product counts exactly (the counts stay far below 2^24), and so does an int8
product accumulating in int32 (``torch._int_mm``). Which is faster depends on the machine, not
on the device type: on one AVX-512 CPU here int8 ran at ~390 GOP/s against ~88 GFLOP/s for
float32, while on an AVX2-only CPU int8 reached ~1 GOP/s against ~87 GFLOP/s. bfloat16 is not a
candidate: its products come back rounded to bfloat16, which cannot hold counts above 256.

So the choice is measured once per device, on a product of the size scoring runs
(:func:`bit_operand_dtype`), and can be pinned with ``FEDPRINT_BIT_PRODUCTS=float32|int8``.

Batched products (a stack of B independent ``[m, k] @ [k, n]``, as paired scoring runs them) are
float32: torch has no batched int8 product (``torch.bmm`` on int8 returns int8, which overflows),
and a Python loop of ``torch._int_mm`` over the batch is what batching is there to avoid.
"""

from __future__ import annotations

import functools
import os
import time

import torch
from torch import Tensor

#: Environment variable that pins the arithmetic of bit products (``float32`` or ``int8``).
OVERRIDE = "FEDPRINT_BIT_PRODUCTS"
_CHOICES = {"float32": torch.float32, "int8": torch.int8}


def bit_operand_dtype(device: torch.device, *, batched: bool = False) -> torch.dtype:
    """The dtype to unpack 0/1 operands into on ``device``: ``torch.int8`` when int8 products
    are faster there, else ``torch.float32``. Measured once per device and remembered.
    ``batched``: operands of batched products (B > 1 in :func:`bit_product`), always float32."""
    if batched:
        return torch.float32
    pinned = os.environ.get(OVERRIDE, "").strip().lower()
    if pinned:
        if pinned not in _CHOICES:
            raise ValueError(f"{OVERRIDE}={pinned!r}: use one of {', '.join(_CHOICES)}")
        return _CHOICES[pinned]
    return _measured(str(device))


@functools.cache
def _measured(device_name: str) -> torch.dtype:
    device = torch.device(device_name)
    generator = torch.Generator().manual_seed(0)
    a = (torch.rand(256, 1536, generator=generator) < 0.4).to(device)
    b = (torch.rand(1024, 1536, generator=generator) < 0.4).to(device)
    timings = {}
    for dtype in (torch.float32, torch.int8):
        x, y = a.to(dtype), b.to(dtype)
        try:
            seconds = min(_timed(x, y, device) for _ in range(3))
        except RuntimeError:  # no int8 product on this device or build
            continue
        timings[dtype] = seconds
    return min(timings, key=lambda d: timings[d])


def _timed(a: Tensor, b: Tensor, device: torch.device) -> float:
    start = time.perf_counter()
    bit_product(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bit_product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` as float32 for operands ``a: [m, k]``, ``b: [n, k]`` of one dtype: float32
    (any values), or int8 holding small non-negative integers (exact, accumulated in int32).

    Batched: ``a: [B, m, k]``, ``b: [B, n, k]`` -> ``[B, m, n]``, one product per batch entry.
    A batch of one is the 2-D product (int8 where chosen); larger batches compute in float32.
    """
    if a.dim() == 3:
        if a.shape[0] == 1:
            return bit_product(a[0], b[0])[None]
        return torch.bmm(a.to(torch.float32), b.to(torch.float32).mT)
    if a.dtype == torch.int8:
        try:
            return torch._int_mm(a, b.T).to(torch.float32)
        except RuntimeError:  # shapes the device's int8 kernel refuses (CUDA: m <= 16, ...)
            return a.to(torch.float32) @ b.to(torch.float32).T
    return a @ b.T
