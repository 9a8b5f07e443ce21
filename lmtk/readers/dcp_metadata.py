"""DCP's ``.metadata`` pickle, read by an allow-list: nothing runs, and torch.distributed.checkpoint stays unimported.

DCP's own reader unpickles ``.metadata`` with no restriction, so a crafted file could run code. Here only
DCP's metadata classes are accepted, by name, and each becomes a plain record of its pickled fields:
importing torch.distributed.checkpoint just to hold them would cost 1.5 s of every DCP conversion. Other
codebases that pickle DCP's records under their own names (OLMo-core's ``_StorageInfo``) are accepted by
name and by fields, never imported.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from lmtk.errors import ConversionError
from lmtk.layouts import DCP_METADATA


class _Record:
    """A DCP metadata object: the fields it was pickled with, nothing else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:
            raise pickle.UnpicklingError(f"{type(self).__name__} built from arguments")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise pickle.UnpicklingError(f"{type(self).__name__} pickled with a {type(state).__name__} state")
        self.__dict__.update(state)


class Metadata(_Record):
    state_dict_metadata: dict[str, Any]
    storage_data: dict[Any, Any]


class TensorStorageMetadata(_Record):
    pass


class BytesStorageMetadata(_Record):
    pass


class ChunkStorageMetadata(_Record):
    pass


class StorageMeta(_Record):
    pass


class StorageInfo(_Record):
    """Where a chunk's bytes are: ``relative_path``, ``offset``, ``length``."""

    transform_descriptors: Any = None


class MetadataIndex(_Record):
    """A key of ``storage_data``: equal and hashed by name and offset, as DCP's own."""

    offset: Any = None

    def _key(self) -> tuple[str, tuple[int, ...] | None]:
        return self.fqn, None if self.offset is None else tuple(self.offset)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MetadataIndex) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


class TensorProperties(_Record):
    """DCP pickles these as a tuple: (dtype, layout, requires_grad, memory format code, pin_memory)."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5 or not isinstance(state[0], torch.dtype):
            raise pickle.UnpicklingError("TensorProperties pickled with an unknown state")
        self.dtype = state[0]


_MEMORY_FORMATS = {"TORCH_CONTIGUOUS_FORMAT": 0, "TORCH_CHANNELS_LAST": 1, "TORCH_PRESERVE_FORMAT": 2}


def _memory_format(code: Any) -> int:
    """DCP's ``_MEM_FORMAT_ENCODING`` enum, kept as its number."""
    if code not in _MEMORY_FORMATS.values():
        raise pickle.UnpicklingError(f"unknown memory format code {code!r}")
    return int(code)


def _enum_member(cls: Any, name: Any) -> int:
    """``getattr(enum, NAME)``, how newer Pythons pickle enum members: only for the memory format enum."""
    if cls is not _memory_format or name not in _MEMORY_FORMATS:
        raise pickle.UnpicklingError(f"getattr({cls!r}, {name!r}) in DCP metadata")
    return _MEMORY_FORMATS[name]


class ForeignStorageInfo(StorageInfo):
    """Another codebase's copy of DCP's storage record: accepted only with exactly DCP's fields."""

    FIELDS = {"relative_path": str, "offset": int, "length": int}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != set(self.FIELDS) or not all(
                type(state[k]) is t for k, t in self.FIELDS.items()):
            raise pickle.UnpicklingError(f"a storage record shaped {state!r:.80}, not DCP's (relative_path, offset, length)")
        self.__dict__.update(state)


_DCP = "torch.distributed.checkpoint"
# (module, name) as pickled -> what it becomes.
ALLOWED: dict[tuple[str, str], Any] = {
    (f"{_DCP}.metadata", "Metadata"): Metadata,
    (f"{_DCP}.metadata", "MetadataIndex"): MetadataIndex,
    (f"{_DCP}.metadata", "StorageMeta"): StorageMeta,
    (f"{_DCP}.metadata", "TensorProperties"): TensorProperties,
    (f"{_DCP}.metadata", "TensorStorageMetadata"): TensorStorageMetadata,
    (f"{_DCP}.metadata", "ChunkStorageMetadata"): ChunkStorageMetadata,
    (f"{_DCP}.metadata", "BytesStorageMetadata"): BytesStorageMetadata,
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"): _memory_format,
    (f"{_DCP}.filesystem", "_StorageInfo"): StorageInfo,
    ("builtins", "getattr"): _enum_member,
    # Codebases that write DCP's layout with their own record class.
    ("olmo_core.distributed.checkpoint.filesystem", "_StorageInfo"): ForeignStorageInfo,
}
# Plain values inside the records, taken as they are.
_PLAIN = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
          ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata type")


def read_metadata(path: Path) -> Any:
    file = path / DCP_METADATA
    if not file.is_file():
        raise ConversionError(path, "incomplete DCP checkpoint: no .metadata file (the save did not finish?)")
    try:
        with file.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise ConversionError(file, f"refused to unpickle: {e}") from e
    except Exception as e:
        raise ConversionError(file, f"unreadable DCP metadata ({type(e).__name__}: {e})") from e
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise ConversionError(file, f"holds a {type(metadata).__name__}, not DCP metadata")
    return metadata
