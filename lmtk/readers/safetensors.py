"""Safetensors checkpoints: HF weights without a config, and torch DCP's per-rank HuggingFace shards.

``HuggingFaceStorageWriter`` (torch >= 2.8) saves a DCP checkpoint as safetensors: with
``save_distributed=True`` each rank writes ``shard-0000R-model-0000F-of-0000N.safetensors`` holding its
slices under the full names, their places in the full tensors in the header's ``DCP_SHARDING_INFO``;
with consolidation, ``model-0000F-of-0000N.safetensors`` plus an index, as ``save_pretrained`` writes.
Files are memory-mapped and never unpickled: a safetensors header is JSON.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmtk import remote
from lmtk.errors import ConversionError, listing
from lmtk.layouts import HF_SHARD_FILE, HF_WEIGHTS_FILE
from lmtk.readers.base import SourceInfo, TensorSpec
from lmtk.remote import is_remote

log = logging.getLogger(__name__)

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 << 20  # safetensors' own limit
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    """One tensor in one safetensors file."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int  # absolute byte offset in the file
    end: int


class _File:
    """A safetensors file: its header, its tensors memory-mapped on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(path, f"truncated safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                raise ConversionError(path, "truncated or corrupt safetensors file (its header runs past the end)")
            try:
                header = json.loads(f.read(length))
            except ValueError as e:
                raise ConversionError(path, f"corrupt safetensors header ({e})") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, Entry] = {}
        for name, spec in header.items():
            try:
                dtype, shape = DTYPES[spec["dtype"]], tuple(int(d) for d in spec["shape"])
                begin, end = (8 + length + int(o) for o in spec["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise ConversionError(path, f"{name}: unreadable header entry ({type(e).__name__}: {e})") from e
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 8 + length:
                raise ConversionError(path, f"{name}: its byte range does not fit shape {list(shape)} of {spec['dtype']}")
            if end > size:
                raise ConversionError(path, f"truncated safetensors file: {name} ends at byte {end}, the file at {size}")
            self.entries[name] = Entry(path, shape, dtype, begin, end)
        self._mapped: torch.UntypedStorage | None = None
        if is_remote(path):
            remote.preload([(path, e.start, e.end) for e in self.entries.values()])

    def tensor(self, entry: Entry) -> torch.Tensor:
        """The tensor's bytes in the file's private mapping: reading touches only its pages."""
        if is_remote(self.path):
            return remote.tensor(self.path, entry.start, entry.end - entry.start).view(entry.dtype).reshape(entry.shape)
        if self._mapped is None:
            self._mapped = torch.UntypedStorage.from_file(str(self.path), False, self.path.stat().st_size)
        out = torch.empty(0, dtype=entry.dtype)
        if entry.start % entry.dtype.itemsize:  # an unaligned data start (torch's consolidation pads no header)
            return out.set_(self._mapped[entry.start : entry.end].clone()).reshape(entry.shape)
        return out.set_(self._mapped, entry.start // entry.dtype.itemsize, entry.shape)

    def pieces(self, entry: Entry) -> Iterable[torch.Tensor]:
        """The tensor's bytes in order: its mapping, or parts fetched from a bucket as the writer goes."""
        if is_remote(self.path):
            return remote.stream(self.path, entry.start, entry.end - entry.start, dtype=entry.dtype)
        return [self.tensor(entry)]


class SafetensorsReader:
    """A folder of HF weights with no config (torch's consolidated DCP save): checked and completed like any checkpoint."""

    def __init__(self, path: Path, *, allowed_globals: Sequence[str] = ()) -> None:
        del allowed_globals  # nothing here is pickled
        self.path = path
        names = _weight_files(path)
        self._files = {name: _File(path / name) for name in names}
        self._entries: dict[str, tuple[_File, Entry]] = {}
        for file in self._files.values():
            for tensor, entry in file.entries.items():
                if tensor in self._entries:
                    raise ConversionError(file.path, f"{tensor} is also in {self._entries[tensor][0].path.name}")
                self._entries[tensor] = (file, entry)
        index = path / INDEX
        self.info = SourceInfo(layout="safetensors", files=([index] if index.is_file() else []) + [f.path for f in self._files.values()])

    def specs(self) -> dict[str, TensorSpec]:
        return {name: TensorSpec(entry.shape, entry.dtype) for name, (_, entry) in self._entries.items()}

    def read(self, name: str) -> torch.Tensor:
        file, entry = self._entries[name]
        return file.tensor(entry)

    def read_pieces(self, name: str) -> Iterable[torch.Tensor]:
        file, entry = self._entries[name]
        return file.pieces(entry)

    def close(self) -> None:
        remote.forget(list(self._files.values()) and [f.path for f in self._files.values()])
        self._files, self._entries = {}, {}


def _weight_files(path: Path) -> list[str]:
    index = path / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ConversionError(index, f"unreadable index ({type(e).__name__}: {e})") from e
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ConversionError(path, f"incomplete weights: the index names missing files {listing(missing)}")
        return names
    return sorted(p.name for p in path.iterdir() if HF_WEIGHTS_FILE.match(p.name))


@dataclass(frozen=True)
class _Slice:
    entry: Entry
    offsets: tuple[int, ...]


