"""LoRA runs written by the trainers' own save code with peft (``tests/trainers/lora_*``): one command per run dir.

Each fixture holds the run as the trainer wrote it, the base model the adapter was trained on (``base/``, its
weights perturbed away from their init), the logits of the trained PEFT model at each saved step, and what
``PeftModel.save_pretrained`` writes for it (``exported/<unit>/``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FIXTURES, reference_of, run_lmtk, summary_of

# fixture -> overrides its run needs (accelerate records no lora_alpha anywhere)
RUNS = {
    "lora_hf_trainer_fsdp2_sharded": (),
    "lora_hf_trainer_fsdp2_full": (),
    "lora_hf_trainer_fsdp1_sharded": (),
    "lora_accelerate_fsdp2_sharded": ("convert.lora.alpha=16",),
    "lora_verl": (),
    "lora_verl_lora_only": (),
}
FORMATS = ("huggingface", "peft")


@pytest.fixture(scope="session")
def lora_converted(tmp_path_factory: pytest.TempPathFactory):
    done: dict[tuple[str, str], tuple[subprocess.CompletedProcess[str], Path, Path]] = {}

    def get(name: str, final_format: str) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
        if (name, final_format) not in done:
            work = tmp_path_factory.mktemp(f"{name}-{final_format}")
            proc = run_lmtk(f"convert.checkpoint_path={FIXTURES / name / 'run'}",
                            f"convert.base_model={FIXTURES / name / 'base'}", f"convert.final_format={final_format}",
                            f"convert.output_dir={work / 'out'}", f"hydra.run.dir={work / 'run'}", *RUNS[name], cwd=work)
            done[name, final_format] = proc, work / "out", work / "run"
        return done[name, final_format]

    return get


def _logits(folder: Path, input_ids: torch.Tensor, *, base: Path | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    if base is None:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert not any(info.values()), f"{folder}: {info}"
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


@pytest.mark.parametrize("final_format", FORMATS)
@pytest.mark.parametrize("name", sorted(RUNS))
def test_one_command_converts_every_lora_checkpoint(lora_converted, name: str, final_format: str) -> None:
    proc, out, run_dir = lora_converted(name, final_format)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = reference_of(name)
    assert sorted(p.name for p in out.iterdir()) == sorted(reference["logits"])
    results = {Path(r["output"]).name: r for r in summary_of(run_dir)}
    for unit in reference["logits"]:
        folder = out / unit
        assert results[unit]["status"] == "ok" and results[unit]["warnings"] == []
        base = FIXTURES / name / "base" if final_format == "peft" else None
        diff = (_logits(folder, reference["input_ids"], base=base) - reference["logits"][unit]).abs().max().item()
        assert diff <= 1e-5, f"{folder}: logits differ from the trained PEFT model's by {diff}"
        record = json.loads((folder / "conversion.json").read_text())
        assert record["adapter"]["kind"] == "lora" and record["adapter"]["lora_alpha"] == 16
        assert record["adapter"]["output"] == ("peft" if final_format == "peft" else "merged")
        if final_format == "peft":
            ours = load_file(folder / "adapter_model.safetensors")
            theirs = load_file(FIXTURES / name / "exported" / unit / "adapter_model.safetensors")
            assert sorted(ours) == sorted(theirs)
            assert [n for n in theirs if not torch.equal(ours[n], theirs[n])] == []


def test_a_merged_folder_is_never_the_base_model(lora_converted) -> None:
    _, out, _ = lora_converted("lora_hf_trainer_fsdp2_sharded", "huggingface")
    base = load_file(FIXTURES / "lora_hf_trainer_fsdp2_sharded" / "base" / "model.safetensors")
    merged = load_file(out / "checkpoint-4" / "model.safetensors")
    changed = [n for n in base if not torch.equal(base[n], merged[n])]
    assert sorted(changed) == sorted(n for n in base if n.endswith("_proj.weight"))


def test_the_wrong_alpha_fails_the_logits_check(tmp_path: Path) -> None:
    name = "lora_accelerate_fsdp2_sharded"
    proc = run_lmtk(f"convert.checkpoint_path={FIXTURES / name / 'run'}", f"convert.base_model={FIXTURES / name / 'base'}",
                    "convert.lora.alpha=4", f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = reference_of(name)
    unit = sorted(reference["logits"])[-1]
    diff = (_logits(tmp_path / "out" / unit, reference["input_ids"]) - reference["logits"][unit]).abs().max().item()
    assert diff > 1e-3


def test_a_sharded_trainer_checkpoint_without_its_run_needs_alpha(tmp_path: Path) -> None:
    """The Trainer records lora_alpha only in the run's adapter_config.json (save_model): alone, one line."""
    name = "lora_hf_trainer_fsdp2_sharded"
    checkpoint = tmp_path / "run" / "checkpoint-4"
    shutil.copytree(FIXTURES / name / "run" / "checkpoint-4", checkpoint)
    proc = run_lmtk(f"convert.checkpoint_path={checkpoint}", f"convert.base_model={FIXTURES / name / 'base'}",
                    f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    assert proc.returncode == 1
    [failed] = summary_of(tmp_path / "hydra")
    assert failed["error"].startswith(f"{checkpoint}: a LoRA checkpoint, but no lora_alpha is recorded")
    assert "convert.lora.alpha=ALPHA" in failed["error"] and "\n" not in failed["error"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_trainers_own_adapter_copy_that_disagrees_is_a_warning(tmp_path: Path) -> None:
    """FSDP2 + FULL_STATE_DICT may leave rank 0's slice in the Trainer's adapter_model.safetensors: the FSDP part wins."""
    from safetensors.torch import save_file

    name = "lora_hf_trainer_fsdp2_full"
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / name / "run", run)
    copy = run / "checkpoint-4" / "adapter_model.safetensors"
    tensors = load_file(copy)
    first = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[first] = tensors[first][:2].contiguous()  # half the rows, as one rank of two holds
    save_file(tensors, copy, metadata={"format": "pt"})
    proc = run_lmtk(f"convert.checkpoint_path={run}", f"convert.base_model={FIXTURES / name / 'base'}",
                    f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {Path(r["output"]).name: r for r in summary_of(tmp_path / "hydra")}
    assert results["checkpoint-2"]["warnings"] == []
    [warning] = results["checkpoint-4"]["warnings"]
    assert warning.startswith("the trainer's own adapter_model.safetensors differs from the FSDP part in 1 tensor(s)")
    assert first in warning and warning.endswith("converting the FSDP part")
    reference = reference_of(name)
    diff = (_logits(tmp_path / "out" / "checkpoint-4", reference["input_ids"])
            - reference["logits"]["checkpoint-4"]).abs().max().item()
    assert diff <= 1e-5


def test_an_empty_model_save_is_one_line_naming_the_cause(tmp_path: Path) -> None:
    """peft 0.21 + FSDP1 SHARDED_STATE_DICT: the model DCP lists no tensors (the optimizer's has them all)."""
    name = "lora_hf_trainer_fsdp1_sharded_peft021"
    proc = run_lmtk(f"convert.checkpoint_path={FIXTURES / name / 'run'}",
                    f"convert.base_model={FIXTURES / 'lora_hf_trainer_fsdp1_sharded' / 'base'}",
                    f"convert.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    assert proc.returncode == 1
    results = summary_of(tmp_path / "hydra")
    assert [r["status"] for r in results] == ["failed", "failed"]
    for r in results:
        model = Path(r["checkpoint"]) / "pytorch_model_fsdp_0"
        assert r["error"].startswith(f"{model}: holds no tensors at all: an empty save")
        assert "peft 0.21 with FSDP1 SHARDED_STATE_DICT" in r["error"] and "\n" not in r["error"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
