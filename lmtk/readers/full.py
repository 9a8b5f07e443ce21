"""Full (unsharded) state dicts saved with ``torch.save``, bare or inside a training dict."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lmtk.errors import ConversionError
from lmtk import remote
from lmtk.remote import is_remote, materialize, streamed
from lmtk.readers.base import SourceInfo, TensorSpec
from lmtk.readers.safe import ONE_RANK, Placeholder, safe_load

log = logging.getLogger(__name__)

# Where training code puts the weights inside the dict it saves, in the order we look.
STATE_DICT_KEYS = ("model", "state_dict", "module", "model_state_dict")


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
    inert = [k for k, v in node.items() if isinstance(v, Placeholder)]
    if inert:
        raise ConversionError(path, f"{inert[0]} is a pickled {node[inert[0]].qualname} object where a tensor must be")
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
            if t.is_sparse or t.device.type == "meta" and not is_remote(path):
                raise ConversionError(path, f"tensor {name} is {'sparse' if t.is_sparse else 'on the meta device'}")
        self._tensors = tensors
        self.info = SourceInfo(layout="full", files=[path], metadata=metadata, location=location)
        if is_remote(path):
            remote.preload([(path, *extent) for t in tensors.values() if (extent := remote.extent(t))])

    def specs(self) -> dict[str, TensorSpec]:
        return {name: TensorSpec.of(t) for name, t in self._tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        if is_remote(self.path):
            return materialize(self.path, self._tensors[name])
        return self._tensors[name]

    def read_pieces(self, name: str) -> Iterable[torch.Tensor]:
        if is_remote(self.path):
            return streamed(self.path, self._tensors[name])
        return [self._tensors[name]]

    def same_bytes(self, a: str, b: str) -> bool:
        """Tied weights saved once share one storage: from a bucket, known from the file's layout alone."""
        x, y = self._tensors[a], self._tensors[b]
        where = [getattr(t.untyped_storage(), "_checkpoint_offset", None) if is_remote(self.path) else
                 t.untyped_storage().data_ptr() for t in (x, y)]
        return where[0] is not None and where[0] == where[1] and x.storage_offset() == y.storage_offset() and \
            x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype

    def close(self) -> None:
        self._tensors = {}
        remote.forget(self.info.files)
