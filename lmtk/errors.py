"""The one exception a user can cause: a checkpoint (or base model) that cannot be converted."""

from __future__ import annotations

from pathlib import Path


class ConversionError(Exception):
    """``path: reason`` on one line; the batch records it and moves on to the next checkpoint."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")


def listing(names: list[str], *, limit: int = 20) -> str:
    """A short, readable list of names for an error line."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")
