"""Load ``torch.save`` files without running anything they hold.

``torch.load(weights_only=True)`` refuses any Python object it does not know, and one such object
(Lightning's pickled hyper-parameters, numpy RNG state, an argparse namespace) blocks the weights
beside it. Here every unknown type becomes an inert placeholder: a class made on the spot under the
pickled name that imports nothing, calls nothing and only records that it was there. Only tensors are
used. Names of modules that exist to run code (``os``, ``subprocess``, ``builtins.eval``, ...) are
refused outright: a checkpoint that references them is a payload, not trainer state.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmtk.errors import ConversionError
from lmtk.remote import is_remote

log = logging.getLogger(__name__)

_ZIP_MAGIC = b"PK\x03\x04"
ONE_RANK = "holds DTensor shards: one rank's file; convert the directory that holds every rank's file"
# What these name runs code when called: a file that references them is refused, never loaded. (Placeholders
# would keep them inert too; refusing says plainly that the file is a payload, not training state.)
_CODE_MODULES = ("os", "posix", "nt", "sys", "subprocess", "importlib", "runpy", "shutil", "socket", "pickle",
                 "_pickle", "marshal", "ctypes", "code", "codeop", "pty", "webbrowser", "types")
_CODE_BUILTINS = {f"{m}.{f}" for m in ("builtins", "__builtin__") for f in (
    "eval", "exec", "compile", "__import__", "open", "breakpoint", "input", "exit", "quit", "globals", "locals",
    "vars", "setattr", "delattr")}
# An unknown global torch.load stopped at (names the static scan cannot see, e.g. numpy dtypes built while loading).
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


class Placeholder:
    """An object a checkpoint pickled that lmtk does not need: nothing of it was imported or run."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


def _placeholder(name: str) -> type[Placeholder]:
    return type(name.rsplit(".", 1)[-1], (Placeholder,), {"qualname": name, "__module__": "lmtk.placeholder"})


def sniff(path: Path) -> str:
    """Why a file is not a torch.save checkpoint, or "" when it looks like one."""
    with path.open("rb") as f:
        head = f.read(64)
    if not head:
        return "empty file (0 bytes)"
    if head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80":
        return ""
    if head.startswith(b"version https://git-lfs"):
        return "a git-lfs pointer, not the checkpoint itself (run `git lfs pull`)"
    if head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml", b"<")):
        return "an HTML/XML page, not a checkpoint (a failed download?)"
    return "not a PyTorch checkpoint (unrecognised file header)"


def safe_load(path: Path, *, allowed_globals: Sequence[str] = ()) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped when the format allows, unknown objects as placeholders.

    ``allowed_globals`` names types the user trusts (``convert.allowed_globals``): those are real.
    """
    if reason := sniff(path):
        raise ConversionError(path, reason)
    with path.open("rb") as f:
        zipped = f.read(4) == _ZIP_MAGIC
        if zipped and not zipfile.is_zipfile(f):
            raise ConversionError(path, "truncated or corrupt file (its zip directory is missing)")
    if is_remote(path) and not zipped:
        raise ConversionError(path, "saved in torch's legacy (pre-1.6) format, which cannot be read in place from a "
                              "bucket; copy it to local disk")
    trusted = [(resolve_global(name), name) for name in allowed_globals]

    def load() -> Any:
        if not is_remote(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
        # From a bucket: the pickle and the zip directory only; each tensor's bytes are fetched when read.
        with path.open("rb") as f:
            return torch.load(f, map_location="meta", weights_only=True)

    try:  # most files hold tensors and plain values only: one load, no scan
        with torch.serialization.safe_globals(trusted):
            return load()
    except Exception as e:
        if not isinstance(e, pickle.UnpicklingError) and "global" not in str(e).lower():
            raise ConversionError(path, _load_failure(e)) from e
    unknown: set[str] = set()
    if zipped:
        try:
            with path.open("rb") as f:
                unknown = set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
        except Exception as e:  # a broken zip: torch.load below names it better
            log.debug("%s: could not list globals: %s", path, e)
    for _ in range(64):  # each round learns the globals the last one stopped at
        _refuse_code(path, unknown - set(allowed_globals))
        inert = [(_placeholder(name), name) for name in sorted(unknown - set(allowed_globals))]
        try:
            with torch.serialization.safe_globals(trusted + inert):
                obj = load()
        except Exception as e:
            if (found := _REFUSED_GLOBAL.search(str(e))) and found[1] not in unknown:
                unknown.add(found[1])
                continue
            raise ConversionError(path, _load_failure(e)) from e
        if inert:
            log.info("%s: read %d kinds of pickled objects beside the weights as inert placeholders: %s", path,
                     len(inert), ", ".join(name for _, name in inert[:8]) + (", ..." if len(inert) > 8 else ""))
        return obj
    raise ConversionError(path, "too many kinds of pickled Python objects")


def _refuse_code(path: Path, names: set[str]) -> None:
    if any(name.startswith("torch.distributed._shard.") for name in names):
        raise ConversionError(
            path,
            "holds FSDP1 ShardedTensor values (a per-rank torch.save of SHARDED_STATE_DICT or LOCAL_STATE_DICT), "
            "which cannot be loaded without running code; save with torch.distributed.checkpoint (dcp.save) "
            "under SHARDED_STATE_DICT, or a FULL_STATE_DICT",
        )
    if any(name.startswith("torch.distributed.tensor") or name.startswith("torch.distributed.device_mesh")
           for name in names):
        raise ConversionError(path, ONE_RANK)
    code = sorted(name for name in names if name.split(".")[0] in _CODE_MODULES or name in _CODE_BUILTINS)
    if code:
        raise ConversionError(
            path,
            f"holds Python objects that a weights-only load refuses: {', '.join(code)} (these run code when "
            "loaded: a pickle payload, not training state; if you trust this file, name them in "
            "convert.allowed_globals)",
        )


def resolve_global(name: str) -> Any:
    """``"argparse.Namespace"`` -> the class, for torch's allow-list."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ConversionError("convert.allowed_globals", f"cannot import {name!r}")


def _load_failure(e: Exception) -> str:
    text = str(e)
    if isinstance(e, (EOFError, OSError)) or "central directory" in text or "unexpected EOF" in text.lower():
        return f"truncated or corrupt file ({type(e).__name__} while reading it)"
    # torch's text advises weights_only=False; never pass that on.
    first = text.split("\n")[0].split(". ")[0]
    return f"torch.load failed: {type(e).__name__}: {first}"
