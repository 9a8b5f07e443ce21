"""Object storage, against a real S3 server (SeaweedFS), so what lands in a bucket is checked there, not assumed.

Model folders are written to a bucket: complete ones only (``conversion.json`` last), with the trained logits,
skipped, refused and cleaned as local folders are. URLs where lmtk still needs a local path (checkpoints, base
models) are refused in one line, nothing written anywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import FIXTURES, REPO, assert_logits, base_of, reference_of, run_lmtk, summary_of
from lmtk.output import MARKER
from s3server import S3Server, start_s3_server

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


def test_task_watch_refuses_a_bucket_checkpoint_path_in_one_line(bucket: S3Server, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/run"
    result = run_lmtk("task=watch", f"convert.checkpoint_path={url}", f"convert.base_model={BASE}",
                      f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}",
                      "watch.idle_timeout=1", cwd=tmp_path, env=bucket.env)
    assert result.returncode == 1, result.stderr
    line = _one_error_line(result.stdout + result.stderr, url, "convert.checkpoint_path is a s3:// URL")
    assert "task=watch follows local (or mounted) run folders only" in line
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "out").exists()


def test_task_inspect_reads_a_bucket_checkpoint_path(bucket: S3Server, tmp_path: Path) -> None:
    result = run_lmtk("task=inspect", f"convert.checkpoint_path=s3://{BUCKET}/run", f"convert.base_model={BASE}",
                      f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                      env=bucket.env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["checkpoint"] for r in summary_of(tmp_path / "run")] == [f"s3://{BUCKET}/run/bare.pth"]
    assert not (tmp_path / "out").exists()


def test_an_adapter_config_url_is_refused_and_nothing_lands_anywhere(bucket: S3Server, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/adapter_config.json"
    result = run_lmtk(f"convert.checkpoint_path={EXAMPLE}", f"convert.base_model={BASE}",
                      f"convert.output_dir={tmp_path / 'out'}", f"convert.lora.adapter_config={url}",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=bucket.env)
    assert result.returncode == 1, result.stderr
    _one_error_line(result.stdout + result.stderr, url, "convert.lora.adapter_config is a s3:// URL; it must be a "
                    "local path")
    assert not (tmp_path / "s3:").exists()
    assert not (tmp_path / "out").exists()


def test_a_file_or_http_url_is_refused_in_one_line(tmp_path: Path) -> None:
    for url in (f"file://{EXAMPLE}", "https://example.com/run"):
        result = run_lmtk(f"convert.checkpoint_path={url}", f"convert.base_model={BASE}",
                          f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        _one_error_line(result.stdout + result.stderr, url, "URL; lmtk reads and writes local paths, s3:// and gs://")


def test_a_sweep_glob_matching_nothing_in_the_bucket_is_one_line(bucket: S3Server, tmp_path: Path) -> None:
    result = run_lmtk("--multirun", "sweep=checkpoints", f"sweep.glob='s3://{BUCKET}/run/*.nothing'",
                      f"convert.base_model={BASE}", f"convert.output_dir={tmp_path / 'out'}",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, env=bucket.env)
    assert result.returncode != 0
    _one_error_line(result.stdout + result.stderr, f"s3://{BUCKET}/run/*.nothing", "nothing in the bucket matches")
    assert not (tmp_path / "out").exists()


# -- model folders written to a bucket -----------------------------------------------------------------------------

FIXTURE = "torchtitan_llama3"
OUT_BUCKET = "lmtk-models"


def _run_into(url: str, tmp_path: Path, env: dict[str, str], *extra: str, run: str = "rd") -> Any:
    return run_lmtk(f"convert.checkpoint_path={FIXTURES / FIXTURE / 'run' / 'outputs' / 'checkpoint'}",
                    f"convert.base_model={base_of(FIXTURE)}", f"convert.output_dir={url}",
                    f"hydra.run.dir={tmp_path / run}", *extra, cwd=tmp_path, env=env)


@pytest.fixture(scope="module")
def models(s3_server: S3Server) -> S3Server:
    s3_server.filesystem().mkdir(OUT_BUCKET)
    return s3_server


def test_a_run_converts_into_a_bucket_with_its_logits_and_a_rerun_skips(models: S3Server, tmp_path: Path) -> None:
    url = f"s3://{OUT_BUCKET}/titan"
    result = _run_into(url, tmp_path, models.env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = summary_of(tmp_path / "rd")
    assert [(r["status"], r["output"]) for r in results] == [("ok", f"{url}/step-2"), ("ok", f"{url}/step-4")]
    fs = models.filesystem()
    reference = reference_of(FIXTURE)
    for step in ("step-2", "step-4"):
        names = {Path(k).name for k in fs.find(f"{OUT_BUCKET}/titan/{step}")}
        assert {"config.json", "model.safetensors", MARKER, "tokenizer.json"} <= names, names
        local = tmp_path / "got" / step
        fs.get(f"{OUT_BUCKET}/titan/{step}/", str(local), recursive=True)
        assert_logits(local, reference, step)
    assert not (tmp_path / "s3:").exists()
    stamp = fs.info(f"{OUT_BUCKET}/titan/step-2/{MARKER}")["LastModified"]
    again = _run_into(url, tmp_path, models.env, run="rd2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {r["status"] for r in summary_of(tmp_path / "rd2")} == {"skipped"}
    assert fs.info(f"{OUT_BUCKET}/titan/step-2/{MARKER}")["LastModified"] == stamp


def test_a_folder_of_another_checkpoint_in_the_bucket_is_refused(models: S3Server, tmp_path: Path) -> None:
    url = f"s3://{OUT_BUCKET}/clash"
    fs = models.filesystem()
    copy = tmp_path / "copy" / "checkpoint"
    shutil.copytree(FIXTURES / FIXTURE / "run" / "outputs" / "checkpoint", copy)
    assert _run_into(url, tmp_path, models.env).returncode == 0
    before = {k: fs.info(k)["ETag"] for k in fs.find(f"{OUT_BUCKET}/clash")}
    result = run_lmtk(f"convert.checkpoint_path={copy}", f"convert.base_model={base_of(FIXTURE)}",
                      f"convert.output_dir={url}", f"hydra.run.dir={tmp_path / 'rd2'}", cwd=tmp_path, env=models.env)
    assert result.returncode == 1
    line = _one_error_line(result.stdout + result.stderr, "already holds the conversion of another checkpoint")
    assert f"{url}/step-2 already holds the conversion of another checkpoint" in line, line
    fs.invalidate_cache()
    assert {k: fs.info(k)["ETag"] for k in fs.find(f"{OUT_BUCKET}/clash")} == before


def test_an_unfinished_upload_is_cleaned_and_converted_again(models: S3Server, tmp_path: Path) -> None:
    fs = models.filesystem()
    fs.pipe(f"{OUT_BUCKET}/left/step-2/model.safetensors", b"half an upload")
    fs.pipe(f"{OUT_BUCKET}/left/step-2/junk.bin", b"x")
    result = _run_into(f"s3://{OUT_BUCKET}/left", tmp_path, models.env, "convert.only=step-2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no conversion.json: an upload that did not finish; removing it" in (tmp_path / "rd" / "lmtk.log").read_text()
    fs.invalidate_cache()
    names = {Path(k).name for k in fs.find(f"{OUT_BUCKET}/left/step-2")}
    assert "junk.bin" not in names and MARKER in names
    local = tmp_path / "got"
    fs.get(f"{OUT_BUCKET}/left/step-2/", str(local), recursive=True)
    assert_logits(local, reference_of(FIXTURE), "step-2")


def test_wrong_credentials_or_a_missing_bucket_is_one_line_and_nothing_lands(models: S3Server, tmp_path: Path) -> None:
    wrong = {**models.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    result = _run_into(f"s3://{OUT_BUCKET}/denied", tmp_path, wrong, "convert.staging_dir=" + str(tmp_path / "stage"))
    assert result.returncode == 1
    line = _one_error_line(result.stdout + result.stderr, f"s3://{OUT_BUCKET}/denied/step-2", "cannot")
    assert "not-the-secret" not in result.stdout + result.stderr + (tmp_path / "rd" / "summary.json").read_text()
    del line
    assert models.filesystem().find(f"{OUT_BUCKET}/denied") == []
    assert list((tmp_path / "stage").iterdir()) == []  # nothing staged is left either
    missing = _run_into("s3://lmtk-no-such-bucket/out", tmp_path, models.env, run="rd2")
    assert missing.returncode == 1
    _one_error_line(missing.stdout + missing.stderr, "s3://lmtk-no-such-bucket/out/step-2")


def test_the_server_stopping_mid_upload_leaves_no_model_and_a_rerun_completes(big: tuple[Path, Path],
                                                                              tmp_path: Path) -> None:
    """Its own server, stopped as soon as the staged folder is complete (the upload under way); restarted on the
    same data, the rerun removes the unfinished prefix and converts again."""
    base, ckpt = big
    server = start_s3_server(tmp_path / "s3")
    stage = tmp_path / "stage"
    stage.mkdir()
    try:
        server.filesystem().mkdir("lmtk-down")
        args = [f"convert.checkpoint_path={ckpt}", f"convert.base_model={base}", "convert.output_dir=s3://lmtk-down/out",
                f"convert.staging_dir={stage}", "convert.max_shard_size=50MB"]
        proc = subprocess.Popen([sys.executable, "-m", "lmtk", *args, f"hydra.run.dir={tmp_path / 'rd'}"],
                                cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", **server.env},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240
        while not list(stage.glob(f"*/big/{MARKER}")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.01)
        server.stop()
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 1, output[-3000:]
        _one_error_line(output, "s3://lmtk-down/out/big: cannot", "EndpointConnectionError")
        assert list(stage.iterdir()) == []
        server = start_s3_server(tmp_path / "s3")
        fs = server.filesystem()
        assert MARKER not in {Path(k).name for k in fs.find("lmtk-down/out/big")}  # never taken for a model
        again = run_lmtk(*args, f"hydra.run.dir={tmp_path / 'rd2'}", cwd=tmp_path, env=server.env)
        assert again.returncode == 0, again.stderr[-3000:]
        fs.invalidate_cache()
        assert MARKER in {Path(k).name for k in fs.find("lmtk-down/out/big")}
    finally:
        server.stop()


def test_storage_options_in_the_config_reach_the_bucket_and_stay_secret(models: S3Server, tmp_path: Path) -> None:
    options = models.storage_options
    override = ("convert.storage_options={key:" + options["key"] + ",secret:" + options["secret"]
                + ",client_kwargs:{endpoint_url:'" + options["client_kwargs"]["endpoint_url"] + "'}}")
    clean_env = {k: "" for k in models.env}
    result = _run_into(f"s3://{OUT_BUCKET}/opts", tmp_path, clean_env, override, "convert.only=step-2")
    assert result.returncode == 0, result.stderr[-3000:]
    fs = models.filesystem()
    assert MARKER in {Path(k).name for k in fs.find(f"{OUT_BUCKET}/opts/step-2")}
    written = (tmp_path / "rd" / "lmtk.log").read_text() + (tmp_path / "rd" / "summary.json").read_text()
    written += fs.cat_file(f"{OUT_BUCKET}/opts/step-2/{MARKER}").decode()
    written += fs.cat_file(f"{OUT_BUCKET}/opts/step-2/README.md").decode()
    assert options["secret"] not in written


def test_a_bucket_output_under_task_watch_is_refused_in_one_line(models: S3Server, tmp_path: Path) -> None:
    url = f"s3://{OUT_BUCKET}/watched"
    result = run_lmtk("task=watch", f"convert.checkpoint_path={tmp_path}", f"convert.output_dir={url}",
                      f"hydra.run.dir={tmp_path / 'rd'}", "watch.idle_timeout=1", cwd=tmp_path, env=models.env)
    assert result.returncode == 1, result.stderr
    _one_error_line(result.stdout + result.stderr, url, "task=watch writes to local folders only")
    assert models.filesystem().find(f"{OUT_BUCKET}/watched") == []


def test_storage_options_the_filesystem_refuses_are_one_line(models: S3Server, tmp_path: Path) -> None:
    url = f"s3://{OUT_BUCKET}/badopts"
    result = _run_into(url, tmp_path, models.env, "convert.storage_options={no_such_option:1}", "convert.only=step-2",
                       "convert.staging_dir=" + str(tmp_path / "stage"))
    assert result.returncode == 1, result.stderr
    _one_error_line(result.stdout + result.stderr, f"{url}/step-2", "no_such_option")
    assert list((tmp_path / "stage").iterdir()) == []
    assert models.filesystem().find(f"{OUT_BUCKET}/badopts") == []


def test_a_large_shard_is_sent_while_it_is_written_and_lands_whole(big: tuple[Path, Path], models: S3Server,
                                                                  tmp_path: Path) -> None:
    """One ~300 MB shard: a multipart upload whose 32 MiB parts go while the writer writes; the object is the file."""
    base, ckpt = big
    url = f"s3://{OUT_BUCKET}/streamed"
    result = run_lmtk(f"convert.checkpoint_path={ckpt}", f"convert.base_model={base}", f"convert.output_dir={url}",
                      f"hydra.run.dir={tmp_path / 'rd'}", cwd=tmp_path, env=models.env)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "rd" / "lmtk.log").read_text()
    line = next(l for l in log.splitlines() if "uploaded" in l)
    sent, early = (float(x) for x in re.findall(r"([\d.]+) (?:GB|MB)", line)[:2])
    assert early > 0.9 * sent, line  # the weights went while being written, not after
    fs = models.filesystem()
    local = tmp_path / "got"
    fs.get(f"{OUT_BUCKET}/streamed/big/", str(local), recursive=True)
    from safetensors import safe_open

    with safe_open(local / "model.safetensors", "pt") as f:
        assert all(torch.equal(f.get_tensor(n), torch.full(f.get_slice(n).get_shape(), 0.5)) for n in f.keys())


def test_the_server_stopping_while_a_shard_is_sent_leaves_no_object(big: tuple[Path, Path], tmp_path: Path) -> None:
    base, ckpt = big
    server = start_s3_server(tmp_path / "s3")
    stage = tmp_path / "stage"
    stage.mkdir()
    try:
        server.filesystem().mkdir("lmtk-down")
        args = [f"convert.checkpoint_path={ckpt}", f"convert.base_model={base}", "convert.output_dir=s3://lmtk-down/out",
                f"convert.staging_dir={stage}"]
        proc = subprocess.Popen([sys.executable, "-m", "lmtk", *args, f"hydra.run.dir={tmp_path / 'rd'}"],
                                cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", **server.env},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240
        while not any(p.stat().st_size > 140 << 20 for p in stage.glob("*/*/*.safetensors")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.01)
        server.stop()
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 1, output[-3000:]
        _one_error_line(output, "s3://lmtk-down/out/big", "cannot upload model.safetensors")
        assert list(stage.iterdir()) == []
        server = start_s3_server(tmp_path / "s3")
        assert server.filesystem().find("lmtk-down/out") == []  # parts never completed are no object
        again = run_lmtk(*args, f"hydra.run.dir={tmp_path / 'rd2'}", cwd=tmp_path, env=server.env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert {Path(k).name for k in server.filesystem().find("lmtk-down/out/big")} >= {MARKER, "model.safetensors"}
    finally:
        server.stop()


def test_a_gs_url_without_its_filesystem_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    """gs:// shares the code path with s3://; without gcsfs installed (as here) it says which extra brings it."""
    pytest.importorskip("s3fs")
    if __import__("importlib").util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed: this checks the message a user without it gets")
    result = run_lmtk("convert.checkpoint_path=gs://some-bucket/run", f"convert.base_model={BASE}",
                      f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    _one_error_line(result.stdout + result.stderr, "gs://some-bucket/run", 'pip install "lmtk[gcs]"')
    assert not (tmp_path / "out").exists()
