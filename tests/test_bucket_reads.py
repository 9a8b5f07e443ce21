"""Checkpoints read where they lie in a bucket, against a real S3 server (SeaweedFS): the trainers' own run trees
uploaded as they were written, converted bucket -> local and bucket -> bucket with the trained logits, and the
faults a user meets (a wrong secret, a missing key, the server going down mid-read) one line each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import FIXTURES, assert_logits, base_of, compose_config, reference_of, run_lmtk, summary_of
from lmtk.convert import run_convert
from lmtk.output import MARKER, TEMP_TAG
from lmtk.sweep import quote
from s3server import S3Server, start_s3_server

RUNS = "lmtk-runs"
# Every trainer and every layout: DCP (Trainer, accelerate, Lightning, torchtitan, OLMo-core), full .pth/.bin,
# per-rank DTensor files (verl), torch's safetensors forms, LoRA merged from ranks and from a Trainer's .bin,
# and an MoE naming whose expert stacks are split (read whole, not streamed).
FIXTURE_RUNS = (
    "hf_trainer_fsdp2_sharded", "hf_trainer_fsdp1_full", "accelerate_fsdp2_sharded", "lightning_fsdp_sharded",
    "lightning_modelparallel_full", "lightning_fabric", "verl", "torchtitan_llama3", "olmo_core_llama",
    "torch_hf_sharded", "torch_hf_consolidated", "lora_verl", "lora_hf_trainer_fsdp2_full", "torchtitan_qwen3_moe",
)


@pytest.fixture(scope="module")
def runs(s3_server: S3Server) -> S3Server:
    """Each fixture's run tree and base folder, uploaded once (``s3://lmtk-runs/<name>/run``, ``.../base``)."""
    fs = s3_server.filesystem()
    fs.mkdir(RUNS)
    for name in FIXTURE_RUNS:
        fs.put(str(FIXTURES / name / "run"), f"{RUNS}/{name}/run", recursive=True)
        base = FIXTURES / name / "base" if (FIXTURES / name / "base").is_dir() else base_of(name)
        fs.put(str(base), f"{RUNS}/{name}/base", recursive=True)
    return s3_server


