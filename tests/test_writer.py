"""The writer's look-ahead: pieces made on their own thread, within a byte budget, errors in order, stopped on exit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtk.readers.base import TensorSpec
from lmtk.pool import take
from lmtk.writer import _WRITE, ahead, write_safetensors

# float32 pieces of one and a half writes and a little: each crosses a write's end unevenly.
UNEVEN = 3 * _WRITE // 8 + 5


def test_pieces_come_in_order_and_never_run_more_than_the_budget_ahead() -> None:
    made: list[int] = []

    def items() -> Iterator[int]:
        for i in range(50):
            made.append(i)
            yield i

    ahead_of_consumer = []
    for i in ahead(items(), budget=3, size=lambda item: 1):
        ahead_of_consumer.append(len(made) - 1 - i)
    assert ahead_of_consumer and max(ahead_of_consumer) <= 4  # three queued, one in the maker's hand
    assert made == list(range(50))


def test_memory_taken_for_a_piece_is_reused_only_after_the_consumer_is_past_it() -> None:
    """Each piece is made in memory from ``take``: reused for later pieces, never while the consumer holds it."""
    count, elements = 40, 1 << 16

    def items() -> Iterator[torch.Tensor]:
        for i in range(count):
            yield take((elements,), torch.float32).fill_(i)

    addresses = set()
    for i, piece in enumerate(ahead(items(), budget=3 * elements * 4, size=lambda t: t.numel() * 4)):
        time.sleep(0.002)  # the maker runs ahead meanwhile, taking memory for the next pieces
        assert bool((piece == i).all()), f"piece {i} was overwritten while in the consumer's hand"
        addresses.add(piece.data_ptr())
    assert len(addresses) <= 6  # three ahead, one in hand, one being made: the same few buffers over and over


def test_a_merged_block_from_the_pool_is_never_split_by_a_cast() -> None:
    """Pool memory is reused once the writer is past the item it was taken for: a piece split into several
    items by a cast would still be read after that. A merged block must fit one cast block."""
    from lmtk import stream
    from lmtk.derived import LoraMerge

    assert LoraMerge.BLOCK_ELEMENTS <= stream.BLOCK


def test_an_item_larger_than_the_budget_still_goes_through_alone() -> None:
    assert list(ahead(iter([5, 7, 1]), budget=2, size=lambda item: item)) == [5, 7, 1]


def test_an_error_while_making_comes_after_the_items_made_before_it() -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("block 3 is bad")

    got = []
    with pytest.raises(ValueError, match="block 3 is bad"):
        for item in ahead(items(), budget=100, size=lambda item: 1):
            got.append(item)
    assert got == [1, 2]


def test_a_consumer_that_stops_stops_the_maker_and_its_clean_up_runs_there() -> None:
    cleaned: list[str] = []

    def items() -> Iterator[int]:
        try:
            for i in range(1_000_000):
                yield i
        finally:
            cleaned.append(threading.current_thread().name)

    pieces = ahead(items(), budget=4, size=lambda item: 1)
    assert next(pieces) == 0
    pieces.close()
    assert cleaned == ["lmtk-ahead"]  # done before close() returned, on the thread that ran the items
    assert not [t for t in threading.enumerate() if t.name == "lmtk-ahead"]


def test_a_failed_tensor_stops_the_file_and_the_maker(tmp_path: Path) -> None:
    specs = {f"t{i}": TensorSpec((4, 4), torch.float32) for i in range(8)}
    fetched: list[str] = []

    def fetch(name: str) -> Iterator[torch.Tensor]:
        fetched.append(name)
        if name == "t3":
            raise RuntimeError("t3 cannot be read")
        yield torch.full((4, 4), float(name[1:]))

    with pytest.raises(RuntimeError, match="t3 cannot be read"):
        write_safetensors(tmp_path / "model.safetensors", specs, fetch)
    assert fetched == ["t0", "t1", "t2", "t3"]  # nothing fetched past the failure
    assert not [t for t in threading.enumerate() if t.name == "lmtk-ahead"]


def test_pieces_of_many_tensors_land_where_the_header_says(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.randn(3 + i, 70_001) for i in range(6)}

    def fetch(name: str) -> Iterator[torch.Tensor]:
        yield from tensors[name].reshape(-1).split(UNEVEN)

    write_safetensors(tmp_path / "model.safetensors", {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in tensors.items()},
                      fetch)
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_file_ranges_and_pieces_in_memory_interleave(tmp_path: Path) -> None:
    """Mapped pieces are copied with copy_file_range, pieces in memory written from it: alternating both, in
    pieces that cross the writes unevenly, every byte lands where the header says."""
    from lmtk.readers.safetensors import SafetensorsReader
    from safetensors.torch import save_file

    source = tmp_path / "source"
    source.mkdir()
    mapped = {f"m{i}": torch.randn(5 + i, 30_000) for i in range(4)}
    save_file(mapped, source / "model.safetensors")
    reader = SafetensorsReader(source)
    in_memory = {f"c{i}": torch.randn(7, 20_001 + i) for i in range(4)}
    order = [name for pair in zip(mapped, in_memory) for name in pair]
    tensors = {**mapped, **in_memory}

    def fetch(name: str) -> list[torch.Tensor]:
        return list(reader.read_pieces(name)) if name in mapped else list(in_memory[name].reshape(-1).split(UNEVEN))

    write_safetensors(tmp_path / "model.safetensors", {n: TensorSpec(tuple(tensors[n].shape), torch.float32) for n in order},
                      fetch)
    reader.close()
    loaded = load_file(tmp_path / "model.safetensors")
    assert list(loaded) == order and all(torch.equal(loaded[n], tensors[n]) for n in order)


def test_a_tensor_of_another_size_than_planned_is_refused(tmp_path: Path) -> None:
    specs = {"a": TensorSpec((4,), torch.float32), "b": TensorSpec((4,), torch.float32)}
    with pytest.raises(ValueError, match=r"a: got 32 bytes, planned 16 for \[4\]"):
        write_safetensors(tmp_path / "model.safetensors", specs, lambda name: [torch.ones(8)])
