"""torch.distributed.checkpoint directories: ``.metadata`` plus ``__R_S.distcp`` files.

``.metadata`` is read by an allow-list (``lmtk.readers.dcp_metadata``); each tensor chunk is read
straight from the byte range the metadata points to. Non-tensor entries (optimizer hyper-parameters,
counters) are never unpickled.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import _weights_only_unpickler

from lmtk import remote
from lmtk.errors import ConversionError, listing
from lmtk.layouts import DCP_METADATA as METADATA
from lmtk.readers.base import SourceInfo, TensorSpec
from lmtk.readers.dcp_metadata import read_metadata
from lmtk.remote import is_remote
from lmtk.readers.full import STATE_DICT_KEYS

log = logging.getLogger(__name__)

# Roots that hold training state, not the model (optimizer_0, ... as Lightning numbers them).
NON_MODEL_ROOT = re.compile(r"^(optimizer|optim|optimizers|lr_scheduler|scheduler|dataloader|rng|extra_state|"
                            r"train_state)(_\d+)?$")


def model_entries(names: list[str]) -> tuple[dict[str, str], str]:
    """Checkpoint name -> model name, and the root the model sat under ("" when at the top).

    A root (``model``, ``app.model``, ...) counts only when everything else is training state: an HF model
    saved at the top has ``model.*`` beside ``lm_head.weight``.
    """
    state = {n for n in names if NON_MODEL_ROOT.match(n.removeprefix("app.").split(".")[0])}
    for root in STATE_DICT_KEYS + tuple(f"app.{k}" for k in STATE_DICT_KEYS):
        found = {n: n[len(root) + 1 :] for n in names if n.startswith(root + ".")}
        if found and len(found) + len(state) == len(names):
            return found, root
    return {n: n for n in names if n not in state}, ""


class DcpReader:
    def __init__(self, path: Path, *, allowed_globals: Sequence[str] = ()) -> None:
        del allowed_globals  # tensor chunks hold tensors only; other entries are never unpickled
        self.path = path
        metadata = read_metadata(path)
        tensors = {
            fqn: md for fqn, md in metadata.state_dict_metadata.items() if type(md).__name__ == "TensorStorageMetadata"
        }
        self._names, root = model_entries(list(tensors))
        if not metadata.state_dict_metadata:
            raise ConversionError(path, "holds no tensors at all: an empty save (its .metadata lists nothing); peft 0.21 "
                                  "with FSDP1 SHARDED_STATE_DICT saves a LoRA model this way (its adapter filter misses "
                                  "FSDP1's nested _fsdp_wrapped_module. names): save with peft 0.20, FSDP2 or "
                                  "FULL_STATE_DICT")
        if not self._names:
            raise ConversionError(path, "no model tensors in this DCP checkpoint")
        self._tensors = {fqn: tensors[fqn] for fqn in self._names}
        self._storage = _storage_by_fqn(metadata.storage_data, self._tensors)
        files = self._check_files(metadata.storage_data)
        skipped = len(metadata.state_dict_metadata) - len(self._names)
        log.info("%s: %d model tensors under %r; %d other entries skipped", path, len(self._names), root, skipped)
        self._by_model_name = {m: fqn for fqn, m in self._names.items()}
        self._mapped: dict[Path, torch.UntypedStorage] = {}
        self._files: dict[Path, BinaryIO] = {}
        self._opening = threading.Lock()
        self._places: dict[tuple[str, int], Any] = {}
        self.info = SourceInfo(layout="dcp", files=[path / METADATA, *files], location=root)

    def _check_files(self, storage_data: dict[Any, Any]) -> list[Path]:
        # Every entry counts, optimizer state too: a short or missing file means a broken save.
        ends: dict[str, int] = {}
        for info in storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        missing = [name for name in sorted(ends) if not (self.path / name).is_file()]
        if missing:
            raise ConversionError(self.path, f"incomplete DCP checkpoint: missing {listing(missing)}")
        short = [f"{n} ({(self.path / n).stat().st_size} < {end} bytes)" for n, end in sorted(ends.items())
                 if (self.path / n).stat().st_size < end]
        if short:
            raise ConversionError(self.path, f"truncated DCP shard files: {listing(short)}")
        return [self.path / name for name in sorted(ends)]

    def specs(self) -> dict[str, TensorSpec]:
        return {m: TensorSpec(tuple(self._tensors[fqn].size), self._tensors[fqn].properties.dtype)
                for fqn, m in self._names.items()}

    def read(self, name: str) -> torch.Tensor:
        md = self._tensors[self._by_model_name[name]]
        full = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for offset, chunk in self._chunks(name):
            region = full
            for dim, (start, length) in enumerate(zip(offset, chunk.shape)):
                region = region.narrow(dim, start, length)
            region.copy_(chunk)
        return full

    def read_pieces(self, name: str) -> Iterable[torch.Tensor]:
        """The tensor as pieces whose bytes, in order, are the whole tensor's: no copy for row shards."""
        size = tuple(self._tensors[self._by_model_name[name]].size)
        if is_remote(self.path):
            return self._remote_pieces(name, size)
        chunks = sorted(self._chunks(name), key=lambda c: c[0])
        rows = 0
        for offset, chunk in chunks:
            if len(size) == 0 or offset[0] != rows or tuple(offset[1:]) != (0,) * (len(size) - 1) \
                    or tuple(chunk.shape[1:]) != size[1:]:
                return [self.read(name)]
            rows += chunk.shape[0]
        return [chunk.contiguous() for _, chunk in chunks]

    def _remote_pieces(self, name: str, size: tuple[int, ...]) -> Iterable[torch.Tensor]:
        """Row chunks stream from the bucket part by part; any other tiling is assembled first."""
        fqn = self._by_model_name[name]
        chunks = sorted(((tuple(index.offset), info) for index, info in self._storage[fqn]), key=lambda c: c[0])
        places, rows = [], 0
        for offset, info in chunks:
            place = self._remote_place(info, fqn)
            shape = place[3] if place else ()
            if place is None or len(size) == 0 or offset[0] != rows or tuple(offset[1:]) != (0,) * (len(size) - 1) \
                    or tuple(shape[1:]) != size[1:] or place[4] != _contiguous(shape):
                return [self.read(name)]
            places.append(place)
            rows += shape[0]
        return remote.stream_many([(self.path / info.relative_path, start, nbytes) for info, start, nbytes, *_ in places],
                                  dtype=places[0][5]) if places else iter(())

    def _remote_place(self, info: Any, fqn: str) -> tuple[Any, int, int, tuple[int, ...], tuple[int, ...], torch.dtype] | None:
        """Where a chunk's tensor lies in its .distcp object (read off the chunk's zip directory), or None."""
        known = (info.relative_path, info.offset)
        if known not in self._places:
            # The ends of this chunk's archive and of the next ones (its pickle leads, its zip directory trails),
            # fetched at once: a checkpoint has thousands of chunks, each one GET would add up.
            order = [(f, i) for f in self._tensors for _, i in self._storage[f]]
            at = next(n for n, (_, i) in enumerate(order) if (i.relative_path, i.offset) == known)
            batch = [(f, i) for f, i in order[at:] if (i.relative_path, i.offset) not in self._places][:_BATCH]
            # A small chunk comes whole (its tensor is then read from memory), a large one by its head.
            spans = [[(0, i.length)] if i.length <= remote.SMALL else [(0, _ENDS)] for _, i in batch]
            data = iter(remote.fetch_many([(self.path / i.relative_path, i.offset + a, i.offset + b)
                                           for (_, i), chunk in zip(batch, spans) for a, b in chunk]))
            for (f, i), chunk in zip(batch, spans):
                windows = {a: next(data) for a, _ in chunk}
                if len(chunk) == 1:
                    remote.keep(self.path / i.relative_path, i.offset, windows[0])
                self._places[(i.relative_path, i.offset)] = self._read_place(i, f, windows)
        return self._places[known]

    def _read_place(self, info: Any, fqn: str, windows: dict[int, bytes]
                    ) -> tuple[Any, int, int, tuple[int, ...], tuple[int, ...], torch.dtype] | None:
        file = self.path / info.relative_path
        try:
            if (found := _from_local_headers(windows[0])) is not None:
                (storage, offset, size, stride), records = found
                kind, dtype, key, _, numel = storage
                start = info.offset + records[f"data/{key}"]
            else:  # past the head: the zip directory at the archive's end says (fetched when read)
                with remote.Sparse(file, info.offset, info.length, windows) as f:
                    archive = torch._C.PyTorchFileReader(f)
                    storage, offset, size, stride = _TensorPickle(io.BytesIO(archive.get_record("data.pkl"))).load()
                    kind, dtype, key, _, numel = storage
                    start = info.offset + archive.get_record_offset(f"data/{key}")
        except (pickle.UnpicklingError, TypeError, ValueError):
            return None
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(file, f"corrupt chunk of {fqn} ({type(e).__name__})") from e
        if kind != "storage" or not isinstance(dtype, torch.dtype) or offset != 0:
            return None
        return info, start, math.prod(size) * dtype.itemsize, size, stride, dtype

    def _chunks(self, name: str) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        fqn = self._by_model_name[name]
        return [(tuple(index.offset), self._load_chunk(info, fqn)) for index, info in self._storage[fqn]]

    def _load_chunk(self, info: Any, fqn: str) -> torch.Tensor:
        """One chunk, memory-mapped: each is a small ``torch.save`` archive inside the .distcp file."""
        file = self.path / info.relative_path
        if getattr(info, "transform_descriptors", None):
            raise ConversionError(file, f"{fqn} is stored with transforms {info.transform_descriptors}; not supported")
        if is_remote(file):
            return self._remote_chunk(file, info, fqn)
        with self._opening:  # shard files may be written by several threads
            if file not in self._mapped:
                self._files[file] = open(file, "rb")
                self._mapped[file] = torch.UntypedStorage.from_file(str(file), False, file.stat().st_size)
        try:
            archive = torch._C.PyTorchFileReader(_FileSlice(self._files[file], info.offset, info.length))
            tensor = _chunk_view(archive, self._mapped[file], info)
            if tensor is None:
                tensor = _load_archive(archive, self._mapped[file], info)
        except Exception as e:
            raise ConversionError(file, f"corrupt chunk of {fqn} ({type(e).__name__})") from e
        if not isinstance(tensor, torch.Tensor):
            raise ConversionError(file, f"the chunk of {fqn} holds a {type(tensor).__name__}, not a tensor")
        return tensor

    def _remote_chunk(self, file: Any, info: Any, fqn: str) -> torch.Tensor:
        """A chunk from a bucket: its one plain tensor fetched by range, or (anything else) its archive whole."""
        place = self._remote_place(info, fqn)
        if place is not None:
            _, start, nbytes, size, stride, dtype = place
            return remote.tensor(file, start, nbytes).view(dtype).as_strided(size, stride)
        window = remote.tensor(file, info.offset, info.length)
        try:
            archive = torch._C.PyTorchFileReader(io.BytesIO(window.numpy().tobytes()))
            tensor = _load_archive(archive, window.untyped_storage(), _Whole(info.length))
        except Exception as e:
            raise ConversionError(file, f"corrupt chunk of {fqn} ({type(e).__name__})") from e
        if not isinstance(tensor, torch.Tensor):
            raise ConversionError(file, f"the chunk of {fqn} holds a {type(tensor).__name__}, not a tensor")
        return tensor

    def close(self) -> None:
        if is_remote(self.path):
            remote.forget(self.info.files)
        for f in self._files.values():
            f.close()
        self._storage, self._mapped, self._files = {}, {}, {}


