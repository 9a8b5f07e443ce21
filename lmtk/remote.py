"""Checkpoints read where they lie in a bucket: a listing for discovery, byte ranges for the readers.

``BucketPath`` is a path whose questions (is it a folder, what is in it, how big is it) are answered from
listings: the tree under ``convert.checkpoint_path`` is listed once, recursively, when the run starts, and any
other folder (a unit's parent, a base model) once when first asked. So discovery and the trainer entries work
on a bucket unchanged. The readers ask for byte ranges (``fetch``, ``stream``): a tensor streams to the writer
in parts of ``PART`` bytes, ``convert.remote_concurrency`` of them in flight, so memory holds at most that many
parts beyond what a local conversion holds. Nothing is downloaded whole; only small files (configs, tokenizer
files, DCP's ``.metadata``) are read into memory at once.
"""

from __future__ import annotations

import bisect
import io
import logging
import os
import stat as stat_module
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import PurePosixPath
from typing import Any

import torch

from lmtk.errors import ConversionError
from lmtk.storage import BUCKETS, filesystem, reason_of, scheme_of

log = logging.getLogger(__name__)

PART = 16 << 20  # bytes per ranged GET when streaming a tensor
_WINDOW = 1 << 20  # read-ahead of an open file (a zip directory, a pickle); smaller files are read whole

# The bytes of a GET are read-only; the tensors made from them are only read (cast, checked, written).
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@dataclass
class _Settings:
    storage_options: Mapping[str, Any] | None = None
    concurrency: int = 4


_settings = _Settings()
_buckets: dict[str, _Bucket] = {}
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def configure(*, storage_options: Mapping[str, Any] | None, concurrency: int) -> None:
    """How buckets are reached in this process (``convert.storage_options``, ``convert.remote_concurrency``); what
    earlier listings said is forgotten: a run sees the bucket as it is when it starts."""
    if concurrency < 1:
        raise ConversionError("convert.remote_concurrency", f"must be 1 or more, not {concurrency}")
    global _pool
    with _lock:
        _buckets.clear()
        if concurrency != _settings.concurrency and _pool is not None:
            _pool.shutdown(wait=False)
            _pool = None
        _settings.storage_options, _settings.concurrency = storage_options, concurrency


def is_remote(path: object) -> bool:
    return isinstance(path, BucketPath)


def location(text: str, *, listed: bool = True) -> Any:
    """``text`` as a path: a ``BucketPath`` (its tree listed once, when ``listed``) for a bucket URL, else local."""
    from pathlib import Path

    scheme = scheme_of(text)
    if scheme is None:
        return Path(text)
    if scheme not in BUCKETS:
        raise ConversionError(text, f"a {scheme}:// URL; lmtk reads local paths, s3:// and gs://")
    path = BucketPath(text.rstrip("/"))
    if listed:
        path._bucket.list_tree(path)
    return path


