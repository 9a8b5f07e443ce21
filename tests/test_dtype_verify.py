"""dtype policy, verification against the source, provenance and model card in every output."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import FsdpRun, convert, logits_of
from lmtk.verify import verify_folder

LAYOUTS = ["bare", "wrapped", "prefixed", "ddp", "dcp", "ranks", "pytorch_model_fsdp_0"]
TOLERANCE = {"bfloat16": 0.1, "float16": 0.02}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cast_outputs(fsdp: Callable[..., FsdpRun], tmp_path: Path, family: str, layout: str, dtype: str) -> None:
    run = fsdp(family)
    [result] = convert(tmp_path, checkpoint=run[layout], base=run.base, out=tmp_path / "out",
                       overrides=(f"convert.dtype={dtype}",))
    assert result.status == "ok", result.error
    folder = Path(result.output)
    assert json.loads((folder / "config.json").read_text())["dtype"] == dtype
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16" if dtype == "bfloat16" else "F16"}
    source = run[layout]
    source_bytes = source.stat().st_size if source.is_file() else sum(p.stat().st_size for p in source.rglob("*"))
    assert (folder / "model.safetensors").stat().st_size < 0.6 * source_bytes
    ref = torch.load(run.reference, weights_only=True)
    diff = (logits_of(folder, ref["input_ids"]).float() - ref["logits"]).abs().max().item()
    assert diff <= TOLERANCE[dtype] * max(1.0, ref["logits"].abs().max().item()), diff


def test_no_dtype_keeps_the_checkpoints_and_auto_follows_the_base_config(gpt2: FsdpRun, tmp_path: Path) -> None:
    [kept] = convert(tmp_path, checkpoint=gpt2["bare"], base=gpt2.base, out=tmp_path / "kept")
    assert json.loads((Path(kept.output) / "config.json").read_text())["dtype"] == "float32"
    base = tmp_path / "bf16-base"
    base.mkdir()
    for file in gpt2.base.iterdir():
        (base / file.name).write_bytes(file.read_bytes())
    config = json.loads((base / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (base / "config.json").write_text(json.dumps(config))
    [auto] = convert(tmp_path, checkpoint=gpt2["bare"], base=base, out=tmp_path / "auto",
                     overrides=("convert.dtype=auto",))
    assert json.loads((Path(auto.output) / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(Path(auto.output) / "model.safetensors").values()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_passes_on_good_output(llama: FsdpRun, tmp_path: Path, dtype: str) -> None:
    [result] = convert(tmp_path, checkpoint=llama["dcp"], base=llama.base, out=tmp_path / "out",
                       overrides=("convert.verify=true", f"convert.dtype={dtype}"))
    assert result.status == "ok", result.error
    assert result.verify["passed"] is True and result.verify["dtype"] == dtype
    assert result.verify["max_abs_diff"] <= result.verify["tolerance"]
    if dtype == "float32":
        assert result.verify["max_abs_diff"] < 1e-5
    marker = json.loads((Path(result.output) / "conversion.json").read_text())
    assert marker["verify"]["passed"] is True


def test_verify_fails_on_a_corrupted_output(gpt2: FsdpRun, tmp_path: Path) -> None:
    [result] = convert(tmp_path, checkpoint=gpt2["bare"], base=gpt2.base, out=tmp_path / "out")
    folder = Path(result.output)
    from transformers import AutoModelForCausalLM

    from lmtk.verify import fixed_input

    reference = AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=fixed_input(512)).logits.detach()
    assert verify_folder(folder, reference, params=1, max_params=10, label="test")["passed"] is True
    weights = load_file(folder / "model.safetensors")
    weights["transformer.h.0.attn.c_attn.weight"], weights["transformer.h.1.attn.c_attn.weight"] = (
        weights["transformer.h.1.attn.c_attn.weight"], weights["transformer.h.0.attn.c_attn.weight"])  # a mapping bug
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    outcome = verify_folder(folder, reference, params=1, max_params=10, label="test")
    assert outcome["passed"] is False and outcome["max_abs_diff"] > outcome["tolerance"]


def test_verify_skips_models_over_the_limit(gpt2: FsdpRun, tmp_path: Path) -> None:
    [result] = convert(tmp_path, checkpoint=gpt2["bare"], base=gpt2.base, out=tmp_path / "out",
                       overrides=("convert.verify=true", "convert.verify_max_params=1000"))
    assert result.status == "ok" and result.verify["passed"] is None and "verify_max_params" in result.verify["skipped"]


def test_provenance_and_model_card(gpt2: FsdpRun, tmp_path: Path) -> None:
    [result] = convert(tmp_path, checkpoint=gpt2["wrapped"], base=gpt2.base, out=tmp_path / "out",
                       overrides=("convert.dtype=bfloat16",))
    folder = Path(result.output)
    record = json.loads((folder / "conversion.json").read_text())
    assert record["source"] == str(gpt2["wrapped"].resolve()) and record["layout"] == "full"
    assert record["files"] == [{"path": str(gpt2["wrapped"].resolve()), "size": gpt2["wrapped"].stat().st_size}]
    assert record["metadata"] == {"epoch": 3, "step": 1200, "lr": 0.01, "progress_from": "checkpoint"}
    assert record["dtype"] == "bfloat16" and record["location"] == "model"
    assert record["dropped"] == ["lm_head.weight"] and record["renamed"] == {}
    assert record["lmtk_version"] and record["created"]
    card = (folder / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: transformers" in front and "pipeline_tag: text-generation" in front
    assert "epoch 3, step 1200" in body and "bfloat16" in body