# From a bucket: the bytes read at each end of a chunk's archive (a one-tensor pickle and zip directory fit), and
# how many chunks have theirs fetched at once.
_ENDS, _BATCH = 8 << 10, 256

# The storage classes torch.save names a tensor's storage by.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _TensorPickle(pickle.Unpickler):
    """A chunk's ``data.pkl``: one ``_rebuild_tensor_v2`` call, read as what it describes, nothing run."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _described
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return pid  # ("storage", dtype, key, location, numel)


def _described(storage: Any, offset: int, size: Any, stride: Any, *rest: Any) -> tuple[Any, int, tuple[int, ...], tuple[int, ...]]:
    return storage, offset, tuple(size), tuple(stride)


def _chunk_view(archive: Any, mapped: torch.UntypedStorage, info: Any) -> torch.Tensor | None:
    """The chunk as a view of the mapped file, its place read off the archive's directory (a fast path);
    None when the archive holds anything but one plain tensor."""
    try:
        storage, offset, size, stride = _TensorPickle(io.BytesIO(archive.get_record("data.pkl"))).load()
        kind, dtype, key, _, numel = storage
    except (pickle.UnpicklingError, TypeError, ValueError):
        return None
    if kind != "storage" or not isinstance(dtype, torch.dtype):
        return None
    start = info.offset + archive.get_record_offset(f"data/{key}")
    nbytes = int(numel) * dtype.itemsize
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))  # the last element's index (an empty tensor has none)
    if start + nbytes > info.offset + info.length or (0 not in size and last >= numel):
        raise ValueError(f"a tensor of {list(size)} does not fit its {numel}-element storage")
    return torch.empty(0, dtype=dtype).set_(mapped[start : start + nbytes], offset, size, stride)


def _load_archive(archive: Any, mapped: torch.UntypedStorage, info: Any) -> Any:
    """What torch.load(mmap=True, weights_only=True) reads from a whole file, here from the chunk's slice."""
    window = mapped[info.offset : info.offset + info.length]
    return torch.serialization._load(archive, "cpu", _weights_only_unpickler, overall_storage=window, encoding="utf-8")


