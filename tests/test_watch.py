"""``task=watch``: a real ``python -m lmtk`` follows runs while they are written, and converts each checkpoint once,
only after its trainer has finished it.

The runs are written live: a real FSDP2 training process on 2 gloo ranks, and the committed trainer fixtures copied
into a run dir file by file in the order each trainer's save code writes them, with the file that completes a
checkpoint held back longer than the quiet period (so a watch that trusted the quiet period alone would convert it
early, and these tests would fail).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from helpers import FIXTURES, assert_logits, base_of, compose_config, logits_of, reference_of, summary_of
from lmtk.errors import ConversionError
from lmtk.output import MARKER, TEMP_TAG
from lmtk.sweep import quote
from lmtk.watch import check_templates

FAST = ("watch.interval=0.2", "watch.settle=0.5")
# Longer than watch.settle: a checkpoint is quiet this long before the file that completes it arrives.
HELD_BACK = 1.3

HOOK = """import json, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(sys.argv[2:]) + "\\n")
print("evaluated", sys.argv[2])
"""


def _hook_override(tmp: Path) -> tuple[str, Path]:
    script, calls = tmp / "hook.py", tmp / "calls.jsonl"
    script.write_text(HOOK)
    argv = [sys.executable, str(script), str(calls), "{output}", "{checkpoint}", "{step}"]
    return "watch.on_converted=[[" + ",".join(quote(a) for a in argv) + "]]", calls


def _calls(calls: Path) -> list[list[str]]:
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def _watch(run: Path, out: Path, run_dir: Path, *overrides: str, fast: bool = True,
           extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    args = [f"convert.checkpoint_path={quote(str(run))}", f"convert.output_dir={quote(str(out))}",
            f"hydra.run.dir={quote(str(run_dir))}", "task=watch", *(FAST if fast else ()), *extra, *overrides]
    return subprocess.Popen([sys.executable, "-m", "lmtk", *args], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(what: Callable[[], bool], *, timeout: float, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"lmtk exited {proc.returncode}:\n{proc.stdout.read()[-3000:] if proc.stdout else ''}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _log_has(run_dir: Path, text: str) -> Callable[[], bool]:
    log = run_dir / "lmtk.log"
    return lambda: log.exists() and text in log.read_text()


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    output, _ = proc.communicate(timeout=timeout)
    return output


def _no_partial(out: Path) -> None:
    assert not list(out.glob(f".*{TEMP_TAG}*")), list(out.iterdir())


# -- a real training run -------------------------------------------------------------------------------------------

def test_live_fsdp2_run_every_checkpoint_converted_once_with_its_logits(tmp_path: Path) -> None:
    from lmtk.synthetic import make_base_folder

    base = make_base_folder(tmp_path / "base", "llama")
    run, out, refs, run_dir = tmp_path / "run", tmp_path / "out", tmp_path / "refs", tmp_path / "rd"
    hook, calls = _hook_override(tmp_path)
    code = ("from pathlib import Path; from lmtk.synthetic import train_live; "
            f"train_live(Path({str(base)!r}), Path({str(run)!r}), references=Path({str(refs)!r}), steps=6, "
            "save_every=2, keep=2, pause=2.0)")
    trainer = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    watcher = _watch(run, out, run_dir, f"convert.base_model={quote(str(base))}", "watch.idle_timeout=null", hook)
    try:
        assert trainer.wait(timeout=240) == 0
        steps = ("step-2", "step-4", "step-6")
        _wait_for(lambda: len(_calls(calls)) == 3, timeout=60, proc=watcher)
        watcher.send_signal(signal.SIGTERM)  # the user stops it: nothing in flight, a clean exit
        output = _finish(watcher)
    finally:
        trainer.kill()
        watcher.kill()
    assert watcher.returncode == 0, output[-3000:]
    assert not (run / "step-2").exists()  # rotated away by the trainer, converted before it went
    results = {Path(r["checkpoint"]).name: r for r in summary_of(run_dir)}
    assert sorted(results) == list(steps) and {r["status"] for r in results.values()} == {"ok"}, results
    assert sorted(c[1:] for c in _calls(calls)) == sorted([str(run / s), s.split("-")[1]] for s in steps)
    for name in steps:
        assert results[name]["hooks"][0]["exit_code"] == 0
        assert f"evaluated {out / name}" in Path(results[name]["hooks"][0]["log"]).read_text()
        reference = torch.load(refs / f"{name}.pt", weights_only=True)
        diff = (logits_of(out / name, reference["input_ids"]) - reference["logits"]).abs().max().item()
        assert diff <= 1e-5, f"{name}: logits differ from the trained model's by {diff}"
    _no_partial(out)


# -- each trainer's write order ------------------------------------------------------------------------------------

# fixture -> (the units under run/, in save order; the order of the files in each, by path prefix, the last one
# held back). From each trainer's save code (see lmtk.trainers for the functions).
ORDERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # Trainer._save_checkpoint: model, optimizer, scheduler, RNG, trainer_state.json.
    "hf_trainer_fsdp2_sharded": (("checkpoint-2", "checkpoint-4"),
                                 ("pytorch_model_fsdp_0/", "optimizer_0/", "scheduler.pt", "rng_state", "trainer_state.json")),
    # CheckpointManager.save -> dcp.save: the shards, then .metadata (FileSystemWriter.finish).
    "torchtitan_llama3": (("outputs/checkpoint/step-2", "outputs/checkpoint/step-4"), ("__", ".metadata")),
    # RayPPOTrainer._save_checkpoint: the actor (model, optimizer, extra state, FSDP and HF config), data.pt; then
    # latest_checkpointed_iteration.txt (written by the copier).
    "verl": (tuple(f"checkpoints/lmtk_fixture/tiny_llama_fsdp2/global_step_{n}" for n in (2, 4)),
             ("actor/model_", "actor/optim_", "actor/extra_state", "actor/fsdp_config.json", "actor/huggingface/",
              "data.pt")),
    # Checkpointer.save: into stepN-tmp the model and optimizer DCP, trainer state, config; .metadata.json; rename.
    "olmo_core_llama": (("step2", "step4"), ("model_and_optim/__", "model_and_optim/.metadata", "train/", "config.json",
                                             "data_paths.txt", ".metadata.json")),
    # FSDPStrategy.save_checkpoint: the DCP save, then meta.pt.
    "lightning_fsdp_sharded": (tuple(f"lightning_logs/version_0/checkpoints/epoch=0-step={n}.ckpt" for n in (2, 4)),
                               ("__", ".metadata", "meta.pt")),
    # Accelerator.save_state: model, optimizer, scheduler, then random_states_*.pkl.
    "accelerate_fsdp2_sharded": (("checkpoints/checkpoint_0", "checkpoints/checkpoint_1"),
                                 ("pytorch_model_fsdp_0/", "optimizer_0/", "scheduler.bin", "random_states_")),
}
# Units the trainer stages under another name and renames when done.
STAGED = {"hf_trainer_fsdp2_sharded": {"checkpoint-2": "tmp-checkpoint-2"},
          "olmo_core_llama": {"step2": "step2-tmp", "step4": "step4-tmp"}}
VERL_LATEST = "latest_checkpointed_iteration.txt"


def _in_save_order(unit: Path, order: tuple[str, ...]) -> list[Path]:
    files = [p for p in unit.rglob("*") if p.is_file()]

    def rank(p: Path) -> tuple[int, bool, str]:
        rel = str(p.relative_to(unit))
        matches = [i for i, prefix in enumerate(order) if rel.startswith(prefix)]
        assert matches, f"{rel} has no place in the save order"
        return matches[-1], p.name == ".metadata", rel  # a DCP folder's .metadata comes after its shards

    return sorted(files, key=rank)


def _copy_live(fixture: str, dest: Path, events: dict[str, float]) -> None:
    """Write ``fixture``'s run into ``dest`` as its trainer would: files one by one, the completing one late."""
    src = FIXTURES / fixture / "run"
    units, order = ORDERS[fixture]
    in_units = [src / u for u in units]
    for file in sorted(p for p in src.rglob("*") if p.is_file()):  # what the run holds besides its checkpoints
        if not any(file.is_relative_to(u) for u in in_units) and file.name != VERL_LATEST:
            (dest / file.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, dest / file.relative_to(src))
    for unit in units:
        final = dest / unit
        staged = final.with_name(STAGED.get(fixture, {}).get(final.name, final.name))
        files = _in_save_order(src / unit, order)
        # The completing file is the first of the last group (accelerate: the first rank's random_states_*.pkl,
        # written after the model and optimizer of every rank).
        last = next(i for i, f in enumerate(files) if str(f.relative_to(src / unit)).startswith(order[-1]))
        for i, file in enumerate(files):
            if i == last:
                time.sleep(HELD_BACK)
            target = staged / file.relative_to(src / unit)
            target.parent.mkdir(parents=True, exist_ok=True)
            if file.name == ".metadata":  # FileSystemWriter.finish: .metadata.tmp, then a rename
                shutil.copy2(file, target.with_name(".metadata.tmp"))
                os.rename(target.with_name(".metadata.tmp"), target)
            else:
                shutil.copy2(file, target)
            time.sleep(0.03)
        if staged != final:
            time.sleep(HELD_BACK)
            os.rename(staged, final)
        if fixture == "verl":
            time.sleep(HELD_BACK)
            (final.parent / VERL_LATEST).write_text(final.name.rsplit("_", 1)[1])
        events[final.name] = time.time()


