"""LoRA checkpoints of peft's own PeftModel: merged (W + s·B·A) or written as an adapter folder, never guessed.

Each variant is a real PeftModel (peft's LoraConfig: Linear, GPT-2's Conv1D, embeddings, rsLoRA, DoRA,
modules_to_save, two adapters) with every adapter tensor moved off its init, saved the two ways trainers save it:
the whole PeftModel under its in-memory names, or only the adapter under peft's saved names. The trainers' own
runs are in tests/test_trainers_lora.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, convert, summary_of

VOCAB = 261
INPUT = torch.arange(24).reshape(2, 12) * 7 % VOCAB
TOKENIZER = REPO / "tests" / "trainers" / "base"

# name -> (family, LoraConfig fields, adapter names)
VARIANTS = {
    "llama": ("llama", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                            modules_to_save=["lm_head"]), ["default"]),
    "gpt2_conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
                    ["default"]),
    "embedding_rslora": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"], use_rslora=True),
                         ["default"]),
    "dora": ("llama", dict(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"], use_dora=True), ["default"]),
    "two_adapters": ("llama", dict(r=2, lora_alpha=4, target_modules=["k_proj"]), ["default", "other"]),
}


def _base_model(family: str, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        bos_token_id=0, eos_token_id=0))


def _make(root: Path, name: str, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    family, fields, adapters = VARIANTS[name]
    folder = root / name
    model = _base_model(family, seed)
    model.save_pretrained(folder / "base")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / file, folder / "base" / file)
    peft_model = get_peft_model(model, LoraConfig(**fields), adapter_name=adapters[0])
    for other in adapters[1:]:
        peft_model.add_adapter(other, LoraConfig(**fields))
    with torch.no_grad():  # as if trained: every factor (and magnitude, trained copy) off its init
        for param_name, param in peft_model.named_parameters():
            if any(s in param_name for s in ("lora_", "modules_to_save")):
                param.add_(torch.randn_like(param) * 0.2)
    peft_model.set_adapter(adapters[0])
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(input_ids=INPUT).logits
    torch.save({"input_ids": INPUT, "logits": logits}, folder / "reference.pt")
    peft_model.save_pretrained(folder / "exported", selected_adapters=[adapters[0]])
    record = json.loads((folder / "exported" / "adapter_config.json").read_text())
    for kind, state in (("whole", peft_model.state_dict()),
                        ("adapter", get_peft_model_state_dict(peft_model, adapter_name=adapters[0]))):
        (folder / kind).mkdir()
        torch.save({"model": {k: v.detach().clone() for k, v in state.items()}, "step": 10}, folder / kind / "step-10.pt")
        if len(adapters) == 1:  # the trainer's record of the settings, beside the checkpoint
            (folder / kind / "adapter_config.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="session")
def peft_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("peft")
    for seed, name in enumerate(VARIANTS):
        _make(root, name, seed)
    return root


def _logits_diff(folder: Path, reference: Path, *, adapter_of: Path | None = None) -> float:
    from transformers import AutoModelForCausalLM

    ref = torch.load(reference, weights_only=True)
    if adapter_of is None:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert not any(info.values()), info
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapter_of), folder)
    with torch.no_grad():
        return (model.eval()(input_ids=ref["input_ids"]).logits - ref["logits"]).abs().max().item()


@pytest.mark.parametrize("kind", ["whole", "adapter"])
@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "two_adapters"])
def test_merged_and_adapter_folders_give_the_trained_logits(peft_runs: Path, tmp_path: Path, name: str,
                                                            kind: str) -> None:
    run = peft_runs / name
    [merged] = convert(tmp_path / "m", checkpoint=run / kind / "step-10.pt", base=run / "base", out=tmp_path / "merged")
    assert merged.status == "ok", merged.error
    assert _logits_diff(Path(merged.output), run / "reference.pt") <= 1e-5
    record = json.loads((Path(merged.output) / "conversion.json").read_text())
    assert record["adapter"]["alpha_from"] == str(run / kind / "adapter_config.json")
    assert record["adapter"]["base_weights_from"] == ("the checkpoint" if kind == "whole" else str(run / "base"))
    [adapter] = convert(tmp_path / "p", checkpoint=run / kind / "step-10.pt", base=run / "base",
                        out=tmp_path / "peft", overrides=("convert.final_format=peft",))
    assert adapter.status == "ok", adapter.error
    folder = Path(adapter.output)
    assert _logits_diff(folder, run / "reference.pt", adapter_of=run / "base") <= 1e-5
    ours, theirs = load_file(folder / "adapter_model.safetensors"), load_file(run / "exported" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert [n for n in theirs if not torch.equal(ours[n], theirs[n])] == []
    config = json.loads((folder / "adapter_config.json").read_text())
    expected = json.loads((run / "exported" / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out"):
        assert config[key] == expected[key], key
    assert sorted(config["target_modules"]) == sorted(expected["target_modules"])
    assert config["modules_to_save"] == expected["modules_to_save"]
    assert config["base_model_name_or_path"] == str(run / "base")


def test_transformers_load_adapter_reads_the_folder(peft_runs: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run = peft_runs / "llama"
    [result] = convert(tmp_path, checkpoint=run / "adapter" / "step-10.pt", base=run / "base", out=tmp_path / "out",
                       overrides=("convert.final_format=peft",))
    model = AutoModelForCausalLM.from_pretrained(run / "base")
    model.load_adapter(result.output)
    ref = torch.load(run / "reference.pt", weights_only=True)
    with torch.no_grad():
        assert (model.eval()(input_ids=INPUT).logits - ref["logits"]).abs().max().item() <= 1e-5


def test_a_wrong_alpha_fails_the_logits_check(peft_runs: Path, tmp_path: Path) -> None:
    run = peft_runs / "llama"
    [result] = convert(tmp_path, checkpoint=run / "adapter" / "step-10.pt", base=run / "base", out=tmp_path / "out",
                       overrides=("convert.lora.alpha=4",))  # the record says 16: the user's value wins, and is wrong
    assert result.status == "ok"
    assert _logits_diff(Path(result.output), run / "reference.pt") > 1e-3
    assert json.loads((Path(result.output) / "conversion.json").read_text())["adapter"]["alpha_from"] == "convert.lora.alpha"


def _bare(run: Path, tmp_path: Path, kind: str = "adapter") -> Path:
    """The checkpoint alone, with no record of its settings beside it."""
    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copy(run / kind / "step-10.pt", folder / "step-10.pt")
    return folder / "step-10.pt"


def test_no_recorded_alpha_is_one_line_naming_the_key(peft_runs: Path, tmp_path: Path) -> None:
    run = peft_runs / "llama"
    checkpoint = _bare(run, tmp_path)
    [result] = convert(tmp_path, checkpoint=checkpoint, base=run / "base", out=tmp_path / "out")
    assert result.status == "failed" and "\n" not in result.error
    assert result.error.startswith(f"{checkpoint}: a LoRA checkpoint, but no lora_alpha is recorded")
    assert "convert.lora.alpha=ALPHA" in result.error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    [result] = convert(tmp_path, checkpoint=checkpoint, base=run / "base", out=tmp_path / "out",
                       overrides=("convert.lora.alpha=16",))
    assert result.status == "ok" and _logits_diff(Path(result.output), run / "reference.pt") <= 1e-5


def test_shapes_that_do_not_fit_are_one_line(peft_runs: Path, tmp_path: Path) -> None:
    run = peft_runs / "llama"
    saved = torch.load(run / "adapter" / "step-10.pt", weights_only=True)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    saved["model"][key] = torch.randn(4, 16)
    (tmp_path / "ckpt").mkdir()
    torch.save(saved, tmp_path / "ckpt" / "step-10.pt")
    [result] = convert(tmp_path, checkpoint=tmp_path / "ckpt" / "step-10.pt", base=run / "base", out=tmp_path / "out",
                       overrides=("convert.lora.alpha=16",))
    assert result.status == "failed" and "\n" not in result.error
    assert f"{key} [4, 16]" in result.error and "do not fit model.layers.0.self_attn.q_proj.weight [32, 32]" in result.error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_base_without_weights_is_one_line(peft_runs: Path, tmp_path: Path) -> None:
    run = peft_runs / "llama"
    base = tmp_path / "base"
    shutil.copytree(run / "base", base, ignore=shutil.ignore_patterns("*.safetensors"))
    [result] = convert(tmp_path, checkpoint=run / "adapter" / "step-10.pt", base=base, out=tmp_path / "out")
    assert result.status == "failed" and "\n" not in result.error
    assert result.error.startswith(f"{base}: the base model has no safetensors weights")
    # The whole PeftModel carries its base weights: no base weights needed.
    [result] = convert(tmp_path, checkpoint=run / "whole" / "step-10.pt", base=base, out=tmp_path / "out")
    assert result.status == "ok", result.error


def test_an_untrained_adapter_is_a_warning_everywhere(peft_runs: Path, tmp_path: Path) -> None:
    run = peft_runs / "llama"
    saved = torch.load(run / "adapter" / "step-10.pt", weights_only=True)
    saved["model"] = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in saved["model"].items()}
    (tmp_path / "ckpt").mkdir()
    torch.save(saved, tmp_path / "ckpt" / "step-10.pt")
    shutil.copy(run / "adapter" / "adapter_config.json", tmp_path / "ckpt")
    [result] = convert(tmp_path / "run", checkpoint=tmp_path / "ckpt" / "step-10.pt", base=run / "base",
                       out=tmp_path / "out")
    assert result.status == "ok"
    [warning] = result.warnings
    assert warning.startswith("every lora_B is exactly zero at step 10")
    assert summary_of(tmp_path / "run")[0]["warnings"] == [warning]
    assert json.loads((Path(result.output) / "conversion.json").read_text())["warnings"] == [warning]
    assert warning in (Path(result.output) / "README.md").read_text()


def test_several_adapters_are_chosen_never_guessed(peft_runs: Path, tmp_path: Path) -> None:
    run = peft_runs / "two_adapters"
    checkpoint = run / "whole" / "step-10.pt"
    [result] = convert(tmp_path, checkpoint=checkpoint, base=run / "base", out=tmp_path / "out",
                       overrides=("convert.lora.alpha=4",))
    assert result.status == "failed" and "\n" not in result.error
    assert result.error == (f"{checkpoint}: holds 2 LoRA adapters (default, other); choose one with "
                            "convert.lora.adapter_name=NAME")
    [result] = convert(tmp_path, checkpoint=checkpoint, base=run / "base", out=tmp_path / "out",
                       overrides=("convert.lora.alpha=4", "convert.lora.adapter_name=default"))
    assert result.status == "ok", result.error
    assert _logits_diff(Path(result.output), run / "reference.pt") <= 1e-5


def test_an_adapter_folder_from_a_checkpoint_without_lora_is_one_line(peft_runs: Path, tmp_path: Path) -> None:
    run = peft_runs / "llama"
    from safetensors.torch import load_file as load

    (tmp_path / "plain").mkdir()
    torch.save(load(run / "base" / "model.safetensors"), tmp_path / "plain" / "step-1.pt")
    [result] = convert(tmp_path, checkpoint=tmp_path / "plain" / "step-1.pt", base=run / "base", out=tmp_path / "out",
                       overrides=("convert.final_format=peft",))
    assert result.status == "failed" and "\n" not in result.error
    assert "convert.final_format=peft writes a LoRA adapter, but this checkpoint holds no lora_A / lora_B" in result.error


def test_verify_checks_a_merged_adapter(peft_runs: Path, tmp_path: Path) -> None:
    run = peft_runs / "gpt2_conv1d"
    [result] = convert(tmp_path, checkpoint=run / "adapter" / "step-10.pt", base=run / "base", out=tmp_path / "out",
                       overrides=("convert.verify=true",))
    assert result.status == "ok", result.error
    assert result.verify["passed"] is True
