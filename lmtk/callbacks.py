"""Hydra callbacks: ``<sweep dir>/summary.json`` lists every job's results, kept current as jobs end."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lmtk.summary import Result, write_json, write_summary

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
# One small record per finished job: which run dir holds its summary.json.
JOBS = ".lmtk-jobs"


class SweepSummary(Callback):
    """Rebuilds ``<sweep dir>/summary.json`` from the per-job files on disk whenever a job ends.

    Under joblib and submitit ``on_job_end`` runs in the worker, so nothing can be collected in memory,
    and Hydra skips ``on_multirun_end`` once any job failed: every job end therefore rebuilds the whole file.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A reused sweep dir must not list the previous sweep's jobs.
        shutil.rmtree(Path(config.hydra.sweep.dir) / JOBS, ignore_errors=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        completed = job_return.status is JobStatus.COMPLETED
        record_job(config, run_dir=Path(config.hydra.runtime.output_dir), status=job_return.status.name.lower(),
                   error=None if completed else _error_of(job_return))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results = rebuild_sweep_summary(sweep_dir)["results"]
        counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "skipped", "failed")}
        log.info(
            "sweep summary: %d ok, %d skipped, %d failed -> %s",
            counts["ok"], counts["skipped"], counts["failed"], sweep_dir.absolute() / SUMMARY,
        )


def record_job(config: DictConfig, *, run_dir: Path, status: str, error: str | None,
               extra: dict[str, Any] | None = None) -> None:
    """Record one finished job of the sweep and rebuild the sweep summary.

    ``error`` is set for a job that did not complete: when it died before writing its own summary (a config
    that does not resolve, a process SLURM killed), its checkpoint is recorded as failed with that error.
    """
    checkpoint = checkpoint_of(config)
    if error is not None and not (run_dir / SUMMARY).exists():
        write_summary(run_dir / SUMMARY, [Result(checkpoint=checkpoint, status="failed", error=error)])
    sweep_dir, num = Path(config.hydra.sweep.dir), int(config.hydra.job.num)
    record = {"job": num, "status": status, "checkpoint": checkpoint, "run_dir": str(run_dir), **(extra or {})}
    write_json(sweep_dir / JOBS / f"{num}.json", record)
    rebuild_sweep_summary(sweep_dir)


def rebuild_sweep_summary(sweep_dir: Path) -> dict[str, Any]:
    """Write ``sweep_dir/summary.json`` from the job records and each job's ``summary.json``; return it."""
    while True:
        names = _record_names(sweep_dir / JOBS)
        jobs = [json.loads((sweep_dir / JOBS / name).read_text()) for name in names]
        results = [r for job in jobs for r in _results_in(Path(job["run_dir"]))]
        summary = {"results": results, "jobs": jobs}
        write_json(sweep_dir / SUMMARY, summary)
        # A job that ended while this one was reading may have replaced the file first: read again.
        if _record_names(sweep_dir / JOBS) == names:
            return summary


def _record_names(jobs_dir: Path) -> list[str]:
    if not jobs_dir.is_dir():
        return []
    names = [p.name for p in jobs_dir.glob("[0-9]*.json")]
    return sorted(names, key=lambda name: int(name.removesuffix(".json")))


def _results_in(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((run_dir / SUMMARY).read_text())["results"]
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s: no readable %s (%s); its results are missing from the sweep summary", run_dir, SUMMARY, e)
        return []


def checkpoint_of(config: DictConfig) -> str:
    resolved = OmegaConf.select(config, "convert.checkpoint_path", throw_on_resolution_failure=False)
    if resolved is not None:
        only = OmegaConf.select(config, "convert.only", throw_on_resolution_failure=False)
        return str(Path(resolved) / only) if only else str(resolved)
    # It failed to resolve (the likely reason the job died): report it as written.
    return str(OmegaConf.to_container(config.convert, resolve=False)["checkpoint_path"])


def _error_of(job_return: JobReturn) -> str:
    try:
        job_return.return_value  # re-raises the job's exception
    except Exception as e:
        return " ".join(f"{type(e).__name__}: {e}".split())
    return f"job ended with status {job_return.status.name}"


class CheckpointCallback(Callback):
    """Register a subclass under ``hydra.callbacks`` to act on each folder ``task=watch`` converts (in Python,
    where ``watch.on_converted`` runs a command). An exception it raises is logged; the watch goes on."""

    def on_checkpoint_converted(self, *, output: Path, checkpoint: Path, step: int | None, result: Result,
                                **kwargs: Any) -> None:
        pass
