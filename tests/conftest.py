"""Session fixtures: real FSDP2 checkpoints, made once per test session on CPU processes (gloo)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import FsdpRun
from lmtk.synthetic import LAYOUTS, make_base_folder, save_checkpoints


@pytest.fixture(scope="session")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., FsdpRun]:
    """``fsdp("gpt2")`` or ``fsdp("llama", world_size=3)``: every layout of one real FSDP2 run."""
    runs: dict[tuple[str, int], FsdpRun] = {}

    def get(family: str, world_size: int = 2) -> FsdpRun:
        key = (family, world_size)
        if key not in runs:
            root = tmp_path_factory.mktemp(f"fsdp-{family}-ws{world_size}")
            base = make_base_folder(root / "base", family)
            layouts = LAYOUTS if world_size == 2 else ("dcp", "ranks")
            checkpoints = save_checkpoints(
                base, root / "checkpoints", reference=root / "reference.pt", world_size=world_size, layouts=layouts
            )
            runs[key] = FsdpRun(base=base, checkpoints=checkpoints, reference=root / "reference.pt")
        return runs[key]

    return get


@pytest.fixture
def gpt2(fsdp: Callable[..., FsdpRun]) -> FsdpRun:
    return fsdp("gpt2")


@pytest.fixture
def llama(fsdp: Callable[..., FsdpRun]) -> FsdpRun:
    return fsdp("llama")
