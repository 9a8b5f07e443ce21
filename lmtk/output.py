"""Output folders that exist only when complete: build in a hidden temp folder, then rename.

A finished folder records where it came from (``conversion.json``, written last); a rerun compares
that record with the source to skip it, reconvert it, or refuse to touch a folder lmtk did not write
or one that holds another checkpoint's conversion.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
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
        if etag := getattr(stat, "etag", None):  # an object in a bucket: rewritten, it has another
            entry["etag"] = etag
        if checksum:
            entry["sha256"] = _sha256(file)
        entries.append(entry)
    return {"files": entries, "options": options}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def check_replaceable(final: Path, *, source: str, overwrite: bool, since: float) -> dict[str, Any]:
    """The marker of the finished folder at ``final``, when a conversion of ``source`` may replace it; else raise.

    A folder is never replaced when lmtk did not write it, nor when it holds another checkpoint's
    conversion, unless ``overwrite`` is set, and even then not when it was finished after ``since`` (by
    another job of the same run or sweep): no ``ok`` result may point at another checkpoint's weights.
    """
    marker = read_marker(final)
    if marker is None:
        raise ConversionError(final, "exists and was not written by lmtk; move it away or choose another convert.output_dir")
    other = marker.get("source")
    if other != source:
        if not overwrite:
            raise ConversionError(source, f"{final} already holds the conversion of another checkpoint, {other}; "
                                  "choose another convert.output_dir, or set convert.overwrite=true to replace it")
        if (final / MARKER).stat().st_mtime >= since:
            raise ConversionError(source, f"{final} was just converted from another checkpoint, {other}, by this run "
                                  "or sweep; not replaced even with convert.overwrite=true: choose another convert.output_dir")
    return marker


@contextmanager
def staged_folder(final: Path, *, may_replace: Callable[[Path], object]) -> Iterator[Path]:
    """Yield an empty temp folder next to ``final``; on success it becomes ``final``, else it is removed.

    When ``final`` exists by then, ``may_replace(final)`` decides: it raises to keep the folder.
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
        _move_into_place(temp, final, may_replace=may_replace)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _move_into_place(temp: Path, final: Path, *, may_replace: Callable[[Path], object]) -> None:
    try:
        os.rename(temp, final)  # atomic; fails when final exists (and is not an empty folder)
        return
    except OSError:
        if not final.exists():
            raise
    may_replace(final)
    aside = final.parent / f".{final.name}{TEMP_TAG}{_owner()}-old-{uuid.uuid4().hex[:8]}"
    os.rename(final, aside)
    os.rename(temp, final)
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale_temps(parent: Path, name: str) -> None:
    """Remove temp folders for ``name`` left by killed runs: their process on this host is gone, or the
    SLURM job that wrote them has left the queue (or is this very job, requeued after preemption)."""
    prefix = f".{name}{TEMP_TAG}"
    host = socket.gethostname()
    for path in parent.glob(f"{glob.escape(prefix)}*"):
        owner_host, _, rest = path.name[len(prefix):].rpartition("@")
        pid, _, rest = rest.partition("-")
        job = rest.split("-")[0].removeprefix("slurm") if rest.startswith("slurm") else None
        dead = owner_host == host and pid.isdigit() and not _alive(int(pid))
        if dead or (job and (job == os.environ.get("SLURM_JOB_ID") or _slurm_job_gone(job))):
            log.info("removing %s, left by a run that was killed", path)
            shutil.rmtree(path, ignore_errors=True)


def _owner() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    return f"{socket.gethostname()}@{os.getpid()}" + (f"-slurm{job}" if job else "")


def _slurm_job_gone(job: str) -> bool:
    """Whether SLURM no longer knows the job as queued or running (False when squeue cannot tell)."""
    try:
        proc = subprocess.run(["squeue", "--noheader", f"--jobs={job}", "--format=%T"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return (proc.returncode == 0 and not proc.stdout.strip()) or "Invalid job id" in proc.stderr


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
