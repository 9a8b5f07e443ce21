"""Where a run of several checkpoints stands: ``[2/40]`` on each line, and the time the rest will take."""

from __future__ import annotations

import time

from tqdm import tqdm


class Pace:
    """Counts checkpoints as they start and end; the ETA assumes the rest take as long as those done so far."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.tag = ""
        self._first: float | None = None

    def start(self) -> float:
        now = time.perf_counter()
        self._first = now if self._first is None else self._first
        self.tag = f"[{self.done + 1}/{self.total}]"
        return now

    def end(self, started: float) -> float:
        """Seconds since ``started``; one more checkpoint done."""
        self.done += 1
        return time.perf_counter() - started

    @property
    def eta(self) -> str:
        left = self.total - self.done
        if left <= 0 or not self.done or self._first is None:
            return ""
        seconds = (time.perf_counter() - self._first) / self.done * left
        return f"; ETA {tqdm.format_interval(seconds)} for {left} more"

    @staticmethod
    def size(nbytes: int) -> str:
        return tqdm.format_sizeof(nbytes, "B", 1000)
