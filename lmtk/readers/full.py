"""Full (unsharded) state dicts saved with ``torch.save``, bare or inside a training dict."""

from __future__ import annotations

import importlib
import logging
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lmtk.errors import ConversionError
from lmtk.readers.base import SourceInfo, TensorSpec

log = logging.getLogger(__name__)

# Where training code puts the weights inside the dict it saves, in the order we look.
STATE_DICT_KEYS = ("model", "state_dict", "module", "model_state_dict")
SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

_ZIP_MAGIC = b"PK\x03\x04"
ONE_RANK = "holds DTensor shards: one rank's file; convert the directory that holds every rank's file"


def sniff(path: Path) -> str:
    """Why a file is not a torch.save checkpoint, or "" when it looks like one."""
    with open(path, "rb") as f:
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
    """``torch.load`` with ``weights_only=True`` always, memory-mapped when the format allows.

    ``allowed_globals`` names extra types the user trusts (``convert.allowed_globals``).
    """
    if reason := sniff(path):
        raise ConversionError(path, reason)
    with open(path, "rb") as f:
        zipped = f.read(4) == _ZIP_MAGIC
    if zipped and not zipfile.is_zipfile(path):
        raise ConversionError(path, "truncated or corrupt file (its zip directory is missing)")
    if zipped:
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as e:  # a broken zip: torch.load below names it better
            log.debug("%s: could not list globals: %s", path, e)
            unsafe = set()
        refused = sorted(unsafe - set(allowed_globals))
        if any(name.startswith("torch.distributed._shard.") for name in refused):
            raise ConversionError(
                path,
                "holds FSDP1 ShardedTensor values (a per-rank torch.save of SHARDED_STATE_DICT or "
                "LOCAL_STATE_DICT), which cannot be loaded without running code; save with "
                "torch.distributed.checkpoint (dcp.save) under SHARDED_STATE_DICT, or a FULL_STATE_DICT",
            )
        if any(name.startswith("torch.distributed.tensor") for name in refused):
            raise ConversionError(path, ONE_RANK)
        if refused:
            raise ConversionError(
                path,
                f"holds Python objects that a weights-only load refuses: {', '.join(refused)} "
                "(if you trust this file, name them in convert.allowed_globals)",
            )
    try:
        with torch.serialization.safe_globals([resolve_global(name) for name in allowed_globals]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(path, _load_failure(e)) from e


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


def find_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """The tensors of the model inside what torch.save wrote, where they were, and scalar metadata."""
    if not isinstance(obj, Mapping):
        raise ConversionError(path, f"holds a {type(obj).__name__}, not a state dict or a training dict")
    metadata = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (int, float, str, bool))}
    location: list[str] = []
    node: Mapping = obj
    while True:
        inner = next((k for k in STATE_DICT_KEYS if isinstance(node.get(k), Mapping)), None)
        if inner is None:
            break
        location.append(inner)
        node = node[inner]
    tensors = {k: v for k, v in node.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:10]))
        raise ConversionError(path, f"no model weights found (top-level keys: {keys})")
    skipped = [k for k in node if k not in tensors]
    if skipped:
        log.info("%s: skipping %d non-tensor entries next to the weights: %s", path, len(skipped), skipped[:5])
    return tensors, ".".join(location), metadata


class FullStateDictReader:
    """Tensors stay memory-mapped: reading one touches only its pages."""

    def __init__(self, path: Path, *, allowed_globals: Sequence[str] = ()) -> None:
        self.path = path
        tensors, location, metadata = find_state_dict(safe_load(path, allowed_globals=allowed_globals), path)
        for name, t in tensors.items():
            if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
                raise ConversionError(path, f"{ONE_RANK} ({name} is a {type(t).__name__})")
            if t.is_sparse or t.device.type == "meta":
                raise ConversionError(path, f"tensor {name} is {'sparse' if t.is_sparse else 'on the meta device'}")
        self._tensors = tensors
        self.info = SourceInfo(layout="full", files=[path], metadata=metadata, location=location)

    def specs(self) -> dict[str, TensorSpec]:
        return {name: TensorSpec.of(t) for name, t in self._tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def read_pieces(self, name: str) -> list[torch.Tensor]:
        return [self._tensors[name]]

    def close(self) -> None:
        self._tensors = {}
