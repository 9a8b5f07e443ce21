"""Submitit launchers that account for every job (``hydra/launcher=convert_slurm`` and ``convert_local``).

Hydra instantiates launchers from the ``hydra_plugins`` namespace only: ``hydra_plugins.lmtk_launchers``
(``lmtk/hydra_plugin``) puts the behaviour here onto hydra-submitit-launcher's classes.

hydra-submitit-launcher waits for each job in turn and lets submitit's error for the first job SLURM
killed escape as a traceback: the sweep summary is lost and later jobs are not waited for. These
launchers submit the same way, then collect every job; one that ended without a result (an OOM kill,
a time limit, a cancel, a node failure) is recorded as failed with SLURM's state and the end of its
stderr, and the sweep fails with one line. A request no node of the partition can hold is refused
before anything is submitted. Preempted and timed-out jobs are requeued by submitit (``checkpoint``
resubmits the same job) and convert again from the start.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf, open_dict

from lmtk.callbacks import checkpoint_of, record_job

log = logging.getLogger(__name__)

_STDERR_LINES = 5
_POLL_S = 5.0


class LaunchError(CompactHydraException):
    """A sweep that cannot be submitted, said in one line."""


class JobEnded(CompactHydraException):
    """A job that ended without a result (Hydra prints the message, without a traceback)."""


class Accounted:
    """``launch`` of hydra-submitit-launcher 1.2.0, collecting every job whatever became of it."""

    _EXECUTOR: str
    params: dict[str, Any]
    config: Any
    hydra_context: Any

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        self._check_request()
        executor = make_executor(self._EXECUTOR, dict(self.params))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info("Submitit '%s' sweep output dir : %s", self._EXECUTOR, sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        args = []
        for num, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
            args.append((list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()))
        try:
            jobs = executor.map_array(self, *zip(*args))
        except Exception as e:  # sbatch said no (a request the partition refuses, an unknown account, ...)
            raise LaunchError(f"{self._EXECUTOR} refused the sweep's jobs: {_last_line(e)}") from None
        _wait(jobs)
        return [self._collect(job, num, overrides) for job, (overrides, _, num, _, _) in zip(jobs, args)]

    def _collect(self, job: Any, num: int, overrides: list[str]) -> JobReturn:
        try:
            return job.results()[0]
        except Exception as e:  # the job ended without returning: killed, timed out, cancelled, ...
            state = _state_of(job)
            config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(config.hydra.job):
                config.hydra.job.num = num
            run_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
            stderr = " | ".join(_tail(job.stderr()))
            error = (f"{checkpoint_of(config)}: SLURM job {job.job_id} ended {state} ({_last_line(e)})"
                     + (f"; the end of its stderr: {stderr}" if stderr else ""))
            log.error("%s", error)
            record_job(config, run_dir=run_dir, status="failed", error=error,
                       extra={"slurm_job": job.job_id, "slurm_state": state})
            ended = JobEnded(f"{error} (all jobs: {Path(str(config.hydra.sweep.dir)) / 'summary.json'})")
            return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=ended)

    def _check_request(self) -> None:
        """Fail at once, not after waiting forever, when no node can hold one job (SLURM only)."""


class SlurmRequestCheck(Accounted):
    def _check_request(self) -> None:
        check_request(self.params)


def check_request(params: Any) -> None:
    """Refuse a job request no node of the partition can hold (sinfo's answer; nothing when sinfo cannot tell)."""
    partition = params.get("partition")
    largest = largest_node(partition)
    if largest is None:
        return
    name, cpus, mem_mb = largest
    want_cpus = (params.get("cpus_per_task") or 1) * (params.get("tasks_per_node") or 1)
    want_gb = params.get("mem_gb")
    if want_cpus > cpus or (want_gb is not None and want_gb * 1024 > mem_mb):
        raise LaunchError(
            f"hydra.launcher asks for {want_cpus} CPUs and {want_gb} GB per job, but the largest node of "
            f"partition {name} has {cpus} CPUs and {mem_mb / 1024:.0f} GB: lower hydra.launcher.cpus_per_task "
            "or hydra.launcher.mem_gb, or choose another hydra.launcher.partition"
        )


def make_executor(kind: str, params: dict[str, Any]) -> Any:
    """A submitit executor (``slurm`` or ``local``) from a launcher config's parameters, as
    hydra-submitit-launcher builds it."""
    try:
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    except ImportError as e:
        raise LaunchError(f"{kind} jobs need submitit: pip install \"lmtk[slurm]\" ({e.name} is missing)") from None

    params = {k: v for k, v in params.items() if k != "_target_"}
    init = {"folder": params.pop("submitit_folder")}
    if "max_num_timeout" in params:
        init[f"{kind}_max_num_timeout"] = params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(cluster=kind, **init)
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in shared else f"{kind}_{k}": v for k, v in params.items()})
    return executor


