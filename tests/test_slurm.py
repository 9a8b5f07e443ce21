"""Sweeps on a live SLURM cluster through ``hydra/launcher=convert_slurm``: no mocks of SLURM or submitit.

``scripts/slurm_cluster.sh`` starts a single-node cluster with accounting (CI runs the suite under it);
elsewhere these tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (FIXTURES, FsdpRun, assert_logits, assert_matches_reference, base_of, reference_of, run_lmtk,
                     summary_of)


def _cluster() -> str | None:
    """Why there is no cluster to test against, or None when there is one."""
    if not os.environ.get("SLURM_CONF"):
        return "no SLURM cluster (SLURM_CONF unset): run the suite under scripts/slurm_cluster.sh, as CI does"
    if shutil.which("sinfo") is None:
        return "no SLURM client (sinfo) on PATH"
    if subprocess.run(["sinfo"], capture_output=True, timeout=30).returncode != 0:
        return f"sinfo cannot reach the cluster of {os.environ['SLURM_CONF']}"
    return None


# CI sets LMTK_REQUIRE_SLURM=1: there, no cluster is a failure, not a skip.
REQUIRED = os.environ.get("LMTK_REQUIRE_SLURM") == "1"
pytestmark = pytest.mark.skipif(_cluster() is not None and not REQUIRED, reason=_cluster() or "")


def test_the_cluster_is_up() -> None:
    assert _cluster() is None, _cluster()


def sweep(tmp_path: Path, *overrides: str, wait: bool = True) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    """``python -m lmtk --multirun hydra/launcher=convert_slurm ...`` into tmp_path's out/ and sweep/."""
    args = ["--multirun", "hydra/launcher=convert_slurm", f"convert.output_dir={tmp_path / 'out'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    if wait:
        return run_lmtk(*args, cwd=tmp_path)
    return subprocess.Popen([sys.executable, "-m", "lmtk", *args], cwd=tmp_path, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def when(condition: Callable[[], bool], *, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def writing(out: Path, name: str) -> Callable[[], bool]:
    """True once a conversion of ``name`` is under way: its temp folder holds weights."""
    return lambda: any(p.stat().st_size > 0 for p in out.glob(f".{name}.lmtk-tmp-*/model*.safetensors"))


def running_job() -> tuple[str, str]:
    """The running job's own id (for scontrol) and its id as submitit names it (ARRAY_TASK)."""
    own, named = subprocess.run(["squeue", "--noheader", "--states=RUNNING", "--format=%A %i"], capture_output=True,
                                text=True, check=True).stdout.split()
    return own, named


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def job_states(job: str) -> list[str]:
    """Every state sacct recorded for the job, requeues included (-D)."""
    out = subprocess.run(["sacct", "-D", "-X", "--noheader", "--parsable2", "--format=State", f"--jobs={job}"],
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.fixture
def ckpts(gpt2: FsdpRun, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "epoch-001.pth").symlink_to(gpt2["bare"])
    (folder / "epoch-002").symlink_to(gpt2["dcp"])
    (folder / "epoch-003.pth").touch()  # broken
    return folder


def test_the_shipped_preset_runs_as_it_is(ckpts: Path, gpt2: FsdpRun, tmp_path: Path) -> None:
    """No resource overrides: the preset fits a node of 2 CPUs; the broken checkpoint fails, the rest convert."""
    proc = sweep(tmp_path, "sweep=checkpoints", f"sweep.glob={ckpts}/epoch-*", f"convert.base_model={gpt2.base}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Submitit 'slurm' sweep" in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert [(Path(r["checkpoint"]).name, r["status"]) for r in summary["results"]] == [
        ("epoch-001.pth", "ok"), ("epoch-002", "ok"), ("epoch-003.pth", "failed")]
    assert summary["results"][2]["error"] == f"{ckpts / 'epoch-003.pth'}: empty file (0 bytes)"
    assert [j["status"] for j in summary["jobs"]] == ["completed", "completed", "failed"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["epoch-001", "epoch-002"]
    for name in ("epoch-001", "epoch-002"):
        assert_matches_reference(tmp_path / "out" / name, gpt2.reference)


def test_a_killed_job_is_reported_and_the_same_command_converts_only_it(big: tuple[Path, Path], tmp_path: Path) -> None:
    base, ckpt = big
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save({k: v.to(torch.bfloat16) for k, v in torch.load(ckpt, weights_only=True).items()}, ckpts / "a.pth")
    (ckpts / "big.pth").symlink_to(ckpt)
    overrides = ("sweep=checkpoints", f"sweep.glob={ckpts}/*.pth", f"convert.base_model={base}",
                 "convert.initial_format=full")
    proc = sweep(tmp_path, *overrides, wait=False)
    when(writing(tmp_path / "out", "big"), seconds=240, what="the conversion of big.pth to start writing")
    own, job = running_job()
    listed = subprocess.run(["scontrol", "listpids", own], capture_output=True, text=True, check=True).stdout
    pids = [line.split()[0] for line in listed.splitlines()[1:] if line.strip()]
    python = [int(p) for p in pids if "submitit" in _cmdline(p)]
    assert python, listed
    for pid in python:  # what the OOM killer, or the end of KillWait, does
        os.kill(pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, output[-3000:]
    results = summary_of(tmp_path / "sweep")
    assert [(Path(r["checkpoint"]).name, r["status"]) for r in results] == [("a.pth", "ok"), ("big.pth", "failed")]
    error = results[1]["error"]
    assert error.startswith(f"{ckpts / 'big.pth'}: SLURM job {job} ended FAILED") and "\n" not in error
    assert "the end of its stderr" in error
    assert f"SLURM job {job} ended FAILED" in output and "Traceback" not in output
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == ["a"]

    again = sweep(tmp_path, *overrides)  # the same command: only the killed one is converted
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["status"] for r in summary_of(tmp_path / "sweep")] == ["skipped", "ok"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "big"]  # the killed job's temp is gone


def test_a_preempted_job_is_requeued_and_converts_again(big: tuple[Path, Path], tmp_path: Path) -> None:
    base, ckpt = big
    proc = sweep(tmp_path, f"convert.checkpoint_path={ckpt}", f"convert.base_model={base}", wait=False)
    when(writing(tmp_path / "out", "big"), seconds=240, what="the conversion of big.pth to start writing")
    own, job = running_job()
    # What SLURM sends before preempting a job (submitit asks for USR2): submitit requeues it.
    subprocess.run(["scancel", "--signal=USR2", own], check=True)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "REQUEUED" in job_states(own), job_states(own)
    [result] = summary_of(tmp_path / "sweep")
    assert result["status"] == "ok"
    written, source = load_file(tmp_path / "out" / "big" / "model.safetensors"), torch.load(ckpt, weights_only=True)
    assert all(torch.equal(written[name], source[name]) for name in written)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["big"]


def test_a_request_no_node_can_hold_fails_at_once(gpt2: FsdpRun, tmp_path: Path) -> None:
    started = time.monotonic()
    proc = sweep(tmp_path, f"convert.checkpoint_path={gpt2['bare']}", f"convert.base_model={gpt2.base}",
                 "hydra.launcher.cpus_per_task=64", "hydra.launcher.mem_gb=4096")
    assert time.monotonic() - started < 60
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "hydra.launcher asks for 64 CPUs and 4096 GB per job, but the largest node of partition "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert subprocess.run(["squeue", "--noheader"], capture_output=True, text=True).stdout.strip() == ""


def test_a_request_sbatch_refuses_says_why(gpt2: FsdpRun, tmp_path: Path) -> None:
    proc = sweep(tmp_path, f"convert.checkpoint_path={gpt2['bare']}", f"convert.base_model={gpt2.base}",
                 "hydra.launcher.partition=nosuchpartition")
    assert proc.returncode == 1
    assert ("slurm refused the sweep's jobs: sbatch: error: Batch job submission failed: Invalid partition name "
            "specified") in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_watch_submits_one_job_per_complete_checkpoint(tmp_path: Path) -> None:
    """``task=watch hydra/launcher=convert_slurm``: the watcher stays a light process; each checkpoint it finds
    complete is converted by a SLURM job of its own, accounted for in the summary."""
    fixture = "torchtitan_llama3"
    run, out, run_dir = tmp_path / "run", tmp_path / "out", tmp_path / "rd"
    shutil.copytree(FIXTURES / fixture / "run" / "outputs" / "checkpoint", run)
    proc = run_lmtk("task=watch", "hydra/launcher=convert_slurm", f"convert.checkpoint_path={run}",
                    f"convert.output_dir={out}", f"hydra.run.dir={run_dir}", f"convert.base_model={base_of(fixture)}",
                    "watch.interval=1", "watch.settle=0.5", "watch.idle_timeout=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = summary_of(run_dir)
    assert [r["status"] for r in results] == ["ok", "ok"], results
    jobs = [r["metadata"]["job"] for r in results]
    assert len(set(jobs)) == 2
    for job in jobs:
        assert job_states(job) == ["COMPLETED"], job
    reference = reference_of(fixture)
    for result in results:
        assert_logits(Path(result["output"]), reference, Path(result["output"]).name)
