"""``python -m lmtk --multirun``: real sweeps over real FSDP2 checkpoints, on the basic, joblib and submitit launchers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException

from helpers import FsdpRun, assert_matches_reference, compose_config, run_lmtk, summary_of
from lmtk.config import SweepConfig, register_configs
from lmtk.sweep import SweepError, sweep_values

# Sorted as the sweep runs them; the third is broken, the fourth has a space, a quote and a comma.
CHECKPOINTS = ["epoch-001.pth", "epoch-002", "epoch-003.pth", "epoch-004 it's,final.pth"]
CONVERTED = ["epoch-001", "epoch-002", "epoch-004 it's,final"]


@pytest.fixture
def ckpts(gpt2: FsdpRun, tmp_path: Path) -> Path:
    """A checkpoint folder whose own name has a space and a comma: two files, a DCP directory, an empty file."""
    folder = tmp_path / "ckpts a,b"
    folder.mkdir()
    (folder / CHECKPOINTS[0]).symlink_to(gpt2["bare"])
    (folder / CHECKPOINTS[1]).symlink_to(gpt2["dcp"])
    (folder / CHECKPOINTS[2]).touch()
    (folder / CHECKPOINTS[3]).symlink_to(gpt2["wrapped"])
    (folder / "notes.txt").write_text("not matched by the glob")
    return folder


def glob_sweep(ckpts: Path, gpt2: FsdpRun, tmp_path: Path, *launcher: str) -> subprocess.CompletedProcess[str]:
    return run_lmtk(
        "--multirun", "task=convert", "sweep=checkpoints", f"sweep.glob='{ckpts}/epoch-*'", *launcher,
        f"convert.base_model={gpt2.base}", f"convert.output_dir={tmp_path / 'out'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
    )


def check_glob_sweep(proc: subprocess.CompletedProcess[str], ckpts: Path, gpt2: FsdpRun, tmp_path: Path) -> None:
    """Every job ran in its own dir, the sweep summary lists them all, and the broken one failed the sweep."""
    sweep, out = tmp_path / "sweep", tmp_path / "out"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"see {sweep / '2' / 'summary.json'} (all jobs: {sweep / 'summary.json'})" in proc.stderr
    for num, name in enumerate(CHECKPOINTS):
        assert (sweep / str(num) / "lmtk.log").is_file()
        [result] = summary_of(sweep / str(num))
        assert result["checkpoint"] == str(ckpts / name)
    summary = json.loads((sweep / "summary.json").read_text())
    assert [(r["checkpoint"], r["status"]) for r in summary["results"]] == [
        (str(ckpts / name), "failed" if name == "epoch-003.pth" else "ok") for name in CHECKPOINTS
    ]
    assert summary["results"][2]["error"] == f"{ckpts / 'epoch-003.pth'}: empty file (0 bytes)"
    assert [(j["job"], j["status"], j["run_dir"]) for j in summary["jobs"]] == [
        (num, "failed" if num == 2 else "completed", str(sweep / str(num))) for num in range(4)
    ]
    assert not list(sweep.glob(".summary.json*"))
    assert sorted(p.name for p in out.iterdir()) == CONVERTED  # nothing half-written, no temp folders
    for name in CONVERTED:
        assert_matches_reference(out / name, gpt2.reference)


def test_glob_sweep_on_the_basic_launcher(ckpts: Path, gpt2: FsdpRun, tmp_path: Path) -> None:
    check_glob_sweep(glob_sweep(ckpts, gpt2, tmp_path), ckpts, gpt2, tmp_path)


def test_glob_sweep_on_joblib(ckpts: Path, gpt2: FsdpRun, tmp_path: Path) -> None:
    proc = glob_sweep(ckpts, gpt2, tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    check_glob_sweep(proc, ckpts, gpt2, tmp_path)


def test_glob_sweep_on_submitit_local_with_the_shipped_preset(ckpts: Path, gpt2: FsdpRun, tmp_path: Path) -> None:
    proc = glob_sweep(ckpts, gpt2, tmp_path, "hydra/launcher=convert_local")
    assert "Submitit 'local' sweep" in proc.stdout + proc.stderr
    assert (tmp_path / "sweep" / ".submitit").is_dir()
    check_glob_sweep(proc, ckpts, gpt2, tmp_path)


def test_list_sweep_succeeds_and_forgets_a_previous_sweep_in_the_same_dir(gpt2: FsdpRun, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # Left by an earlier, longer sweep into the same dir.
    (sweep / "2").mkdir(parents=True)
    (sweep / "2" / "summary.json").write_text(json.dumps({"results": [{"checkpoint": "stale", "status": "ok"}]}))
    (sweep / ".lmtk-jobs").mkdir()
    (sweep / ".lmtk-jobs" / "2.json").write_text(json.dumps({"job": 2, "status": "completed", "run_dir": str(sweep / "2")}))
    proc = run_lmtk(
        "--multirun", "task=convert", f"convert.checkpoint_path={gpt2['bare']},{gpt2['ranks']}",
        f"convert.base_model={gpt2.base}", f"convert.output_dir={tmp_path / 'out'}", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = summary_of(sweep)
    assert [(r["checkpoint"], r["status"]) for r in results] == [(str(gpt2["bare"]), "ok"), (str(gpt2["ranks"]), "ok")]
    assert f"sweep summary: 2 ok, 0 skipped, 0 failed -> {sweep / 'summary.json'}" in proc.stdout + proc.stderr


def test_a_job_that_dies_early_is_still_in_the_sweep_summary(gpt2: FsdpRun, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_lmtk(
        "--multirun", "task=convert", f"convert.checkpoint_path={gpt2['bare']},${{oc.env:LMTK_UNSET_IN_TESTS}}",
        f"convert.base_model={gpt2.base}", f"convert.output_dir={tmp_path / 'out'}", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    died = summary_of(sweep / "1")
    assert summary_of(sweep) == summary_of(sweep / "0") + died
    assert died[0]["checkpoint"] == "${oc.env:LMTK_UNSET_IN_TESTS}" and died[0]["status"] == "failed"
    assert "LMTK_UNSET_IN_TESTS" in died[0]["error"] and "\n" not in died[0]["error"]


def test_an_empty_glob_is_an_error_naming_the_pattern(tmp_path: Path) -> None:
    pattern = tmp_path / "nothing here" / "epoch-*.pth"
    proc = run_lmtk("--multirun", "sweep=checkpoints", f"sweep.glob='{pattern}'",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"sweep.glob={pattern}: no file or directory matches this pattern\n")
    assert not (tmp_path / "sweep").exists()


def test_an_unset_glob_says_how_to_set_it(tmp_path: Path) -> None:
    proc = run_lmtk("--multirun", "sweep=checkpoints", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("sweep.glob is not set (or has an unquoted comma): add \"sweep.glob='/ckpts/epoch-*'\"")


def test_a_glob_sweep_without_multirun_says_to_add_it(ckpts: Path, gpt2: FsdpRun, tmp_path: Path) -> None:
    proc = run_lmtk("sweep=checkpoints", f"sweep.glob='{ckpts}/epoch-*'", f"convert.output_dir={tmp_path / 'out'}",
                    f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "sweep=checkpoints runs one job per checkpoint: add --multirun (-m)" in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_same_checkpoint_in_two_parallel_jobs_leaves_one_complete_output(gpt2: FsdpRun, tmp_path: Path) -> None:
    out, sweep = tmp_path / "out", tmp_path / "sweep"
    proc = run_lmtk(
        "--multirun", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        f"convert.checkpoint_path={gpt2['bare']},{gpt2['bare']}", f"convert.base_model={gpt2.base}",
        f"convert.output_dir={out}", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Which one the second job does depends on timing: find the first one's folder finished, or swap in its own.
    assert sorted(r["status"] for r in summary_of(sweep)) in (["ok", "ok"], ["ok", "skipped"])
    assert [p.name for p in out.iterdir()] == ["bare"]
    assert_matches_reference(out / "bare", gpt2.reference)


def test_glob_values_are_sorted_absolute_and_survive_hydra_quoting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["b,2.pth", "a 1.pth", "it's.pth", "back\\slash.pth", "c'\\.pth", "dir,x"]
    for name in names:
        (tmp_path / name).mkdir() if name.startswith("dir") else (tmp_path / name).touch()
    (tmp_path / ".hidden.pth").touch()
    monkeypatch.chdir(tmp_path)
    sweep = OverridesParser.create().parse_override(f"convert.checkpoint_path={sweep_values('*')}")
    values = [v.text for v in sweep.value().list]
    assert values == [str(tmp_path / name) for name in sorted(names)]


def test_an_empty_glob_raises_naming_the_pattern(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match=f"sweep.glob={tmp_path}/x-\\*: no file or directory matches"):
        sweep_values(f"{tmp_path}/x-*")


def test_the_sweep_group_is_typed_and_off_by_default() -> None:
    assert compose_config().sweep is None
    assert compose_config("sweep=checkpoints", "sweep.glob=/ckpts/*.pth").sweep == SweepConfig(glob="/ckpts/*.pth")
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("sweep=checkpoints", "sweep.globs=/ckpts/*.pth")
    assert "globs" in str(err.value.__cause__ or err.value)


@pytest.mark.parametrize(("preset", "target", "gpus"), [("convert_slurm", "ConvertSlurmLauncher", None),
                                                       ("convert_local", "ConvertLocalLauncher", 0)])
def test_launcher_presets_ask_for_cpu_memory_and_time(preset: str, target: str, gpus: int | None) -> None:
    register_configs()
    with initialize_config_module(config_module="lmtk.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={preset}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == f"hydra_plugins.lmtk_launchers.{target}"
    assert (launcher.cpus_per_task, launcher.mem_gb, launcher.timeout_min, launcher.gpus_per_node) == (2, 4, 60, gpus)