@dataclass(frozen=True)
class _Whole:
    """A chunk's place when its archive is a buffer of its own."""

    length: int
    offset: int = 0


_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_SIGNATURE = b"PK\x03\x04"


def _from_local_headers(head: bytes) -> tuple[Any, dict[str, int]] | None:
    """A chunk archive's pickle (as ``_TensorPickle`` reads it) and where its tensor's data starts, from the zip
    local headers at the archive's head: torch.save stores its records uncompressed, sizes in data descriptors
    after each (so headers are found by their signature, and the pickle read to its STOP). None when the head
    ends first or holds anything else."""
    described, records, pos = None, {}, 0
    while (pos := head.find(_SIGNATURE, pos)) >= 0 and pos + _LOCAL_HEADER.size <= len(head):
        *_, method, _, _, _, _, _, name_length, extra_length = _LOCAL_HEADER.unpack_from(head, pos)
        name = head[pos + 30 : pos + 30 + name_length].decode("utf-8", "replace").split("/", 1)[-1]
        data = pos + 30 + name_length + extra_length
        if method != 0 or data > len(head):
            return None
        records[name] = data
        if name == "data.pkl":
            try:
                reader = io.BytesIO(head[data:])
                described = _TensorPickle(reader).load()
            except (pickle.UnpicklingError, EOFError, TypeError, ValueError):
                return None
            if not (isinstance(described, tuple) and len(described) == 4 and isinstance(described[0], tuple)
                    and len(described[0]) == 5):
                return None
            pos = data + reader.tell()
            continue
        if described is not None and name == f"data/{described[0][2]}":
            return described, records
        pos = data
    return None


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class _FileSlice(io.RawIOBase):
    """A read-only window of an open file, so torch's zip reader sees one chunk's archive."""

    def __init__(self, file: BinaryIO, start: int, length: int) -> None:
        self._file, self._start, self._length, self._pos = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(base + pos, 0), self._length)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: max(self._length - self._pos, 0)]
        n = os.preadv(self._file.fileno(), [view], self._start + self._pos)  # no shared file position: thread-safe
        self._pos += n
        return n


def _storage_by_fqn(storage_data: dict[Any, Any], tensors: dict[str, Any]) -> dict[str, list[tuple[Any, Any]]]:
    by_fqn: dict[str, list[tuple[Any, Any]]] = {fqn: [] for fqn in tensors}
    for index, info in storage_data.items():
        if index.fqn in by_fqn:
            by_fqn[index.fqn].append((index, info))
    for fqn, md in tensors.items():
        covered = sum(_numel(c.sizes) for c in md.chunks)
        if covered != _numel(md.size) or len(by_fqn[fqn]) != len(md.chunks):
            raise ConversionError(fqn, "DCP metadata does not cover the whole tensor (a broken or mixed save)")
    return by_fqn


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
