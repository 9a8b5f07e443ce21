"""Object-storage URLs where lmtk needs a local path: refused in one line, nothing written anywhere.

Against a real S3 server (SeaweedFS), so "nothing written" is checked in the bucket itself, not assumed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REPO, run_lmtk
from s3server import S3Server

EXAMPLE = REPO / "examples" / "checkpoints" / "bare.pth"
BASE = REPO / "examples" / "tiny-gpt2"
BUCKET = "lmtk-refusals"


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> S3Server:
    fs = s3_server.filesystem()
    fs.mkdir(BUCKET)
    fs.put(str(EXAMPLE), f"{BUCKET}/run/bare.pth")
    return s3_server


def _one_error_line(output: str, *needles: str) -> str:
    lines = [line for line in output.splitlines() if all(n in line for n in needles)]
    assert len(lines) >= 1, output
    assert "Traceback" not in output, output
    return lines[0]


@pytest.mark.parametrize("task", ["convert", "inspect", "watch"])
def test_a_bucket_checkpoint_path_is_refused_in_one_line(bucket: S3Server, tmp_path: Path, task: str) -> None:
    url = f"s3://{BUCKET}/run"
    result = run_lmtk(f"task={task}", f"convert.checkpoint_path={url}", f"convert.base_model={BASE}",
                      f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}",
                      "watch.idle_timeout=1", cwd=tmp_path, env=bucket.env)
    assert result.returncode == 1, result.stderr
    line = _one_error_line(result.stdout + result.stderr, url, "convert.checkpoint_path is a s3:// URL")
    assert "local paths only" in line
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["convert.output_dir", "convert.base_model"])
def test_a_bucket_output_or_base_is_refused_and_nothing_lands_anywhere(bucket: S3Server, tmp_path: Path,
                                                                       option: str) -> None:
    url = f"s3://{BUCKET}/out"
    paths = {"convert.checkpoint_path": str(EXAMPLE), "convert.base_model": str(BASE),
             "convert.output_dir": str(tmp_path / "out"), option: url}
    result = run_lmtk(*(f"{k}={v}" for k, v in paths.items()), f"hydra.run.dir={tmp_path / 'run'}",
                      cwd=tmp_path, env=bucket.env)
    assert result.returncode == 1, result.stderr
    _one_error_line(result.stdout + result.stderr, url, f"{option} is a s3:// URL")
    # The bug this guards against: "ok", exit 0, and the model in a local folder named s3:/lmtk-refusals/out.
    assert not (tmp_path / "s3:").exists()
    assert not (tmp_path / "out").exists()
    fs = bucket.filesystem()
    assert fs.find(f"{BUCKET}/out") == []
    assert fs.find(f"{BUCKET}/run") == [f"{BUCKET}/run/bare.pth"]


def test_a_gs_or_file_url_is_refused_too(tmp_path: Path) -> None:
    for url in ("gs://some-bucket/run", f"file://{EXAMPLE}"):
        result = run_lmtk(f"convert.checkpoint_path={url}", f"convert.base_model={BASE}",
                          f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        _one_error_line(result.stdout + result.stderr, url, "URL; lmtk reads and writes local paths only")


def test_a_sweep_glob_url_is_refused_in_one_line(tmp_path: Path) -> None:
    result = run_lmtk("--multirun", "sweep=checkpoints", "sweep.glob='s3://lmtk-refusals/run/*.pth'",
                      f"convert.base_model={BASE}", f"convert.output_dir={tmp_path / 'out'}",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode != 0
    _one_error_line(result.stdout + result.stderr, "s3://lmtk-refusals/run/*.pth", "URL")
    assert not (tmp_path / "out").exists()
