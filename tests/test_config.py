"""Config composition through Hydra's compose API: defaults, validation, presets."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from helpers import REPO, compose_config
from lmtk.config import FinalFormat, InitialFormat, LmtkConfig, Task


def test_defaults_compose_into_the_typed_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMTK_WORKSPACE", raising=False)
    cfg = compose_config()
    assert isinstance(cfg, LmtkConfig)
    assert cfg.task is Task.convert
    assert cfg.model.name_or_path == "gpt2"
    assert cfg.convert.base_model is None  # the checkpoint's own config, else the model group's
    assert cfg.convert.only is None
    assert cfg.convert.initial_format is InitialFormat.fsdp
    assert cfg.convert.final_format is FinalFormat.huggingface
    assert cfg.convert.checkpoint_path == "workspace/output"
    assert cfg.convert.output_dir == "workspace/converted"
    assert cfg.convert.max_shard_size == "5GB"


def test_workspace_root_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LMTK_WORKSPACE", str(tmp_path))
    cfg = compose_config()
    assert cfg.convert.checkpoint_path == f"{tmp_path}/output"
    assert cfg.convert.output_dir == f"{tmp_path}/converted"


def test_every_field_can_be_overridden() -> None:
    cfg = compose_config(
        "convert.checkpoint_path=/ckpt/a.pth", "convert.base_model=/models/base", "convert.output_dir=/out",
        "convert.initial_format=dcp", "convert.max_shard_size=100MB", "convert.overwrite=true", "verbose_level=2",
    )
    assert cfg.convert.checkpoint_path == "/ckpt/a.pth"
    assert cfg.convert.base_model == "/models/base"
    assert cfg.convert.initial_format is InitialFormat.dcp
    assert cfg.convert.overwrite is True and cfg.verbose_level == 2


def test_a_misspelt_key_names_the_key() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("convert.chekpoint_path=/x.pth")
    assert "chekpoint_path" in str(err.value.__cause__ or err.value)


def test_an_unknown_enum_value_lists_the_allowed_ones() -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_config("convert.final_format=onnx")
    text = str(err.value.__cause__ or err.value)
    assert "onnx" in text and "huggingface" in text


def test_a_wrong_type_is_refused() -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config("convert.overwrite=maybe")


def test_the_guide_preset_has_the_guide_values() -> None:
    cfg = compose_config("+experiment=convert_test/gpt-2_all_converted")
    assert cfg.experiment_name == "gpt2_fsdp_to_hf" and cfg.verbose_level == 2
    c = cfg.convert
    assert (c.base_model, c.checkpoint_path, c.output_dir) == ("gpt2", "/workspace/output", "/workspace/converted")
    assert c.initial_format is InitialFormat.fsdp and c.final_format is FinalFormat.huggingface


def test_the_example_preset_points_at_shipped_files() -> None:
    cfg = compose_config("+experiment=example")
    assert (Path(cfg.convert.base_model) / "config.json").is_file()
    assert (Path(cfg.convert.checkpoint_path) / "bare.pth").is_file()


@pytest.mark.parametrize(
    "preset", sorted(p.relative_to(REPO / "conf" / "experiment").with_suffix("").as_posix()
                     for p in (REPO / "conf" / "experiment").rglob("*.yaml"))
)
def test_every_shipped_preset_composes(preset: str) -> None:
    assert isinstance(compose_config(f"+experiment={preset}"), LmtkConfig)
