"""Write safetensors shards one tensor at a time, so memory stays at one tensor.

``safetensors.torch.save_file`` wants the whole shard in memory; the format is simple enough
(8-byte header length, JSON header, raw bytes) to stream instead. Shard planning is
huggingface_hub's, so names and the index match what ``save_pretrained`` writes.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from lmtk.readers.base import TensorSpec

log = logging.getLogger(__name__)

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
INDEX_NAME = "model.safetensors.index.json"


def plan_shards(specs: dict[str, TensorSpec], *, max_shard_size: str | int) -> dict[str, list[str]]:
    """Shard file name -> tensor names, as huggingface_hub plans them for ``save_pretrained``."""
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        specs,
        get_storage_size=lambda spec: spec.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    return split.filename_to_tensors


# Name -> the tensor's bytes as pieces, in order (one piece, a shard per rank, or blocks).
Fetch = Callable[[str], Iterable[torch.Tensor]]


def write_model_weights(
    folder: Path,
    specs: dict[str, TensorSpec],
    fetch: Fetch,
    *,
    max_shard_size: str | int,
    label: str,
) -> list[str]:
    """Write every tensor in ``specs`` (fetched on demand) as shards plus an index when sharded."""
    shards = plan_shards(specs, max_shard_size=max_shard_size)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(specs), desc=label, unit="tensor", disable=not sys.stderr.isatty(), leave=False)
    with bar:
        for filename, names in shards.items():
            write_safetensors(folder / filename, {n: specs[n] for n in names}, fetch, on_tensor=bar.update)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs.values())},
            "weight_map": {n: f for f, names in shards.items() for n in sorted(names)},
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(shards)


def write_safetensors(
    path: Path,
    specs: dict[str, TensorSpec],
    fetch: Fetch,
    *,
    on_tensor: Callable[[int], object] = lambda n: None,
) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, spec in specs.items():
        header[name] = {"dtype": DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, spec in specs.items():
            written = 0
            for piece in fetch(name):
                if piece.dtype != spec.dtype:
                    raise ValueError(f"{name}: got {piece.dtype}, planned {spec.dtype}")
                written += f.write(_bytes_of(piece))
            if written != spec.nbytes:
                raise ValueError(f"{name}: got {written} bytes, planned {spec.nbytes} for {list(spec.shape)}")
            on_tensor(1)
        f.flush()
        os.fsync(f.fileno())


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    # A view of the tensor's own memory (the mmap'd file for .pth inputs): no copy unless strided.
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())
