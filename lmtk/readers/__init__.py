"""Find checkpoints under a path, tell their layout, and open the matching reader."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from lmtk.errors import ConversionError
from lmtk.prefetch import prefetch
from lmtk.readers.base import Reader, SourceInfo, TensorSpec
from lmtk.readers.dcp import METADATA, DcpReader
from lmtk.readers.full import SUFFIXES, FullStateDictReader
from lmtk.readers.ranks import RANK_FILE, RankShardReader

__all__ = ["Reader", "SourceInfo", "TensorSpec", "detect", "find_checkpoints", "open_reader"]

log = logging.getLogger(__name__)


def detect(path: Path) -> str | None:
    """The layout of a checkpoint at ``path``, or None when it is not one."""
    if path.is_file():
        return "full" if path.suffix in SUFFIXES else None
    if not path.is_dir():
        return None
    names = [p.name for p in path.iterdir()]
    if METADATA in names or any(n.endswith(".distcp") for n in names):
        return "dcp"
    if any(RANK_FILE.match(n) for n in names):
        return "ranks"
    return None


def find_checkpoints(path: Path, *, layout: str) -> list[tuple[Path, str]]:
    """The checkpoints ``path`` stands for: itself, or each one directly inside it."""
    if not path.exists():
        raise ConversionError(path, "no such file or directory")
    pinned = None if layout == "fsdp" else layout
    found = _layout_of(path, pinned, top=True)
    if found:
        return [(path, found)]
    if path.is_file():
        raise ConversionError(path, f"not a checkpoint file (expected one of {', '.join(SUFFIXES)})")
    checkpoints = []
    for child in sorted(path.iterdir()):
        if child.name.startswith("."):
            continue
        if kind := _layout_of(child, pinned, top=False):
            checkpoints.append((child, kind))
        else:
            log.info("skipping %s: not a checkpoint", child)
    if not checkpoints:
        raise ConversionError(path, "no checkpoints found in this directory")
    return checkpoints


def _layout_of(path: Path, pinned: str | None, *, top: bool) -> str | None:
    if top and path.is_file():
        found = "full"  # a file named by the user is a checkpoint, whatever its suffix
    else:
        found = detect(path)
    if pinned and found and found != pinned:
        log.info("skipping %s: a %s checkpoint, but convert.initial_format=%s", path, found, pinned)
        return None
    return found


def open_reader(path: Path, layout: str, *, allowed_globals: Sequence[str] = ()) -> Reader:
    readers = {"full": FullStateDictReader, "dcp": DcpReader, "ranks": RankShardReader}
    reader = readers[layout](path, allowed_globals=allowed_globals)
    prefetch(reader.info.files)
    return reader
