"""Where bytes live: local paths, and model folders written to a bucket (``s3://``, ``gs://``, through fsspec).

A conversion into a bucket is made in a local staging folder, as any conversion, then handed over file by
file: the weights and the rest first, ``conversion.json`` last, so a prefix without it is never a model. A
failed upload removes what it put there. A prefix left without ``conversion.json`` (a killed run) is cleaned
by the next run before it converts again. Reading checkpoints from a bucket is not built: such a URL is
refused in one line.
"""

from __future__ import annotations

import logging
import os
import re
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

    def upload(self, local: Path) -> int:
        """Replace the folder's contents with ``local``'s: its marker goes first, the new one last. Bytes sent."""
        names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
        before = self.files()
        if MARKER in before:  # from here until the new marker lands, the folder is not a model
            self._call(f"remove the old {MARKER}", self.fs.rm_file, f"{self.path}/{MARKER}")
        sent = 0
        try:
            for name in [n for n in names if n != MARKER] + [MARKER]:
                self._call(f"upload {name}", self.fs.put_file, str(local / name), f"{self.path}/{name}")
                sent += (local / name).stat().st_size
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