@pytest.mark.parametrize("fixture", sorted(ORDERS))
def test_each_trainers_write_order_is_followed(tmp_path: Path, fixture: str) -> None:
    run, out, run_dir = tmp_path / "run", tmp_path / "out", tmp_path / "rd"
    run.mkdir()
    hook, calls = _hook_override(tmp_path)
    base = () if fixture == "verl" else (f"convert.base_model={quote(str(base_of(fixture)))}",)
    watcher = _watch(run, out, run_dir, *base, hook, "watch.idle_timeout=4")
    events: dict[str, float] = {}
    try:
        _wait_for(_log_has(run_dir, "watching"), timeout=60, proc=watcher)
        copier = threading.Thread(target=_copy_live, args=(fixture, run, events))
        copier.start()
        copier.join()
        output = _finish(watcher)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, output[-3000:]
    reference = reference_of(fixture)
    results = summary_of(run_dir)
    names = {Path(r["checkpoint"]).name for r in results}
    assert names == set(events) and {r["status"] for r in results} == {"ok"}, results
    assert len(_calls(calls)) == len(events), _calls(calls)  # once each
    for result in results:
        folder = Path(result["output"])
        # Converted only after the file (or rename) that completes it.
        assert (folder / MARKER).stat().st_mtime > events[Path(result["checkpoint"]).name], folder
        assert_logits(folder, reference, folder.name)
    assert not any("tmp" in Path(c[1]).name for c in _calls(calls))
    _no_partial(out)


