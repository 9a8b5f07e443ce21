"""Match a checkpoint's tensors to the architecture before anything is written."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lmtk import keys
from lmtk.base import Architecture
from lmtk.errors import ConversionError, listing
from lmtk.readers.base import TensorSpec

log = logging.getLogger(__name__)


@dataclass
class Plan:
    # Output name -> checkpoint key it is read from.
    sources: dict[str, str]
    # Output name -> spec, in the architecture's order.
    outputs: dict[str, TensorSpec]
    # Checkpoint keys renamed (old -> new), and keys dropped on purpose, for the log and provenance.
    renamed: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    # (tied copy in the checkpoint, the tensor it must equal), checked when read.
    tied_checks: list[tuple[str, str]] = field(default_factory=list)


def make_plan(path: Path, specs: dict[str, TensorSpec], arch: Architecture) -> Plan:
    flat = [n for n in specs if n.split(".")[-1] in ("_flat_param", "flat_param") or "._fpw_module." in n]
    if flat:
        raise ConversionError(
            path,
            f"FSDP1 LOCAL_STATE_DICT (flattened parameters such as {flat[0]}) records no original names or shapes "
            "and cannot be converted; save with StateDictType.SHARDED_STATE_DICT (DCP) or FULL_STATE_DICT instead",
        )
    known = arch.params.keys() | arch.non_persistent
    by_target: dict[str, str] = {}
    unexpected: list[str] = []
    duplicated: list[str] = []
    renamed: dict[str, str] = {}
    for name in specs:
        target = keys.match(name, known, base_prefix=arch.base_prefix)
        if target is None:
            unexpected.append(name)
            continue
        if target in by_target:
            duplicated.append(f"{by_target[target]} and {name} -> {target}")
            continue
        by_target[target] = name
        if target != name:
            renamed[name] = target

    dropped = [by_target.pop(t) for t in sorted(arch.non_persistent & by_target.keys())]
    saved = arch.saved
    missing = [t for t in saved if t not in by_target]
    wrong_shape = [
        f"{by_target[t]} {list(specs[by_target[t]].shape)} != {list(spec.shape)}"
        for t, spec in arch.params.items()
        if t in by_target and specs[by_target[t]].shape != spec.shape
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
    if problems:
        raise ConversionError(path, f"does not match {arch.class_name}: " + "; ".join(problems))

    tied_checks = [(by_target[t], by_target[s]) for t, s in arch.tied.items() if t in by_target]
    dropped += [c for c, _ in tied_checks]
    if renamed:
        log.info("%s: renamed %d keys (%s)", path, len(renamed), keys.describe_renames(renamed))
    if dropped:
        log.info("%s: dropping %s (tied copies, non-persistent buffers)", path, listing(dropped))
    return Plan(
        sources={t: by_target[t] for t in saved},
        outputs={t: specs[by_target[t]] for t in saved},
        renamed=renamed,
        dropped=dropped,
        tied_checks=tied_checks,
    )
