"""Start reading checkpoints into the page cache early, while Python is still importing torch.

Torch-free on purpose: ``python -m lmtk`` calls it before the heavy imports. The kernel reads ahead in
the background (``posix_fadvise(WILLNEED)``); inputs larger than half the free memory are left alone.
"""

from __future__ import annotations

import os
from pathlib import Path


def prefetch(paths: list[Path]) -> None:
    files = [p for p in paths if p.is_file()]
    if sum(p.stat().st_size for p in files) > _available_memory() // 2:
        return
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except (AttributeError, OSError):  # not on every platform; only a speed-up
            pass
        finally:
            os.close(fd)


def prefetch_checkpoints(path: Path) -> None:
    """``path`` and what lies up to two levels below it (a directory of checkpoint directories)."""
    try:
        if path.is_file():
            prefetch([path])
        elif path.is_dir():
            prefetch([p for p in sorted(path.glob("*")) + sorted(path.glob("*/*")) if not p.name.startswith(".")]
                     + sorted(path.glob(".metadata")) + sorted(path.glob("*/.metadata")))
    except OSError:
        pass


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
