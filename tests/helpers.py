"""Shared test helpers: run the converter the ways a user does, check outputs the ways HF loads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from lmtk.config import LmtkConfig, register_configs
from lmtk.convert import run_convert
from lmtk.summary import Result
from lmtk.sweep import quote

REPO = Path(__file__).resolve().parents[1]
# Training runs written by real trainers' own save code (see tests/trainers/README.md).
FIXTURES = REPO / "tests" / "trainers"


# converted(fixture, with_base=True) -> (the python -m lmtk process, its output_dir, its run dir)
Convert = Callable[..., "tuple[subprocess.CompletedProcess[str], Path, Path]"]


@dataclass(frozen=True)
class FsdpRun:
    base: Path
    checkpoints: Path
    reference: Path

    def __getitem__(self, layout: str) -> Path:
        """The checkpoint saved as ``layout`` (see lmtk.synthetic.LAYOUTS)."""
        return next(p for p in self.checkpoints.iterdir() if p.name.split(".")[0] == layout)


def compose_config(*overrides: str) -> LmtkConfig:
    register_configs()
    with initialize_config_module(config_module="lmtk.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def convert(run_dir: Path, *, checkpoint: Path, base: Path, out: Path, overrides: tuple[str, ...] = ()) -> list[Result]:
    """In-process conversion through the composed config, as ``python -m lmtk`` runs it."""
    cfg = compose_config(
        f"convert.checkpoint_path={quote(str(checkpoint))}", f"convert.base_model={quote(str(base))}",
        f"convert.output_dir={quote(str(out))}", *overrides
    )
    return run_convert(cfg, run_dir=run_dir)


def run_lmtk(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lmtk", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def model_class_of(folder: Path) -> type:
    """The class ``config.json`` names (a vision-language model's is no AutoModelForCausalLM)."""
    import transformers

    return getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])


def logits_of(folder: Path, input_ids: torch.Tensor | None = None, **inputs: torch.Tensor) -> torch.Tensor:
    """Load ``folder`` as a user would and run it; fail on any missing or unexpected key."""
    model, info = model_class_of(folder).from_pretrained(folder, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"{folder}: {problems}"
    model.eval()
    if input_ids is not None:
        inputs["input_ids"] = input_ids
    with torch.no_grad():
        return model(**inputs).logits


def assert_matches_reference(folder: Path, reference: Path, *, atol: float = 1e-5) -> None:
    ref = torch.load(reference, weights_only=True)
    if ref["logits"] is None:  # a model that cannot run without its image: its tensors are compared alone
        return
    diff = (logits_of(folder, ref["input_ids"]) - ref["logits"]).abs().max().item()
    assert diff <= atol, f"{folder}: logits differ from the FSDP model by {diff}"


def summary_of(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "summary.json").read_text())["results"]


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def base_of(fixture: str) -> Path:
    """The HF config a trainer fixture's model matches: its own base/ (other codebases' models), else the shared one."""
    own = FIXTURES / fixture / "base"
    return own if own.is_dir() else FIXTURES / "base"


def reference_of(fixture: str) -> dict:
    """``{"input_ids", "logits": {folder name: logits}, "steps": {folder name: step}}`` of a trainer fixture."""
    return torch.load(FIXTURES / fixture / "reference.pt", weights_only=True)


def assert_logits(folder: Path, reference: dict, unit: str, *, atol: float = 1e-5) -> None:
    diff = (logits_of(folder, reference["input_ids"]) - reference["logits"][unit]).abs().max().item()
    assert diff <= atol, f"{folder}: logits differ from the trained model's at {unit} by {diff}"
