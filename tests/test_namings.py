"""Other codebases' names (``conf/naming``): torchtitan and OLMo-core checkpoints, mapped as their own exporters map them.

The fixtures' reference logits come from the frameworks' own models; ``exported/`` holds what their own HF
exporters wrote from the same checkpoints (torchtitan's ``Llama3StateDictAdapter.to_hf``, OLMo-core's
``convert_state_to_hf``).
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FIXTURES, Convert, assert_logits, base_of, compose_config, convert, reference_of, run_lmtk
from lmtk.config import NamingConfig, Transform

CODEBASES = {
    "torchtitan_llama3": ("torchtitan_llama3", ["step-2", "step-4"]),
    "torchtitan_llama3_tied": ("torchtitan_llama3", ["step-2", "step-4"]),
    "olmo_core_olmo2": ("olmo_core_olmo2", ["step2", "step4"]),
    "olmo_core_llama": ("olmo_core_llama", ["step2", "step4"]),
    "torchtitan_qwen3_moe": ("torchtitan_qwen3", ["step-2", "step-4"]),
    "torchtitan_deepseek_v3": ("torchtitan_deepseek_v3", ["step-2", "step-4"]),
    "olmo_core_moe": ("olmo_core_moe", ["step2", "step4"]),
}


@pytest.mark.parametrize("fixture", sorted(CODEBASES))
def test_tensors_equal_what_the_frameworks_own_exporter_writes(converted: Convert, fixture: str) -> None:
    naming, units = CODEBASES[fixture]
    proc, out, _ = converted(fixture)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for unit in units:
        ours = load_file(out / unit / "model.safetensors")
        theirs = load_file(FIXTURES / fixture / "exported" / unit / "model.safetensors")
        assert sorted(ours) == sorted(theirs)
        unequal = [name for name in theirs if not torch.equal(ours[name], theirs[name])]
        assert not unequal, f"{unit}: differs from the framework's own export in {unequal}"
        record = json.loads((out / unit / "conversion.json").read_text())
        assert record["codebase_naming"] == naming
        kind = "hub" if fixture in MOE else "in-memory"  # per-expert tensors: what save_pretrained writes
        assert f"| names in the checkpoint | {naming} ({kind}) |" in (out / unit / "README.md").read_text()


MOE = ("torchtitan_qwen3_moe", "torchtitan_deepseek_v3", "olmo_core_moe")


@pytest.mark.parametrize("fixture", MOE)
def test_moe_logits_equal_the_codebases_own_model(converted: Convert, fixture: str) -> None:
    proc, out, _ = converted(fixture)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = reference_of(fixture)
    for unit in CODEBASES[fixture][1]:
        scale = reference["logits"][unit].abs().max().item()
        assert_logits(out / unit, reference, unit, atol=1e-4 * scale)


def test_the_deepseek_routing_bias_is_kept(converted: Convert) -> None:
    _, out, _ = converted("torchtitan_deepseek_v3")
    ours = load_file(out / "step-4" / "model.safetensors")
    bias = ours["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.abs().max() > 0  # trained: zeroing it changes the step-4 logits by 5e-2


def _naming_without_split(tmp_path: Path, name: str) -> Path:
    """A user's naming group entry: a shipped MoE naming with its expert split left out."""
    conf = tmp_path / "conf" / "naming"
    conf.mkdir(parents=True)
    text = (Path(__file__).parents[1] / "conf" / "naming" / f"{name}.yaml").read_text()
    text = text.replace(f"# @package namings.{name}", "# @package namings.no_split")
    kept = [block for block in text.split("\n") if block]
    cut, inside = [], False
    for line in kept:  # drop the split: block and its indented lines
        if line.startswith("split:"):
            inside = True
            continue
        if inside and (line.startswith(" ") or not line.strip()):
            continue
        inside = False
        cut.append(line)
    (conf / "no_split.yaml").write_text("\n".join(cut) + "\n")
    return tmp_path / "conf"


