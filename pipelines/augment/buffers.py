"""Recycling stage 2's output batches on CPU, only when nothing references them any more.

Why: a fresh 64x3x224x224 float32 batch is 38.5 MB, above glibc's largest mmap threshold, so
every batch is a new mapping whose ~9,400 pages fault on first touch: 10-13 ms on this project's
2-core CI machine, more than normalizing and mixing it (benchmarks/results/augment_cpu.md). The
CUDA caching allocator already recycles device memory, so this is for CPU batches only.

Safety does not rest on a contract with the caller (FFCV and DALI hand out buffers "valid until
the next batch"): a buffer is handed out again only when its Python object is referenced by the
pool alone and its storage by nothing else, so a batch the caller still holds, a view of it, or
a tensor autograd saved for backward all make the pool allocate a new one instead. The storage
count is torch's ``_storage_Use_Count``; without it (another torch) the pool always allocates.
"""
from __future__ import annotations

import sys

import torch

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def unreferenced(t: torch.Tensor, pool_refs: int = 1) -> bool:
    """True when only the pool (``pool_refs`` references to the Python object) holds ``t``."""
    if _use_count is None:
        return False
    # getrefcount: the pool's references + this function's argument + getrefcount's own.
    if sys.getrefcount(t) > pool_refs + 2:
        return False
    storage = t.untyped_storage()
    return _use_count(storage._cdata) <= 2  # t's own reference + the ``storage`` object here


class BufferPool:
    """Up to ``keep`` CPU buffers, handed out again once unreferenced (see module doc). Stage 2
    keeps its RandAugment result (uint8) and its output (float32) here."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._buffers: list[torch.Tensor] = []
        self.reused = 0  # how many requests a recycled buffer served (tests, benchmarks)

    def empty(self, shape, dtype: torch.dtype, memory_format=torch.channels_last) -> torch.Tensor:
        shape = torch.Size(shape)
        for i in range(len(self._buffers)):
            t = self._buffers[i]
            if t.shape == shape and t.dtype == dtype and t.is_contiguous(memory_format=memory_format):
                # Two references right now: the list's and ``t``; one more for the argument.
                if unreferenced(t, pool_refs=2):
                    self.reused += 1
                    return t
        t = torch.empty(shape, dtype=dtype, memory_format=memory_format)
        self._buffers.append(t)
        if len(self._buffers) > self.keep:
            self._buffers.pop(0)
        return t