# -- stopping and restarting ---------------------------------------------------------------------------------------

def test_sigterm_finishes_or_abandons_the_conversion_in_flight_and_a_restart_completes_the_set(
        tmp_path: Path, big: tuple[Path, Path]) -> None:
    fixture = "torchtitan_llama3"
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(FIXTURES / fixture / "run", run)
    units = run / "outputs" / "checkpoint"
    base = f"convert.base_model={quote(str(base_of(fixture)))}"
    hook, calls = _hook_override(tmp_path)

    # Two signals: the conversion in flight (a ~300 MB checkpoint, seconds to write) is abandoned, nothing of it
    # left, exit 128 + SIGTERM.
    big_base, big_pth = big
    big_run, big_out = tmp_path / "big-run", tmp_path / "big-out"
    big_run.mkdir()
    os.link(big_pth, big_run / big_pth.name)
    first = _watch(big_run, big_out, tmp_path / "rd1", f"convert.base_model={quote(str(big_base))}", hook,
                   "watch.idle_timeout=30")
    _wait_for(_log_has(tmp_path / "rd1", "converting"), timeout=60, proc=first)
    first.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    output = _finish(first)
    assert first.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert not big_out.exists() or not list(big_out.iterdir()), list(big_out.iterdir())
    assert _calls(calls) == []

    # One signal: the conversion in flight finishes, nothing after it starts, exit 0.
    second = _watch(run, out, tmp_path / "rd2", base, hook, "watch.idle_timeout=30")
    _wait_for(_log_has(tmp_path / "rd2", "converting"), timeout=60, proc=second)
    second.send_signal(signal.SIGTERM)
    output = _finish(second)
    assert second.returncode == 0, output[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["step-2"] and (out / "step-2" / MARKER).exists()

    # A restart converts only what is missing.
    third = _watch(run, out, tmp_path / "rd3", base, hook, "watch.idle_timeout=2")
    output = _finish(third)
    assert third.returncode == 0, output[-3000:]
    statuses = {Path(r["checkpoint"]).name: r["status"] for r in summary_of(tmp_path / "rd3")}
    assert statuses == {"step-2": "skipped", "step-4": "ok"}
    assert [Path(c[1]).name for c in _calls(calls)] == ["step-2", "step-4"]
    reference = reference_of(fixture)
    for name in ("step-2", "step-4"):
        assert_logits(out / name, reference, name)
    _no_partial(out)


def test_a_checkpoint_rotated_away_before_its_turn_is_logged(tmp_path: Path) -> None:
    fixture = "torchtitan_llama3"
    run, out, run_dir = tmp_path / "run", tmp_path / "out", tmp_path / "rd"
    shutil.copytree(FIXTURES / fixture / "run" / "outputs" / "checkpoint", run)
    (run / "step-4" / ".metadata").unlink()  # still being written
    watcher = _watch(run, out, run_dir, f"convert.base_model={quote(str(base_of(fixture)))}", "watch.idle_timeout=3")
    try:
        _wait_for(_log_has(run_dir, "step-4: not complete yet"), timeout=60, proc=watcher)
        shutil.rmtree(run / "step-4")
        output = _finish(watcher)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, output[-3000:]
    results = {Path(r["checkpoint"]).name: r for r in summary_of(run_dir)}
    assert results["step-2"]["status"] == "ok"
    assert results["step-4"]["status"] == "skipped" and "removed before it was converted" in results["step-4"]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["step-2"]


# -- config --------------------------------------------------------------------------------------------------------

def test_watch_config_composes_beside_convert() -> None:
    cfg = compose_config("task=watch", "watch.interval=2", "watch.on_converted=[[echo,'{output}']]")
    assert cfg.task.value == "watch" and cfg.watch.interval == 2.0 and cfg.watch.on_converted == [["echo", "{output}"]]
    assert cfg.convert.max_shard_size == compose_config().convert.max_shard_size


def test_unknown_template_field_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"\{path\}; the fields are \{output\}, \{checkpoint\}, \{step\}"):
        check_templates([["eval", "{path}"]])
    proc = subprocess.run([sys.executable, "-m", "lmtk", "task=watch", f"convert.checkpoint_path={tmp_path}",
                           f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'rd'}",
                           "watch.on_converted=[[eval,'{path}']]"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 1
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line]
    assert errors and "watch.on_converted" in errors[0] and "{path}" in errors[0], proc.stdout + proc.stderr


