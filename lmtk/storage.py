"""Where bytes live: a local path or an object-store URL (``s3://``, ``gs://``), reached through fsspec.

Local paths stay plain ``Path`` objects (mmap and ``copy_file_range`` downstream); a URL gets an fsspec
filesystem built from ``convert.storage_options`` over the standard credential chains (AWS env vars, profiles,
instance roles, ``AWS_ENDPOINT_URL``; Google application default credentials).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from lmtk.errors import ConversionError

log = logging.getLogger(__name__)

# Schemes served, and the extra that installs each one's filesystem.
SCHEMES = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}
_URL = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://")
# Keys of storage_options whose values never reach a log, a summary or a card.
_SECRET = re.compile(r"secret|token|password|key|credential|session", re.IGNORECASE)


def scheme_of(location: str) -> str | None:
    """The URL scheme of ``location`` (``s3``), None for a local path."""
    match = _URL.match(str(location))
    return match["scheme"].lower() if match else None


def is_url(location: str) -> bool:
    return scheme_of(location) is not None


def check_served(location: str, *, option: str) -> None:
    """A URL whose scheme lmtk cannot serve is one line, never a local folder named ``s3:``."""
    scheme = scheme_of(location)
    if scheme is not None and scheme not in SCHEMES:
        raise ConversionError(f"{location}: {option} is a {scheme}:// URL; lmtk reads and writes local paths, "
                              f"{', '.join(s + '://' for s in sorted(SCHEMES))} only")


def filesystem(location: str, *, storage_options: dict[str, Any]) -> Any:
    """The fsspec filesystem serving ``location`` (a URL), built with the user's ``storage_options``."""
    scheme = scheme_of(location)
    if scheme is None or scheme not in SCHEMES:
        raise ValueError(f"not a served URL: {location}")
    try:
        import fsspec

        return fsspec.filesystem(scheme, **storage_options)
    except ImportError as e:
        raise ConversionError(f'{location}: {scheme}:// needs its filesystem: pip install "lmtk[{SCHEMES[scheme]}]" '
                              f"({e})") from None


def redacted(storage_options: dict[str, Any]) -> dict[str, Any]:
    """``storage_options`` fit for a log or a record: secret values replaced, nested dicts walked."""
    out: dict[str, Any] = {}
    for key, value in storage_options.items():
        if isinstance(value, dict):
            out[key] = redacted(value)
        elif _SECRET.search(str(key)):
            out[key] = "***"
        else:
            out[key] = value
    return out
