"""Filesystem events for ``task=watch``: inotify (through watchdog) wakes the watcher as soon as a trainer writes,
instead of at its next look. The looks at ``watch.interval`` stay, events or not: a network filesystem (NFS,
Lustre, a mounted bucket) sends no event for a file written on another host.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any


class Events:
    """Sets ``wake`` whenever anything under ``root`` changes; until ``root`` exists, when its parent changes."""

    def __init__(self, root: Path, wake: threading.Event) -> None:
        self.root, self.wake = root, wake
        self._observer: Any = None
        self._watching: Path | None = None

    def start(self) -> str:
        """Start watching; what the watcher runs on, for the log ("inotify" or why it is polling only)."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            return "polling only (watchdog is not installed)"
        wake = self.wake

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.event_type != "opened" and event.event_type != "closed_no_write":
                    wake.set()

        self._handler = _Wake()
        self._observer = Observer()
        self._observer.daemon = True
        try:
            self._observer.start()
            self.refresh()
        except OSError as e:  # inotify limits reached, or none on this kernel
            self.stop()
            return f"polling only (no filesystem events: {e.strerror or e})"
        if type(self._observer).__name__ == "PollingObserver":  # watchdog's fallback: a second poller, not events
            self.stop()
            return "polling only (no inotify here)"
        return "inotify"

    def refresh(self) -> None:
        """Watch ``root`` recursively once it exists (it may appear after the watch starts)."""
        if self._observer is None:
            return
        target = self.root if self.root.is_dir() else self.root.parent
        if target == self._watching or not target.is_dir():
            return
        self._observer.unschedule_all()
        self._observer.schedule(self._handler, str(target), recursive=target == self.root)
        self._watching = target

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer = None
