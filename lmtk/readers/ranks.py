"""One ``torch.save`` per rank of DTensor shards: ``model_world_size_W_rank_R.pt`` (verl's layout).

Each tensor is rebuilt from its placements: ``Shard(dim)`` pieces (uneven last pieces included)
are placed at their offsets, ``Replicate`` copies are taken once. A plain tensor in every rank
file (a one-GPU or DDP save) is already whole.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmtk.errors import ConversionError, listing
from lmtk import remote
from lmtk.remote import is_remote, materialize
from lmtk.layouts import RANK_FILE
from lmtk.readers.base import SourceInfo, TensorSpec
from lmtk.readers.full import find_state_dict
from lmtk.readers.safe import safe_load

log = logging.getLogger(__name__)



def rank_files(path: Path) -> tuple[list[Path], int]:
    """The model's rank files in order, after checking the set is whole and from one world size."""
    found = [(p, RANK_FILE.match(p.name)) for p in sorted(path.iterdir())]
    matches = [(p, m) for p, m in found if m]
    stems = {m["stem"] for _, m in matches}
    stem = "model" if "model" in stems else (stems.pop() if len(stems) == 1 else None)
    if stem is None:
        raise ConversionError(path, f"rank files of several kinds ({', '.join(sorted(stems))}) and none named model_*")
    matches = [(p, m) for p, m in matches if m["stem"] == stem]
    worlds = {int(m["world"]) for _, m in matches}
    if len(worlds) > 1:
        raise ConversionError(path, f"rank files from different world sizes {sorted(worlds)}: "
                              + listing([p.name for p, _ in matches]))
    world = worlds.pop()
    by_rank = {int(m["rank"]): p for p, m in matches}
    missing = [f"{stem}_world_size_{world}_rank_{r}.pt" for r in range(world) if r not in by_rank]
    if missing:
        raise ConversionError(path, f"incomplete rank set (world size {world}): missing {listing(missing)}")
    extra = sorted(r for r in by_rank if r >= world)
    if extra:
        raise ConversionError(path, f"rank numbers {extra} do not fit world size {world}")
    return [by_rank[r] for r in range(world)], world


class RankShardReader:
    def __init__(self, path: Path, *, allowed_globals: Sequence[str] = ()) -> None:
        import torch.distributed.tensor  # noqa: F401  registers DTensor's types with the weights-only loader

        self.path = path
        files, self.world = rank_files(path)
        self._ranks: list[dict[str, Any]] = []
        metadata: dict[str, Any] = {}
        # Unpickling a DeviceMesh outside a process group warns once per tensor; it is harmless here.
        mesh_log = logging.getLogger("torch.distributed.device_mesh")
        level, mesh_log.level = mesh_log.level, logging.ERROR
        try:
            for file in files:
                tensors, location, metadata = find_state_dict(safe_load(file, allowed_globals=allowed_globals), file)
                if is_remote(file):
                    _fetch_meshes(file, tensors)
                    remote.preload([(file, *e) for t in tensors.values()
                                    if (e := remote.extent(getattr(t, "_local_tensor", t)))])
                self._ranks.append(tensors)
        finally:
            mesh_log.setLevel(level)
        self._check_consistent(files)
        self.info = SourceInfo(layout="ranks", files=files, metadata=metadata, location=location)

    def _check_consistent(self, files: list[Path]) -> None:
        first = self._ranks[0]
        for file, tensors in zip(files[1:], self._ranks[1:]):
            if tensors.keys() != first.keys():
                diff = sorted(tensors.keys() ^ first.keys())
                raise ConversionError(file, f"holds other tensors than {files[0].name} (a different run?): {listing(diff)}")
            for name, t in tensors.items():
                if tuple(t.shape) != tuple(first[name].shape) or t.dtype != first[name].dtype:
                    raise ConversionError(file, f"{name} has another global shape or dtype than in {files[0].name} (a different run?)")
        for file, tensors in zip(files, self._ranks):
            for name, t in tensors.items():
                mesh = getattr(t, "device_mesh", None)
                if mesh is not None and mesh.size() != self.world:
                    raise ConversionError(file, f"{name} was sharded over {mesh.size()} ranks, but the files say {self.world}")

    def specs(self) -> dict[str, TensorSpec]:
        return {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in self._ranks[0].items()}

    def read(self, name: str) -> torch.Tensor:
        first = self._ranks[0][name]
        if not hasattr(first, "placements"):
            return self._local(0, name)  # a plain tensor is the same whole tensor on every rank
        full = torch.empty(tuple(first.shape), dtype=first.dtype)
        for rank, tensors in enumerate(self._ranks):
            dtensor = tensors[name]
            region = full
            try:
                offsets = _offsets(dtensor, rank)
            except ValueError as e:
                raise ConversionError(self.info.files[rank], f"{name}: {e}") from e
            for dim, start in offsets.items():
                region = region.narrow(dim, start, dtensor._local_tensor.shape[dim])
            region.copy_(self._local(rank, name))
        return full

    def _local(self, rank: int, name: str) -> torch.Tensor:
        """A rank's own piece (fetched from a bucket when the files lie there)."""
        piece = self._ranks[rank][name]
        piece = getattr(piece, "_local_tensor", piece)
        return materialize(self.info.files[rank], piece) if is_remote(self.path) else piece

    def read_pieces(self, name: str) -> list[torch.Tensor]:
        """Row shards (``Shard(0)`` over one mesh dim) stream as the ranks' own memory-mapped pieces."""
        first = self._ranks[0][name]
        placements = getattr(first, "placements", None)
        if placements is None:
            return [self._local(0, name)]
        if len(placements) != 1 or not placements[0].is_shard(0) or type(placements[0]).__name__ != "Shard":
            return [self.read(name)]
        order = sorted(range(self.world), key=lambda r: _offsets(self._ranks[r][name], r).get(0, 0))
        return [self._local(r, name).contiguous() for r in order]

    def close(self) -> None:
        self._ranks = []
        remote.forget(self.info.files)


def _fetch_meshes(file: Any, tensors: dict[str, Any]) -> None:
    """Loaded without data from a bucket, the device meshes' own small rank tensors are fetched at once."""
    meshes = {id(m): m for t in tensors.values() if (m := getattr(t, "device_mesh", None)) is not None}
    for mesh in meshes.values():
        for key, value in vars(mesh).items():
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                setattr(mesh, key, materialize(file, value))


def _offsets(dtensor: Any, rank: int) -> dict[int, int]:
    """Tensor dim -> where this rank's piece starts, from torch.chunk's split of each sharded dim."""
    mesh = dtensor.device_mesh.mesh
    coordinate = _coordinate(tuple(mesh.shape), tuple(mesh.flatten().tolist()), rank)
    offsets: dict[int, int] = {}
    for mesh_dim, placement in enumerate(dtensor.placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard() or type(placement).__name__ != "Shard":
            raise ValueError(f"placement {placement} is not supported (only Shard and Replicate)")
        dim = placement.dim
        if dim in offsets:
            raise ValueError(f"dim {dim} is sharded twice; not supported")
        size, parts = dtensor.shape[dim], mesh.shape[mesh_dim]
        chunk = -(-size // parts)
        offsets[dim] = min(coordinate[mesh_dim] * chunk, size)
    return offsets


@functools.lru_cache(maxsize=64)
def _coordinate(shape: tuple[int, ...], ranks: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """Where ``rank`` sits in the device mesh (the same for every tensor of a save: computed once)."""
    flat = ranks.index(rank)
    coordinate = []
    for size in reversed(shape):
        flat, at = divmod(flat, size)
        coordinate.append(at)
    return tuple(reversed(coordinate))
