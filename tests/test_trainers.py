"""Training runs written by the trainers' own save code (``tests/trainers/``): one command converts each run.

Every fixture holds the run directory as the trainer wrote it and the logits of the unsharded model at each
saved step; its ``make_fixture.py`` says which framework versions wrote it and how.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import FIXTURES, Convert, assert_logits, base_of, reference_of, run_lmtk, summary_of

RUNS = (
    "hf_trainer_fsdp2_sharded", "hf_trainer_fsdp2_full", "hf_trainer_fsdp1_sharded", "hf_trainer_fsdp1_full",
    "accelerate_fsdp2_sharded", "lightning_fsdp_sharded", "lightning_modelparallel_full", "lightning_fabric", "verl",
    "torchtitan_llama3", "torchtitan_llama3_tied", "olmo_core_olmo2", "olmo_core_llama",
    "torch_hf_sharded", "torch_hf_consolidated",
)
# Runs that carry their model's HF config (verl's actor/huggingface): converted with no convert.base_model.
OWN_CONFIG = ("verl",)


@pytest.mark.parametrize("name", RUNS)
def test_one_command_converts_every_checkpoint_of_the_run(converted: Convert, name: str) -> None:
    proc, out, run_dir = converted(name, with_base=name not in OWN_CONFIG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = reference_of(name)
    assert sorted(p.name for p in out.iterdir()) == sorted(reference["logits"])
    results = {Path(r["output"]).name: r for r in summary_of(run_dir)}
    for unit, step in reference["steps"].items():
        assert_logits(out / unit, reference, unit)
        assert results[unit]["status"] == "ok"
        record = json.loads((out / unit / "conversion.json").read_text())
        assert record["metadata"] == results[unit]["metadata"]
        recorded = record["metadata"].get("step", record["metadata"].get("iteration"))
        assert recorded == (step if "accelerate" not in name else int(unit.split("_")[-1])), record["metadata"]
        assert "| training progress | " in (out / unit / "README.md").read_text()


def test_a_checkpoint_that_carries_its_config_needs_no_base_model(converted: Convert) -> None:
    _, out, _ = converted("verl", with_base=False)
    record = json.loads((out / "global_step_4" / "conversion.json").read_text())
    assert record["base_model_from"] == "the checkpoint"
    assert record["base_model"].endswith("global_step_4/actor/huggingface")
    assert (out / "global_step_4" / "tokenizer.json").is_file()
    assert record["trainer"] == "verl" and record["metadata"] == {"step": 4, "progress_from": "name"}


def test_training_state_beside_the_model_is_skipped_with_a_line_each(converted: Convert) -> None:
    proc, _, _ = converted("hf_trainer_fsdp2_full")
    log = proc.stdout + proc.stderr
    unit = FIXTURES / "hf_trainer_fsdp2_full" / "run" / "checkpoint-4"
    for sibling, what in [("optimizer.bin", "optimizer state"), ("rng_state_1.pth", "RNG state"),
                          ("scheduler.pt", "LR scheduler state"), ("training_args.bin", "training arguments"),
                          ("model.safetensors", "HF weights the Trainer wrote beside FSDP's")]:
        assert f"{unit}: skipping {sibling} ({what})" in log
    assert "a HuggingFace model already" in log  # the run root, where save_model wrote the final model


def test_the_step_comes_from_the_trainers_own_records(converted: Convert) -> None:
    _, out, _ = converted("hf_trainer_fsdp2_sharded")
    record = json.loads((out / "checkpoint-4" / "conversion.json").read_text())
    assert record["metadata"] == {"step": 4, "epoch": 0.5, "progress_from": "trainer_state.json"}
    assert record["trainer"] == "transformers Trainer"
    _, out, _ = converted("lightning_fsdp_sharded")
    record = json.loads((out / "epoch=0-step=4" / "conversion.json").read_text())
    assert (record["metadata"]["step"], record["metadata"]["progress_from"]) == (4, "meta.pt")
    card = (out / "epoch=0-step=4" / "README.md").read_text()
    assert "| training progress | epoch 0, step 4 (from meta.pt) |" in card


def test_the_model_part_inside_a_checkpoint_converts_under_the_checkpoints_name(tmp_path: Path) -> None:
    run = FIXTURES / "hf_trainer_fsdp2_sharded" / "run"
    proc = run_lmtk(f"convert.checkpoint_path={run / 'checkpoint-4' / 'pytorch_model_fsdp_0'}",
                    f"convert.base_model={FIXTURES / 'base'}", f"convert.output_dir={tmp_path / 'out'}",
                    f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["checkpoint-4"]
    assert_logits(tmp_path / "out" / "checkpoint-4", reference_of("hf_trainer_fsdp2_sharded"), "checkpoint-4")


def test_two_runs_into_one_output_dir_never_share_a_folder(tmp_path: Path) -> None:
    """checkpoint-4 of two runs: the second fails naming both, and the first's folder keeps its own weights."""
    out = tmp_path / "out"
    first, second = (FIXTURES / name / "run" / "checkpoint-4" / "pytorch_model_fsdp_0"
                     for name in ("hf_trainer_fsdp2_sharded", "hf_trainer_fsdp1_sharded"))
    procs = [run_lmtk(f"convert.checkpoint_path={ckpt}", f"convert.base_model={FIXTURES / 'base'}",
                      f"convert.output_dir={out}", f"hydra.run.dir={tmp_path / str(i)}", cwd=tmp_path)
             for i, ckpt in enumerate((first, second))]
    assert procs[0].returncode == 0 and procs[1].returncode == 1
    [failed] = summary_of(tmp_path / "1")
    assert failed["status"] == "failed" and "\n" not in failed["error"]
    assert failed["error"] == (
        f"{second.parent}: {out / 'checkpoint-4'} already holds the conversion of another checkpoint, "
        f"{first.parent}; choose another convert.output_dir, or set convert.overwrite=true to replace it"
    )
    assert_logits(out / "checkpoint-4", reference_of("hf_trainer_fsdp2_sharded"), "checkpoint-4")
    # Asked for, the other checkpoint replaces it, and then the folder holds the other checkpoint's weights.
    proc = run_lmtk(f"convert.checkpoint_path={second}", f"convert.base_model={FIXTURES / 'base'}",
                    f"convert.output_dir={out}", "convert.overwrite=true", f"hydra.run.dir={tmp_path / '2'}",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_logits(out / "checkpoint-4", reference_of("hf_trainer_fsdp1_sharded"), "checkpoint-4")


def test_a_sweep_never_lets_one_job_replace_anothers_folder(tmp_path: Path) -> None:
    """Inner directories of two runs' checkpoint-4 in one sweep, even with overwrite: one ok, one failed."""
    out, sweep = tmp_path / "out", tmp_path / "sweep"
    runs = tmp_path / "runs"
    for name in ("hf_trainer_fsdp2_sharded", "hf_trainer_fsdp1_sharded"):
        (runs / name).mkdir(parents=True)
        (runs / name / "checkpoint-4").symlink_to(FIXTURES / name / "run" / "checkpoint-4")
    proc = run_lmtk("--multirun", "sweep=checkpoints", f"sweep.glob={runs}/*/checkpoint-4/pytorch_model_fsdp_0",
                    f"convert.base_model={FIXTURES / 'base'}", f"convert.output_dir={out}", "convert.overwrite=true",
                    f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 1
    results = summary_of(sweep)
    assert [r["status"] for r in results] == ["ok", "failed"]
    assert "just converted from another checkpoint" in results[1]["error"]
    assert [p.name for p in out.iterdir()] == ["checkpoint-4"]
    assert_logits(out / "checkpoint-4", reference_of(Path(results[0]["checkpoint"]).parent.name), "checkpoint-4")


def test_sweep_over_every_checkpoint_of_a_run(tmp_path: Path) -> None:
    """sweep=units: one job per checkpoint found in the run, no glob to write; folder names as in one run."""
    name = "lightning_fsdp_sharded"
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / name / "run", run)
    # A second version of the same run: its checkpoints have the same names, so every folder is named by its path.
    shutil.copytree(run / "lightning_logs" / "version_0", run / "lightning_logs" / "version_1")
    sweep, out = tmp_path / "sweep", tmp_path / "out"
    proc = run_lmtk("--multirun", "sweep=units", f"convert.checkpoint_path={run}", f"convert.base_model={base_of(name)}",
                    f"convert.output_dir={out}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [f"lightning_logs--version_{v}--checkpoints--epoch=0-step={s}" for v in (0, 1) for s in (2, 4)]
    assert sorted(p.name for p in out.iterdir()) == expected
    assert [r["status"] for r in summary_of(sweep)] == ["ok"] * 4
    reference = reference_of(name)
    for folder in expected:
        assert_logits(out / folder, reference, folder.split("--")[-1])


def test_a_lightning_checkpoint_path_with_equals_signs_is_quoted(tmp_path: Path) -> None:
    ckpt = FIXTURES / "lightning_modelparallel_full" / "run" / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=2.ckpt"
    proc = run_lmtk(f"convert.checkpoint_path='{ckpt}'", f"convert.base_model={FIXTURES / 'base'}",
                    f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_logits(tmp_path / "out" / "epoch=0-step=2", reference_of("lightning_modelparallel_full"), "epoch=0-step=2")


def test_a_glob_sweep_over_a_runs_checkpoints_names_each_job_after_its_checkpoint(tmp_path: Path) -> None:
    name = "hf_trainer_fsdp2_sharded"
    sweep, out = tmp_path / "sweep", tmp_path / "out"
    proc = run_lmtk("--multirun", "sweep=checkpoints", f"sweep.glob={FIXTURES / name / 'run'}/checkpoint-*",
                    f"convert.base_model={FIXTURES / 'base'}", f"convert.output_dir={out}",
                    f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    for unit in ("checkpoint-2", "checkpoint-4"):
        assert_logits(out / unit, reference_of(name), unit)
