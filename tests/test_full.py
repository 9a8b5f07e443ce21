"""Full state dict files from a real FSDP2 run -> HF folders that load and give the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import FsdpRun, assert_matches_reference, convert, summary_of, tree


@pytest.mark.parametrize("layout", ["bare", "wrapped", "prefixed", "ddp"])
def test_gpt2_full_state_dicts_convert_exactly(gpt2: FsdpRun, tmp_path: Path, layout: str) -> None:
    results = convert(tmp_path, checkpoint=gpt2[layout], base=gpt2.base, out=tmp_path / "out")
    assert [r.status for r in results] == ["ok"]
    folder = tmp_path / "out" / layout
    assert Path(results[0].output) == folder
    assert_matches_reference(folder, gpt2.reference)


def test_output_folder_is_complete(gpt2: FsdpRun, tmp_path: Path) -> None:
    convert(tmp_path, checkpoint=gpt2["wrapped"], base=gpt2.base, out=tmp_path / "out")
    folder = tmp_path / "out" / "wrapped"
    assert tree(folder) == sorted([
        "README.md", "config.json", "conversion.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json",
    ])
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["dtype"] == "float32"
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
    assert "lm_head.weight" not in names  # tied: written once, as the embedding
    assert "transformer.wte.weight" in names
    marker = json.loads((folder / "conversion.json").read_text())
    assert marker["location"] == "model"
    assert marker["metadata"] == {"epoch": 3, "step": 1200, "lr": 0.01, "progress_from": "checkpoint"}
    assert [p.name for p in tmp_path.joinpath("out").iterdir()] == ["wrapped"]  # no temp folder left


def test_untied_llama_keeps_its_head(llama: FsdpRun, tmp_path: Path) -> None:
    convert(tmp_path, checkpoint=llama["bare"], base=llama.base, out=tmp_path / "out")
    folder = tmp_path / "out" / "bare"
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in f.keys()
        assert not any("rotary" in k for k in f.keys())
    assert_matches_reference(folder, llama.reference)


def test_llama_prefixed_keys(llama: FsdpRun, tmp_path: Path) -> None:
    convert(tmp_path, checkpoint=llama["prefixed"], base=llama.base, out=tmp_path / "out")
    assert_matches_reference(tmp_path / "out" / "prefixed", llama.reference)


def test_sharded_output_has_an_index(gpt2: FsdpRun, tmp_path: Path) -> None:
    convert(tmp_path, checkpoint=gpt2["bare"], base=gpt2.base, out=tmp_path / "out",
            overrides=("convert.max_shard_size=40KB",))
    folder = tmp_path / "out" / "bare"
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not (folder / "model.safetensors").exists()
    assert_matches_reference(folder, gpt2.reference)


@pytest.mark.parametrize("layout", ["bare", "dcp", "ranks"])
def test_parallel_shard_writers_write_the_same_files(llama: FsdpRun, tmp_path: Path, layout: str) -> None:
    """convert.write_workers=3 writes each shard file as one writer does, byte for byte."""
    folders = {}
    for workers in (1, 3):
        [result] = convert(tmp_path, checkpoint=llama[layout], base=llama.base, out=tmp_path / f"out{workers}",
                           overrides=("convert.max_shard_size=20KB", f"convert.write_workers={workers}"))
        assert result.status == "ok", result.error
        folders[workers] = tmp_path / f"out{workers}" / layout
    shards = sorted(p.name for p in folders[1].glob("model-*.safetensors"))
    assert len(shards) > 3
    for name in [*shards, "model.safetensors.index.json"]:
        assert (folders[1] / name).read_bytes() == (folders[3] / name).read_bytes(), name
    assert_matches_reference(folders[3], llama.reference)


def test_no_writers_is_refused(gpt2: FsdpRun, tmp_path: Path) -> None:
    [result] = convert(tmp_path, checkpoint=gpt2["bare"], base=gpt2.base, out=tmp_path / "out",
                       overrides=("convert.write_workers=0",))
    assert result.status == "failed" and result.error == "convert.write_workers: must be 1 or more, not 0"


def test_tied_copy_that_differs_is_refused(gpt2: FsdpRun, tmp_path: Path) -> None:
    sd = torch.load(gpt2["bare"], weights_only=True)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    bad = tmp_path / "untied.pth"
    torch.save(sd, bad)
    [result] = convert(tmp_path, checkpoint=bad, base=gpt2.base, out=tmp_path / "out")
    assert result.status == "failed"
    assert str(bad) in result.error and "lm_head.weight differs" in result.error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda sd: sd.pop("transformer.h.1.mlp.c_fc.weight"), "missing keys: transformer.h.1.mlp.c_fc.weight"),
        (lambda sd: sd.__setitem__("extra.weight", torch.zeros(2)), "unexpected keys: extra.weight"),
        (lambda sd: sd.__setitem__("transformer.wpe.weight", torch.zeros(3, 32)), "wrong shapes: transformer.wpe.weight"),
    ],
)
def test_key_problems_fail_before_writing(gpt2: FsdpRun, tmp_path: Path, edit, words: str) -> None:
    sd = torch.load(gpt2["bare"], weights_only=True)
    edit(sd)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    [result] = convert(tmp_path, checkpoint=bad, base=gpt2.base, out=tmp_path / "out")
    assert result.status == "failed" and words in result.error and result.error.startswith(str(bad))
    assert "\n" not in result.error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_directory_converts_each_file_and_survives_a_bad_one(gpt2: FsdpRun, tmp_path: Path) -> None:
    batch = tmp_path / "batch"
    batch.mkdir()
    for layout in ("bare", "wrapped"):
        (batch / f"{layout}.pth").symlink_to(gpt2[layout])
    (batch / "a-broken.pth").write_bytes(b"not a checkpoint")
    (batch / "notes.txt").write_text("not a checkpoint either")
    results = convert(tmp_path, checkpoint=batch, base=gpt2.base, out=tmp_path / "out")
    assert [(Path(r.checkpoint).name, r.status) for r in results] == [
        ("a-broken.pth", "failed"), ("bare.pth", "ok"), ("wrapped.pth", "ok")
    ]
    assert "a-broken.pth" in results[0].error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bare", "wrapped"]
    summary = summary_of(tmp_path)
    assert [r["status"] for r in summary] == ["failed", "ok", "ok"]
    assert summary[1]["output"] == str(tmp_path / "out" / "bare") and summary[1]["error"] is None


def test_a_folder_lmtk_did_not_write_is_never_replaced(gpt2: FsdpRun, tmp_path: Path) -> None:
    foreign = tmp_path / "out" / "bare"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("mine")
    [result] = convert(tmp_path, checkpoint=gpt2["bare"], base=gpt2.base, out=tmp_path / "out",
                       overrides=("convert.overwrite=true",))
    assert result.status == "failed" and "not written by lmtk" in result.error
    assert (foreign / "precious.txt").read_text() == "mine"


def test_base_without_tokenizer_warns_and_converts(gpt2: FsdpRun, tmp_path: Path, caplog) -> None:
    base = tmp_path / "config-only"
    base.mkdir()
    (base / "config.json").write_bytes((gpt2.base / "config.json").read_bytes())
    [result] = convert(tmp_path, checkpoint=gpt2["bare"], base=base, out=tmp_path / "out")
    assert result.status == "ok"
    assert "no tokenizer" in caplog.text
    assert_matches_reference(tmp_path / "out" / "bare", gpt2.reference)


def test_missing_base_model_says_how_to_fix_it(gpt2: FsdpRun, tmp_path: Path) -> None:
    [result] = convert(tmp_path, checkpoint=gpt2["bare"], base=Path("no-such-org/no-such-model"), out=tmp_path / "out")
    assert result.status == "failed" and "convert.base_model=" in result.error


def test_tied_model_saved_without_its_head(gpt2: FsdpRun, tmp_path: Path) -> None:
    sd = torch.load(gpt2["bare"], weights_only=True)
    del sd["lm_head.weight"]
    headless = tmp_path / "headless.pth"
    torch.save(sd, headless)
    [result] = convert(tmp_path, checkpoint=headless, base=gpt2.base, out=tmp_path / "out")
    assert result.status == "ok", result.error
    assert_matches_reference(tmp_path / "out" / "headless", gpt2.reference)


def test_rotary_buffers_in_a_checkpoint_are_dropped(llama: FsdpRun, tmp_path: Path) -> None:
    sd = torch.load(llama["bare"], weights_only=True)
    sd["model.rotary_emb.inv_freq"] = torch.ones(4)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # older transformers kept one per layer
    with_buffers = tmp_path / "buffers.pth"
    torch.save(sd, with_buffers)
    [result] = convert(tmp_path, checkpoint=with_buffers, base=llama.base, out=tmp_path / "out")
    assert result.status == "ok", result.error
    with safe_open(tmp_path / "out" / "buffers" / "model.safetensors", "pt") as f:
        assert not any("inv_freq" in k for k in f.keys())
    assert_matches_reference(tmp_path / "out" / "buffers", llama.reference)
