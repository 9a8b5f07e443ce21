"""torch.distributed.checkpoint directories: ``.metadata`` plus ``__R_S.distcp`` files.

``.metadata`` is a pickle; DCP's own reader unpickles it with no restriction, so a crafted file
could run code. We unpickle it with an allow-list of DCP's metadata classes, and read each tensor
chunk straight from the byte range the metadata points to. Non-tensor entries (optimizer
hyper-parameters, counters) are never unpickled.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import _weights_only_unpickler

from lmtk.errors import ConversionError, listing
from lmtk.layouts import DCP_METADATA as METADATA
from lmtk.readers.base import SourceInfo, TensorSpec
from lmtk.readers.full import STATE_DICT_KEYS

log = logging.getLogger(__name__)

_DCP = "torch.distributed.checkpoint"
ALLOWED_GLOBALS = {
    (f"{_DCP}.metadata", name)
    for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    )
} | {
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}
# Roots that hold training state, not the model: skipped when no model root is found.
NON_MODEL_ROOTS = ("optimizer", "optim", "optimizers", "lr_scheduler", "scheduler", "dataloader", "rng", "extra_state",
                   "train_state")


class _ForeignStorageInfo:
    """Another codebase's copy of DCP's storage record (OLMo-core pickles its own ``_StorageInfo``).

    Accepted by name, never imported: built from its fields alone, which must be exactly DCP's.
    """

    FIELDS = {"relative_path": str, "offset": int, "length": int}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != set(self.FIELDS) or not all(
                type(state[k]) is t for k, t in self.FIELDS.items()):
            raise pickle.UnpicklingError(f"a storage record shaped {state!r:.80}, not DCP's (relative_path, offset, length)")
        self.relative_path, self.offset, self.length = state["relative_path"], state["offset"], state["length"]
        self.transform_descriptors = None


# Codebases that write DCP's layout with their own metadata classes: (module, name) -> the stand-in.
FOREIGN_GLOBALS = {("olmo_core.distributed.checkpoint.filesystem", "_StorageInfo"): _ForeignStorageInfo}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if (module, name) in FOREIGN_GLOBALS:
            return FOREIGN_GLOBALS[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata type")


def read_metadata(path: Path) -> Any:
    file = path / METADATA
    if not file.is_file():
        raise ConversionError(path, "incomplete DCP checkpoint: no .metadata file (the save did not finish?)")
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise ConversionError(file, f"refused to unpickle: {e}") from e
    except Exception as e:
        raise ConversionError(file, f"unreadable DCP metadata ({type(e).__name__}: {e})") from e
    if type(metadata).__name__ != "Metadata" or not hasattr(metadata, "state_dict_metadata"):
        raise ConversionError(file, f"holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def model_entries(names: list[str]) -> tuple[dict[str, str], str]:
    """Checkpoint name -> model name, and the root the model sat under ("" when at the top)."""
    for root in STATE_DICT_KEYS + tuple(f"app.{k}" for k in STATE_DICT_KEYS):
        found = {n: n[len(root) + 1 :] for n in names if n.startswith(root + ".")}
        if found:
            return found, root
    return {n: n for n in names if n.split(".")[0] not in NON_MODEL_ROOTS}, ""


class DcpReader:
    def __init__(self, path: Path, *, allowed_globals: Sequence[str] = ()) -> None:
        del allowed_globals  # tensor chunks hold tensors only; other entries are never unpickled
        self.path = path
        metadata = read_metadata(path)
        tensors = {
            fqn: md for fqn, md in metadata.state_dict_metadata.items() if type(md).__name__ == "TensorStorageMetadata"
        }
        self._names, root = model_entries(list(tensors))
        if not self._names:
            raise ConversionError(path, "no model tensors in this DCP checkpoint")
        self._tensors = {fqn: tensors[fqn] for fqn in self._names}
        self._storage = _storage_by_fqn(metadata.storage_data, self._tensors)
        files = self._check_files(metadata.storage_data)
        skipped = len(metadata.state_dict_metadata) - len(self._names)
        log.info("%s: %d model tensors under %r; %d other entries skipped", path, len(self._names), root, skipped)
        self._by_model_name = {m: fqn for fqn, m in self._names.items()}
        self._mapped: dict[Path, torch.UntypedStorage] = {}
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

    def read_pieces(self, name: str) -> list[torch.Tensor]:
        """The tensor as pieces whose bytes, in order, are the whole tensor's: no copy for row shards."""
        size = tuple(self._tensors[self._by_model_name[name]].size)
        chunks = sorted(self._chunks(name), key=lambda c: c[0])
        rows = 0
        for offset, chunk in chunks:
            if len(size) == 0 or offset[0] != rows or tuple(offset[1:]) != (0,) * (len(size) - 1) \
                    or tuple(chunk.shape[1:]) != size[1:]:
                return [self.read(name)]
            rows += chunk.shape[0]
        return [chunk.contiguous() for _, chunk in chunks]

    def _chunks(self, name: str) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        fqn = self._by_model_name[name]
        return [(tuple(index.offset), self._load_chunk(info, fqn)) for index, info in self._storage[fqn]]

    def _load_chunk(self, info: Any, fqn: str) -> torch.Tensor:
        """One chunk, memory-mapped: each is a ``torch.save`` archive inside the .distcp file."""
        file = self.path / info.relative_path
        if getattr(info, "transform_descriptors", None):
            raise ConversionError(file, f"{fqn} is stored with transforms {info.transform_descriptors}; not supported")
        if file not in self._mapped:
            self._mapped[file] = torch.UntypedStorage.from_file(str(file), False, file.stat().st_size)
        window = self._mapped[file][info.offset : info.offset + info.length]
        try:
            with open(file, "rb") as f:
                archive = torch._C.PyTorchFileReader(_FileSlice(f, info.offset, info.length))
                # torch.load(mmap=True) does exactly this for a whole file; here the archive is a slice.
                tensor = torch.serialization._load(
                    archive, "cpu", _weights_only_unpickler, overall_storage=window, encoding="utf-8"
                )
        except Exception as e:
            raise ConversionError(file, f"corrupt chunk of {fqn} ({type(e).__name__})") from e
        if not isinstance(tensor, torch.Tensor):
            raise ConversionError(file, f"the chunk of {fqn} holds a {type(tensor).__name__}, not a tensor")
        return tensor

    def close(self) -> None:
        self._storage = {}
        self._mapped = {}


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
        self._file.seek(self._start + self._pos)
        n = self._file.readinto(view) or 0
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