def test_leaving_out_the_expert_split_fails_naming_the_experts(tmp_path: Path) -> None:
    fixture = "torchtitan_qwen3_moe"
    proc = run_lmtk(f"hydra.searchpath=[file://{_naming_without_split(tmp_path, 'torchtitan_qwen3')}]",
                    "naming=no_split", f"convert.checkpoint_path={FIXTURES / fixture / 'run'}",
                    f"convert.base_model={base_of(fixture)}", f"convert.output_dir={tmp_path / 'out'}",
                    f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 1
    results = json.loads((tmp_path / "run" / "summary.json").read_text())["results"]
    for r in results:
        assert "missing keys: model.layers.0.mlp.experts." in r["error"], r["error"]
        assert "unexpected keys: layers.0.moe.routed_experts.inner_experts.w1_EFD" in r["error"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("fixture,field,count", [("torchtitan_qwen3_moe", "num_local_experts", 3),
                                                 ("olmo_core_moe", "num_experts", 8)])
def test_a_wrong_expert_count_is_one_line_naming_the_tensor(tmp_path: Path, fixture: str, field: str,
                                                             count: int) -> None:
    base = tmp_path / "base"
    shutil.copytree(base_of(fixture), base)
    config = json.loads((base / "config.json").read_text())
    config[field] = count
    (base / "config.json").write_text(json.dumps(config))
    naming = CODEBASES[fixture][0]
    [result, _] = convert(tmp_path, checkpoint=FIXTURES / fixture / "run", base=base, out=tmp_path / "out",
                          overrides=(f"naming={naming}",))
    assert result.status == "failed" and "\n" not in result.error
    stack = "layers.0.moe.routed_experts.inner_experts.w1_EFD [4, 16, 32] is not a stack of 3 experts" \
        if count == 3 else "blocks.0.feed_forward_moe.router.weight [128] does not reshape to [num_experts=8, hidden_size=32]"
    assert stack in result.error, result.error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _without_the_rotary_permutation(tmp_path: Path) -> Path:
    """A user's naming group entry: torchtitan's key map with its transforms left out."""
    conf = tmp_path / "conf" / "naming"
    conf.mkdir(parents=True)
    text = (Path(__file__).parents[1] / "conf" / "naming" / "torchtitan_llama3.yaml").read_text()
    text = text.replace("# @package namings.torchtitan_llama3", "# @package namings.no_rotary")
    (conf / "no_rotary.yaml").write_text(text.split("transforms:")[0] + "drop:\n  - freqs_cis\n")
    return tmp_path / "conf"


def test_leaving_out_the_rotary_permutation_fails_these_checks(tmp_path: Path) -> None:
    """The checks above catch a missing permutation: the folder loads and runs, and is wrong."""
    fixture = "torchtitan_llama3"
    out = tmp_path / "out"
    proc = run_lmtk(f"hydra.searchpath=[file://{_without_the_rotary_permutation(tmp_path)}]", "naming=no_rotary",
                    f"convert.checkpoint_path={FIXTURES / fixture / 'run'}", f"convert.base_model={base_of(fixture)}",
                    f"convert.output_dir={out}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = reference_of(fixture)
    for unit in ("step-2", "step-4"):
        with pytest.raises(AssertionError, match="logits differ"):
            assert_logits(out / unit, reference, unit)
        ours = load_file(out / unit / "model.safetensors")
        theirs = load_file(FIXTURES / fixture / "exported" / unit / "model.safetensors")
        assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], theirs["model.layers.0.self_attn.q_proj.weight"])
        assert torch.equal(ours["model.layers.0.self_attn.v_proj.weight"], theirs["model.layers.0.self_attn.v_proj.weight"])


def test_a_naming_can_be_pinned_and_a_wrong_pin_is_one_line(gpt2, tmp_path: Path) -> None:
    fixture = "olmo_core_olmo2"
    results = convert(tmp_path, checkpoint=FIXTURES / fixture / "run" / "step2", base=base_of(fixture),
                      out=tmp_path / "out", overrides=("naming=olmo_core_olmo2",))
    assert [r.status for r in results] == ["ok"]
    assert_logits(tmp_path / "out" / "step2", reference_of(fixture), "step2")
    # The Llama-like block's names onto an OLMo 2 model: refused before anything is written.
    [result] = convert(tmp_path, checkpoint=FIXTURES / fixture / "run" / "step4", base=base_of(fixture),
                       out=tmp_path / "out", overrides=("naming=olmo_core_llama",))
    assert result.status == "failed" and "\n" not in result.error
    assert result.error.endswith("the pinned naming(s) olmo_core_llama map onto LlamaForCausalLM, but the base config "
                                 "is a Olmo2ForCausalLM")
    # torchtitan's names pinned on an HF checkpoint: the plan says what does not match.
    [result] = convert(tmp_path, checkpoint=gpt2["bare"], base=base_of("torchtitan_llama3"), out=tmp_path / "out",
                       overrides=("naming=torchtitan_llama3",))
    assert result.status == "failed" and "does not match LlamaForCausalLM" in result.error
    assert not (tmp_path / "out" / "bare").exists() and not (tmp_path / "out" / "step4").exists()


def test_verify_says_what_it_cannot_check_for_a_mapped_naming(tmp_path: Path) -> None:
    fixture = "torchtitan_llama3"
    [result, _] = convert(tmp_path, checkpoint=FIXTURES / fixture / "run", base=base_of(fixture), out=tmp_path / "out",
                          overrides=("convert.verify=true",))
    assert result.verify["passed"] is True
    assert "checks the writing, not the mapping itself" in result.verify["reference"]
    record = json.loads((tmp_path / "out" / "step-2" / "conversion.json").read_text())
    assert record["verify"] == result.verify


def test_every_shipped_naming_is_typed_and_detection_tries_them_all() -> None:
    cfg = compose_config()
    assert sorted(cfg.namings) == ["hf", "olmo_core_llama", "olmo_core_moe", "olmo_core_olmo2", "torchtitan_deepseek_v3",
                                   "torchtitan_llama3", "torchtitan_qwen3"]
    assert all(isinstance(n, NamingConfig) for n in cfg.namings.values())
    rotary = cfg.namings["torchtitan_llama3"].transforms
    assert {t.kind for t in rotary.values()} == {Transform.rotary_half_split}
    assert sorted(compose_config("naming=torchtitan_llama3").namings) == ["torchtitan_llama3"]


@pytest.mark.parametrize("module", ["olmo_core.distributed.checkpoint.filesystem", "olmo_core.evil"])
def test_olmo_core_metadata_is_accepted_by_name_and_shape_only(tmp_path: Path, module: str) -> None:
    """Its _StorageInfo is read without olmo_core; another class, or other fields, are refused."""

    class _Info:
        def __init__(self, **fields: object) -> None:
            self.__dict__.update(fields)

    _Info.__module__, _Info.__qualname__ = module, "_StorageInfo"
    folder = tmp_path / "dcp"
    shutil.copytree(FIXTURES / "olmo_core_llama" / "run" / "step2" / "model_and_optim", folder)

    class _Swap(pickle.Unpickler):
        def find_class(self, mod: str, name: str) -> object:
            return _Info if name == "_StorageInfo" else super().find_class(mod, name)

    metadata = _Swap(open(folder / ".metadata", "rb")).load()
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first] = _Info(relative_path="__0_0.distcp", offset=0, length=10, code="os.system")
    # Stand-in modules, only so pickle can name the class while writing; removed right after.
    parts = module.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for name in names:
        sys.modules[name] = type(sys)(name)
    sys.modules[module]._StorageInfo = _Info
    try:
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    finally:
        for name in names:
            del sys.modules[name]
    [result] = convert(tmp_path, checkpoint=folder, base=base_of("olmo_core_llama"), out=tmp_path / "out")
    assert result.status == "failed" and "\n" not in result.error
    expected = "not DCP's (relative_path, offset, length)" if module.endswith("filesystem") else \
        f"{module}._StorageInfo is not a DCP metadata type"
    assert expected in result.error and result.error.startswith(str(folder / ".metadata"))
    assert not any(m.startswith("olmo_core") for m in sys.modules)
