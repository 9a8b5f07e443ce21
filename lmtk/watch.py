"""The ``watch`` task: follow a live training run, converting each checkpoint once its trainer has finished it.

A checkpoint is converted when two things hold: its trainer's own completeness rule (``lmtk.trainers``:
``complete``, ``staging``, ``latest``, and for every DCP part, ``.metadata`` naming only files that are there
in full), and a quiet period (``watch.settle`` seconds with no size or mtime change of any of its files).
Conversion itself is ``lmtk.convert``'s, so a restarted watch skips what is already converted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import string
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from lmtk.callbacks import CheckpointCallback
from lmtk.config import LmtkConfig, WatchConfig
from lmtk.convert import _Bases, check_local, convert_unit, find_units
from lmtk.discover import Unit
from lmtk.errors import ConversionError
from lmtk.launchers import job_failure
from lmtk.layouts import DCP_METADATA
from lmtk.namings import load_namings
from lmtk.notify import Events
from lmtk.output import MARKER, TEMP_TAG, read_marker
from lmtk.pace import Pace
from lmtk.readers.dcp_metadata import read_metadata
from lmtk.storage import scheme_of
from lmtk.summary import Result, log_summary, write_summary
from lmtk.trainers import TRAINERS

log = logging.getLogger(__name__)

FIELDS = ("output", "checkpoint", "step")
_GAP = 0.2  # seconds between two looks woken by events
_JOB_POLL = 5.0  # seconds between two questions to the cluster about the jobs in flight
_Snapshot = dict[str, tuple[int, int]]


class Interrupted(Exception):
    """A second SIGINT/SIGTERM abandoned the conversion in flight (its temp folder is gone)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Abandon(BaseException):
    """Raised by the signal handler; a BaseException so the per-checkpoint ``except Exception`` lets it through."""

    def __init__(self, signum: int) -> None:
        self.signum = signum


@dataclass
class Watched(Result):
    # What watch.on_converted ran for this checkpoint: {argv, log, exit_code} per command.
    hooks: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Pending:
    snapshot: _Snapshot
    changed: float
    waiting: str = ""


def check_templates(templates: Sequence[Sequence[str]]) -> None:
    """Refuse an ``on_converted`` template naming a field other than ``{output}``, ``{checkpoint}``, ``{step}``."""
    for argv in templates:
        if not argv:
            raise ConversionError("watch.on_converted", "holds an empty command")
        for part in argv:
            try:
                names = [name for _, name, _, _ in string.Formatter().parse(part) if name is not None]
            except ValueError as e:
                raise ConversionError("watch.on_converted", f"{part!r}: {e}") from e
            for name in names:
                if name not in FIELDS:
                    raise ConversionError("watch.on_converted", f"{part!r} names {{{name}}}; the fields are "
                                          + ", ".join(f"{{{f}}}" for f in FIELDS))


