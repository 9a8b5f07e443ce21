"""Every layout, detected by itself: DCP directories and per-rank DTensor shards, whole and broken."""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from helpers import FsdpRun, assert_matches_reference, convert


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("layout", ["dcp", "ranks", "hf_shards"])
def test_sharded_layouts_convert_exactly(
    fsdp: Callable[..., FsdpRun], tmp_path: Path, family: str, world_size: int, layout: str
) -> None:
    run = fsdp(family, world_size=world_size)
    [result] = convert(tmp_path, checkpoint=run[layout], base=run.base, out=tmp_path / "out")
    assert (result.status, result.layout) == ("ok", layout), result.error
    assert_matches_reference(tmp_path / "out" / layout, run.reference)


def test_accelerate_sharded_save_converts(gpt2: FsdpRun, tmp_path: Path) -> None:
    [result] = convert(tmp_path, checkpoint=gpt2["pytorch_model_fsdp_0"], base=gpt2.base, out=tmp_path / "out")
    assert result.status == "ok"
    assert_matches_reference(tmp_path / "out" / "pytorch_model_fsdp_0", gpt2.reference)


def test_a_mixed_directory_converts_checkpoints_and_skips_the_rest(gpt2: FsdpRun, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(gpt2["wrapped"], mixed / "epoch-001.pth")
    shutil.copytree(gpt2["dcp"], mixed / "epoch-002")
    shutil.copytree(gpt2["ranks"], mixed / "epoch-003")
    shutil.copytree(gpt2.base, mixed / "hf-model")
    (mixed / "train.log").write_text("step 1 loss 3.2\n")
    (mixed / "args.json").write_text("{}")
    results = convert(tmp_path, checkpoint=mixed, base=gpt2.base, out=tmp_path / "out")
    assert [(Path(r.checkpoint).name, r.layout, r.status) for r in results] == [
        ("epoch-001.pth", "full", "ok"), ("epoch-002", "dcp", "ok"), ("epoch-003", "ranks", "ok"),
    ]
    for name in ("epoch-001", "epoch-002", "epoch-003"):
        assert_matches_reference(tmp_path / "out" / name, gpt2.reference)


def test_initial_format_pins_one_layout(gpt2: FsdpRun, tmp_path: Path) -> None:
    results = convert(tmp_path, checkpoint=gpt2.checkpoints, base=gpt2.base, out=tmp_path / "out",
                      overrides=("convert.initial_format=dcp",))
    assert [(Path(r.checkpoint).name, r.status) for r in results] == [("dcp", "ok"), ("pytorch_model_fsdp_0", "ok")]


def _broken_copy(run: FsdpRun, layout: str, tmp_path: Path) -> Path:
    target = tmp_path / "broken" / layout
    shutil.copytree(run[layout], target)
    return target


def _assert_failed_cleanly(results: list, words: str, tmp_path: Path) -> None:
    [result] = results
    assert result.status == "failed", result
    assert words in result.error, result.error
    assert "\n" not in result.error
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


def test_dcp_without_metadata(gpt2: FsdpRun, tmp_path: Path) -> None:
    broken = _broken_copy(gpt2, "dcp", tmp_path)
    (broken / ".metadata").unlink()
    _assert_failed_cleanly(convert(tmp_path, checkpoint=broken, base=gpt2.base, out=tmp_path / "out"),
                           "no .metadata", tmp_path)


def test_dcp_missing_a_shard_file(gpt2: FsdpRun, tmp_path: Path) -> None:
    broken = _broken_copy(gpt2, "dcp", tmp_path)
    (broken / "__1_0.distcp").unlink()
    _assert_failed_cleanly(convert(tmp_path, checkpoint=broken, base=gpt2.base, out=tmp_path / "out"),
                           "missing __1_0.distcp", tmp_path)


def test_dcp_truncated_shard_file(gpt2: FsdpRun, tmp_path: Path) -> None:
    broken = _broken_copy(gpt2, "dcp", tmp_path)
    shard = broken / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    _assert_failed_cleanly(convert(tmp_path, checkpoint=broken, base=gpt2.base, out=tmp_path / "out"),
                           "truncated DCP shard files: __0_0.distcp", tmp_path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_dcp_metadata_that_would_run_code_is_refused(gpt2: FsdpRun, tmp_path: Path) -> None:
    broken = _broken_copy(gpt2, "dcp", tmp_path)
    (broken / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    results = convert(tmp_path, checkpoint=broken, base=gpt2.base, out=tmp_path / "out")
    _assert_failed_cleanly(results, "posix.system is not a DCP metadata type", tmp_path)
    assert not Path("PWNED").exists() and not (broken / "PWNED").exists()


def test_rank_set_missing_a_rank(fsdp: Callable[..., FsdpRun], tmp_path: Path) -> None:
    run = fsdp("gpt2", world_size=3)
    broken = _broken_copy(run, "ranks", tmp_path)
    (broken / "model_world_size_3_rank_1.pt").unlink()
    _assert_failed_cleanly(convert(tmp_path, checkpoint=broken, base=run.base, out=tmp_path / "out"),
                           "missing model_world_size_3_rank_1.pt", tmp_path)


def test_rank_files_from_different_world_sizes(fsdp: Callable[..., FsdpRun], tmp_path: Path) -> None:
    two, three = fsdp("gpt2"), fsdp("gpt2", world_size=3)
    broken = _broken_copy(two, "ranks", tmp_path)
    shutil.copy(three["ranks"] / "model_world_size_3_rank_2.pt", broken)
    _assert_failed_cleanly(convert(tmp_path, checkpoint=broken, base=two.base, out=tmp_path / "out"),
                           "different world sizes [2, 3]", tmp_path)


def test_rank_files_from_different_runs(fsdp: Callable[..., FsdpRun], tmp_path: Path) -> None:
    gpt2, llama = fsdp("gpt2"), fsdp("llama")
    broken = _broken_copy(gpt2, "ranks", tmp_path)
    shutil.copy(llama["ranks"] / "model_world_size_2_rank_1.pt", broken)
    _assert_failed_cleanly(convert(tmp_path, checkpoint=broken, base=gpt2.base, out=tmp_path / "out"),
                           "model_world_size_2_rank_1.pt: holds other tensors", tmp_path)


def test_plain_tensors_in_every_rank_file_are_not_concatenated(gpt2: FsdpRun, tmp_path: Path) -> None:
    full = torch.load(gpt2["bare"], weights_only=True)
    ddp = tmp_path / "ddp-ranks"
    ddp.mkdir()
    for rank in range(2):
        torch.save(full, ddp / f"model_world_size_2_rank_{rank}.pt")
    [result] = convert(tmp_path, checkpoint=ddp, base=gpt2.base, out=tmp_path / "out")
    assert result.status == "ok", result.error
    assert_matches_reference(tmp_path / "out" / "ddp-ranks", gpt2.reference)


def test_fsdp1_local_state_dict_is_refused_with_advice(gpt2: FsdpRun, tmp_path: Path) -> None:
    flat = tmp_path / "local.pth"
    torch.save({"_fsdp_wrapped_module._flat_param": torch.zeros(100)}, flat)
    [result] = convert(tmp_path, checkpoint=flat, base=gpt2.base, out=tmp_path / "out")
    assert result.status == "failed"
    assert "LOCAL_STATE_DICT" in result.error and "SHARDED_STATE_DICT" in result.error


@pytest.mark.parametrize("layout", ["fsdp1_full", "fsdp1_dcp"])
def test_fsdp1_full_and_sharded_saves_convert_exactly(fsdp1: FsdpRun, tmp_path: Path, layout: str) -> None:
    [result] = convert(tmp_path, checkpoint=fsdp1[layout], base=fsdp1.base, out=tmp_path / "out")
    assert result.status == "ok", result.error
    assert_matches_reference(tmp_path / "out" / layout, fsdp1.reference)


@pytest.mark.parametrize("layout", ["fsdp1_local", "fsdp1_sharded_ranks"])
def test_fsdp1_per_rank_sharded_tensors_are_refused_with_advice(fsdp1: FsdpRun, tmp_path: Path, layout: str) -> None:
    [result] = convert(tmp_path, checkpoint=fsdp1[layout], base=fsdp1.base, out=tmp_path / "out")
    assert result.status == "failed" and "\n" not in result.error
    assert "ShardedTensor" in result.error and "dcp.save" in result.error and "FULL_STATE_DICT" in result.error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_one_rank_file_alone_says_to_convert_the_directory(gpt2: FsdpRun, tmp_path: Path) -> None:
    rank_file = gpt2["ranks"] / "model_world_size_2_rank_0.pt"
    [result] = convert(tmp_path, checkpoint=rank_file, base=gpt2.base, out=tmp_path / "out")
    assert result.status == "failed" and "one rank's file" in result.error, result.error


def test_an_hf_model_saved_at_the_top_of_a_dcp_checkpoint_keeps_every_tensor(llama: FsdpRun, tmp_path: Path) -> None:
    """``dcp.save(model.state_dict())``: ``model.*`` beside ``lm_head.weight`` is not a ``model`` root."""
    import torch.distributed.checkpoint as dcp

    dcp.save(torch.load(llama["bare"], weights_only=True), checkpoint_id=tmp_path / "top")
    [result] = convert(tmp_path, checkpoint=tmp_path / "top", base=llama.base, out=tmp_path / "out")
    assert result.status == "ok", result.error
    assert_matches_reference(tmp_path / "out" / "top", llama.reference)
