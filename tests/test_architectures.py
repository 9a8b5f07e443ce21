"""Every decoder and image-text-to-text architecture converts into exactly what save_pretrained writes, from every naming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_matches_reference, convert
from lmtk.synthetic import VLM_ZOO, ZOO, save_zoo

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# Vision-language models whose names changed in transformers 4.52: hub names are what older runs saved.
LEGACY_VLM = ("qwen2_vl", "qwen2_5_vl", "llava", "gemma3", "mllama", "paligemma")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every zoo architecture sharded by FSDP2 on 2 CPU processes, in one spawn."""
    return save_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def vlm_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every tiny image-text-to-text architecture sharded by FSDP2 on 2 CPU processes, in one spawn."""
    return save_zoo(tmp_path_factory.mktemp("vlm-zoo"), VLM_ZOO)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _assert_same_as_save_pretrained(converted: Path, reference: Path) -> None:
    got, want = _weights(converted), _weights(reference)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("model_type", ZOO)
@pytest.mark.parametrize("layout", ["full.pth", "dcp"])
def test_fsdp_checkpoint_equals_save_pretrained(zoo: Path, tmp_path: Path, model_type: str, layout: str) -> None:
    root = zoo / model_type
    [result] = convert(tmp_path, checkpoint=root / layout, base=root / "base", out=tmp_path / "out")
    assert result.status == "ok", result.error
    folder = Path(result.output)
    _assert_same_as_save_pretrained(folder, root / "reference")
    assert_matches_reference(folder, root / "reference.pt")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == json.loads((root / "reference" / "config.json").read_text())["architectures"]


@pytest.mark.parametrize("model_type", MOE)
def test_hub_named_moe_checkpoint(zoo: Path, tmp_path: Path, model_type: str) -> None:
    root = zoo / model_type
    [result] = convert(tmp_path, checkpoint=root / "hub.pth", base=root / "base", out=tmp_path / "out")
    assert result.status == "ok", result.error
    _assert_same_as_save_pretrained(Path(result.output), root / "reference")
    assert_matches_reference(Path(result.output), root / "reference.pt")
    marker = json.loads((Path(result.output) / "conversion.json").read_text())
    assert marker["naming"] == "hub"


def test_moe_in_memory_names_are_detected(zoo: Path, tmp_path: Path) -> None:
    [result] = convert(tmp_path, checkpoint=zoo / "mixtral" / "full.pth", base=zoo / "mixtral" / "base",
                       out=tmp_path / "out")
    marker = json.loads((Path(result.output) / "conversion.json").read_text())
    assert marker["naming"] == "in-memory"
    names = _weights(Path(result.output))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in names
    assert not any("gate_up_proj" in n for n in names)


@pytest.mark.parametrize("model_type", VLM_ZOO)
@pytest.mark.parametrize("layout", ["full.pth", "dcp", "ranks"])
def test_vlm_fsdp_checkpoint_equals_save_pretrained(vlm_zoo: Path, tmp_path: Path, model_type: str, layout: str) -> None:
    root = vlm_zoo / model_type
    [result] = convert(tmp_path, checkpoint=root / layout, base=root / "base", out=tmp_path / "out")
    assert result.status == "ok", result.error
    folder = Path(result.output)
    _assert_same_as_save_pretrained(folder, root / "reference")
    assert_matches_reference(folder, root / "reference.pt")
    [architecture] = json.loads((root / "reference" / "config.json").read_text())["architectures"]
    assert json.loads((folder / "config.json").read_text())["architectures"] == [architecture]
    marker = json.loads((folder / "conversion.json").read_text())
    # GIT's config nests no text_config, and AutoModelForCausalLM maps it (GitForCausalLM) before the rest.
    auto = "AutoModelForCausalLM" if model_type == "git" else "AutoModelForImageTextToText"
    assert (marker["model_class"], marker["model_class_from"]) == (architecture, auto)


@pytest.mark.parametrize("model_type", LEGACY_VLM)
def test_vlm_checkpoint_with_pre_4_52_names(vlm_zoo: Path, tmp_path: Path, model_type: str) -> None:
    root = vlm_zoo / model_type
    [result] = convert(tmp_path, checkpoint=root / "hub.pth", base=root / "base", out=tmp_path / "out")
    assert result.status == "ok", result.error
    _assert_same_as_save_pretrained(Path(result.output), root / "reference")
    assert_matches_reference(Path(result.output), root / "reference.pt")
    assert json.loads((Path(result.output) / "conversion.json").read_text())["naming"] == "hub"


def test_the_model_class_comes_from_the_config_or_convert_model_class(vlm_zoo: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    config = json.loads((vlm_zoo / "llava" / "base" / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["LlavaForConditionalGeneration"]}))
    checkpoint = vlm_zoo / "llava" / "full.pth"
    [named] = convert(tmp_path, checkpoint=checkpoint, base=base, out=tmp_path / "named")
    marker = json.loads((Path(named.output) / "conversion.json").read_text())
    assert (marker["model_class"], marker["model_class_from"]) == ("LlavaForConditionalGeneration",
                                                                    "the config's architectures")
    [wrong] = convert(tmp_path, checkpoint=checkpoint, base=base, out=tmp_path / "wrong",
                      overrides=("convert.model_class=LlavaNextForConditionalGeneration",))
    assert wrong.status == "failed" and "LlavaNextForConditionalGeneration" in wrong.error
    [bogus] = convert(tmp_path, checkpoint=checkpoint, base=base, out=tmp_path / "bogus",
                      overrides=("convert.model_class=NoSuchModel",))
    assert bogus.status == "failed" and "convert.model_class=NoSuchModel is not a model class" in bogus.error
