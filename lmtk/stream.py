"""The tensors on their way to disk: cast, checked for NaN/Inf, in blocks so memory stays flat."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from lmtk.config import NonFinite
from lmtk.errors import ConversionError
from lmtk.pool import take

log = logging.getLogger(__name__)

BLOCK = 1 << 22  # elements per block: 16 MB of float32

# NaN and Inf are the values whose exponent bits are all ones; numpy checks those bits ~20x faster
# than torch.isfinite on CPU, for bfloat16 too. Each block is first checked whole, in one pass (about
# twice as fast as counting); only a block that holds a NaN or Inf is counted.
_NUMPY_FLOATS = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}
_EXPONENT_BITS = {
    torch.float64: (torch.int64, 0x7FF0000000000000),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
}


def streamed(
    fetch: Callable[[str], Iterable[torch.Tensor]], *, path: Path, dtype: torch.dtype | None, nonfinite: NonFinite
) -> Callable[[str], Iterator[torch.Tensor]]:
    """Wrap a fetch: cast floating-point pieces to ``dtype`` block by block and count NaN/Inf after the cast.

    The writer runs it on its look-ahead thread (``lmtk.writer.ahead``): the next pieces are cast and checked on
    the other core while this one is written.
    """

    def stream(name: str) -> Iterator[torch.Tensor]:
        bad = 0
        for piece in fetch(name):
            cast = dtype is not None and piece.is_floating_point() and piece.dtype != dtype
            blocks = _blocks(piece) if cast else [piece]
            for block in blocks:
                out = take(tuple(block.shape), dtype).copy_(block) if cast else block
                bad += count_nonfinite(out)
                yield out
        if bad:
            message = f"{name} has {bad} NaN/Inf values" + (f" after the cast to {dtype}" if dtype else "")
            if nonfinite is NonFinite.fail:
                raise ConversionError(path, f"{message} (convert.nonfinite=warn converts anyway)")
            log.warning("%s: %s", path, message)

    return stream


def _blocks(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), BLOCK):
        yield flat[start : start + BLOCK]


def count_nonfinite(tensor: torch.Tensor) -> int:
    if tensor.dtype not in _EXPONENT_BITS:
        return 0
    int_dtype, mask = _EXPONENT_BITS[tensor.dtype]
    bits = tensor.detach().contiguous().reshape(-1).view(int_dtype).numpy()
    count = 0
    for i in range(0, bits.size, BLOCK):
        block = bits[i : i + BLOCK]
        if not _all_finite(block, tensor.dtype, mask):
            count += int(np.count_nonzero((block & mask) == mask))
    return count


def _all_finite(bits: np.ndarray, dtype: torch.dtype, mask: int) -> bool:
    if dtype in _NUMPY_FLOATS:
        return bool(np.isfinite(bits.view(_NUMPY_FLOATS[dtype])).all())
    # bfloat16, which numpy lacks: the largest magnitude's bits must stay below the all-ones exponent.
    return bits.size == 0 or int(np.max(bits.view(np.uint16) & 0x7FFF)) < mask


def equal(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> bool:
    """Byte equality of two tensors given as pieces, walking both without joining them (pieces fetched from a
    bucket arrive as the walk needs them)."""
    a, b = iter(a), iter(b)
    x, y = next(a, None), next(b, None)
    if x is None or y is None:
        return x is None and y is None
    if x.dtype != y.dtype:
        return False
    if _same_memory(x, y):  # tied weights saved once: the same memory, piece for piece, nothing to compare
        rest_a, rest_b = list(a), list(b)
        if len(rest_a) == len(rest_b) and all(_same_memory(p, q) for p, q in zip(rest_a, rest_b)):
            return True
        a, b = iter(rest_a), iter(rest_b)
    left = _byte_blocks(itertools.chain([x], a))
    right = _byte_blocks(itertools.chain([y], b))
    u, v = next(left, None), next(right, None)
    while True:
        while u is not None and not len(u):
            u = next(left, None)
        while v is not None and not len(v):
            v = next(right, None)
        if u is None or v is None:
            return u is None and v is None
        n = min(len(u), len(v), 4 * BLOCK)
        if not np.array_equal(u[:n], v[:n]):
            return False
        u, v = u[n:], v[n:]


def _same_memory(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()


def _byte_blocks(pieces: Iterable[torch.Tensor]) -> Iterator[np.ndarray]:
    for piece in pieces:
        yield piece.contiguous().reshape(-1).view(torch.uint8).numpy()
