"""Vision-language training runs written by the trainers' own save code (``tests/trainers/vlm_*``).

One command converts each run; the folders hold what save_pretrained writes (tensor for tensor), give the
trained model's logits on an image + text input, and carry the base's processor files. AutoProcessor
itself needs PIL and torchvision (whose wheel for torch 2.13 is a CUDA build that fails to import on CPU
torch), which lmtk does not depend on: the processor files are compared with the base's byte for byte,
AutoTokenizer loads them, and AutoProcessor is run where PIL and torchvision import.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FIXTURES, Convert, logits_of, reference_of, summary_of

RUNS = ("vlm_hf_trainer_qwen2_5_vl", "vlm_hf_trainer_llava", "vlm_hf_trainer_gemma3", "vlm_verl_qwen2_5_vl")
# Runs whose checkpoints carry the model's HF config and processor (verl's actor/huggingface, FULL_STATE_DICT).
OWN_CONFIG = ("vlm_verl_qwen2_5_vl", "vlm_hf_trainer_gemma3")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.json", "tokenizer_config.json")


def _processor_source(name: str, unit: str, *, with_base: bool) -> Path:
    """Where the output's processor files come from: convert.base_model, else the checkpoint's own."""
    if with_base:
        return FIXTURES / name / "base"
    [unit_dir] = (FIXTURES / name / "run").rglob(unit)
    return unit_dir / "actor" / "huggingface" if name == "vlm_verl_qwen2_5_vl" else unit_dir


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("name", RUNS)
def test_one_command_converts_every_checkpoint_of_a_vlm_run(converted: Convert, name: str, with_base: bool) -> None:
    if not with_base and name not in OWN_CONFIG:
        pytest.skip("the run carries no HF config: convert.base_model is needed")
    proc, out, run_dir = converted(name, with_base=with_base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = reference_of(name)
    assert sorted(p.name for p in out.iterdir()) == sorted(reference["logits"])
    results = {Path(r["output"]).name: r for r in summary_of(run_dir)}
    for unit, step in reference["steps"].items():
        folder = out / unit
        assert results[unit]["status"] == "ok" and results[unit]["metadata"]["step"] == step
        image = (logits_of(folder, **reference["inputs"]) - reference["logits"][unit]).abs().max().item()
        text = (logits_of(folder, reference["input_ids"]) - reference["text_logits"][unit]).abs().max().item()
        assert image <= 1e-5 and text <= 1e-5, (unit, image, text)
        saved = FIXTURES / name / "save_pretrained" / unit
        if saved.is_dir():
            got, want = load_file(folder / "model.safetensors"), load_file(saved / "model.safetensors")
            assert sorted(got) == sorted(want)
            assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in want.items())
            architectures = json.loads((saved / "config.json").read_text())["architectures"]
            assert json.loads((folder / "config.json").read_text())["architectures"] == architectures
        assert "pipeline_tag: image-text-to-text" in (folder / "README.md").read_text()
        source = _processor_source(name, unit, with_base=with_base)
        for file in PROCESSOR_FILES:
            assert (folder / file).is_file() == (source / file).is_file(), file
            if (source / file).is_file():
                assert (folder / file).read_bytes() == (source / file).read_bytes(), file


@pytest.mark.parametrize("name", RUNS)
def test_the_processor_loads_from_the_output(converted: Convert, name: str) -> None:
    from transformers import AutoTokenizer

    _, out, _ = converted(name)
    folder = next(out.iterdir())
    processor = json.loads((folder / "processor_config.json").read_text())
    assert processor["processor_class"].endswith("Processor") and "image_processor" in processor
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("a b")["input_ids"]
    pytest.importorskip("PIL", reason="AutoProcessor needs PIL")
    pytest.importorskip("torchvision", reason="AutoProcessor needs torchvision", exc_type=ImportError)
    from transformers import AutoProcessor

    assert type(AutoProcessor.from_pretrained(folder)).__name__ == processor["processor_class"]


def test_verify_passes_on_a_vlm_and_says_its_input_is_text_only(converted: Convert, tmp_path: Path) -> None:
    from helpers import convert

    name = "vlm_hf_trainer_qwen2_5_vl"
    [result] = convert(tmp_path, checkpoint=FIXTURES / name / "run" / "checkpoint-4", base=FIXTURES / name / "base",
                       out=tmp_path / "out", overrides=("convert.verify=true",))
    assert result.status == "ok", result.error
    assert result.verify["passed"] is True and result.verify["max_abs_diff"] < 1e-5
    assert result.verify["input"].startswith("32 text tokens, no image")
    marker = json.loads((Path(result.output) / "conversion.json").read_text())
    assert (marker["model_class"], marker["model_class_from"]) == ("Qwen2_5_VLForConditionalGeneration",
                                                                    "the config's architectures")


@pytest.mark.parametrize("name,text_class", [("vlm_hf_trainer_qwen2_5_vl", "Qwen2ForCausalLM"),
                                             ("vlm_hf_trainer_llava", "LlamaForCausalLM"),
                                             ("vlm_hf_trainer_gemma3", "Gemma3ForCausalLM")])
def test_text_only_writes_the_language_model_as_a_causal_lm(tmp_path: Path, name: str, text_class: str) -> None:
    from transformers import AutoModelForCausalLM

    from helpers import convert

    unit = "checkpoint-4"
    [result] = convert(tmp_path, checkpoint=FIXTURES / name / "run" / unit, base=FIXTURES / name / "base",
                       out=tmp_path / "out", overrides=("convert.text_only=true", "convert.verify=true"))
    assert result.status == "ok", result.error
    folder = Path(result.output)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [text_class] and "vision_config" not in config
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert type(model).__name__ == text_class and not any(info.values()), info
    reference = reference_of(name)
    with torch.no_grad():
        logits = model.eval()(input_ids=reference["input_ids"]).logits
    assert (logits - reference["text_logits"][unit]).abs().max().item() <= 1e-5
    marker = json.loads((folder / "conversion.json").read_text())
    vision = [k for k in marker["dropped"] if "vision" in k or "visual" in k]
    assert vision and not any("vision" in k or "visual" in k for k in load_file(folder / "model.safetensors"))
    assert not (folder / "processor_config.json").exists() and (folder / "tokenizer.json").is_file()
    assert "pipeline_tag: text-generation" in (folder / "README.md").read_text()
    assert result.verify["passed"] is True and "input" not in result.verify


def test_text_only_refuses_a_text_model(llama, tmp_path: Path) -> None:
    from helpers import convert

    [result] = convert(tmp_path, checkpoint=llama["bare"], base=llama.base, out=tmp_path / "out",
                       overrides=("convert.text_only=true",))
    assert result.status == "failed" and "nests no text_config" in result.error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
