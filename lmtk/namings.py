"""Other codebases' tensor names (``conf/naming/*.yaml``) mapped onto transformers' names.

A naming is a key map plus per-tensor transforms. ``renamed`` shows a reader's checkpoint under HF
names (a ``lmtk.derived`` view), one tensor at a time, so planning, writing and verify work on it as on
any reader. Which naming
a checkpoint uses is found by trying each candidate against the architecture.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from lmtk import keys
from lmtk.architecture import Architecture
from lmtk.config import ExpertSplit, NamingConfig, TensorTransform
from lmtk.config import Transform as Kind
from lmtk.derived import CHECKPOINT, Derived, DerivedReader, ExpertSlice, Reshape, RotaryHalfSplit, Source
from lmtk.errors import ConversionError
from lmtk.plan import Plan, make_plan
from lmtk.readers.base import Reader, TensorSpec

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
        self._splits = [(_pattern(src), split) for src, split in self.config.split.items()]
        self._drop_if_zero = [_pattern(d) for d in self.config.drop_if_zero]

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

    def dropped_if_zero(self, key: str) -> bool:
        return any(p.fullmatch(c) for c in keys.candidates(key, base_prefix="") for p in self._drop_if_zero)

    def split_of(self, key: str) -> tuple[ExpertSplit, tuple[str, ...]] | None:
        """How a checkpoint key's expert stack splits, and its layer number(s), or None."""
        for candidate in keys.candidates(key, base_prefix=""):
            for pattern, split in self._splits:
                if match := pattern.fullmatch(candidate):
                    return split, match.groups()
        return None

    def transform_of(self, hf_name: str) -> TensorTransform | None:
        return next((t for pattern, t in self._transforms if pattern.fullmatch(hf_name)), None)


def load_namings(configs: dict[str, NamingConfig]) -> list[Naming]:
    """The namings to try, HF's first (a checkpoint in HF names never needs another)."""
    if not configs:
        configs = {HF: NamingConfig(codebase="transformers", family="any architecture")}
    return sorted((Naming(name, config) for name, config in configs.items()), key=lambda n: not n.is_hf)


def renamed(reader: Reader, naming: Naming, *, config: dict[str, Any]) -> DerivedReader:
    """A reader's checkpoint under a naming's HF names; transforms applied as each tensor is read.

    A stack of experts becomes one entry per expert, each a slice of the same source. Keys the naming does not
    know keep their own names, so the plan reports them as unexpected.
    """
    specs = reader.specs()
    original: dict[str, str] = {}  # HF name -> checkpoint key
    tensors: dict[str, Derived] = {}
    dropped: list[str] = []
    for key, spec in specs.items():
        if (found := naming.split_of(key)) is not None:
            for hf, entry in _experts(key, spec, *found, config=config, path=reader.path).items():
                original[hf], tensors[hf] = key, entry
        elif (hf := naming.rename(key)) is not None and hf not in original:
            original[hf] = key
            transform = naming.transform_of(hf)
            tensors[hf] = _compiled(transform, key, spec, config=config, where=(reader.path, hf)) if transform \
                else Derived(spec, (Source(key),))
        elif naming.dropped(key):
            dropped.append(key)
        elif naming.dropped_if_zero(key):
            if bool(reader.read(key).any()):
                raise ConversionError(reader.path, f"{key} is not zero, and the {naming.title} model's HF class has "
                                      "no place for it (a routing bias changes which experts run): converting it "
                                      "would change the model")
            dropped.append(key)
        else:
            tensors[key] = Derived(spec, (Source(key),))
    return DerivedReader({CHECKPOINT: reader}, tensors, renamed=original, dropped=dropped)


def _experts(key: str, spec: TensorSpec, split: ExpertSplit, layer: tuple[str, ...], *, config: dict[str, Any],
             path: Path) -> dict[str, Derived]:
    """One entry per expert of a stacked tensor, each its slice of the stack."""
    count = next((config[f] for f in split.experts if isinstance(config.get(f), int)), None)
    shape = spec.shape
    if count is None:
        raise ConversionError(path, f"{key}: the base config gives no expert count ({', '.join(split.experts)})")
    if len(shape) not in (2, 3) or shape[0] % count or (len(shape) == 3 and shape[0] != count):
        raise ConversionError(path, f"{key} {list(shape)} is not a stack of {count} experts "
                              f"({split.experts[0]} in the base config)")
    each = tuple(shape[1:]) if len(shape) == 3 else (shape[0] // count, shape[1])
    out = each[::-1] if split.transpose else each
    return {split.to.format(*layer, e=e): Derived(TensorSpec(out, spec.dtype), (Source(key),),
                                                  ExpertSlice(e, count, each, split.transpose))
            for e in range(count)}


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
        view: Reader = reader if naming.is_hf else renamed(reader, naming, config=config)
        try:
            plan = make_plan(reader.path, view.specs(), arch)
        except ConversionError as e:
            attempts.append((_unknown(view.specs(), arch), e))
            continue
        if isinstance(view, DerivedReader):  # report renames from the checkpoint's own keys
            plan.dropped += view.dropped
            plan.renamed = {key: plan.renamed.get(hf, hf) for hf, key in view.renamed.items()
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


def _compiled(transform: TensorTransform, key: str, spec: TensorSpec, *, config: dict[str, Any],
              where: tuple[Path, str]) -> Derived:
    """A naming's transform of one tensor, its sizes taken from the base config and checked against its shape."""
    if transform.kind is Kind.rotary_half_split:
        heads = config.get(transform.heads) or config.get("num_attention_heads")
        rows = spec.shape[0] if spec.shape else 0
        if not isinstance(heads, int) or heads <= 0 or rows % (2 * heads):
            raise ConversionError(where[0], f"{where[1]}: {rows} rows do not split into {heads} heads of rotary "
                                  f"pairs ({transform.heads} in the base config)")
        return Derived(spec, (Source(key),), RotaryHalfSplit(heads))
    if transform.kind is Kind.reshape:
        shape = tuple(config.get(f) for f in transform.shape)
        if not all(isinstance(d, int) for d in shape) or math.prod(shape) != math.prod(spec.shape):  # type: ignore[arg-type]
            raise ConversionError(where[0], f"{key} {list(spec.shape)} does not reshape to "
                                  f"[{', '.join(f'{f}={config.get(f)}' for f in transform.shape)}]")
        return Derived(TensorSpec(shape, spec.dtype), (Source(key),), Reshape(shape))  # type: ignore[arg-type]
    raise ValueError(f"unknown transform {transform.kind}")
