"""Reusable staging buffers for the high-precision weights of quantized layers during a load.

A streamed load reads each quantized layer's bf16 weights, quantizes them and drops them. Reading
into fresh memory costs a page fault per 4 KiB page the first time it is touched (measured on this
project's VM: ~0.3-0.5 s per GB, against ~0.1 s per GB to copy the same bytes from the page cache
into memory already mapped), so the loader lends each quantized layer buffers from this pool and
takes them back once the layer is quantized: the next layer of the same shapes reuses the same,
already resident pages. Resident memory is unchanged (one layer's high-precision weights were live
at the peak anyway); at the end of the load the pool is emptied.

A buffer is only reused when nothing else still holds its storage (a method that kept a view of
its high-precision weight, e.g. an unquantized bias): checked with the storage's reference count
(:func:`oqcore.torch_compat.storage_use_count`; where torch does not tell, nothing is reused).
"""

from __future__ import annotations

import torch

from oqcore.torch_compat import storage_use_count


class StagingPool:
    """Buffers lent to quantized layers (``owner`` = the layer's module path), reused by shape and dtype.

    ``cap_bytes`` bounds the free buffers kept between layers (the loader passes the largest
    layer's high-precision size, so a model whose layers differ in shape keeps at most one layer's
    worth of buffers it may not reuse).
    """

    def __init__(self, cap_bytes: int):
        self.cap_bytes = cap_bytes
        self._free: dict[tuple[torch.dtype, tuple[int, ...]], list[torch.Tensor]] = {}
        self._lent: dict[str, list[torch.Tensor]] = {}
        self._free_bytes = 0
        self._alone = storage_use_count(torch.empty(1))  # the count of a storage held by one tensor only
        self.reused_bytes = 0

    def take(self, owner: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous CPU tensor of ``shape`` and ``dtype`` (uninitialized) lent to ``owner``."""
        stack = self._free.get((dtype, tuple(shape)))
        if stack:
            buf = stack.pop()
            self._free_bytes -= buf.nbytes
            self.reused_bytes += buf.nbytes
        else:
            buf = torch.empty(shape, dtype=dtype)
        self._lent.setdefault(owner, []).append(buf)
        return buf

    def give_back(self, owner: str) -> None:
        """Take back what ``owner`` borrowed; buffers still referenced elsewhere are left to them."""
        for buf in self._lent.pop(owner, []):
            if self._alone is None or storage_use_count(buf) != self._alone:
                continue
            if self._free_bytes + buf.nbytes > self.cap_bytes:
                continue
            self._free.setdefault((buf.dtype, tuple(buf.shape)), []).append(buf)
            self._free_bytes += buf.nbytes

    def clear(self) -> None:
        """Drop every buffer (free and lent records); the memory goes back to the allocator."""
        self._free.clear()
        self._lent.clear()
        self._free_bytes = 0
