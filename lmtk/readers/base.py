"""What every reader offers: the tensors it has (name, shape, dtype) and each tensor on request."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class SourceInfo:
    """What a reader learnt about the checkpoint beyond its tensors."""

    layout: str
    files: list[Path]
    # Scalars found next to the weights in a training dict (epoch, step, ...).
    metadata: dict[str, Any] = field(default_factory=dict)
    # Where the weights sat inside the saved object, e.g. "model" or "state_dict".
    location: str = ""


class Reader(Protocol):
    path: Path
    info: SourceInfo

    def specs(self) -> dict[str, TensorSpec]: ...

    def read(self, name: str) -> torch.Tensor: ...

    # The tensor as pieces whose bytes, concatenated, are the tensor's: lets shards stream uncopied.
    def read_pieces(self, name: str) -> Iterable[torch.Tensor]: ...

    def close(self) -> None: ...


def same_bytes(reader: object, a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are known to be the very same bytes of the checkpoint without reading them (tied
    weights saved once), for readers that can tell (an optional ``same_bytes`` method); else False."""
    method = getattr(reader, "same_bytes", None)
    return bool(method(a, b)) if method is not None else False
