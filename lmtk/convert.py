"""The ``convert`` task: every checkpoint under ``convert.checkpoint_path`` becomes a HF model folder."""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtk import __version__
from lmtk.base import BaseModel
from lmtk.config import ConvertConfig, LmtkConfig, NonFinite
from lmtk.errors import ConversionError
from lmtk.output import MARKER, existing_state, fingerprint, staged_folder
from lmtk.plan import Plan, fetcher, make_plan
from lmtk.readers import Reader, find_checkpoints, open_reader
from lmtk.summary import Result, log_summary, write_summary
from lmtk.writer import Fetch, write_model_weights

log = logging.getLogger(__name__)


def run_convert(cfg: LmtkConfig, *, run_dir: Path) -> list[Result]:
    """Convert every checkpoint, one failure never stopping the rest; write ``run_dir/summary.json``."""
    options = cfg.convert
    base = BaseModel(options.base_model)
    try:
        checkpoints = find_checkpoints(Path(options.checkpoint_path), layout=options.initial_format.value)
        _refuse_output_inside(Path(options.checkpoint_path), Path(options.output_dir))
    except ConversionError as e:
        log.error("%s", e)
        results = [Result(checkpoint=options.checkpoint_path, status="failed", error=str(e))]
    else:
        log.info("found %d checkpoint(s) under %s", len(checkpoints), options.checkpoint_path)
        results = [convert_checkpoint(path, layout, base=base, options=options) for path, layout in checkpoints]
    write_summary(run_dir / "summary.json", results)
    log_summary(results)
    return results


def output_name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def _refuse_output_inside(checkpoint_path: Path, output_dir: Path) -> None:
    if checkpoint_path.is_dir() and output_dir.resolve().is_relative_to(checkpoint_path.resolve()):
        raise ConversionError(output_dir, f"convert.output_dir is inside the checkpoint directory {checkpoint_path}; "
                              "choose a folder outside it")


@dataclass
class _Outcome:
    status: str
    bytes_written: int = 0


