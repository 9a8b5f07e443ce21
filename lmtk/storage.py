"""Where bytes live. lmtk reads and writes local paths (mmap, ``copy_file_range``); a URL in a path option is
refused in one line, before anything is read or written, so ``s3://bucket/out`` never becomes a local
folder named ``s3:/bucket/out``.
"""

from __future__ import annotations

import re

from lmtk.errors import ConversionError

_URL = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://")


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
        raise ConversionError(location, f"{option} is a {scheme}:// URL; lmtk reads and writes local paths only "
                              "(copy the checkpoint to local disk, or mount the bucket)")