def run_watch(cfg: LmtkConfig, *, run_dir: Path, callbacks: Sequence[CheckpointCallback] = (),
              executor: Any = None) -> list[Result]:
    """Watch ``convert.checkpoint_path`` until it goes quiet or a signal stops it; ``run_dir/summary.json`` stays
    true throughout. Raises ``Interrupted`` when a second signal abandoned a conversion.

    ``executor`` (a submitit executor: SLURM, or local processes) runs each conversion as its own job; the
    watcher itself then only looks, submits and collects."""
    watch = cfg.watch
    try:
        check_local(cfg.convert)  # before the first look: a URL would otherwise be watched as a missing folder
        if scheme := scheme_of(cfg.convert.checkpoint_path):  # events and quiet periods are a local filesystem's
            raise ConversionError(cfg.convert.checkpoint_path, f"convert.checkpoint_path is a {scheme}:// URL; "
                                  "task=watch follows local (or mounted) run folders only (task=convert reads buckets)")
        if scheme := scheme_of(cfg.convert.output_dir):  # a vanished checkpoint's folder is removed locally
            raise ConversionError(cfg.convert.output_dir, f"convert.output_dir is a {scheme}:// URL; task=watch writes "
                                  "to local folders only (task=convert writes to buckets)")
        check_templates(watch.on_converted)
        if watch.interval <= 0 or watch.settle < 0:
            raise ConversionError("watch", f"interval must be > 0 and settle >= 0 (got {watch.interval}, {watch.settle})")
    except ConversionError as e:
        log.error("%s", e)
        result = Result(checkpoint=str(cfg.convert.checkpoint_path), status="failed", error=str(e))
        write_summary(run_dir / "summary.json", [result])
        return [result]
    watcher = _Watcher(cfg, run_dir=run_dir, callbacks=callbacks, executor=executor)
    previous = {s: signal.signal(s, watcher.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        watcher.loop()
    except ConversionError as e:  # a check that stops the whole run (convert.output_dir inside the run, ...)
        log.error("%s", e)
        watcher.results[Path(cfg.convert.checkpoint_path)] = Result(
            checkpoint=str(cfg.convert.checkpoint_path), status="failed", error=str(e))
    except _Abandon as e:
        watcher.cancel_jobs()
        watcher.save()
        log.error("abandoned on a second %s; nothing partial left behind", signal.Signals(e.signum).name)
        raise Interrupted(e.signum) from None
    finally:
        watcher.events.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    results = watcher.save()
    log_summary(results)
    return results


class _Watcher:
    def __init__(self, cfg: LmtkConfig, *, run_dir: Path, callbacks: Sequence[CheckpointCallback],
                 executor: Any = None) -> None:
        self.cfg, self.options, self.watch = cfg, cfg.convert, cfg.watch
        self.root = Path(self.options.checkpoint_path)
        self.run_dir = run_dir
        self.callbacks = callbacks
        self.bases = _Bases(self.options.base_model, default=cfg.model.name_or_path, model_class=self.options.model_class)
        self.namings = load_namings(cfg.namings)
        self.started = time.time()
        self.pending: dict[Path, _Pending] = {}
        self.done: set[Path] = set()
        self.results: dict[Path, Result] = {}
        self.signum: int | None = None
        self.wake = threading.Event()
        self.events = Events(self.root, self.wake)
        self.polls = 0
        self.executor = executor
        # Conversions submitted as jobs and not ended yet: checkpoint -> (job, unit, snapshot at submission).
        self.jobs: dict[Path, tuple[Any, Unit, _Snapshot]] = {}

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("%s: finishing the conversion in flight, then stopping (again to abandon it)",
                        signal.Signals(signum).name)
            self.wake.set()
        else:
            raise _Abandon(signum)

    def save(self) -> list[Result]:
        results = list(self.results.values())
        write_summary(self.run_dir / "summary.json", results)
        return results

    def loop(self) -> None:
        last_news = time.monotonic()
        mode = self.events.start() if self.watch.events else "polling only (watch.events=false)"
        where = f"{getattr(self.executor, 'cluster', 'submitit')} jobs" if self.executor is not None else "this process"
        log.info("watching %s: %s, a look every %gs at least (quiet period %gs); conversions run in %s", self.root,
                 mode, self.watch.interval, self.watch.settle, where)
        while self.signum is None:
            self.events.refresh()
            self.wake.clear()
            news = self.poll() | self.collect()
            now = time.monotonic()
            if news:
                last_news = now
            elif not self.jobs and self.watch.idle_timeout is not None and now - last_news >= self.watch.idle_timeout:
                log.info("nothing new for %gs: the watch ends", self.watch.idle_timeout)
                for path, pending in self.pending.items():
                    self._record(path, Result(checkpoint=str(path), status="skipped",
                                              error=f"never complete while watched: {pending.waiting}"))
                return
            self.wake.wait(self._next_look(now, last_news))
            if self.signum is None:
                time.sleep(_GAP)  # a trainer writing sends events by the thousand: one look per burst
        log.info("stopped by %s", signal.Signals(self.signum).name)
        while self.jobs:  # the conversions in flight finish (a second signal cancels them)
            self.collect()
            if self.jobs:
                time.sleep(_JOB_POLL)

    def _next_look(self, now: float, last_news: float) -> float:
        """Seconds until the next look: the interval, or sooner when a checkpoint's quiet period or the idle
        timeout ends first (events wake the watcher earlier still)."""
        deadlines = [self.watch.interval]
        # Only quiet periods still running: one that ended on an unfinished checkpoint waits for news.
        deadlines += [d for p in self.pending.values() if (d := p.changed + self.watch.settle - now) > 0]
        if self.watch.idle_timeout is not None:
            deadlines.append(last_news + self.watch.idle_timeout - now)
        if self.jobs:
            deadlines.append(_JOB_POLL)
        return max(min(deadlines), 0.0)

    def poll(self) -> bool:
        """One look at the run: True when anything changed or was converted."""
        units = self._units()
        news = False
        seen = {u.path for u in units}
        for path in [p for p in self.pending if p not in seen]:
            if path.exists():  # now part of a larger unit (accelerate's folder, once random_states_*.pkl is there)
                del self.pending[path]
                continue
            log.warning("%s was removed before it was converted (rotated away by the trainer?)", path)
            self._record(path, Result(checkpoint=str(path), status="skipped",
                                      error="removed before it was converted (rotated away by the trainer?)"))
            del self.pending[path]
            news = True
        for unit in units:
            if self.signum is not None:
                break
            if unit.path in self.done or unit.path in self.jobs:
                continue
            snap = snapshot(unit.path)
            now = time.monotonic()
            pending = self.pending.get(unit.path)
            if pending is None or pending.snapshot != snap:
                self.pending[unit.path] = pending = _Pending(snap, now, pending.waiting if pending else "")
                news = True
            if now - pending.changed < self.watch.settle:
                continue
            if reason := incomplete(unit, self.root):
                if reason != pending.waiting:
                    log.info("%s: not complete yet (%s)", unit.path, reason)
                    pending.waiting = reason
                continue
            self._convert(unit, snap)
            news = True
        return news

    def _units(self) -> list[Unit]:
        if not self.root.exists():
            return []
        try:
            units = find_units(self.options)
        except ConversionError as e:
            if "no checkpoints found" in str(e):
                return []
            raise
        finally:
            if self.polls == 0:  # what discovery skips is logged once, not at every look
                logging.getLogger("lmtk.discover").setLevel(logging.WARNING)
            self.polls += 1
        return [u for u in units if not _staged(u, self.root)]

    def _convert(self, unit: Unit, before: _Snapshot) -> None:
        kwargs = dict(bases=self.bases, namings=self.namings, options=self.options, since=self.started, pace=Pace(1))
        if self.executor is not None:
            # A job gets the base unloaded (it builds its own) and paths that do not depend on its working dir.
            kwargs["bases"] = _Bases(self.options.base_model, default=self.cfg.model.name_or_path,
                                     model_class=self.options.model_class)
            kwargs["options"] = replace(self.options, output_dir=str(Path(self.options.output_dir).absolute()))
            try:
                job = self.executor.submit(_job, replace(unit, path=unit.path.absolute()), **kwargs)
            except Exception as e:  # sbatch said no: this checkpoint fails, the watch goes on
                self.done.add(unit.path)
                self.pending.pop(unit.path, None)
                self._record(unit.path, Result(checkpoint=str(unit.path), status="failed", layout=unit.layout,
                                               error=f"{unit.path}: its job was refused: {str(e).strip()[-300:]}"))
                return
            log.info("%s: complete, submitted as job %s", unit.path, job.job_id)
            self.jobs[unit.path] = (job, unit, before)
            return
        self._finish(unit, before, convert_unit(unit, **kwargs))

    def collect(self) -> bool:
        """Finish the checkpoints whose jobs ended: True when any did."""
        if not self.jobs:
            return False
        first = next(iter(self.jobs.values()))[0]
        try:  # one sacct call for every job
            first.watcher.update()
        except (AttributeError, NotImplementedError):
            pass
        ended = [path for path, (job, _, _) in self.jobs.items() if job.done()]
        for path in ended:
            job, unit, before = self.jobs.pop(path)
            try:
                result = job.result()
            except Exception as e:  # killed, timed out, cancelled, or the job's own process failed
                error, extra = job_failure(job, e)
                log.error("%s: %s", unit.path, error)
                result = Result(checkpoint=str(unit.path), status="failed", layout=unit.layout,
                                error=f"{unit.path}: {error}")
                result.metadata.update(extra)
            else:
                result.metadata["job"] = job.job_id
            self._finish(unit, before, result)
        return bool(ended)

    def cancel_jobs(self) -> None:
        for path, (job, unit, _) in list(self.jobs.items()):
            try:
                job.cancel(check=False)
            except Exception as e:
                log.debug("cancelling job %s: %s", job.job_id, e)
            self._record(path, Result(checkpoint=str(path), status="failed", layout=unit.layout,
                                      error=f"{path}: job {job.job_id} cancelled on a second signal"))
        self.jobs = {}

    def _finish(self, unit: Unit, before: _Snapshot, result: Result) -> None:
        """What follows a conversion, in-process or a job's: the source checked unchanged, hooks, the summary."""
        final = Path(self.options.output_dir).absolute() / unit.name
        if not unit.path.exists():
            _remove_output(final, source=unit.path, converted=result.status == "ok")
            log.warning("%s vanished during its conversion (rotated away?); nothing kept", unit.path)
            self.pending.pop(unit.path, None)
            self._record(unit.path, Result(checkpoint=str(unit.path), status="skipped", layout=unit.layout,
                                           error="vanished during its conversion (rotated away by the trainer?)"))
            return
        if snapshot(unit.path) != before:
            _remove_output(final, source=unit.path, converted=result.status == "ok")
            log.error("%s: changed during its conversion; converting again once quiet", unit.path)
            self.pending[unit.path] = _Pending(snapshot(unit.path), time.monotonic())
            self._record(unit.path, Result(checkpoint=str(unit.path), status="failed", layout=unit.layout,
                                           error=f"{unit.path}: changed during its conversion; converted again once quiet"))
            return
        self.pending.pop(unit.path, None)
        self.done.add(unit.path)
        entry = Watched(**asdict(result))
        if result.status == "ok":
            step = result.metadata.get("step", unit.progress_in_name().get("step"))
            entry.hooks = self._hooks(unit, final, step)
            for callback in self.callbacks:
                try:
                    callback.on_checkpoint_converted(output=final, checkpoint=unit.path, step=step, result=entry)
                except Exception as e:  # the user's code: its failure is logged, the watch goes on
                    log.error("%s.on_checkpoint_converted failed for %s: %s: %s", type(callback).__name__,
                              unit.path, type(e).__name__, e)
        self._record(unit.path, entry)

    def _hooks(self, unit: Unit, final: Path, step: Any) -> list[dict[str, Any]]:
        if not self.watch.on_converted:
            return []
        values = {"output": str(final), "checkpoint": str(unit.path), "step": "" if step is None else str(step)}
        hooks_dir = self.run_dir / "hooks"
        hooks_dir.mkdir(parents=True, exist_ok=True)
        log_file = hooks_dir / f"{unit.name}.log"
        ran = []
        with open(log_file, "a") as out:
            for template in self.watch.on_converted:
                argv = [part.format(**values) for part in template]
                out.write(f"$ {' '.join(argv)}\n")
                out.flush()
                try:
                    code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
                except OSError as e:
                    out.write(f"cannot run {argv[0]}: {e.strerror or e}\n")
                    code = 127
                (log.info if code == 0 else log.error)("%s: %s exited %d (log: %s)", unit.path, argv[0], code, log_file)
                ran.append({"argv": argv, "log": str(log_file), "exit_code": code})
        return ran

    def _record(self, path: Path, result: Result) -> None:
        self.results[path] = result
        self.save()


def _job(unit: Unit, **kwargs: Any) -> Result:
    """One checkpoint's conversion as a job of its own (its log goes to the job's stderr)."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    return convert_unit(unit, **kwargs)


def snapshot(path: Path) -> _Snapshot:
    """Size and mtime of every file of a unit (a file unit: itself)."""
    found: _Snapshot = {}
    try:
        if path.is_file():
            stat = path.stat()
            return {"": (stat.st_size, stat.st_mtime_ns)}
        for folder, _, names in os.walk(path):
            for name in names:
                file = Path(folder, name)
                try:
                    stat = file.stat()
                except FileNotFoundError:
                    continue
                found[str(file.relative_to(path))] = (stat.st_size, stat.st_mtime_ns)
    except FileNotFoundError:
        pass
    return found


def incomplete(unit: Unit, root: Path) -> str | None:
    """Why ``unit`` is not finished by its trainer yet, or None when it is."""
    trainer = unit.trainer
    if trainer is None and any(m and (unit.path.parent / m).exists() for t in TRAINERS for m in t.model):
        # accelerate's pytorch_model_fsdp_0 (or optimizer_0 beside it) before random_states_*.pkl makes their
        # folder a unit.
        return f"{unit.path.name} is part of a checkpoint its trainer is still writing"
    if trainer is not None and unit.path.is_dir():
        for glob in trainer.complete:
            if not any(unit.path.glob(glob)) and not (glob == DCP_METADATA and unit.layout != "dcp"):
                return f"no {glob} yet"
    if trainer is not None and trainer.latest:
        step = unit.progress_in_name().get("step")
        record = unit.path.parent / trainer.latest
        try:
            latest = int(record.read_text().strip())
        except (OSError, ValueError):
            return f"no step in {record} yet"
        if step is not None and latest < step:
            return f"{record} says {latest}, not {step} yet"
    for folder in _dcp_parts(unit.path):
        if reason := dcp_incomplete(folder):
            return reason
    return None


def _dcp_parts(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return sorted({f.parent for f in path.rglob("*.distcp")} | {f.parent for f in path.rglob(DCP_METADATA)})


def dcp_incomplete(folder: Path) -> str | None:
    """DCP writes ``.metadata`` last (FileSystemWriter.finish); it must name only files that are there in full."""
    if not (folder / DCP_METADATA).is_file():
        return f"no {folder / DCP_METADATA} yet"
    try:
        metadata = read_metadata(folder)
    except ConversionError as e:
        return str(e)
    needed: dict[str, int] = {}
    for info in getattr(metadata, "storage_data", {}).values():
        name = getattr(info, "relative_path", None)
        if isinstance(name, str):
            end = int(getattr(info, "offset", 0) or 0) + int(getattr(info, "length", 0) or 0)
            needed[name] = max(needed.get(name, 0), end)
    for name, size in sorted(needed.items()):
        try:
            have = (folder / name).stat().st_size
        except FileNotFoundError:
            return f"{folder / name} named in .metadata is missing"
        if have < size:
            return f"{folder / name} holds {have} of {size} bytes"
    return None


def _staged(unit: Unit, root: Path) -> bool:
    """Inside a folder a trainer stages a save in (``tmp-checkpoint-N``): never a unit."""
    parts = unit.path.relative_to(root).parts if unit.path.is_relative_to(root) else (unit.path.name,)
    return any(t.staging and re.fullmatch(t.staging, part) for t in TRAINERS for part in parts)


def _remove_output(final: Path, *, source: Path, converted: bool) -> None:
    """Remove the folder this very conversion wrote (renamed aside first, so it never shows half-removed)."""
    marker = read_marker(final) if converted else None
    if marker is None or marker.get("source") != str(source.resolve()):
        return
    aside = final.parent / f".{final.name}{TEMP_TAG}removed-{uuid.uuid4().hex[:8]}"
    os.rename(final, aside)
    shutil.rmtree(aside, ignore_errors=True)
    log.info("removed %s (its %s came from a checkpoint that changed or vanished)", final, MARKER)


__all__ = ["Interrupted", "WatchConfig", "check_templates", "dcp_incomplete", "incomplete", "run_watch", "snapshot"]