@pytest.fixture()
def aws(runs: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for key, value in runs.env.items():
        monkeypatch.setenv(key, value)
    return runs


def _convert(checkpoint: str, out: str, run_dir: Path, *overrides: str) -> list[dict]:
    cfg = compose_config(f"convert.checkpoint_path={quote(checkpoint)}", f"convert.output_dir={quote(out)}",
                         *overrides)
    run_convert(cfg, run_dir=run_dir)
    return summary_of(run_dir)


@pytest.mark.parametrize("name", FIXTURE_RUNS)
def test_a_run_in_a_bucket_converts_to_local_folders_with_the_trained_logits(aws: S3Server, tmp_path: Path,
                                                                             name: str) -> None:
    # verl carries its model's config (actor/huggingface): read from the bucket too; the others' base is a URL.
    base = [] if name == "verl" else [f"convert.base_model=s3://{RUNS}/{name}/base"]
    alpha = ["convert.lora.alpha=16"] if name == "lora_accelerate_fsdp2_sharded" else []
    results = _convert(f"s3://{RUNS}/{name}/run", str(tmp_path / "out"), tmp_path / "rd", *base, *alpha)
    reference = reference_of(name)
    assert [r["status"] for r in results] == ["ok"] * len(reference["logits"]), results
    assert all(r["checkpoint"].startswith(f"s3://{RUNS}/{name}/run/") for r in results)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(reference["logits"])
    scale = max(v.abs().max().item() for v in reference["logits"].values())
    for unit in reference["logits"]:
        assert_logits(tmp_path / "out" / unit, reference, unit, atol=max(1e-5, 1e-4 * scale if "moe" in name else 0))
        record = json.loads((tmp_path / "out" / unit / MARKER).read_text())
        assert all(f["path"].startswith("s3://") and f["etag"] for f in record["files"]), record["files"]
    if name == "verl":
        assert record["base_model"].startswith(f"s3://{RUNS}/verl/run/checkpoints/")
        assert record["base_model"].endswith("/global_step_4/actor/huggingface")
        assert (tmp_path / "out" / "global_step_4" / "tokenizer.json").is_file()


def test_a_rerun_skips_and_a_rewritten_object_is_converted_again(aws: S3Server, tmp_path: Path) -> None:
    name, unit = "torchtitan_llama3", "step-2"
    fs = aws.filesystem()
    run = f"{RUNS}/rewritten"
    fs.put(str(FIXTURES / name / "run"), run, recursive=True)
    args = (f"s3://{run}", str(tmp_path / "out"))
    base = f"convert.base_model=s3://{RUNS}/{name}/base"
    assert {r["status"] for r in _convert(*args, tmp_path / "rd1", base)} == {"ok"}
    again = _convert(*args, tmp_path / "rd2", base)
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    # The trainer re-saves step-2 (another run, same names and sizes): its ETags change, so it converts again.
    for key in fs.find(f"{run}/outputs/checkpoint/step-4"):
        fs.copy(key, key.replace("step-4", "step-2"))
    redone = {Path(r["output"]).name: r["status"] for r in _convert(*args, tmp_path / "rd3", base)}
    assert redone == {"step-2": "ok", "step-4": "skipped"}
    reference = reference_of(name)
    assert_logits(tmp_path / "out" / unit, {**reference, "logits": {unit: reference["logits"]["step-4"]}}, unit)


def test_bucket_to_bucket_with_the_trained_logits(aws: S3Server, tmp_path: Path) -> None:
    fs = aws.filesystem()
    fs.mkdir("lmtk-converted")
    results = _convert(f"s3://{RUNS}/verl/run", "s3://lmtk-converted/verl", tmp_path / "rd")
    assert [(r["status"], r["output"]) for r in results] == [("ok", "s3://lmtk-converted/verl/global_step_2"),
                                                             ("ok", "s3://lmtk-converted/verl/global_step_4")]
    reference = reference_of("verl")
    for unit in ("global_step_2", "global_step_4"):
        fs.get(f"lmtk-converted/verl/{unit}/", str(tmp_path / "got" / unit), recursive=True)
        assert_logits(tmp_path / "got" / unit, reference, unit)


def test_a_subprocess_with_storage_options_converts_one_unit(runs: S3Server, tmp_path: Path) -> None:
    """``python -m lmtk`` as a user types it, credentials in convert.storage_options (no AWS env at all)."""
    options = runs.storage_options
    value = "{key:%s,secret:%s,client_kwargs:{endpoint_url:'%s'}}" % (options["key"], options["secret"],
                                                                     options["client_kwargs"]["endpoint_url"])
    env = {k: "" for k in runs.env}
    result = run_lmtk(f"convert.checkpoint_path=s3://{RUNS}/hf_trainer_fsdp2_sharded/run", "convert.only=checkpoint-4",
                      f"convert.base_model=s3://{RUNS}/hf_trainer_fsdp2_sharded/base", f"convert.storage_options={value}",
                      f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'rd'}", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-4"]
    assert_logits(tmp_path / "out" / "checkpoint-4", reference_of("hf_trainer_fsdp2_sharded"), "checkpoint-4")
    logged = (tmp_path / "rd" / "lmtk.log").read_text()
    assert options["secret"] not in logged + (tmp_path / "rd" / "summary.json").read_text()


def _one_line(output: str, *needles: str) -> str:
    lines = [line for line in output.splitlines() if all(n in line for n in needles)]
    assert lines, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    return lines[0]