class HfShardsReader:
    """Per-rank ``shard-*`` files: every tensor rebuilt from its ranks' slices, placed by their saved offsets."""

    def __init__(self, path: Path, *, allowed_globals: Sequence[str] = ()) -> None:
        del allowed_globals
        self.path = path
        shard_files = _shard_files(path)
        self._files = {p: _File(p) for p in shard_files}
        slices: dict[str, list[_Slice]] = {}
        for file in self._files.values():
            offsets = _sharding_info(file)
            for name, entry in file.entries.items():
                if name not in offsets:
                    raise ConversionError(file.path, f"{name} has no saved_offsets in DCP_SHARDING_INFO")
                if len(offsets[name]) != len(entry.shape):
                    raise ConversionError(file.path, f"{name}: offsets {offsets[name]} do not fit its shape {list(entry.shape)}")
                slices.setdefault(name, []).append(_Slice(entry, offsets[name]))
        self._slices = slices
        self._shapes = {name: _full_shape(name, parts) for name, parts in slices.items()}
        self.info = SourceInfo(layout="hf_shards", files=shard_files)

    def specs(self) -> dict[str, TensorSpec]:
        return {name: TensorSpec(self._shapes[name], parts[0].entry.dtype) for name, parts in self._slices.items()}

    def _tensor(self, part: _Slice) -> torch.Tensor:
        return self._files[part.entry.file].tensor(part.entry)

    def read(self, name: str) -> torch.Tensor:
        parts = self._slices[name]
        full = torch.empty(self._shapes[name], dtype=parts[0].entry.dtype)
        for part in parts:
            region = full
            for dim, (start, length) in enumerate(zip(part.offsets, part.entry.shape)):
                region = region.narrow(dim, start, length)
            region.copy_(self._tensor(part))
        return full

    def read_pieces(self, name: str) -> Iterable[torch.Tensor]:
        """Row slices stream as the shard files' own mapped bytes (copied by the kernel); others are assembled."""
        shape = self._shapes[name]
        parts = sorted((p for p in self._slices[name] if math.prod(p.entry.shape)), key=lambda p: p.offsets)
        if len(shape) == 0 or any(p.offsets[1:] != (0,) * (len(shape) - 1) or p.entry.shape[1:] != shape[1:]
                                  for p in parts):
            return [self.read(name)]
        return itertools.chain.from_iterable(self._files[p.entry.file].pieces(p.entry) for p in parts)

    def close(self) -> None:
        remote.forget(list(self._files))
        self._files, self._slices = {}, {}


def _shard_files(path: Path) -> list[Path]:
    """Every rank's file for every output file, after checking that none is missing."""
    found = {(int(m["rank"]), int(m["file"]), int(m["files"])): p
             for p in sorted(path.iterdir()) if (m := HF_SHARD_FILE.match(p.name))}
    counts = {n for _, _, n in found}
    if len(counts) > 1:
        raise ConversionError(path, f"shard files of different saves (of {sorted(counts)} output files)")
    [files] = counts
    ranks = sorted({r for r, _, _ in found})
    expected = [(r, f, files) for r in range(1, max(ranks) + 1) for f in range(1, files + 1)]
    # A rank holds no slice of an output file only when that file has no tensor at all: both are written.
    missing = [f"shard-{r:05d}-model-{f:05d}-of-{n:05d}.safetensors" for r, f, n in expected if (r, f, n) not in found]
    if missing:
        raise ConversionError(path, f"incomplete sharded checkpoint: missing {listing(missing)}")
    return [found[key] for key in expected]


def _sharding_info(file: _File) -> dict[str, tuple[int, ...]]:
    try:
        info = json.loads(file.metadata["DCP_SHARDING_INFO"])
        return {name: tuple(int(o) for o in value["saved_offsets"]) for name, value in info.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(file.path, f"no readable DCP_SHARDING_INFO in its header ({type(e).__name__}: {e})") from e


def _full_shape(name: str, parts: list[_Slice]) -> tuple[int, ...]:
    """The whole tensor's shape from its slices, after checking they tile it: same dtype, no overlap, no gap."""
    dtypes = {p.entry.dtype for p in parts}
    if len(dtypes) > 1:
        raise ConversionError(parts[0].entry.file.parent, f"{name}: slices of different dtypes "
                              f"({', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))})")
    nonempty = [p for p in parts if math.prod(p.entry.shape)]
    ndim = len(parts[0].entry.shape)
    shape = tuple(max((p.offsets[d] + p.entry.shape[d] for p in nonempty), default=0) for d in range(ndim))
    for i, a in enumerate(nonempty):
        for b in nonempty[i + 1:]:
            if all(a.offsets[d] < b.offsets[d] + b.entry.shape[d] and b.offsets[d] < a.offsets[d] + a.entry.shape[d]
                   for d in range(ndim)):
                raise ConversionError(b.entry.file, f"{name}: its slice at {list(b.offsets)} overlaps the one at "
                                      f"{list(a.offsets)} in {a.entry.file.name}")
    covered = sum(math.prod(p.entry.shape) for p in nonempty)
    if covered != math.prod(shape):
        raise ConversionError(parts[0].entry.file.parent, f"{name}: the slices cover {covered} of {math.prod(shape)} "
                              f"elements of {list(shape)} (a rank's file from another save, or missing?)")
    return shape
