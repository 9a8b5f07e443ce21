"""One reader per byte layout (``lmtk.layouts`` tells them apart), behind the ``Reader`` protocol."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lmtk.prefetch import prefetch
from lmtk.readers.base import Reader, SourceInfo, TensorSpec
from lmtk.readers.dcp import DcpReader
from lmtk.readers.full import FullStateDictReader
from lmtk.readers.ranks import RankShardReader
from lmtk.readers.safetensors import HfShardsReader, SafetensorsReader

__all__ = ["Reader", "SourceInfo", "TensorSpec", "open_reader"]

READERS = {"full": FullStateDictReader, "dcp": DcpReader, "ranks": RankShardReader, "hf_shards": HfShardsReader,
           "safetensors": SafetensorsReader}


def open_reader(path: Path, layout: str, *, allowed_globals: Sequence[str] = (), readahead: bool = True) -> Reader:
    """The reader of ``layout`` (metadata read, tensors left on disk); ``readahead`` starts the disk reading them."""
    reader = READERS[layout](path, allowed_globals=allowed_globals)
    if readahead:
        prefetch(reader.info.files)
    return reader
