"""Other codebases' tensor names (``conf/naming/*.yaml``) mapped onto transformers' names.

A naming is a key map plus per-tensor transforms. ``Renamed`` shows a reader's checkpoint under HF
names, one tensor at a time, so planning, writing and verify work on it as on any reader. Which naming
a checkpoint uses is found by trying each candidate against the architecture.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtk import keys
from lmtk.architecture import Architecture
from lmtk.config import NamingConfig, TensorTransform, Transform
from lmtk.errors import ConversionError
from lmtk.plan import Plan, make_plan
from lmtk.readers.base import Reader, SourceInfo, TensorSpec

log = logging.getLogger(__name__)

HF = "hf"


def _pattern(template: str) -> re.Pattern[str]:
    """``layers.{}.attention.wq.weight`` -> a regex with one number group per ``{}``."""
    return re.compile(r"(\d+)".join(re.escape(part) for part in template.split("{}")))


@dataclass
class Naming:
    """One entry of the naming group, compiled."""

    name: str
    config: NamingConfig

    def __post_init__(self) -> None:
        self._keys = [(_pattern(src), dst) for src, dst in self.config.keys.items()]
        self._transforms = [(_pattern(dst), t) for dst, t in self.config.transforms.items()]
        self._drop = [_pattern(d) for d in self.config.drop]

    @property
    def title(self) -> str:
        return f"{self.config.codebase} {self.config.family}"

    @property
    def is_hf(self) -> bool:
        return not self.config.keys

    def fits(self, arch: Architecture) -> bool:
        return not self.config.architectures or arch.class_name in self.config.architectures

    def rename(self, key: str) -> str | None:
        """The HF name of a checkpoint key (wrappers and a leading module attribute tried away), or None."""
        for candidate in keys.candidates(key, base_prefix=""):
            for pattern, target in self._keys:
                if match := pattern.fullmatch(candidate):
                    return target.format(*match.groups())
        return None

    def dropped(self, key: str) -> bool:
        return any(p.fullmatch(c) for c in keys.candidates(key, base_prefix="") for p in self._drop)

    def transform_of(self, hf_name: str) -> TensorTransform | None:
        return next((t for pattern, t in self._transforms if pattern.fullmatch(hf_name)), None)


def load_namings(configs: dict[str, NamingConfig]) -> list[Naming]:
    """The namings to try, HF's first (a checkpoint in HF names never needs another)."""
    if not configs:
        configs = {HF: NamingConfig(codebase="transformers", family="any architecture")}
    return sorted((Naming(name, config) for name, config in configs.items()), key=lambda n: not n.is_hf)


class Renamed:
    """A reader's checkpoint under a naming's HF names; transforms applied as each tensor is read."""

    def __init__(self, reader: Reader, naming: Naming, *, config: dict[str, Any]) -> None:
        self.path: Path = reader.path
        self.info: SourceInfo = reader.info
        self._reader, self._naming, self._config = reader, naming, config
        self.original: dict[str, str] = {}  # HF name -> checkpoint key
        self.unmapped: list[str] = []
        self.dropped: list[str] = []
        for key in reader.specs():
            if (hf := naming.rename(key)) is not None and hf not in self.original:
                self.original[hf] = key
            elif naming.dropped(key):
                self.dropped.append(key)
            else:
                self.unmapped.append(key)

    def specs(self) -> dict[str, TensorSpec]:
        specs = self._reader.specs()
        return {hf: specs[key] for hf, key in self.original.items()} | {k: specs[k] for k in self.unmapped}

    def read(self, name: str) -> torch.Tensor:
        tensor = self._reader.read(self.original.get(name, name))
        transform = self._naming.transform_of(name)
        return _apply(transform, tensor, config=self._config, where=(self.path, name)) if transform else tensor

    def read_pieces(self, name: str) -> list[torch.Tensor]:
        if self._naming.transform_of(name):
            return [self.read(name)]
        return self._reader.read_pieces(self.original.get(name, name))

    def close(self) -> None:
        self._reader.close()


def choose(reader: Reader, arch: Architecture, namings: list[Naming], *,
           config: dict[str, Any]) -> tuple[Naming, Reader, Plan]:
    """The naming the checkpoint uses (the first candidate whose names match the architecture), its view, its plan."""
    candidates = [n for n in namings if n.fits(arch)]
    if not candidates:
        wanted = sorted({a for n in namings for a in n.config.architectures})
        raise ConversionError(reader.path, f"the pinned naming(s) {', '.join(n.name for n in namings)} map onto "
                              f"{', '.join(wanted)}, but the base config is a {arch.class_name}")
    attempts: list[tuple[int, ConversionError]] = []
    for naming in candidates:
        view: Reader = reader if naming.is_hf else Renamed(reader, naming, config=config)
        try:
            plan = make_plan(reader.path, view.specs(), arch)
        except ConversionError as e:
            attempts.append((_unknown(view.specs(), arch), e))
            continue
        if isinstance(view, Renamed):  # report renames from the checkpoint's own keys
            plan.dropped += view.dropped
            plan.renamed = {key: plan.renamed.get(hf, hf) for hf, key in view.original.items()
                            if key != plan.renamed.get(hf, hf)}
        if len(candidates) > 1:
            log.info("%s: tensors carry %s names", reader.path, naming.title)
        return naming, view, plan
    # The attempt that came closest names the problem (with one candidate: the pinned naming's own).
    raise min(attempts, key=lambda a: a[0])[1]


def _unknown(names: Iterable[str], arch: Architecture) -> int:
    """How many names no naming of the architecture knows: the fewer, the closer a naming came."""
    return sum(all(keys.match(n, naming.params, base_prefix=arch.base_prefix) is None for naming in arch.namings)
               for n in names)


def _apply(transform: TensorTransform, tensor: torch.Tensor, *, config: dict[str, Any],
           where: tuple[Path, str]) -> torch.Tensor:
    if transform.kind is Transform.rotary_half_split:
        heads = config.get(transform.heads) or config.get("num_attention_heads")
        rows, _cols = tensor.shape[0], tensor.shape[-1] if tensor.dim() > 1 else 1
        if not isinstance(heads, int) or heads <= 0 or rows % (2 * heads):
            raise ConversionError(where[0], f"{where[1]}: {rows} rows do not split into {heads} heads of rotary "
                                  f"pairs ({transform.heads} in the base config)")
        # Interleaved pairs (x0, x1), (x2, x3), ... per head -> first halves, then second halves.
        return tensor.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(tensor.shape).contiguous()
    raise ValueError(f"unknown transform {transform.kind}")
