"""Which byte layout a path holds, told from file names alone: no torch import, no file opened.

Discovery walks whole training-run trees with this before torch is even imported.
"""

from __future__ import annotations

import re
from pathlib import Path

# torch.save files.
FULL_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# torch.distributed.checkpoint: the pickled plan, written last.
DCP_METADATA = ".metadata"
# One torch.save of DTensor shards per rank (verl): model_world_size_2_rank_0.pt.
RANK_FILE = re.compile(r"^(?P<stem>.+)_world_size_(?P<world>\d+)_rank_(?P<rank>\d+)\.pt$")
# torch's DCP HuggingFaceStorageWriter with save_distributed=True: each rank's slices, per output file.
HF_SHARD_FILE = re.compile(r"^shard-(?P<rank>\d+)-model-(?P<file>\d+)-of-(?P<files>\d+)\.safetensors$")
# HF weights: model.safetensors, model-00001-of-00002.safetensors (what save_pretrained and consolidation write).
HF_WEIGHTS_FILE = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")
HF_CONFIG = "config.json"

LAYOUTS = ("full", "dcp", "ranks", "hf_shards", "safetensors")


def detect(path: Path) -> str | None:
    """The layout of a checkpoint at ``path``, or None when it is not one."""
    if path.is_file():
        return "full" if path.suffix in FULL_SUFFIXES else None
    if not path.is_dir():
        return None
    names = [p.name for p in path.iterdir()]
    if DCP_METADATA in names or any(n.endswith(".distcp") for n in names):
        return "dcp"
    if any(RANK_FILE.match(n) for n in names):
        return "ranks"
    if any(HF_SHARD_FILE.match(n) for n in names):
        return "hf_shards"
    if HF_CONFIG not in names and any(HF_WEIGHTS_FILE.match(n) for n in names):
        return "safetensors"  # consolidated HF weights without a config: a checkpoint, not a model
    return None


def is_hf_model(path: Path) -> bool:
    """A folder ``from_pretrained`` loads as it is: an HF config and weights."""
    if not (path / HF_CONFIG).is_file():
        return False
    return any(HF_WEIGHTS_FILE.match(p.name) or re.match(r"^pytorch_model(-\d+-of-\d+)?\.bin$", p.name)
               for p in path.iterdir())


def output_stem(name: str) -> str:
    """A unit's name without its checkpoint suffix: ``epoch=0-step=4.ckpt`` -> ``epoch=0-step=4``."""
    for suffix in FULL_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def data_files(path: Path, layout: str) -> list[Path]:
    """The files a checkpoint's reader will read (its model's rank files, not the optimizer's)."""
    if path.is_file():
        return [path]
    patterns = {"dcp": (DCP_METADATA, "*.distcp"), "ranks": ("model_world_size_*_rank_*.pt",),
                "hf_shards": ("shard-*.safetensors",), "safetensors": ("model*.safetensors",)}.get(layout, ())
    return sorted({p for pattern in patterns for p in path.glob(pattern) if p.is_file()})
