"""What happened to each checkpoint: ``summary.json`` in the run dir and a table in the log."""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

# "planned": what task=inspect says of a checkpoint that task=convert would convert ("ok" once it has).
Status = Literal["ok", "skipped", "failed", "planned"]


@dataclass
class Result:
    checkpoint: str
    status: Status
    output: str | None = None
    error: str | None = None
    layout: str | None = None
    seconds: float = 0.0
    bytes_written: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    # convert.verify's outcome: passed, max_abs_diff, tolerance, ... (None when not run).
    verify: dict[str, Any] | None = None
    # What converted but deserves a look (an untrained adapter, a trainer's copy that disagrees).
    warnings: list[str] = field(default_factory=list)


def write_summary(path: Path, results: list[Result]) -> None:
    """Atomically replace ``path`` with the results (never a half-written file)."""
    write_json(path, {"results": [asdict(r) for r in results]})


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically replace ``path``; concurrent writers (parallel sweep jobs) each use their own temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        temp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def log_summary(results: list[Result]) -> None:
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    log.info("summary: %d ok, %d skipped, %d failed", counts["ok"], counts["skipped"], counts["failed"])
    for r in results:
        where = r.output if r.status != "failed" else r.error
        log.info("  %-7s %s -> %s", r.status, r.checkpoint, where)
        for warning in r.warnings:
            log.warning("          warning: %s", warning)
