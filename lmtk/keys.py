"""Checkpoint key names -> architecture names: unwrap wrappers, drop foreign prefixes.

Each rule is tried only when the name as saved is not a name of the architecture, so a model that
really has a submodule called ``module`` keeps it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container, Iterable

# Segments that wrappers insert into parameter names.
WRAPPER_SEGMENTS = {
    "_orig_mod": "torch.compile",
    "module": "DDP / DeepSpeed",
    "_fsdp_wrapped_module": "FSDP1",
    "_checkpoint_wrapped_module": "activation checkpointing",
}


def strip_wrappers(name: str) -> str:
    return ".".join(s for s in name.split(".") if s not in WRAPPER_SEGMENTS)


def candidates(name: str, *, base_prefix: str) -> Iterable[str]:
    """Names ``name`` may stand for, most literal first."""
    yield name
    stripped = strip_wrappers(name)
    yield stripped
    parts = stripped.split(".")
    # A leading attribute of the training module (Lightning's ``model.``), one segment at a time.
    for i in range(1, len(parts)):
        yield ".".join(parts[i:])
    # A base model saved without its head class (``h.0...`` for ``transformer.h.0...``).
    if base_prefix:
        yield f"{base_prefix}.{stripped}"


def match(name: str, known: Container[str], *, base_prefix: str) -> str | None:
    return next((c for c in candidates(name, base_prefix=base_prefix) if c in known), None)


def describe_renames(renames: dict[str, str]) -> str:
    """One line saying what was removed or added, e.g. ``'_orig_mod.' x29, 'model.' x12``."""
    removed: Counter[str] = Counter()
    for old, new in renames.items():
        old_parts, new_parts = old.split("."), new.split(".")
        extra = list((Counter(old_parts) - Counter(new_parts)).elements())
        for seg in extra:
            removed[f"-'{seg}.'"] += 1
        for seg in (Counter(new_parts) - Counter(old_parts)).elements():
            removed[f"+'{seg}.'"] += 1
    return ", ".join(f"{k} x{n}" for k, n in removed.most_common())
