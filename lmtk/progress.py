"""How far training had got at a checkpoint: step and epoch, from the best record there is."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lmtk.discover import Unit
from lmtk.errors import ConversionError

log = logging.getLogger(__name__)

KEYS = ("step", "epoch", "iteration")


def training_progress(unit: Unit, scalars: dict[str, Any]) -> dict[str, Any]:
    """``scalars`` (what the checkpoint holds next to its weights) with ``step``/``epoch`` filled in and
    ``progress_from`` naming where they came from: the trainer's own record (``trainer_state.json``,
    Lightning's ``meta.pt``), the checkpoint, or the unit's name."""
    for file, keys in (unit.trainer.records if unit.trainer else {}).items():
        path = unit.path / file
        if not (unit.path.is_dir() and path.is_file()):
            continue
        found = _first_keys(_read_record(path), keys)
        if found:
            return {**scalars, **found, "progress_from": file}
    found = _first_keys(scalars, {"step": ("global_step", "step"), "epoch": ("epoch",)})
    if found:
        return {**scalars, **found, "progress_from": "checkpoint"}
    found = unit.progress_in_name()
    return {**scalars, **found, "progress_from": "name"} if found else dict(scalars)


def _first_keys(record: Any, keys: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    if not isinstance(record, dict):
        return {}
    found = {}
    for ours, theirs in keys.items():
        value = next((record[k] for k in theirs if isinstance(record.get(k), (int, float))), None)
        if value is not None and not isinstance(value, bool):
            found[ours] = value
    return found


def _read_record(path: Path) -> Any:
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        from lmtk.readers.safe import safe_load

        return safe_load(path)
    except (OSError, ValueError, ConversionError) as e:  # progress is nice to have: never fail a conversion on it
        log.warning("%s: cannot read the trainer's progress record: %s", path, e)
        return None