# -- waking and jobs -----------------------------------------------------------------------------------------------

def test_filesystem_events_bring_the_next_look_long_before_the_interval(tmp_path: Path) -> None:
    """With a look every 10 minutes only, a checkpoint written after the watch began converts within seconds:
    inotify woke it. (Polling alone would not look again before this test gives up.)"""
    fixture = "torchtitan_llama3"
    run, out, run_dir = tmp_path / "run", tmp_path / "out", tmp_path / "rd"
    run.mkdir()
    watcher = _watch(run, out, run_dir, f"convert.base_model={quote(str(base_of(fixture)))}", fast=False,
                     extra=("watch.interval=600", "watch.settle=0.5", "watch.idle_timeout=null"))
    try:
        _wait_for(_log_has(run_dir, "watching"), timeout=60, proc=watcher)
        assert "inotify" in (run_dir / "lmtk.log").read_text()
        shutil.copytree(FIXTURES / fixture / "run" / "outputs" / "checkpoint", run / "checkpoint")
        _wait_for(lambda: all((out / s / MARKER).exists() for s in ("step-2", "step-4")), timeout=90, proc=watcher)
        watcher.send_signal(signal.SIGTERM)
        output = _finish(watcher)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, output[-3000:]
    reference = reference_of(fixture)
    for step in ("step-2", "step-4"):
        assert_logits(out / step, reference, step)
    _no_partial(out)


def test_each_checkpoint_converts_as_a_job_of_its_own_under_a_submitit_launcher(tmp_path: Path) -> None:
    """``hydra/launcher=convert_local`` (SLURM's resources as local processes, through submitit): the watcher
    submits one job per complete checkpoint and collects it; the hook runs once each."""
    fixture = "torchtitan_llama3"
    run, out, run_dir = tmp_path / "run", tmp_path / "out", tmp_path / "rd"
    shutil.copytree(FIXTURES / fixture / "run" / "outputs" / "checkpoint", run)
    hook, calls = _hook_override(tmp_path)
    watcher = _watch(run, out, run_dir, f"convert.base_model={quote(str(base_of(fixture)))}", hook,
                     "hydra/launcher=convert_local", "hydra.launcher.cpus_per_task=1", "watch.idle_timeout=3")
    try:
        output = _finish(watcher, timeout=300)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, output[-3000:]
    results = summary_of(run_dir)
    assert [r["status"] for r in results] == ["ok", "ok"], results
    jobs = [r["metadata"]["job"] for r in results]
    assert len(set(jobs)) == 2 and all((run_dir / ".submitit" / j).is_dir() for j in jobs), jobs
    assert sorted(Path(c[1]).name for c in _calls(calls)) == ["step-2", "step-4"]
    reference = reference_of(fixture)
    for result in results:
        assert_logits(Path(result["output"]), reference, Path(result["output"]).name)
    _no_partial(out)