class _Bucket:
    """One bucket's filesystem and what its listings said."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, _ = filesystem(url, storage_options=_settings.storage_options)
        self._trees: list[str] = []  # keys listed with everything below them
        self._folders: dict[str, dict[str, dict[str, Any]]] = {}  # folder key -> child name -> info
        self._listed: set[str] = set()  # folders listed on their own (outside the trees)

    def _call(self, url: str, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except ConversionError:
            raise
        except Exception as e:  # botocore/gcsfs raise many kinds; each becomes one line naming the URL
            raise ConversionError(url, f"cannot {what}: {reason_of(e)}") from e

    def list_tree(self, path: BucketPath) -> None:
        """Everything under ``path``, in one listing (the store pages it)."""
        key = path.key
        if self._in_tree(key):
            return
        self.fs.invalidate_cache(key)
        found = self._call(str(path), "list it", self.fs.find, key, detail=True)
        with _lock:
            for name, info in found.items():
                name = name.rstrip("/")
                if info.get("type") != "directory" and (name == key or name.startswith(key + "/")):
                    self._add(name, {**info, "type": "file"}, top=key)
            self._trees.append(key)

    def _add(self, key: str, info: dict[str, Any], *, top: str) -> None:
        """A file under ``top``, and each folder between them."""
        while True:
            parent, _, name = key.rpartition("/")
            self._folders.setdefault(parent, {})[name] = info
            if not parent.startswith(top + "/") and parent != top:
                return
            if parent == top:
                self._folders.setdefault(top.rpartition("/")[0], {})[top.rpartition("/")[2]] = _FOLDER
                return
            key, info = parent, _FOLDER

    def _in_tree(self, key: str) -> bool:
        return any(key == t or key.startswith(t + "/") for t in self._trees)

    def children(self, path: BucketPath) -> dict[str, dict[str, Any]]:
        """What the folder holds, listed once (nothing, for a key that is no folder)."""
        key = path.key
        if self._in_tree(key) or key in self._listed:
            return self._folders.get(key, {})
        try:
            listed = self.fs.ls(key, detail=True, refresh=True)
        except FileNotFoundError:
            listed = []
        except Exception as e:
            raise ConversionError(str(path), f"cannot list it: {reason_of(e)}") from e
        with _lock:
            folder = self._folders.setdefault(key, {})
            for info in listed:
                name = info["name"].rstrip("/")
                if name.startswith(key + "/"):
                    folder.setdefault(name[len(key) + 1 :], _FOLDER if info.get("type") == "directory" else info)
            self._listed.add(key)
        return folder

    def info(self, path: BucketPath) -> dict[str, Any] | None:
        key = path.key
        if "/" not in key:  # the bucket itself
            return _FOLDER
        if self._in_tree(key):
            parent = key.rpartition("/")[0]
            if self._in_tree(parent) or key in self._trees and parent in self._folders and \
                    path.name in self._folders[parent]:
                return self._folders.get(parent, {}).get(path.name)
        return self.children(path.parent).get(path.name)


_FOLDER: dict[str, Any] = {"type": "directory", "size": 0}


class BucketPath(PurePosixPath):
    """``s3://bucket/key`` as a path: joins and names as any path, the rest answered from listings."""

    @property
    def scheme(self) -> str:
        return self.parts[0].rstrip(":")

    @property
    def key(self) -> str:
        """``bucket/key``, as fsspec names it."""
        return "/".join(self.parts[1:])

    @property
    def _bucket(self) -> _Bucket:
        root = f"{self.scheme}://{self.parts[1]}"
        with _lock:
            bucket = _buckets.get(root)
        if bucket is None:
            bucket = _Bucket(root)
            with _lock:
                bucket = _buckets.setdefault(root, bucket)
        return bucket

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"BucketPath({str(self)!r})"

    def _info(self) -> dict[str, Any] | None:
        return self._bucket.info(self) if len(self.parts) > 1 else None

    def exists(self) -> bool:
        return self._info() is not None

    def is_file(self) -> bool:
        return (self._info() or {}).get("type") == "file"

    def is_dir(self) -> bool:
        return (self._info() or {}).get("type") == "directory"

    def is_symlink(self) -> bool:
        return False

    def resolve(self, strict: bool = False) -> BucketPath:
        return self

    def absolute(self) -> BucketPath:
        return self

    def iterdir(self) -> Iterator[BucketPath]:
        for name in sorted(self._bucket.children(self)):
            yield self / name

    def glob(self, pattern: str) -> Iterator[BucketPath]:
        """Matches of a pattern of plain segments (``*.distcp``, ``actor/*.pt``), as trainers and readers ask."""
        found = [self]
        for segment in pattern.split("/"):
            found = [child for folder in found if folder.is_dir() for child in folder.iterdir()
                     if fnmatch(child.name, segment)]
        yield from found

    def stat(self) -> os.stat_result:
        info = self._info()
        if info is None:
            raise FileNotFoundError(str(self))
        modified = info.get("LastModified") or info.get("mtime") or info.get("updated") or 0
        seconds = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0)
        mode = stat_module.S_IFDIR if info.get("type") == "directory" else stat_module.S_IFREG
        result = os.stat_result((mode | 0o444, 0, 0, 1, 0, 0, int(info.get("size") or 0), int(seconds), int(seconds),
                                 int(seconds)))
        return _Stat(result, etag=str(info.get("ETag") or info.get("etag") or "").strip('"'),
                     mtime_ns=int(seconds * 1e9))

    def read_bytes(self) -> bytes:
        return fetch(self, 0, None)

    def read_text(self, encoding: str | None = None, errors: str | None = None) -> str:
        return self.read_bytes().decode(encoding or "utf-8", errors or "strict")

    def open(self, mode: str = "rb", buffering: int = -1, *args: Any, **kwargs: Any) -> Any:
        """For reading: a small object read whole, a large one by ranged GETs of ``buffering`` bytes ahead."""
        if mode not in ("r", "rb"):
            raise OSError(f"{self}: opened for reading only")
        size = self.stat().st_size
        window = buffering if buffering > 0 else _WINDOW
        raw: Any = io.BytesIO(self.read_bytes()) if size <= window else \
            io.BufferedReader(Sparse(self, 0, size, {}), window)
        return io.TextIOWrapper(raw, encoding="utf-8") if mode == "r" else raw


class _Stat:
    """``os.stat_result`` plus the object's ETag (fingerprints use it: a rewritten object has another)."""

    def __init__(self, result: os.stat_result, *, etag: str, mtime_ns: int) -> None:
        self._result, self.etag, self.st_mtime_ns = result, etag, mtime_ns

    def __getattr__(self, name: str) -> Any:
        return getattr(self._result, name)


