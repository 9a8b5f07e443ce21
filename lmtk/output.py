"""Output folders that exist only when complete: build in a hidden temp folder, then rename."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmtk.errors import ConversionError

log = logging.getLogger(__name__)

# Written last into every finished folder: what it came from and how.
MARKER = "conversion.json"
TEMP_TAG = ".lmtk-tmp-"


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def staged_folder(final: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temp folder next to ``final``; on success it becomes ``final``, else it is removed."""
    parent = final.parent
    _check_target(final, overwrite=overwrite)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        temp = parent / f".{final.name}{TEMP_TAG}{uuid.uuid4().hex[:8]}"
        temp.mkdir()
    except OSError as e:
        raise ConversionError(parent, f"cannot create the output folder: {e.strerror or e}") from e
    try:
        yield temp
        _fsync_dir(temp)
        _check_target(final, overwrite=overwrite)
        if final.exists():
            # Only ever an lmtk folder (checked above): move it aside, then swap.
            old = parent / f".{final.name}{TEMP_TAG}old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            temp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            temp.rename(final)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _check_target(final: Path, *, overwrite: bool) -> None:
    if not final.exists():
        return
    if read_marker(final) is None:
        raise ConversionError(final, "exists and was not written by lmtk; move it away or choose another convert.output_dir")
    if not overwrite:
        raise ConversionError(final, "already converted; set convert.overwrite=true to convert again")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
