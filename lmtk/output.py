"""Output folders that exist only when complete: build in a hidden temp folder, then rename.

A finished folder records where it came from (``conversion.json``, written last); a rerun compares
that fingerprint with the source to skip, reconvert, or refuse to touch a folder lmtk did not write.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmtk.errors import ConversionError

log = logging.getLogger(__name__)

MARKER = "conversion.json"
TEMP_TAG = ".lmtk-tmp-"


def fingerprint(files: list[Path], *, options: dict[str, Any], checksum: bool) -> dict[str, Any]:
    """What a finished output was made from; equal fingerprints mean the same output."""
    entries = []
    for file in files:
        stat = file.stat()
        entry: dict[str, Any] = {"path": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if checksum:
            entry["sha256"] = _sha256(file)
        entries.append(entry)
    return {"files": entries, "options": options}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def existing_state(final: Path, current: dict[str, Any]) -> str:
    """``absent``, ``same`` (finished from this very source), ``stale`` (ours, other source), ``foreign``."""
    if not final.exists() and not final.is_symlink():
        return "absent"
    marker = read_marker(final)
    if marker is None:
        return "foreign"
    return "same" if marker.get("fingerprint") == current else "stale"


@contextmanager
def staged_folder(final: Path, *, replace: bool) -> Iterator[Path]:
    """Yield an empty temp folder next to ``final``; on success it becomes ``final``, else it is removed.

    ``replace`` allows swapping out an existing lmtk folder; a folder lmtk did not write is never touched.
    """
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(parent, final.name)
        temp = parent / f".{final.name}{TEMP_TAG}{_owner()}-{uuid.uuid4().hex[:8]}"
        temp.mkdir()
    except OSError as e:
        raise ConversionError(parent, f"cannot create the output folder: {e.strerror or e}") from e
    try:
        yield temp
        _fsync_dir(temp)
        _move_into_place(temp, final, replace=replace)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _move_into_place(temp: Path, final: Path, *, replace: bool) -> None:
    try:
        os.rename(temp, final)  # atomic; fails when final exists (and is not an empty folder)
        return
    except OSError:
        if not final.exists():
            raise
    if read_marker(final) is None:
        raise ConversionError(final, "exists and was not written by lmtk; move it away or choose another convert.output_dir")
    if not replace:
        raise ConversionError(final, "already converted; set convert.overwrite=true to convert again")
    aside = final.parent / f".{final.name}{TEMP_TAG}{_owner()}-old-{uuid.uuid4().hex[:8]}"
    os.rename(final, aside)
    os.rename(temp, final)
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale_temps(parent: Path, name: str) -> None:
    """Remove temp folders for ``name`` left by killed runs on this host (their process is gone)."""
    prefix = f".{name}{TEMP_TAG}"
    host = socket.gethostname()
    for path in parent.glob(f"{glob.escape(prefix)}*"):
        owner_host, _, rest = path.name[len(prefix):].rpartition("@")
        pid = rest.split("-")[0]
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by a run that was killed", path)
            shutil.rmtree(path, ignore_errors=True)


def _owner() -> str:
    return f"{socket.gethostname()}@{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
