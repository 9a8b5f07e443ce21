"""Memory for the pieces the writer's look-ahead thread makes, reused once the writer has written them.

A merged LoRA block or a cast piece is a new tensor of a few MiB, made for one write. Allocated afresh,
glibc hands each back to the kernel when it is freed (a mapping of its own, or the top of the thread's heap
trimmed), and the next one faults in again page by page: on a VM that hands free memory back to its host, a
fault there too (merged LoRA, 774M: 190-260 k page faults on the look-ahead thread; 51-55 k with this pool,
those of the memory-mapped sources). Here the look-ahead thread takes its buffers from a ``Pool``, and a
buffer goes back to the pool once the writer has asked for the item after the one it was taken for.

A buffer taken while the look-ahead thread makes item k belongs to item k: the pieces' generators make one
item at a time and yield it before they take memory for the next, so once the writer is past item k, nothing
reads what item k was made from. So a piece made in the pool must reach the writer as one item: a cast splits
pieces of more than ``stream.BLOCK`` elements across items, which a merged LoRA block (``LoraMerge.BLOCK_ELEMENTS``
at most; a wider row is made outside the pool) never is. Off the look-ahead thread ``take`` is ``torch.empty``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_current = threading.local()
_GRAIN = 64 << 10


def take(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor: from this thread's pool when it has one, valid until its item is written."""
    pool: Pool | None = getattr(_current, "pool", None)
    return torch.empty(shape, dtype=dtype) if pool is None else pool.take(shape, dtype)


class Pool:
    """Buffers lent to the items being made, and freed ones kept (up to ``keep`` bytes) for the next."""

    def __init__(self, *, keep: int) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []
        self._lent: list[tuple[int, torch.Tensor]] = []  # (the item it belongs to, buffer), in order taken
        self._made = 0  # items handed over so far: the index of the one being made

    @contextmanager
    def installed(self) -> Iterator[None]:
        """``take`` on this thread draws from this pool."""
        _current.pool = self
        try:
            yield
        finally:
            _current.pool = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        size = -(-nbytes // _GRAIN) * _GRAIN  # so the blocks of differently shaped weights fit each other's
        with self._lock:
            # The smallest kept buffer that fits, at most twice the size: a small piece holds no large buffer.
            fits = [i for i, b in enumerate(self._free) if size <= b.numel() <= 2 * size]
            if fits:
                buffer = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            else:
                buffer = torch.empty(size, dtype=torch.uint8)
            self._lent.append((self._made, buffer))
        return buffer[:nbytes].view(dtype).view(shape)

    def made(self) -> None:
        """The item being made was handed over; what is taken from now on belongs to the next."""
        with self._lock:
            self._made += 1

    def written(self, item: int) -> None:
        """Items up to ``item`` are written: their buffers are free again."""
        with self._lock:
            done = [buffer for owner, buffer in self._lent if owner <= item]
            self._lent = [(owner, buffer) for owner, buffer in self._lent if owner > item]
            self._free += done
            while sum(b.numel() for b in self._free) > self._keep:
                self._free.pop(0)
