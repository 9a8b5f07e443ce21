"""Where bytes live: local paths, and model folders written to a bucket (``s3://``, ``gs://``, through fsspec).

A conversion into a bucket is made in a local staging folder, as any conversion; its weight files are sent
while they are written (``Uploads``, S3), the rest after, ``conversion.json`` last, so a prefix without it is
never a model. A failed upload removes what it put there. A prefix left without ``conversion.json`` (a killed
run) is cleaned by the next run before it converts again. Reading checkpoints where they lie in a bucket is
``lmtk.remote``.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmtk.errors import ConversionError
from lmtk.output import MARKER

log = logging.getLogger(__name__)

_URL = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://")
# The schemes a model folder can be written to, and the extra that brings their fsspec filesystem.
BUCKETS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
# botocore's own retry of throttling, 5xx and dropped connections, bounded (s3fs retries on top, briefly).
_S3_RETRIES = {"retries": {"max_attempts": 5, "mode": "standard"}}


def scheme_of(location: str) -> str | None:
    """The URL scheme of ``location`` (``s3``), None for a local path."""
    match = _URL.match(str(location))
    return match["scheme"].lower() if match else None


def require_local(location: str | None, *, option: str) -> None:
    """Refuse a URL (``s3://``, ``gs://``, ``file://`` ...) where lmtk needs a local path."""
    if location is None:
        return
    scheme = scheme_of(location)
    if scheme is not None:
        raise ConversionError(location, f"{option} is a {scheme}:// URL; it must be a local path")


def require_local_or_bucket(location: str, *, option: str) -> None:
    """Refuse a URL lmtk cannot read or write (``file://``, ``http://`` ...)."""
    scheme = scheme_of(location)
    if scheme is not None and scheme not in BUCKETS:
        raise ConversionError(location, f"{option} is a {scheme}:// URL; lmtk reads and writes local paths, s3:// "
                              "and gs://")


def reason_of(error: BaseException) -> str:
    """One line saying why a storage call failed (botocore's messages run over several lines)."""
    text = " ".join(str(error).split()) or type(error).__name__
    kinds = {PermissionError: "access denied (wrong or missing credentials?)", FileNotFoundError: "no such bucket or key"}
    kind = next((why for cls, why in kinds.items() if isinstance(error, cls)), None)
    return f"{kind}: {text[:300]}" if kind else f"{type(error).__name__}: {text[:300]}"


def filesystem(url: str, *, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem of a bucket URL and the URL's path on it (``bucket/key``), or one line why not."""
    scheme = scheme_of(url)
    assert scheme in BUCKETS, url
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise ConversionError("convert.storage_options", f"must be a mapping of fsspec options, not "
                              f"{type(storage_options).__name__}")
    try:
        from fsspec.core import url_to_fs

        options = dict(storage_options or {})
        if BUCKETS[scheme] == "s3":
            options["config_kwargs"] = {**_S3_RETRIES, **options.get("config_kwargs", {})}
        return url_to_fs(url, **options)
    except ImportError as e:
        raise ConversionError(url, f"{scheme}:// needs its filesystem: pip install "
                              f"\"lmtk[{BUCKETS[scheme]}]\" ({e.name} is missing)") from e
    except Exception as e:  # options the filesystem does not take, a malformed URL, ...
        raise ConversionError(url, f"cannot open the bucket: {reason_of(e)} (check convert.storage_options)") from e


class BucketFolder:
    """One model folder in a bucket: ``url`` = ``<output_dir>/<unit name>``."""

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        self.fs, self.path = filesystem(url, storage_options=storage_options)
        self.url = url.rstrip("/")
        self.path = self.path.rstrip("/")
        self._retired = False

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as e:  # botocore/gcsfs raise many kinds; each becomes one line naming the URL
            raise ConversionError(self.url, f"cannot {what}: {reason_of(e)}") from e

    def files(self) -> list[str]:
        """The keys under the folder, relative to it."""
        self.fs.invalidate_cache(self.path)
        found = self._call("list the output folder", self.fs.find, self.path + "/")
        return sorted(f[len(self.path) + 1 :] for f in found if f.startswith(self.path + "/"))

    def stage_marker(self, local: Path, *, clean: bool = True) -> None:
        """Put the bucket's ``conversion.json`` (with its time) at ``local``, so skipping and refusing decide as
        for a local folder; a folder left without one by a killed run is removed first (``clean``)."""
        files = self.files()
        if not files:
            return
        if MARKER not in files and not clean:
            log.info("%s holds %d file(s) but no %s: an unfinished upload, removed when converting", self.url,
                     len(files), MARKER)
            return
        if MARKER not in files:
            log.warning("%s holds %d file(s) but no %s: an upload that did not finish; removing it", self.url,
                        len(files), MARKER)
            self._remove(files)
            return
        key = f"{self.path}/{MARKER}"
        data = self._call(f"read {MARKER}", self.fs.cat_file, key)
        info = self._call(f"read {MARKER}", self.fs.info, key)
        local.mkdir(parents=True, exist_ok=True)
        (local / MARKER).write_bytes(data)
        modified = info.get("LastModified") or info.get("mtime") or info.get("updated")
        if hasattr(modified, "timestamp"):
            os.utime(local / MARKER, (modified.timestamp(), modified.timestamp()))

    def retire_marker(self) -> None:
        """Remove the folder's ``conversion.json`` (once): from then until the new one lands it is not a model."""
        if not self._retired:
            self._retired = True
            if self.fs.exists(f"{self.path}/{MARKER}"):
                self._call(f"remove the old {MARKER}", self.fs.rm_file, f"{self.path}/{MARKER}")

    def upload(self, local: Path, *, sent_already: Mapping[str, int] | None = None) -> int:
        """Replace the folder's contents with ``local``'s: its marker goes first, the new one last. Bytes sent.

        ``sent_already``: files (name -> size) uploaded while they were written (``Uploads``)."""
        names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
        before = self.files()
        if MARKER in before:
            self.retire_marker()
        done = dict(sent_already or {})
        sent = sum(done.values())
        try:
            for name in [n for n in names if n != MARKER] + [MARKER]:
                size = (local / name).stat().st_size
                if done.get(name) == size:
                    continue
                self._call(f"upload {name}", self.fs.put_file, str(local / name), f"{self.path}/{name}")
                sent += size
        except BaseException:
            self._remove(self._quiet_files() or names)
            raise
        stale = [n for n in before if n not in names]
        if stale:
            self._remove(stale)
        return sent

    def _quiet_files(self) -> list[str]:
        try:
            return self.files()
        except ConversionError:
            return []

    def _remove(self, names: list[str]) -> None:
        try:
            self.fs.rm([f"{self.path}/{n}" for n in names])
        except Exception as e:  # the server may be the reason the upload failed: say what is left
            log.error("%s: could not remove what a failed upload left (%s); the next run removes it", self.url,
                      reason_of(e))


class Uploads:
    """Weight files sent to a bucket folder while they are written: each one a multipart upload whose parts go
    as soon as the writer has written them (read back from the page cache), so writing and sending overlap.

    At most ``IN_FLIGHT`` parts of ``PART`` bytes are on their way at once; a writer that gets ahead waits. A
    file becomes an object only when it is finished (completed after its fsync); the folder's old
    ``conversion.json`` is removed before the first one is. S3 only (gcsfs has no part API): other buckets
    upload after the conversion, as ``BucketFolder.upload`` does.
    """

    PART, IN_FLIGHT = 32 << 20, 4

    def __init__(self, folder: BucketFolder) -> None:
        self.folder = folder
        self.sent: dict[str, int] = {}  # file name -> size, finished in the bucket
        self._pool = ThreadPoolExecutor(self.IN_FLIGHT, thread_name_prefix="lmtk-put")

    @staticmethod
    def usable(folder: BucketFolder) -> bool:
        return hasattr(folder.fs, "call_s3")

    def file(self, path: Path) -> _PartUpload:
        return _PartUpload(self, path)

    def remove_sent(self) -> None:
        """What was sent for a conversion that then failed: nothing of it stays."""
        if self.sent:
            self.folder._remove(sorted(self.sent))
            self.sent.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _PartUpload:
    def __init__(self, uploads: Uploads, path: Path) -> None:
        self._uploads, self._path, self._name = uploads, path, path.name
        folder = uploads.folder
        self._bucket, self._key, _ = folder.fs.split_path(f"{folder.path}/{self._name}")
        self._fd: int | None = None
        self._id: str | None = None
        self._queued = 0  # bytes handed to parts so far
        self._parts: list[Future[dict[str, Any]]] = []

    def _s3(self, what: str, method: str, **kwargs: Any) -> Any:
        return self._uploads.folder._call(what, self._uploads.folder.fs.call_s3, method, Bucket=self._bucket,
                                          Key=self._key, **kwargs)

    def advance(self, written: int) -> None:
        """The writer has written ``written`` bytes of the file in all: send every whole part among them."""
        while written - self._queued >= Uploads.PART:
            self._send(self._queued, Uploads.PART)

    def _send(self, start: int, length: int) -> None:
        if self._id is None:
            self._fd = os.open(self._path, os.O_RDONLY)
            self._id = self._s3(f"upload {self._name}", "create_multipart_upload")["UploadId"]
        while len([p for p in self._parts if not p.done()]) >= Uploads.IN_FLIGHT:
            next(p for p in self._parts if not p.done()).exception()
        for failed in (p for p in self._parts if p.done() and p.exception() is not None):
            raise failed.exception()  # type: ignore[misc]
        number = len(self._parts) + 1
        self._parts.append(self._uploads._pool.submit(self._part, number, start, length))
        self._queued = start + length

    def _part(self, number: int, start: int, length: int) -> dict[str, Any]:
        assert self._fd is not None
        data = os.pread(self._fd, length, start)
        if len(data) != length:
            raise ConversionError(self._path, f"read {len(data)} of {length} bytes back while uploading it")
        reply = self._s3(f"upload {self._name}", "upload_part", UploadId=self._id, PartNumber=number, Body=data)
        return {"PartNumber": number, "ETag": reply["ETag"]}

    def finish(self, size: int) -> None:
        """The file is complete and fsynced: send the rest, then make it the object."""
        try:
            if self._id is None:  # smaller than a part: one PUT
                self._uploads.folder.retire_marker()
                self._uploads.folder._call(f"upload {self._name}", self._uploads.folder.fs.put_file, str(self._path),
                                           f"{self._uploads.folder.path}/{self._name}")
            else:
                if size > self._queued:
                    self._send(self._queued, size - self._queued)
                parts = [p.result() for p in self._parts]
                self._uploads.folder.retire_marker()
                self._s3(f"upload {self._name}", "complete_multipart_upload", UploadId=self._id,
                         MultipartUpload={"Parts": parts})
                self._id = None
            self._uploads.sent[self._name] = size
        finally:
            self.abort()

    def abort(self) -> None:
        """Give up the upload (a failed write): its parts are dropped by the store, nothing becomes an object."""
        for part in self._parts:
            part.cancel()
        for part in self._parts:
            if not part.cancelled():
                part.exception()
        if self._id is not None:
            try:
                self._s3(f"abort the upload of {self._name}", "abort_multipart_upload", UploadId=self._id)
            except ConversionError as e:
                log.warning("%s", e)
            self._id = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