def fetch(path: BucketPath, start: int, end: int | None) -> bytes:
    """The object's bytes ``[start, end)`` (to its end when ``end`` is None), in one GET."""
    bucket = path._bucket
    return bucket._call(str(path), "read it", bucket.fs.cat_file, path.key, start=start, end=end)


def fetch_many(ranges: list[tuple[BucketPath, int, int]]) -> list[bytes]:
    """Many small ranges ``(path, start, end)`` of one bucket, fetched concurrently (fsspec's ``cat_ranges``)."""
    if not ranges:
        return []
    bucket = ranges[0][0]._bucket
    return bucket._call(str(ranges[0][0].parent), "read it", bucket.fs.cat_ranges, [p.key for p, _, _ in ranges],
                        [s for _, s, _ in ranges], [e for _, _, e in ranges])


class Sparse(io.RawIOBase):
    """A byte range of an object as a seekable file, from windows already fetched (offset in the range -> bytes);
    a read outside them is a GET of its own."""

    def __init__(self, path: BucketPath, start: int, length: int, windows: dict[int, bytes]) -> None:
        self._path, self._start, self._length, self._pos = path, start, length, 0
        self._windows = windows

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(base + pos, 0), self._length)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._length - self._pos)
        if n <= 0:
            return 0
        for at, data in self._windows.items():
            if at <= self._pos and self._pos + n <= at + len(data):
                view[:n] = data[self._pos - at : self._pos - at + n]
                break
        else:
            # An object cut short since it was listed gives fewer bytes: a short read, as a shorter file gives.
            data = fetch(self._path, self._start + self._pos, self._start + self._pos + n)
            n = len(data)
            view[:n] = data
        self._pos += n
        return n


# Small ranges fetched ahead, many at once (a model's biases and norms: hundreds of GETs of a few KB each
# otherwise, one round trip apiece): URL -> [(start, bytes)], each taken by the first read inside it.
SMALL, PRELOAD_LIMIT = 1 << 20, 64 << 20
_preloaded: dict[str, dict[int, bytes]] = {}  # URL -> start -> bytes
_starts: dict[str, list[int]] = {}  # URL -> the starts, sorted


def preload(ranges: list[tuple[BucketPath, int, int]]) -> None:
    """Fetch the small ones of ``ranges`` now, concurrently, up to ``PRELOAD_LIMIT`` bytes in all."""
    chosen, total = [], sum(len(d) for entries in _preloaded.values() for d in entries.values())
    for path, start, end in ranges:
        if 0 < end - start <= SMALL and total + end - start <= PRELOAD_LIMIT:
            chosen.append((path, start, end))
            total += end - start
    for (path, start, _), data in zip(chosen, fetch_many(chosen)):
        keep(path, start, data)


def keep(path: BucketPath, start: int, data: bytes) -> None:
    """Bytes already fetched, for the first read inside them."""
    with _lock:
        entries = _preloaded.setdefault(str(path), {})
        if start not in entries:
            bisect.insort(_starts.setdefault(str(path), []), start)
        entries[start] = data


def forget(paths: list[Any]) -> None:
    """Drop what was preloaded for ``paths`` (a reader closing)."""
    with _lock:
        for path in paths:
            _preloaded.pop(str(path), None)
            _starts.pop(str(path), None)
            _windows.pop(str(path), None)


def _take(path: BucketPath, start: int, nbytes: int) -> bytes | memoryview | None:
    """The range from what was fetched ahead (taken: the first read inside it uses it up), or None."""
    with _lock:
        entries, starts = _preloaded.get(str(path)), _starts.get(str(path))
        if not entries or not starts:
            return None
        i = bisect.bisect_right(starts, start)
        at = starts[i - 1] if i else None
        if at is None or start + nbytes > at + len(entries[at]):
            return None
        del starts[i - 1]
        return memoryview(entries.pop(at))[start - at : start - at + nbytes]


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_settings.concurrency, thread_name_prefix="lmtk-get")
        return _pool


