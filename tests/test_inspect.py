"""The ``lmtk`` command as installed: its help, and ``task=inspect``, the dry run that plans what a conversion does.

Every test runs the console script the package installs (beside this interpreter), as a user types it.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import FIXTURES, Convert, base_of, compose_config, summary_of, tree

LMTK = Path(sys.executable).parent / "lmtk"
STATUS_AFTER_CONVERSION = {"planned": "ok", "skipped": "skipped", "failed": "failed"}


def lmtk(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(LMTK), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def inspect(checkpoint_path: Path, *extra: str, work: Path, out: Path) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    proc = lmtk("task=inspect", f"convert.checkpoint_path={checkpoint_path}", f"convert.output_dir={out}",
                f"hydra.run.dir={work / 'inspect-run'}", *extra, cwd=work)
    return proc, summary_of(work / "inspect-run")


def test_help_says_what_lmtk_does_and_how_to_run_it(tmp_path: Path) -> None:
    proc = lmtk("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("lmtk turns PyTorch FSDP training checkpoints")
    assert "powered by Hydra" not in text and "== Config ==" not in text  # not Hydra's page, nor the raw dump
    for example in ("lmtk task=inspect convert.checkpoint_path=", "lmtk convert.checkpoint_path=/ckpts/epoch-001.pth",
                    "lmtk --multirun sweep=units", "lmtk --multirun hydra/launcher=convert_slurm sweep=units"):
        assert example in text
    assert "task: convert, inspect" in text and "outputs/<date>/<time>/" in text and "--shell-completion" in text
    # Every key the help explains is a real one.
    cfg = compose_config()
    for key in sorted(set(re.findall(r"^ +(convert\.\w+|verbose_level|task)=", text, flags=re.M))):
        node = cfg
        for part in key.split("."):
            assert hasattr(node, part), f"--help names {key}, which the config does not have"
            node = getattr(node, part)
    assert not list(tmp_path.iterdir())  # help runs nothing
    assert "Hydra (" in lmtk("--hydra-help", cwd=tmp_path).stdout  # Hydra's own help is still there


def test_the_lmtk_command_is_python_m_lmtk(tmp_path: Path) -> None:
    args = ("--cfg", "job", "task=inspect", "convert.dtype=bfloat16", "naming=hf")
    command = lmtk(*args, cwd=tmp_path)
    module = subprocess.run([sys.executable, "-m", "lmtk", *args], cwd=tmp_path, capture_output=True, text=True)
    assert command.returncode == module.returncode == 0, command.stderr
    assert command.stdout == module.stdout and "task: inspect" in command.stdout
    assert "complete -o nospace -o default -F hydra_bash_completion lmtk" in lmtk("-sc", "install=bash", cwd=tmp_path).stdout


# DCP with the step in trainer_state.json; verl's rank files with the model's own config; Lightning's DCP with
# meta.pt and "=" in its names; torchtitan's own tensor names mapped onto transformers'.
@pytest.mark.parametrize("name", ["hf_trainer_fsdp2_sharded", "verl", "lightning_fsdp_sharded", "torchtitan_llama3"])
def test_inspect_lists_what_the_conversion_then_does(converted: Convert, tmp_path: Path, name: str) -> None:
    with_base = name != "verl"
    proc, out, run_dir = converted(name, with_base=with_base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = summary_of(run_dir)
    base = [f"convert.base_model={base_of(name)}"] if with_base else []

    fresh = tmp_path / "out"
    shown, planned = inspect(FIXTURES / name / "run", *base, work=tmp_path, out=fresh)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert not fresh.exists()  # nothing written into output_dir
    assert [p["checkpoint"] for p in planned] == [r["checkpoint"] for r in done]
    for plan, result in zip(planned, done):
        record = json.loads((Path(result["output"]) / "conversion.json").read_text())
        assert STATUS_AFTER_CONVERSION[plan["status"]] == result["status"] == "ok"
        assert Path(plan["output"]).name == Path(result["output"]).name
        assert (plan["layout"], plan["metadata"]) == (result["layout"], result["metadata"])
        assert plan["bytes_to_write"] == result["bytes_written"] > 0
        assert (plan["naming"], plan["dtype"], plan["base_model"], plan["base_model_from"], plan["trainer"]) == (
            record["codebase_naming"], record["dtype"], record["base_model"], record["base_model_from"], record["trainer"])
        row = f"{planned.index(plan) + 1} +{re.escape(str(Path(plan['checkpoint']).relative_to(FIXTURES / name / 'run')))}"
        assert re.search(rf"^{row} .* convert$", shown.stdout, flags=re.M), shown.stdout
    assert f"{len(done)} to convert" in shown.stdout

    # Against the finished folders: every one would be skipped, and nothing there changes.
    before = {p: (out / p).stat().st_mtime_ns for p in tree(out)}
    (tmp_path / "again").mkdir()
    again, rerun = inspect(FIXTURES / name / "run", *base, work=tmp_path / "again", out=out)
    assert again.returncode == 0 and [r["status"] for r in rerun] == ["skipped"] * len(done)
    assert [r["naming"] for r in rerun] == [r["naming"] for r in planned]
    assert {p: (out / p).stat().st_mtime_ns for p in tree(out)} == before


def test_refusals_carry_the_conversions_own_error(tmp_path: Path) -> None:
    run = FIXTURES / "hf_trainer_fsdp2_sharded" / "run"
    batch, out = tmp_path / "batch", tmp_path / "out"
    batch.mkdir()
    (batch / "checkpoint-2").symlink_to(run / "checkpoint-2")
    (batch / "checkpoint-4").symlink_to(run / "checkpoint-4")
    (batch / "empty.pth").touch()
    (out / "checkpoint-2").mkdir(parents=True)  # a folder lmtk did not write: never replaced
    (out / "checkpoint-2" / "mine.txt").write_text("keep me")
    base = f"convert.base_model={FIXTURES / 'base'}"
    shown, planned = inspect(batch, base, work=tmp_path, out=out)
    assert shown.returncode == 1  # as the conversion will: some checkpoint fails
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    converted = lmtk("task=convert", f"convert.checkpoint_path={batch}", base, f"convert.output_dir={out}",
                     f"hydra.run.dir={tmp_path / 'convert-run'}", cwd=tmp_path)
    assert converted.returncode == 1
    log = converted.stdout + converted.stderr
    # One line as each checkpoint starts and one as it ends, with an ETA while some are left.
    assert f"[1/3] converting {batch / 'checkpoint-2' / 'pytorch_model_fsdp_0'} " in log
    assert re.search(rf"\[1/3\] failed {re.escape(str(out / 'checkpoint-2'))}: .*; ETA \d\d:\d\d for 2 more", log), log
    assert re.search(rf"\[2/3\] done {re.escape(str(out / 'checkpoint-4'))} in [\d.]+s, 141kB; ETA \d\d:\d\d for 1 more", log)
    assert re.search(r"\[3/3\] failed .*empty file \(0 bytes\)$", log, flags=re.M), log
    done = summary_of(tmp_path / "convert-run")
    assert [(Path(p["checkpoint"]).name, p["status"]) for p in planned] == [
        ("checkpoint-2", "failed"), ("checkpoint-4", "planned"), ("empty.pth", "failed")]
    assert [STATUS_AFTER_CONVERSION[p["status"]] for p in planned] == [r["status"] for r in done]
    assert [p["error"] for p in planned] == [r["error"] for r in done]
    assert "exists and was not written by lmtk" in planned[0]["error"] and "empty file (0 bytes)" in planned[2]["error"]
    assert planned[0]["error"] in shown.stdout and planned[2]["error"] in shown.stdout


def test_inspect_reads_no_dcp_data_file(tmp_path: Path) -> None:
    """Every ``.distcp`` byte zeroed, sizes kept: the plan comes from ``.metadata`` alone, so inspect still plans
    the checkpoint, while the conversion, which reads the chunks, fails on them. (Shortening the files would not
    do: DCP's reader checks their sizes against the metadata when it opens the checkpoint.)"""
    unit = tmp_path / "run" / "checkpoint-4"
    shutil.copytree(FIXTURES / "hf_trainer_fsdp2_sharded" / "run" / "checkpoint-4", unit)
    data = sorted((unit / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert data
    for file in data:
        file.write_bytes(bytes(file.stat().st_size))
    base = f"convert.base_model={FIXTURES / 'base'}"
    shown, [plan] = inspect(tmp_path / "run", base, work=tmp_path, out=tmp_path / "out")
    assert shown.returncode == 0 and plan["status"] == "planned", shown.stdout + shown.stderr[-2000:]
    converted = lmtk(f"convert.checkpoint_path={tmp_path / 'run'}", base, f"convert.output_dir={tmp_path / 'out'}",
                     f"hydra.run.dir={tmp_path / 'convert-run'}", cwd=tmp_path)
    [result] = summary_of(tmp_path / "convert-run")
    assert converted.returncode == 1 and result["status"] == "failed" and ".distcp" in result["error"], result


def _resident_bytes(path: Path) -> int:
    """How much of ``path`` is in the page cache (mincore over a fresh mapping): what anyone read of it since it
    was evicted, the kernel's readahead included."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
    with open(path, "rb") as f:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        try:
            assert libc.mincore(address, size, pages) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(address, size)
    return sum(b & 1 for b in pages.raw) * mmap.PAGESIZE


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and posix_fadvise as Linux has them")
@pytest.mark.parametrize("layout", ["full", "safetensors"])
def test_inspect_leaves_the_tensor_bytes_on_disk(tmp_path: Path, layout: str) -> None:
    """A ~60 MB checkpoint evicted from the page cache, then inspected: of its file, only what the kernel read for
    the headers (a .pth's pickle, zip directory and per-record headers; a safetensors JSON header) is cached after.
    A .pth is memory-mapped by torch.load(mmap=True): its tensor pages stay untouched."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmtk.synthetic import make_base_folder

    base = make_base_folder(tmp_path / "base", "gpt2", vocab_size=16000, n_embd=512, n_head=8)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    state = {k: torch.full(v.shape, 0.5, dtype=v.dtype) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    run = tmp_path / "run"
    run.mkdir()
    if layout == "full":
        file = run / "step-4.pth"
        torch.save(state, file)
    else:
        (run / "step-4").mkdir()
        file = run / "step-4" / "model.safetensors"
        save_file(state, file)
    _evict(file)
    if (left := _resident_bytes(file)) > file.stat().st_size // 100:
        pytest.skip(f"{left} bytes of {file} stay in the page cache after POSIX_FADV_DONTNEED (tmpfs?): nothing to measure")
    shown, [plan] = inspect(run, f"convert.base_model={base}", work=tmp_path, out=tmp_path / "out")
    assert shown.returncode == 0 and plan["status"] == "planned", shown.stdout + shown.stderr[-2000:]
    read, size = _resident_bytes(file), file.stat().st_size
    print(f"{layout}: {read} of {size} bytes in the page cache after inspect")
    assert read <= min(2 << 20, size // 20), f"{read} of {size} bytes of {file} were read"
    file.read_bytes()  # the measure sees reads: the whole file is cached now
    assert _resident_bytes(file) >= size - mmap.PAGESIZE


def _sparse_70b_run(root: Path) -> tuple[Path, Path]:
    """One HF Trainer checkpoint of Llama-3-70B's shapes (bf16, FSDP over 8 ranks, DCP): real ``.metadata`` from
    DCP's own classes, ``.distcp`` files of the sizes it names but sparse (no data written, a few MB on disk)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)

    hidden, inner, vocab, kv, world = 8192, 28672, 128256, 1024, 8
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inner, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
              "vocab_size": vocab, "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}
    (root / "base").mkdir(parents=True)
    (root / "base" / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for layer in range(80):
        at = f"model.layers.{layer}."
        shapes |= {at + "self_attn.q_proj.weight": (hidden, hidden), at + "self_attn.k_proj.weight": (kv, hidden),
                   at + "self_attn.v_proj.weight": (kv, hidden), at + "self_attn.o_proj.weight": (hidden, hidden),
                   at + "mlp.gate_proj.weight": (inner, hidden), at + "mlp.up_proj.weight": (inner, hidden),
                   at + "mlp.down_proj.weight": (hidden, inner), at + "input_layernorm.weight": (hidden,),
                   at + "post_attention_layernorm.weight": (hidden,)}
    model = root / "run" / "checkpoint-1000" / "pytorch_model_fsdp_0"
    model.mkdir(parents=True)
    (model.parent / "trainer_state.json").write_text(json.dumps({"global_step": 1000, "epoch": 1.0}))
    tensors, storage, ends = {}, {}, [0] * world
    for name, shape in shapes.items():
        rows, chunks = shape[0] // world, []
        for rank in range(world):
            offsets, sizes = torch.Size([rank * rows, *[0] * (len(shape) - 1)]), torch.Size([rows, *shape[1:]])
            chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
            length = sizes.numel() * 2 + 1024  # the chunk's bytes and its small archive around them
            storage[MetadataIndex(f"model.{name}", offsets)] = _StorageInfo(f"__{rank}_0.distcp", ends[rank], length)
            ends[rank] += length
        tensors[f"model.{name}"] = TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16), torch.Size(shape), chunks)
    (model / ".metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata=tensors, storage_data=storage)))
    for rank, end in enumerate(ends):
        with open(model / f"__{rank}_0.distcp", "wb") as f:
            f.truncate(end)
    return root / "run", root / "base"


def test_inspect_of_a_70b_shaped_checkpoint_takes_seconds(tmp_path: Path) -> None:
    run, base = _sparse_70b_run(tmp_path / "70b")
    started = time.perf_counter()
    shown, [plan] = inspect(run, f"convert.base_model={base}", work=tmp_path, out=tmp_path / "out")
    seconds = time.perf_counter() - started
    assert shown.returncode == 0 and plan["status"] == "planned", shown.stdout + shown.stderr[-2000:]
    assert plan["bytes_to_write"] == 141_107_412_992 and plan["tensors"] == 723 and plan["dtype"] == "bfloat16"
    assert plan["metadata"]["step"] == 1000
    print(f"inspect of a 70B-shaped checkpoint: {seconds:.1f}s")
    # Reading the 141 GB (zeros from sparse files) would take minutes; start-up and the plan take seconds.
    assert seconds < 90, seconds