# task=watch with one of these launchers submits one job per complete checkpoint (the launcher's config name ->
# submitit's executor).
JOB_LAUNCHERS = {"convert_slurm": "slurm", "convert_local": "local"}


def watch_executor(choice: str | None, launcher: Any, *, folder: Path) -> Any | None:
    """The executor ``task=watch`` submits each checkpoint's conversion to, or None to convert in-process.

    ``choice`` is the ``hydra/launcher`` picked; ``launcher`` its config. Jobs' logs go under ``folder``.
    """
    kind = JOB_LAUNCHERS.get(choice or "")
    if kind is None:
        return None
    params = OmegaConf.to_container(launcher, resolve=True)
    assert isinstance(params, dict)
    params["submitit_folder"] = str(folder / "%j")
    if kind == "slurm":
        check_request(params)
    return make_executor(kind, {str(k): v for k, v in params.items()})


def job_failure(job: Any, error: BaseException) -> tuple[str, dict[str, Any]]:
    """Why a job ended without a result, in one line, and what to record of it."""
    state = _state_of(job)
    stderr = " | ".join(_tail(job.stderr()))
    return (f"job {job.job_id} ended {state} ({_last_line(error)})" + (f"; the end of its stderr: {stderr}" if stderr
            else "")), {"job": job.job_id, "job_state": state}


def _wait(jobs: list[Any]) -> None:
    """Until every job has ended, asking the cluster about all of them at once every few seconds.

    submitit's own wait asks less and less often (every 10 minutes once a job is old), so a job SLURM
    killed would be noticed that late.
    """
    pending = list(jobs)
    while pending:
        try:  # one sacct call for every job (local jobs need none: their processes are watched directly)
            pending[0].watcher.update()
        except (AttributeError, NotImplementedError):
            pass
        pending = [job for job in pending if not job.done()]
        if pending:
            time.sleep(_POLL_S)


def largest_node(partition: str | None) -> tuple[str, int, int] | None:
    """(partition, CPUs, memory in MB) of the partition's largest node, from sinfo; None when sinfo cannot tell."""
    if shutil.which("sinfo") is None:
        return None
    command = ["sinfo", "--noheader", "--format=%P %c %m"] + ([f"--partition={partition}"] if partition else [])
    try:
        lines = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("sinfo failed: %s", e)
        return None
    nodes = [(lines[i], lines[i + 1], lines[i + 2]) for i in range(0, len(lines) - 2, 3)]
    if not partition:  # the default partition is the one sinfo marks with *
        nodes = [n for n in nodes if n[0].endswith("*")]
    try:
        sizes = [(int(c.rstrip("+")), int(m.rstrip("+"))) for _, c, m in nodes]
    except ValueError:
        return None
    if not sizes:
        return None
    return nodes[0][0].rstrip("*"), max(c for c, _ in sizes), max(m for _, m in sizes)


def _state_of(job: Any) -> str:
    try:
        return str(job.get_info(mode="force").get("State") or job.state)
    except Exception as e:  # sacct unreachable: say so rather than fail the summary
        log.debug("no SLURM state for %s: %s", job.job_id, e)
        return "UNKNOWN"


def _tail(text: str | None) -> list[str]:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return [line[:200] for line in lines[-_STDERR_LINES:]]


def _last_line(error: BaseException) -> str:
    text = str(getattr(error, "output", None) or error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__
