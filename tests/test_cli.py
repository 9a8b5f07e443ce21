"""``python -m lmtk`` as a user runs it: real subprocesses, from other working directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path


from helpers import REPO, FsdpRun, assert_matches_reference, run_lmtk, summary_of

EXAMPLE_FOLDERS = ["bare", "dcp", "prefixed", "ranks", "wrapped"]


def test_bundled_example_converts_from_any_directory(tmp_path: Path) -> None:
    proc = run_lmtk("+experiment=example", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    converted = tmp_path / "workspace" / "converted"
    assert sorted(p.name for p in converted.iterdir()) == EXAMPLE_FOLDERS
    for name in EXAMPLE_FOLDERS:
        assert_matches_reference(converted / name, REPO / "examples" / "tiny-gpt2" / "reference.pt")
    [run_dir] = (tmp_path / "outputs").glob("*/*")
    assert [r["status"] for r in summary_of(run_dir)] == ["ok"] * 5
    assert (run_dir / "lmtk.log").is_file()


def test_failure_exits_non_zero_and_keeps_going(gpt2: FsdpRun, tmp_path: Path) -> None:
    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / "good.pth").symlink_to(gpt2["bare"])
    (batch / "empty.pth").touch()
    proc = run_lmtk(
        "task=convert", f"convert.checkpoint_path={batch}", f"convert.base_model={gpt2.base}",
        f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert f"{batch / 'empty.pth'}: empty file (0 bytes)" in proc.stdout + proc.stderr
    results = summary_of(tmp_path / "run")
    assert [(Path(r["checkpoint"]).name, r["status"]) for r in results] == [("empty.pth", "failed"), ("good.pth", "ok")]
    assert_matches_reference(tmp_path / "out" / "good", gpt2.reference)


def test_misspelt_key_stops_before_any_work(tmp_path: Path) -> None:
    proc = run_lmtk("convert.chekpoint_path=/x.pth", cwd=tmp_path)
    assert proc.returncode != 0
    assert "chekpoint_path" in proc.stderr
    assert not (tmp_path / "workspace").exists()


def test_unknown_format_lists_allowed_values(tmp_path: Path) -> None:
    proc = run_lmtk("convert.final_format=onnx", cwd=tmp_path)
    assert proc.returncode != 0 and "onnx" in proc.stderr and "huggingface" in proc.stderr


def test_real_gpt2_missing_offline_says_how_to_point_at_a_folder(gpt2: FsdpRun, tmp_path: Path) -> None:
    proc = run_lmtk(
        "model=gpt2", f"convert.checkpoint_path={gpt2['bare']}", f"convert.output_dir={tmp_path / 'out'}",
        cwd=tmp_path, env={"HF_HOME": str(tmp_path / "empty-cache")},
    )
    assert proc.returncode == 1
    output = proc.stdout + proc.stderr
    assert "gpt2: base model not found" in output and "convert.base_model=/path/to/folder" in output


def test_regular_install_finds_configs_and_example(tmp_path: Path) -> None:
    """A non-editable install (wheel): conf/ and examples/ must travel inside the package."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = wheels.glob("lmtk-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lmtk/conf/config.yaml" in names and "lmtk/examples/checkpoints/dcp/.metadata" in names
    assert "lmtk/conf/sweep/checkpoints.yaml" in names and "lmtk/conf/hydra/launcher/convert_slurm.yaml" in names
    assert "lmtk/conf/naming/torchtitan_llama3.yaml" in names and "lmtk/conf/sweep/units.yaml" in names
    assert "hydra_plugins/lmtk_launchers/__init__.py" in names and "hydra_plugins/__init__.py" not in names
    assert "lmtk/conf/task/inspect.yaml" in names and "lmtk/conf/hydra/help/lmtk.yaml" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    command = subprocess.run([str(site / "bin" / "lmtk"), "--help"], cwd=work, env={**os.environ, "PYTHONPATH": str(site)},
                             capture_output=True, text=True, timeout=120)
    assert command.returncode == 0 and "lmtk task=inspect" in command.stdout, command.stderr[-2000:]
    proc = run_lmtk("+experiment=example", "hydra.run.dir=run", cwd=work, env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((work / "run" / "summary.json").read_text())["results"]
    assert all(r["checkpoint"].startswith(str(site)) for r in results)
    assert [r["status"] for r in results] == ["ok"] * 5
