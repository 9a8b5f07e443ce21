"""torch's DCP HuggingFace layout (``HuggingFaceStorageWriter``): per-rank safetensors shards and consolidated weights.

The run directories in ``tests/trainers/torch_hf_*`` were written by torch's own writer under FSDP2 (2 ranks,
vocab 261 so the shards are uneven, two output files); the tests there convert them whole. Here: what each
form holds once converted, and broken sets, each one line naming the file, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from safetensors import safe_open

from helpers import FIXTURES, assert_logits, convert, reference_of, tree

BASE = FIXTURES / "base"


def _copy(form: str, tmp_path: Path, step: str = "step-4") -> Path:
    target = tmp_path / "broken" / step
    shutil.copytree(FIXTURES / f"torch_hf_{form}" / "run" / step, target)
    return target


def _one_line_failure(step: Path, tmp_path: Path, words: str) -> str:
    [result] = convert(tmp_path, checkpoint=step, base=BASE, out=tmp_path / "out")
    assert result.status == "failed", result
    assert words in result.error and "\n" not in result.error, result.error
    assert not (tmp_path / "out").exists() or tree(tmp_path / "out") == []
    return result.error


@pytest.mark.parametrize("form", ["sharded", "consolidated"])
def test_each_form_becomes_a_complete_folder(tmp_path: Path, form: str) -> None:
    [result] = convert(tmp_path, checkpoint=FIXTURES / f"torch_hf_{form}" / "run" / "step-4", base=BASE,
                       out=tmp_path / "out")
    assert (result.status, result.layout) == ("ok", "hf_shards" if form == "sharded" else "safetensors")
    folder = tmp_path / "out" / "step-4"
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md", "conversion.json"} <= set(tree(folder))
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"} and f.get_tensor("model.embed_tokens.weight").shape == (261, 32)
    assert result.metadata == {"step": 4, "progress_from": "name"}
    assert_logits(folder, reference_of(f"torch_hf_{form}"), "step-4")


def test_a_missing_ranks_files_are_named(tmp_path: Path) -> None:
    step = _copy("sharded", tmp_path)
    for name in ("shard-00001-model-00001-of-00002.safetensors", "shard-00001-model-00002-of-00002.safetensors"):
        (step / name).unlink()
    _one_line_failure(step, tmp_path, "incomplete sharded checkpoint: missing shard-00001-model-00001-of-00002"
                                      ".safetensors, shard-00001-model-00002-of-00002.safetensors")


def test_without_the_last_rank_the_shapes_disagree_with_the_architecture(tmp_path: Path) -> None:
    step = _copy("sharded", tmp_path)
    for name in ("shard-00002-model-00001-of-00002.safetensors", "shard-00002-model-00002-of-00002.safetensors"):
        (step / name).unlink()
    _one_line_failure(step, tmp_path, "wrong shapes: model.embed_tokens.weight [131, 32] != [261, 32]")


def test_a_truncated_shard_is_named(tmp_path: Path) -> None:
    step = _copy("sharded", tmp_path)
    shard = step / "shard-00002-model-00002-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    error = _one_line_failure(step, tmp_path, "truncated safetensors file")
    assert error.startswith(str(shard))


def _edit_header(file: Path, edit) -> None:
    """Rewrite a shard's JSON header (data untouched: its offsets are relative to the data start)."""
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + length :])


def test_overlapping_offsets_are_named(tmp_path: Path) -> None:
    step = _copy("sharded", tmp_path)
    shard = step / "shard-00002-model-00001-of-00002.safetensors"

    def overlap(header: dict) -> None:
        info = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])
        info["model.embed_tokens.weight"]["saved_offsets"] = [100, 0]
        header["__metadata__"]["DCP_SHARDING_INFO"] = json.dumps(info)

    _edit_header(shard, overlap)
    error = _one_line_failure(step, tmp_path, "model.embed_tokens.weight: its slice at [100, 0] overlaps the one at [0, 0]")
    assert error.startswith(str(shard))


def test_slices_of_different_dtypes_are_named(tmp_path: Path) -> None:
    step = _copy("sharded", tmp_path)

    def as_int32(header: dict) -> None:
        header["model.norm.weight"]["dtype"] = "I32"

    _edit_header(step / "shard-00002-model-00002-of-00002.safetensors", as_int32)
    _one_line_failure(step, tmp_path, "model.norm.weight: slices of different dtypes (float32, int32)")


def test_consolidated_weights_missing_a_file_are_named(tmp_path: Path) -> None:
    step = _copy("consolidated", tmp_path)
    (step / "model-00002-of-00002.safetensors").unlink()
    _one_line_failure(step, tmp_path, "the index names missing files model-00002-of-00002.safetensors")


def test_a_gap_between_slices_is_named(tmp_path: Path) -> None:
    step = _copy("sharded", tmp_path)

    def gap(header: dict) -> None:
        info = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])
        info["model.embed_tokens.weight"]["saved_offsets"] = [140, 0]
        header["__metadata__"]["DCP_SHARDING_INFO"] = json.dumps(info)

    _edit_header(step / "shard-00002-model-00001-of-00002.safetensors", gap)
    _one_line_failure(step, tmp_path, "model.embed_tokens.weight: the slices cover 8352 of 8640 elements of [270, 32]")