def convert_checkpoint(path: Path, layout: str, *, base: BaseModel, options: ConvertConfig) -> Result:
    final = Path(options.output_dir).absolute() / output_name(path)
    started = time.perf_counter()
    log.info("converting %s (%s layout) -> %s", path, layout, final)
    reader = None
    try:
        reader = open_reader(path, layout, allowed_globals=options.allowed_globals)
        outcome = _convert(reader, base=base, final=final, options=options)
    except ConversionError as e:
        log.error("%s", e)
        return Result(checkpoint=str(path), status="failed", error=str(e), layout=layout)
    except OSError as e:  # disk full, permissions, a file vanishing mid-run
        error = ConversionError(e.filename or final, e.strerror or str(e))
        log.error("%s", error)
        return Result(checkpoint=str(path), status="failed", error=str(error), layout=layout)
    except Exception as e:  # a bug, not bad input: keep the batch going, keep the traceback in the log
        log.error("%s: unexpected %s: %s", path, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        error = ConversionError(path, f"unexpected {type(e).__name__}: {e}")
        return Result(checkpoint=str(path), status="failed", error=str(error), layout=layout)
    finally:
        if reader is not None:
            reader.close()
    seconds = time.perf_counter() - started
    if outcome.status == "skipped":
        log.info("skipped %s: %s is already converted from this very source", path, final)
    else:
        log.info("done %s in %.1fs (%.1f MB)", final, seconds, outcome.bytes_written / 1e6)
    return Result(
        checkpoint=str(path), status=outcome.status, output=str(final), layout=layout,  # type: ignore[arg-type]
        seconds=round(seconds, 3), bytes_written=outcome.bytes_written, metadata=reader.info.metadata,
    )


def _convert(reader: Reader, *, base: BaseModel, final: Path, options: ConvertConfig) -> _Outcome:
    source = fingerprint(reader.info.files, options=_output_options(options), checksum=options.checksum)
    state = existing_state(final, source)
    if state == "foreign":
        raise ConversionError(final, "exists and was not written by lmtk; move it away or choose another convert.output_dir")
    if state == "same" and not options.overwrite:
        return _Outcome("skipped")
    if state == "stale":
        log.info("%s was converted from another version of %s; converting again", final, reader.path)

    arch = base.architecture
    plan = make_plan(reader.path, reader.specs(), arch)
    _check_tied(reader, plan)
    with staged_folder(final, replace=True) as folder:
        fetch = _checked(fetcher(reader, plan, arch), reader.path, options.nonfinite)
        write_model_weights(folder, plan.outputs, fetch, max_shard_size=options.max_shard_size, label=final.name)
        config = copy.deepcopy(base.config)
        config.architectures = [arch.class_name]
        config.dtype = _main_dtype(plan)
        config.save_pretrained(folder)
        base.save_generation_config(folder)
        base.save_tokenizer(folder)
        _write_marker(folder, reader, plan, source)
    return _Outcome("ok", sum(spec.nbytes for spec in plan.outputs.values()))


def _output_options(options: ConvertConfig) -> dict[str, Any]:
    """The settings that change what is written: a rerun with other values converts again."""
    return {"base_model": options.base_model, "max_shard_size": options.max_shard_size, "lmtk": __version__}


def _checked(fetch: Fetch, path: Path, policy: NonFinite) -> Fetch:
    def checked(name: str) -> list[torch.Tensor]:
        pieces = fetch(name)
        bad = sum(_count_nonfinite(piece) for piece in pieces)
        if bad:
            message = f"{name} has {bad} NaN/Inf values"
            if policy is NonFinite.fail:
                raise ConversionError(path, f"{message} (convert.nonfinite=warn converts anyway)")
            log.warning("%s: %s", path, message)
        return pieces

    return checked


# NaN and Inf are the values whose exponent bits are all ones; numpy checks those bits ~20x faster
# than torch.isfinite on CPU, for bfloat16 too.
_EXPONENT_BITS = {
    torch.float64: (torch.int64, 0x7FF0000000000000),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
}


def _count_nonfinite(tensor: torch.Tensor, *, block: int = 1 << 22) -> int:
    if tensor.dtype not in _EXPONENT_BITS:
        return 0
    int_dtype, mask = _EXPONENT_BITS[tensor.dtype]
    bits = tensor.detach().contiguous().reshape(-1).view(int_dtype).numpy()
    # In blocks, so the check allocates a few MB whatever the tensor's size.
    return sum(int(np.count_nonzero((bits[i : i + block] & mask) == mask)) for i in range(0, bits.size, block))


def _check_tied(reader: Reader, plan: Plan) -> None:
    for copy_name, source_name in plan.tied_checks:
        if not _equal(reader.read_pieces(copy_name), reader.read_pieces(source_name)):
            raise ConversionError(
                reader.path,
                f"{copy_name} differs from {source_name}, but the config ties them (tie_word_embeddings); "
                f"use a base config with tie_word_embeddings=false",
            )


def _equal(a: list[torch.Tensor], b: list[torch.Tensor], *, block: int = 1 << 24) -> bool:
    """Byte equality of two tensors given as pieces, walking both without joining them."""
    if {t.dtype for t in a} != {t.dtype for t in b}:
        return False
    left = [t.contiguous().reshape(-1).view(torch.uint8).numpy() for t in a] or [np.empty(0, np.uint8)]
    right = [t.contiguous().reshape(-1).view(torch.uint8).numpy() for t in b] or [np.empty(0, np.uint8)]
    if sum(map(len, left)) != sum(map(len, right)):
        return False
    i = j = 0
    x, y = left[0], right[0]
    while True:
        while not len(x) and i + 1 < len(left):
            i += 1
            x = left[i]
        while not len(y) and j + 1 < len(right):
            j += 1
            y = right[j]
        n = min(len(x), len(y), block)
        if n == 0:
            return True
        if not np.array_equal(x[:n], y[:n]):
            return False
        x, y = x[n:], y[n:]


def _main_dtype(plan: Plan) -> torch.dtype:
    by_dtype: dict[torch.dtype, int] = {}
    for spec in plan.outputs.values():
        if spec.dtype.is_floating_point:
            by_dtype[spec.dtype] = by_dtype.get(spec.dtype, 0) + spec.nbytes
    return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else torch.float32


def _write_marker(folder: Path, reader: Reader, plan: Plan, source: dict[str, Any]) -> None:
    info = reader.info
    marker = {
        "lmtk_version": __version__,
        "source": str(reader.path.resolve()),
        "layout": info.layout,
        "fingerprint": source,
        "location": info.location,
        "metadata": info.metadata,
        "naming": plan.naming.name,
        "renamed": plan.renamed,
        "dropped": plan.dropped,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=2, default=str) + "\n")
