"""Start reading checkpoints into the page cache early, while Python is still importing torch.

Torch-free on purpose: ``python -m lmtk`` calls it before the heavy imports. The kernel reads ahead in
the background (``posix_fadvise(WILLNEED)``); inputs larger than half the free memory are left alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


def prefetch(paths: list[Path]) -> None:
    files = [p for p in paths if isinstance(p, Path) and p.is_file()]  # objects in a bucket are read by range
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


def prefetch_checkpoints(path: Path, *, only: str | None = None) -> None:
    """The first checkpoint ``path`` stands for: its reader prefetches each one it opens, later; this one
    starts while torch is still being imported."""
    from lmtk.discover import discover
    from lmtk.layouts import data_files

    quiet = logging.getLogger("lmtk.discover")
    disabled, quiet.disabled = quiet.disabled, True  # discovery logs once, when the conversion runs it
    try:
        first = discover(path / only if only else path)[0]
        prefetch(data_files(first.model, first.layout))
    except Exception:  # only a speed-up: the conversion reports whatever is wrong with the path
        pass
    finally:
        quiet.disabled = disabled


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