def test_a_wrong_secret_or_a_missing_key_is_one_line_and_nothing_is_written(runs: S3Server, tmp_path: Path) -> None:
    wrong = {**runs.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    url = f"s3://{RUNS}/torchtitan_llama3/run"
    denied = run_lmtk(f"convert.checkpoint_path={url}", f"convert.base_model={base_of('torchtitan_llama3')}",
                      f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'rd'}", cwd=tmp_path,
                      env=wrong)
    assert denied.returncode == 1
    line = _one_line(denied.stdout + denied.stderr, url, "cannot list it")
    assert "access denied" in line.lower() or "InvalidAccessKeyId" in line or "SignatureDoesNotMatch" in line, line
    assert "not-the-secret" not in denied.stdout + denied.stderr
    missing = run_lmtk(f"convert.checkpoint_path=s3://{RUNS}/no-such-run", f"convert.base_model={base_of('verl')}",
                       f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'rd2'}", cwd=tmp_path,
                       env=runs.env)
    assert missing.returncode == 1
    _one_line(missing.stdout + missing.stderr, f"s3://{RUNS}/no-such-run: no such file or directory")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_missing_a_shard_in_the_bucket_is_one_line(aws: S3Server, tmp_path: Path) -> None:
    fs = aws.filesystem()
    source = f"{RUNS}/torchtitan_llama3/run/outputs/checkpoint/step-2"
    for key in fs.find(source):
        if not key.endswith("__1_0.distcp"):
            fs.copy(key, key.replace(f"{RUNS}/torchtitan_llama3/run", f"{RUNS}/broken"))
    results = _convert(f"s3://{RUNS}/broken", str(tmp_path / "out"), tmp_path / "rd",
                       f"convert.base_model={base_of('torchtitan_llama3')}")
    assert [r["status"] for r in results] == ["failed"]
    assert "incomplete DCP checkpoint: missing __1_0.distcp" in results[0]["error"], results[0]["error"]
    assert results[0]["error"].startswith(f"s3://{RUNS}/broken/")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_server_stopping_mid_read_fails_in_one_line_and_a_rerun_completes(big: tuple[Path, Path],
                                                                              tmp_path: Path) -> None:
    """Its own server, stopped while a 300 MB .pth streams from it: the conversion fails naming the URL, its temp
    folder removed; restarted on the same data, the rerun converts it."""
    base, ckpt = big
    server = start_s3_server(tmp_path / "s3")
    out = tmp_path / "out"
    try:
        fs = server.filesystem()
        fs.mkdir("lmtk-down")
        fs.put(str(ckpt), "lmtk-down/run/big.pth")
        args = ["convert.checkpoint_path=s3://lmtk-down/run", f"convert.base_model={base}", f"convert.output_dir={out}",
                "convert.remote_concurrency=1"]
        proc = subprocess.Popen([sys.executable, "-m", "lmtk", *args, f"hydra.run.dir={tmp_path / 'rd'}"],
                                cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", **server.env},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240
        while not any(p.stat().st_size > 20 << 20 for p in out.glob(f"*{TEMP_TAG}*/*.safetensors")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.01)
        server.stop()
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 1, output[-3000:]
        _one_line(output, "failed s3://lmtk-down/run/big.pth", "cannot read it")
        assert list(out.iterdir()) == []  # the temp folder is gone, nothing partial
        server = start_s3_server(tmp_path / "s3")
        rerun = run_lmtk(*args, f"hydra.run.dir={tmp_path / 'rd2'}", cwd=tmp_path, env=server.env)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        from safetensors import safe_open

        with safe_open(out / "big" / "model.safetensors", "pt") as f:
            assert torch.equal(f.get_tensor("transformer.wte.weight")[:2, :4], torch.full((2, 4), 0.5))
    finally:
        server.stop()


def test_a_sweep_over_checkpoints_in_a_bucket_runs_one_job_each(runs: S3Server, tmp_path: Path) -> None:
    name = "torchtitan_llama3"
    pattern = f"s3://{RUNS}/{name}/run/outputs/checkpoint/step-*"
    proc = run_lmtk("--multirun", "sweep=checkpoints", f"sweep.glob='{pattern}'", "hydra/launcher=joblib",
                    "hydra.launcher.n_jobs=2", f"convert.base_model=s3://{RUNS}/{name}/base",
                    f"convert.output_dir={tmp_path / 'out'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
                    env=runs.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["completed", "completed"]
    reference = reference_of(name)
    for unit in ("step-2", "step-4"):
        assert_logits(tmp_path / "out" / unit, reference, unit)
