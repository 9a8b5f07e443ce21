"""Safe, crash-proof conversion: no input runs code, inputs never change, output is all-or-nothing."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import FsdpRun, assert_matches_reference, convert, run_lmtk, tree


def _one_failure(results: list, path: Path, words: str, out: Path) -> str:
    [result] = results
    assert result.status == "failed", result
    assert result.error.startswith(str(path)) and words in result.error, result.error
    assert "\n" not in result.error and "weights_only=False" not in result.error
    assert not out.exists() or tree(out) == []
    return result.error


# -- every bad input: one line naming the file and the reason, nothing written ------------------------

BAD_FILES = {
    "empty.pth": (b"", "empty file"),
    "truncated.pth": (None, "truncated or corrupt"),
    "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 99\n", "git-lfs pointer"),
    "page.pth": (b"<!DOCTYPE html><html><body>Sign in</body></html>", "HTML"),
    "random.pth": (bytes(random.Random(0).getrandbits(8) for _ in range(4096)), "not a PyTorch checkpoint"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_fail_with_a_named_reason(gpt2: FsdpRun, tmp_path: Path, name: str) -> None:
    content, words = BAD_FILES[name]
    if content is None:
        content = gpt2["bare"].read_bytes()[:5000]
    bad = tmp_path / name
    bad.write_bytes(content)
    _one_failure(convert(tmp_path, checkpoint=bad, base=gpt2.base, out=tmp_path / "out"), bad, words, tmp_path / "out")


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'PWNED'}",))


def test_a_pickle_payload_never_runs(gpt2: FsdpRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    torch.save({"model": torch.load(gpt2["bare"], weights_only=True), "hook": _RunsCode()}, evil)
    error = _one_failure(convert(tmp_path, checkpoint=evil, base=gpt2.base, out=tmp_path / "out"), evil,
                         "refuses: posix.system", tmp_path / "out")
    assert "convert.allowed_globals" in error
    assert not (tmp_path / "PWNED").exists()


_EVIL_MODULE = """
from pathlib import Path

class Hyper:
    # Unpickling an instance normally calls __setstate__: here it would leave a marker file.
    def __setstate__(self, state):
        Path(state["marker"]).touch()
"""


def test_trainer_objects_beside_the_weights_are_inert(
    gpt2: FsdpRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Hyper-parameters, numpy RNG state and argparse namespaces convert without allowed_globals; none of it runs."""
    import importlib
    import logging

    import numpy as np

    caplog.set_level(logging.INFO, logger="lmtk")
    (tmp_path / "evil_hparams.py").write_text(_EVIL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    hyper = importlib.import_module("evil_hparams").Hyper()
    hyper.marker = str(tmp_path / "PWNED")
    ckpt = tmp_path / "epoch=1-step=20.ckpt"
    torch.save({"state_dict": torch.load(gpt2["bare"], weights_only=True), "global_step": 20, "epoch": 1,
                "hyper_parameters": {"config": hyper, "args": argparse.Namespace(lr=0.1)},
                "rng": np.random.RandomState(0).get_state(), "seen": np.int64(5)}, ckpt)
    del sys.modules["evil_hparams"]
    [result] = convert(tmp_path, checkpoint=ckpt, base=gpt2.base, out=tmp_path / "out")
    assert result.status == "ok", result.error
    assert not (tmp_path / "PWNED").exists() and "evil_hparams" not in sys.modules
    assert "evil_hparams.Hyper" in caplog.text and "inert placeholders" in caplog.text
    assert (result.metadata["step"], result.metadata["epoch"]) == (20, 1)
    assert_matches_reference(tmp_path / "out" / "epoch=1-step=20", gpt2.reference)
    # Named in allowed_globals, a type is the real one again (and still converts).
    [result] = convert(tmp_path, checkpoint=ckpt, base=gpt2.base, out=tmp_path / "trusted",
                       overrides=("convert.allowed_globals=[argparse.Namespace]",))
    assert result.status == "ok", result.error


def test_a_payload_hidden_in_the_hyper_parameters_never_runs(
    gpt2: FsdpRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": torch.load(gpt2["bare"], weights_only=True),
                "hyper_parameters": {"lr": 0.1, "callbacks": [{"hook": _RunsCode()}]}}, ckpt)
    _one_failure(convert(tmp_path, checkpoint=ckpt, base=gpt2.base, out=tmp_path / "out"), ckpt,
                 "refuses: posix.system", tmp_path / "out")
    assert not (tmp_path / "PWNED").exists()