def stream(path: BucketPath, start: int, nbytes: int, *, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The range as 1-D tensors of ``dtype``, part by part, the next parts already on their way."""
    return stream_many([(path, start, nbytes)], dtype=dtype)


def stream_many(ranges: list[tuple[BucketPath, int, int]], *, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Ranges ``(path, start, nbytes)`` one after the other as 1-D tensors of ``dtype``, part by part, the next
    parts (of the next ranges too: a tensor's shards) already on their way.

    A range's last part, when short, is read on to a whole ``PART``: a checkpoint's tensors mostly lie one after
    another in the order they are read, so the next range usually starts inside what was read ahead (one window
    per object, kept until a read misses it). Hundreds of small GETs become a few large ones."""
    parts: deque[tuple[BucketPath, int, int, int] | memoryview] = deque()
    for path, start, nbytes in ranges:
        end = start + nbytes
        if nbytes and (data := _take(path, start, nbytes)) is not None:
            parts.append(data)
            continue
        if nbytes and (early := _from_window(path, start, end, itemsize=dtype.itemsize)) is not None:
            parts.append(early)
            start += len(early)
        for at in range(start, end, PART):
            stop = min(at + PART, end)
            parts.append((path, at, stop, _read_on(path, at, stop)))
    pool, ahead = _executor(), _settings.concurrency
    pending: deque[Future[bytes] | memoryview] = deque()
    try:
        while parts or pending:
            while parts and len(pending) < ahead:
                part = parts.popleft()
                pending.append(pool.submit(_fetch_part, *part) if isinstance(part, tuple) else part)
            done = pending.popleft()
            data = done.result() if isinstance(done, Future) else done
            yield torch.frombuffer(data, dtype=dtype) if len(data) else torch.empty(0, dtype=dtype)
    finally:
        for future in pending:
            if isinstance(future, Future):
                future.cancel()


_windows: dict[str, tuple[int, bytes]] = {}  # URL -> the bytes read ahead past the last range, and where they start


def _read_on(path: BucketPath, start: int, stop: int) -> int:
    """Where a part's GET ends: a short part reads on to a whole PART (within the object)."""
    if stop - start >= PART:
        return stop
    return max(stop, min(start + PART, path.stat().st_size))


def _fetch_part(path: BucketPath, start: int, stop: int, read_to: int) -> memoryview:
    data = memoryview(fetch(path, start, read_to))
    if read_to > stop:
        with _lock:
            _windows[str(path)] = (stop, data[stop - start :])
    return data[: stop - start]


def _from_window(path: BucketPath, start: int, end: int, *, itemsize: int) -> memoryview | None:
    """The head of ``[start, end)`` from the object's read-ahead window, when the range starts inside it (whole
    elements of ``itemsize`` bytes only)."""
    with _lock:
        window = _windows.get(str(path))
        if window is None:
            return None
        at, data = window
        if not at <= start < at + len(data):
            del _windows[str(path)]  # read out of order: the window is of no more use
            return None
        taken = data[start - at : start - at + (min(end, at + len(data)) - start) // itemsize * itemsize]
        if not len(taken):
            return None
        if start + len(taken) >= at + len(data):
            del _windows[str(path)]
        else:
            _windows[str(path)] = (start + len(taken), data[start - at + len(taken) :])
        return taken


def tensor(path: BucketPath, start: int, nbytes: int) -> torch.Tensor:
    """The range as one uint8 tensor, its parts fetched at once."""
    out = torch.empty(nbytes, dtype=torch.uint8)
    done = 0
    for block in stream(path, start, nbytes, dtype=torch.uint8):
        out[done : done + block.numel()] = block
        done += block.numel()
    return out


def extent(meta: torch.Tensor) -> tuple[int, int] | None:
    """The byte range ``[start, end)`` of the file a loaded (meta) tensor's elements span, when known."""
    start = getattr(meta.untyped_storage(), "_checkpoint_offset", None)
    if start is None or meta.numel() == 0:
        return None
    first = meta.storage_offset()
    last = first + sum((n - 1) * s for n, s in zip(meta.shape, meta.stride()))
    return start + first * meta.element_size(), start + (last + 1) * meta.element_size()


def materialize(path: BucketPath, meta: torch.Tensor) -> torch.Tensor:
    """A tensor ``torch.load(map_location="meta")`` described, with its bytes from the object it was saved in."""
    storage = meta.untyped_storage()
    start = getattr(storage, "_checkpoint_offset", None)
    if start is None:
        raise ConversionError(str(path), "a tensor without a place in the file (saved in the legacy format?)")
    size, stride, offset = tuple(meta.shape), meta.stride(), meta.storage_offset()
    if meta.numel() == 0:
        return torch.empty(size, dtype=meta.dtype)
    itemsize = meta.element_size()
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    data = tensor(path, start + offset * itemsize, (last - offset + 1) * itemsize).view(meta.dtype)
    return data.as_strided(size, stride)


def streamed(path: BucketPath, meta: torch.Tensor) -> Iterator[torch.Tensor]:
    """A loaded tensor's bytes as parts, when it is a plain range of its storage; else the whole tensor."""
    start = getattr(meta.untyped_storage(), "_checkpoint_offset", None)
    if start is None or not meta.is_contiguous():
        yield materialize(path, meta)
        return
    yield from stream(path, start + meta.storage_offset() * meta.element_size(), meta.numel() * meta.element_size(),
                      dtype=meta.dtype)
