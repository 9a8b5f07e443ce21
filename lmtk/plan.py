"""Match a checkpoint's tensors to the architecture before anything is written."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmtk import keys
from lmtk.architecture import HUB, Architecture, Naming
from lmtk.errors import ConversionError, listing
from lmtk.readers.base import Reader, TensorSpec

log = logging.getLogger(__name__)


@dataclass
class Plan:
    naming: Naming
    # On-disk name -> spec (the checkpoint's dtype), in save_pretrained's order.
    outputs: dict[str, TensorSpec]
    # On-disk name -> (name in the naming, checkpoint key) of each tensor it is converted from.
    sources: dict[str, tuple[tuple[str, str], ...]]
    # Name in the naming -> checkpoint key, for every tensor matched (tied copies included).
    matched: dict[str, str] = field(default_factory=dict)
    # Checkpoint keys renamed (old -> new), and keys dropped on purpose, for the log and provenance.
    renamed: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    # (tied copy in the checkpoint, the key it must equal).
    tied_checks: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Match:
    naming: Naming
    by_name: dict[str, str]  # name in the naming -> checkpoint key
    renamed: dict[str, str]
    dropped: list[str]
    problems: list[str]


def make_plan(path: Path, specs: dict[str, TensorSpec], arch: Architecture) -> Plan:
    _refuse_flat_params(path, specs)
    matches = [_match(specs, naming, arch) for naming in arch.namings]
    best = min(matches, key=lambda m: (len(m.problems) > 0, -len(m.by_name)))
    if best.problems:
        raise ConversionError(path, f"does not match {arch.class_name} ({best.naming.name} names): "
                              + "; ".join(best.problems))
    naming, by_name = best.naming, best.by_name
    tied_checks = [(by_name[c], by_name[s]) for c, s in naming.tied.items() if c in by_name]
    dropped = best.dropped + [c for c, _ in tied_checks]
    if arch.converts:
        log.info("%s: tensors carry %s names", path, naming.name)
    if best.renamed:
        log.info("%s: renamed %d keys (%s)", path, len(best.renamed), keys.describe_renames(best.renamed))
    if dropped:
        log.info("%s: dropping %s (tied copies, buffers)", path, listing(dropped))
    sources = {out: tuple((n, by_name[n]) for n in names) for out, names in naming.sources.items()}
    outputs = {out: TensorSpec(spec.shape, specs[sources[out][0][1]].dtype) for out, spec in arch.disk.items()}
    return Plan(naming=naming, outputs=outputs, sources=sources, matched=by_name, renamed=best.renamed,
                dropped=dropped, tied_checks=tied_checks)


def _match(specs: dict[str, TensorSpec], naming: Naming, arch: Architecture) -> _Match:
    by_name: dict[str, str] = {}
    unexpected, duplicated, dropped = [], [], []
    for key in specs:
        name = keys.match(key, naming.params.keys(), base_prefix=arch.base_prefix)
        if name is None:
            stripped = keys.strip_wrappers(key)
            (dropped if arch.droppable_name(stripped) else unexpected).append(key)
        elif name in by_name:
            duplicated.append(f"{by_name[name]} and {key} -> {name}")
        else:
            by_name[name] = key
    required = {n for names in naming.sources.values() for n in names}
    missing = [n for n in naming.params if n in required and n not in by_name]
    wrong_shape = [
        f"{by_name[n]} {list(specs[by_name[n]].shape)} != {list(spec.shape)}"
        for n, spec in naming.params.items() if n in by_name and specs[by_name[n]].shape != spec.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if duplicated:
        problems.append(f"keys that map to the same weight: {listing(duplicated)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {listing(wrong_shape)}")
    renamed = {key: name for name, key in by_name.items() if key != name}
    return _Match(naming, by_name, renamed, dropped, problems)


def _refuse_flat_params(path: Path, specs: dict[str, TensorSpec]) -> None:
    flat = [n for n in specs if n.split(".")[-1] in ("_flat_param", "flat_param")]
    if flat:
        raise ConversionError(
            path,
            f"FSDP1 LOCAL_STATE_DICT (flattened parameters such as {flat[0]}) records no original names or shapes "
            "and cannot be converted; save with StateDictType.SHARDED_STATE_DICT (DCP) or FULL_STATE_DICT instead",
        )


def fetcher(reader: Reader, plan: Plan, arch: Architecture) -> Callable[[str], list[torch.Tensor]]:
    """On-disk name -> its bytes as pieces; a converted group is converted once and kept only until written."""
    ready: dict[str, torch.Tensor] = {}
    lock = threading.Lock()  # shard files may be written by several threads

    def fetch(out: str) -> list[torch.Tensor]:
        sources = plan.sources[out]
        if not arch.converts or plan.naming.name == HUB:
            return reader.read_pieces(sources[0][1])  # stored as written: stream it
        with lock:
            if out not in ready:
                group = {name: reader.read(key) for name, key in sources}
                ready.update(arch.to_disk(plan.naming, group))
            return [ready.pop(out)]

    return fetch