def test_a_pickled_object_where_a_tensor_must_be_is_one_line(gpt2: FsdpRun, tmp_path: Path) -> None:
    import numpy as np

    state = torch.load(gpt2["bare"], weights_only=True)
    state["transformer.wte.weight"] = state["transformer.wte.weight"].numpy()
    ckpt = tmp_path / "numpy-weights.pth"
    torch.save({"model": state}, ckpt)
    assert isinstance(state["transformer.wte.weight"], np.ndarray)
    _one_failure(convert(tmp_path, checkpoint=ckpt, base=gpt2.base, out=tmp_path / "out"), ckpt,
                 "transformer.wte.weight is a pickled numpy", tmp_path / "out")


def test_nan_weights_fail_or_warn(gpt2: FsdpRun, tmp_path: Path) -> None:
    sd = torch.load(gpt2["bare"], weights_only=True)
    sd["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    ckpt = tmp_path / "nan.pth"
    torch.save(sd, ckpt)
    _one_failure(convert(tmp_path, checkpoint=ckpt, base=gpt2.base, out=tmp_path / "out"), ckpt,
                 "transformer.h.0.mlp.c_fc.weight has 1 NaN/Inf values", tmp_path / "out")
    [result] = convert(tmp_path, checkpoint=ckpt, base=gpt2.base, out=tmp_path / "out",
                       overrides=("convert.nonfinite=warn",))
    assert result.status == "ok"


def test_unwritable_output_dir(gpt2: FsdpRun, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    [result] = convert(tmp_path, checkpoint=gpt2["bare"], base=gpt2.base, out=blocker / "out")
    assert result.status == "failed" and str(blocker) in result.error and "\n" not in result.error


def test_output_dir_inside_the_checkpoint_directory_is_refused(gpt2: FsdpRun, tmp_path: Path) -> None:
    batch = tmp_path / "ckpts"
    shutil.copytree(gpt2.checkpoints, batch)
    [result] = convert(tmp_path, checkpoint=batch, base=gpt2.base, out=batch / "converted")
    assert result.status == "failed" and "inside the checkpoint directory" in result.error
    assert not (batch / "converted").exists()


# -- reruns resume ------------------------------------------------------------------------------------

def test_rerun_skips_finished_work_and_reconverts_a_changed_source(gpt2: FsdpRun, tmp_path: Path) -> None:
    ckpt, out = tmp_path / "ckpt.pth", tmp_path / "out"
    shutil.copy(gpt2["bare"], ckpt)
    assert [r.status for r in convert(tmp_path, checkpoint=ckpt, base=gpt2.base, out=out)] == ["ok"]
    weights = out / "ckpt" / "model.safetensors"
    first = weights.stat().st_mtime_ns
    assert [r.status for r in convert(tmp_path, checkpoint=ckpt, base=gpt2.base, out=out)] == ["skipped"]
    assert weights.stat().st_mtime_ns == first  # left untouched
    os.utime(ckpt, ns=(time.time_ns(), time.time_ns()))  # the source changed
    assert [r.status for r in convert(tmp_path, checkpoint=ckpt, base=gpt2.base, out=out)] == ["ok"]
    second = weights.stat().st_mtime_ns
    assert second != first
    [forced] = convert(tmp_path, checkpoint=ckpt, base=gpt2.base, out=out, overrides=("convert.overwrite=true",))
    assert forced.status == "ok" and weights.stat().st_mtime_ns != second
    assert tree(out) == tree(out)  # stable listing
    assert sorted(p.name for p in out.iterdir()) == ["ckpt"]
    assert_matches_reference(out / "ckpt", gpt2.reference)


def test_checksum_fingerprint_sees_same_size_same_mtime_edits(gpt2: FsdpRun, tmp_path: Path) -> None:
    ckpt, out = tmp_path / "ckpt.pth", tmp_path / "out"
    shutil.copy(gpt2["bare"], ckpt)
    opts = ("convert.checksum=true",)
    assert [r.status for r in convert(tmp_path, checkpoint=ckpt, base=gpt2.base, out=out, overrides=opts)] == ["ok"]
    stat = ckpt.stat()
    other = torch.load(ckpt, weights_only=True)
    other["transformer.ln_f.bias"] += 1
    torch.save(other, ckpt)
    assert ckpt.stat().st_size == stat.st_size
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert [r.status for r in convert(tmp_path, checkpoint=ckpt, base=gpt2.base, out=out, overrides=opts)] == ["ok"]


# -- crashes: kill, disk full ---------------------------------------------------------------------------

def test_sigkill_mid_write_leaves_no_folder_and_the_rerun_finishes(big: tuple[Path, Path], tmp_path: Path) -> None:
    base, ckpt = big
    out = tmp_path / "out"
    args = [f"convert.checkpoint_path={ckpt}", f"convert.base_model={base}", f"convert.output_dir={out}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen([sys.executable, "-m", "lmtk", *args], cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        partial = [p for p in out.glob(".big.lmtk-tmp-*/model.safetensors")] if out.exists() else []
        if partial and partial[0].stat().st_size > 0:
            break
        assert proc.poll() is None, "conversion finished before it could be killed"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "big").exists()
    assert len(list(out.glob(".big.lmtk-tmp-*"))) == 1  # the killed run's temp folder

    done = run_lmtk(*args[:-1], f"hydra.run.dir={tmp_path / 'run2'}", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["big"]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_removes_the_temp_folder_and_the_batch_goes_on(gpt2: FsdpRun, tmp_path: Path) -> None:
    out = tmp_path / "small-disk"
    if not _mount_tmpfs(out, "320k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        batch = tmp_path / "batch"
        batch.mkdir()
        for name in ("a", "b", "c"):
            shutil.copy(gpt2["bare"], batch / f"{name}.pth")
        results = convert(tmp_path, checkpoint=batch, base=gpt2.base, out=out)
        assert [r.status for r in results] == ["ok", "failed", "failed"]  # c still ran
        for r in results[1:]:
            assert "No space left on device" in r.error and "\n" not in r.error
        assert sorted(os.listdir(out)) == ["a"]
        assert_matches_reference(out / "a", gpt2.reference)
    finally:
        subprocess.run(["umount", str(out)], check=False)


def test_read_only_inputs_convert(gpt2: FsdpRun, tmp_path: Path) -> None:
    """The checkpoints sit on a read-only mount (a user + mount namespace: no root needed)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    ro = tmp_path / "ro"
    shutil.copytree(gpt2.checkpoints, ro)
    script = (f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} && ! touch {ro}/x 2>/dev/null && "
              f"{sys.executable} -m lmtk convert.checkpoint_path={ro} convert.base_model={gpt2.base} "
              f"convert.output_dir={tmp_path / 'out'} hydra.run.dir={tmp_path / 'run'}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    if "unshare failed" in proc.stderr or "Operation not permitted" in proc.stderr:
        pytest.skip(f"no user namespaces here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for layout in ("bare", "wrapped", "prefixed", "ddp", "dcp", "ranks"):
        assert_matches_reference(tmp_path / "out" / layout, gpt2.reference)


# -- fuzzing: random and mutated bytes only ever give a clean, named failure --------------------------

def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    kind = rng.choice(["flip", "cut", "splice"])
    if kind == "flip":
        for _ in range(rng.randint(1, 20)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == "cut":
        del buf[rng.randrange(len(buf)):]
    else:
        start = rng.randrange(len(buf))
        buf[start:start + 64] = bytes(rng.randrange(256) for _ in range(64))
    return bytes(buf)


def _assert_clean(results: list, path: Path) -> None:
    [result] = results
    if result.status == "failed":
        assert result.error.startswith(str(path)), result.error
        assert "\n" not in result.error and "unexpected" not in result.error, result.error


def test_fuzzed_pth_files(gpt2: FsdpRun, tmp_path: Path) -> None:
    rng = random.Random(1234)
    good = gpt2["wrapped"].read_bytes()
    for i in range(60):
        ckpt = tmp_path / f"fuzz-{i}.pth"
        ckpt.write_bytes(_mutate(good, rng) if i % 4 else bytes(rng.randrange(256) for _ in range(rng.randint(1, 999))))
        _assert_clean(convert(tmp_path, checkpoint=ckpt, base=gpt2.base, out=tmp_path / f"out-{i}"), ckpt)


def test_fuzzed_dcp_metadata_and_shards(gpt2: FsdpRun, tmp_path: Path) -> None:
    rng = random.Random(4321)
    for i in range(60):
        folder = tmp_path / f"dcp-{i}"
        shutil.copytree(gpt2["dcp"], folder)
        target = folder / (".metadata" if i % 2 else "__0_0.distcp")
        target.write_bytes(_mutate(target.read_bytes(), rng))
        _assert_clean(convert(tmp_path, checkpoint=folder, base=gpt2.base, out=tmp_path / f"out-{i}"), folder)
