"""Tensors made from other tensors: each is its sources plus a typed transform, made when it is read.

A naming's rename and rotary permutation, a merged LoRA weight (W + s·B·A) and one expert's slice of a
stacked tensor are all entries of a ``DerivedReader``: a view over one or more readers that planning,
writing and verify use as any reader, one output tensor at a time. An entry without a transform is its
one source as stored, so its bytes still stream uncopied.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from lmtk.errors import ConversionError
from lmtk.pool import take
from lmtk.readers.base import Reader, SourceInfo, TensorSpec, same_bytes

CHECKPOINT, BASE = "checkpoint", "base"


class Transform(Protocol):
    """How an entry's tensor is made from its sources' tensors (in the entry's order)."""

    def apply(self, tensors: list[torch.Tensor]) -> torch.Tensor: ...


@dataclass(frozen=True)
class Source:
    key: str
    # Which of the view's readers holds it: the checkpoint, or the base model's own weights.
    reader: str = CHECKPOINT


@dataclass(frozen=True)
class Derived:
    spec: TensorSpec
    sources: tuple[Source, ...]
    transform: Transform | None = None


@dataclass(frozen=True)
class RotaryHalfSplit:
    """q/k rows from interleaved rotary pairs (Meta, torchtitan) to HF's half-split order, per head."""

    heads: int

    def apply(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        [tensor] = tensors
        rows = tensor.shape[0]
        # Interleaved pairs (x0, x1), (x2, x3), ... per head -> first halves, then second halves.
        return tensor.reshape(self.heads, rows // self.heads // 2, 2, -1).transpose(1, 2).reshape(tensor.shape).contiguous()


@dataclass(frozen=True)
class Reshape:
    shape: tuple[int, ...]

    def apply(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0].reshape(self.shape)


@dataclass(frozen=True)
class ExpertSlice:
    """Expert ``index`` of ``count`` stacked along the first dimension, in ``shape``, transposed if stored so."""

    index: int
    count: int
    shape: tuple[int, ...]
    transpose: bool = False

    def apply(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        part = tensors[0].reshape(self.count, -1)[self.index].reshape(self.shape)
        return (part.T if self.transpose else part).contiguous()


@dataclass(frozen=True)
class LoraMerge:
    """W + scale · B·A in float32, written in W's dtype; sources W, A, B (and DoRA's magnitude).

    ``transpose``: W is stored [in, out] (GPT-2's Conv1D, an embedding's [num, dim]), so the product is
    transposed. DoRA rescales each output row to its trained magnitude, as peft's merge does.
    """

    scale: float
    transpose: bool = False
    dora: bool = False

    # Rows merged at once when streaming: small enough to stay in the CPU's cache between the copy and the product.
    BLOCK_ELEMENTS = 1 << 20

    def blocks(self, tensors: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The merged weight as blocks of whole rows, in order: memory stays at one block however big W is."""
        if self.dora:  # each row's scale needs the whole row only, but the norm is cheap next to the bytes
            yield self.apply(tensors)
            return
        weight, a, b = tensors[:3]
        left, right = (a.to(torch.float32).T, b.to(torch.float32).T) if self.transpose else \
            (b.to(torch.float32), a.to(torch.float32))
        step = max(1, self.BLOCK_ELEMENTS // max(1, weight.shape[1]))
        # A block from the writer's pool must reach it whole; a row wider than a block could be split by a cast.
        new = take if step * weight.shape[1] <= self.BLOCK_ELEMENTS else _empty
        threads = torch.get_num_threads()
        for start in range(0, weight.shape[0], step):
            rows = weight[start : start + step]
            shape = tuple(rows.shape)
            # One thread: the product is memory-bound, and idle OpenMP workers spinning for the next block fight
            # the NaN/Inf check and the writer for the other core (measured 5x slower with two).
            torch.set_num_threads(1)
            try:
                block = new(shape, torch.float32).copy_(rows).addmm_(left[start : start + step], right,
                                                                     alpha=self.scale)
                out = block if weight.dtype == torch.float32 else new(shape, weight.dtype).copy_(block)
            finally:
                torch.set_num_threads(threads)
            yield out

    def apply(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        weight, a, b = (t.to(torch.float32) for t in tensors[:3])
        # One BLAS call, W + s·B·A straight into one new tensor laid out as W is (no transposed copy).
        merged = torch.addmm(weight, a.T, b.T, alpha=self.scale) if self.transpose else \
            torch.addmm(weight, b, a, alpha=self.scale)
        if self.dora:
            magnitude = tensors[3].to(torch.float32)
            merged.mul_((magnitude / torch.linalg.norm(merged, dim=1)).reshape(-1, 1))
        return merged.to(tensors[0].dtype)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


class DerivedReader:
    """A view whose tensors are ``Derived`` entries over ``readers`` (the first is the checkpoint's)."""

    RECENT = 4

    def __init__(self, readers: Mapping[str, Reader], tensors: dict[str, Derived], *,
                 renamed: dict[str, str] | None = None, dropped: list[str] | None = None) -> None:
        main = readers[CHECKPOINT]
        self.path: Path = main.path
        self.info: SourceInfo = main.info
        self._readers, self._tensors = dict(readers), tensors
        # View name -> the checkpoint key it was renamed from, and checkpoint keys dropped on purpose.
        self.renamed: dict[str, str] = renamed or {}
        self.dropped: list[str] = dropped or []
        self._recent: dict[Source, torch.Tensor] = {}

    def specs(self) -> dict[str, TensorSpec]:
        return {name: entry.spec for name, entry in self._tensors.items()}

    def entry(self, name: str) -> Derived:
        return self._tensors[name]

    def _source(self, source: Source, *, shared: bool) -> torch.Tensor:
        """A source tensor; one that several entries slice (an expert stack) is kept for the next few reads."""
        if not shared:
            return self._readers[source.reader].read(source.key)
        if source not in self._recent:
            self._recent[source] = self._readers[source.reader].read(source.key)
            while len(self._recent) > self.RECENT:  # save_pretrained's order cycles through a layer's few stacks
                self._recent.pop(next(iter(self._recent)))
        return self._recent[source]

    def read(self, name: str) -> torch.Tensor:
        entry = self._tensors[name]
        shared = isinstance(entry.transform, ExpertSlice)
        tensors = [self._source(s, shared=shared) for s in entry.sources]
        if entry.transform is None:
            return tensors[0]
        try:
            out = entry.transform.apply(tensors)
        except (RuntimeError, ValueError) as e:
            raise ConversionError(self.path, f"{name}: {type(entry.transform).__name__} failed ({e})") from e
        if tuple(out.shape) != entry.spec.shape:
            raise ConversionError(self.path, f"{name}: made {list(out.shape)}, planned {list(entry.spec.shape)}")
        return out

    def read_pieces(self, name: str) -> Iterable[torch.Tensor]:
        entry = self._tensors[name]
        if entry.transform is None:
            [source] = entry.sources
            return self._readers[source.reader].read_pieces(source.key)
        if isinstance(entry.transform, LoraMerge):
            return entry.transform.blocks([self._readers[s.reader].read(s.key) for s in entry.sources])
        return [self.read(name)]

    def same_bytes(self, a: str, b: str) -> bool:
        x, y = self._tensors[a], self._tensors[b]
        if x.transform is not None or y.transform is not None or len(x.sources) != 1 or len(y.sources) != 1:
            return False
        [s], [t] = x.sources, y.sources
        return s.reader == t.reader and (s.key == t.key or same_bytes(self._readers[s.reader], s.key, t.key))

    def close(self) -> None:
        self._recent = {}
        for reader in {id(r): r for r in self._readers.values()}.values():
            reader.close()

