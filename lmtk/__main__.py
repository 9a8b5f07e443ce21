"""``lmtk`` (the console command) and ``python -m lmtk``: compose the config, route ``task`` to its function,
set the exit code."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lmtk.config import LmtkConfig, Task, register_configs
from lmtk.prefetch import prefetch_checkpoints

log = logging.getLogger("lmtk")
_STARTED = time.time()
_SINGLE_RUN = False  # set once the config says so: only then does the process end without teardown

register_configs()


class CheckpointsFailed(CompactHydraException):
    """Raised in multirun jobs so Hydra records the job as failed and runs the others.

    A CompactHydraException: Hydra ends the sweep printing its message, without a traceback of its own code.
    """


@hydra.main(version_base="1.3", config_path="pkg://lmtk.conf", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    cfg: LmtkConfig = OmegaConf.to_object(dict_cfg)  # type: ignore[assignment]
    logging.getLogger("lmtk").setLevel({0: logging.WARNING, 1: logging.INFO}.get(cfg.verbose_level, logging.DEBUG))
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    global _SINGLE_RUN
    _SINGLE_RUN = not multirun
    if cfg.sweep is not None and not multirun:
        # Without --multirun Hydra ignores the sweep, and the job would convert the default checkpoint_path.
        log.error("sweep=%s runs one job per checkpoint: add --multirun (-m)", hydra_cfg.runtime.choices.sweep)
        sys.exit(2)

    if cfg.task is Task.convert:
        # The disk starts reading the checkpoints while torch and transformers are imported.
        if "://" not in cfg.convert.checkpoint_path:  # a bucket is read by range, not through the page cache
            prefetch_checkpoints(Path(cfg.convert.checkpoint_path), only=cfg.convert.only)
        from lmtk.convert import run_convert

        results = run_convert(cfg, run_dir=run_dir, since=_started(Path(hydra_cfg.sweep.dir) if multirun else None))
    elif cfg.task is Task.inspect:
        from lmtk.inspect import run_inspect

        results = run_inspect(cfg, run_dir=run_dir, since=_started(Path(hydra_cfg.sweep.dir) if multirun else None))
    elif cfg.task is Task.watch:
        from lmtk.launchers import watch_executor
        from lmtk.watch import Interrupted, run_watch

        # hydra/launcher=convert_slurm (or convert_local) makes each checkpoint's conversion a job of its own.
        executor = watch_executor(hydra_cfg.runtime.choices.get("hydra/launcher"), hydra_cfg.launcher,
                                  folder=run_dir / ".submitit")
        try:
            results = run_watch(cfg, run_dir=run_dir, callbacks=_checkpoint_callbacks(hydra_cfg.callbacks),
                                executor=executor)
        except Interrupted as e:
            sys.exit(128 + e.signum)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        what = "would fail" if cfg.task is Task.inspect else "failed"
        message = f"{len(failed)} of {len(results)} checkpoint(s) {what}; see {run_dir / 'summary.json'}"
        if multirun:
            sweep_summary = Path(hydra_cfg.sweep.dir).absolute() / "summary.json"
            raise CheckpointsFailed(f"{message} (all jobs: {sweep_summary})")
        log.error("%s", message)
        sys.exit(1)


def _checkpoint_callbacks(configs: DictConfig) -> list:
    """The ``hydra.callbacks`` that are ``lmtk.callbacks.CheckpointCallback``s (Hydra keeps its own instances
    to itself, so these are built here)."""
    from hydra.utils import get_class, instantiate

    from lmtk.callbacks import CheckpointCallback

    return [instantiate(c) for c in (configs or {}).values()
            if issubclass(get_class(c._target_), CheckpointCallback)]


def _started(sweep_dir: Path | None) -> float:
    """When this run began; for a sweep job, when the sweep began (the basic sweeper writes multirun.yaml first)."""
    try:
        return (sweep_dir / "multirun.yaml").stat().st_mtime if sweep_dir else _STARTED
    except OSError:
        return _STARTED


def _exit_now(code: int) -> None:
    """End a single run without tearing the interpreter down: everything is written and fsynced by now, and
    torch's teardown of the ops it registered takes up to 2 s. (A sweep ends the usual way: its launcher
    may own worker processes.)"""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli() -> None:
    """The ``lmtk`` console command: the same Hydra app as ``python -m lmtk``, flags and overrides alike."""
    try:
        main()
    except SystemExit as e:
        if not _SINGLE_RUN or not isinstance(e.code, int | None):
            raise
        _exit_now(e.code or 0)
    if _SINGLE_RUN:
        _exit_now(0)


if __name__ == "__main__":
    cli()
