"""The ``convert`` task: every checkpoint under ``convert.checkpoint_path`` becomes a HF model folder."""

from __future__ import annotations

import copy
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from lmtk import __version__
from lmtk.base import BaseModel
from lmtk.config import ConvertConfig, LmtkConfig
from lmtk.errors import ConversionError
from lmtk.output import MARKER, staged_folder
from lmtk.plan import Plan, fetcher, make_plan
from lmtk.readers import Reader, find_checkpoints, open_reader
from lmtk.summary import Result, log_summary, write_summary
from lmtk.writer import write_model_weights

log = logging.getLogger(__name__)


def run_convert(cfg: LmtkConfig, *, run_dir: Path) -> list[Result]:
    """Convert every checkpoint, one failure never stopping the rest; write ``run_dir/summary.json``."""
    options = cfg.convert
    base = BaseModel(options.base_model)
    try:
        checkpoints = find_checkpoints(Path(options.checkpoint_path), layout=options.initial_format.value)
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


def convert_checkpoint(path: Path, layout: str, *, base: BaseModel, options: ConvertConfig) -> Result:
    final = Path(options.output_dir).absolute() / output_name(path)
    started = time.perf_counter()
    log.info("converting %s (%s layout) -> %s", path, layout, final)
    try:
        reader = open_reader(path, layout)
        try:
            written = _convert(reader, base=base, final=final, options=options)
        finally:
            reader.close()
    except ConversionError as e:
        log.error("%s", e)
        return Result(checkpoint=str(path), status="failed", error=str(e), layout=layout)
    except Exception as e:  # a bug, not bad input: keep the batch going, keep the traceback in the log
        log.error("%s: unexpected %s: %s", path, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        return Result(checkpoint=str(path), status="failed", error=f"{path}: {type(e).__name__}: {e}", layout=layout)
    seconds = time.perf_counter() - started
    log.info("done %s in %.1fs (%.1f MB)", final, seconds, written / 1e6)
    return Result(
        checkpoint=str(path), status="ok", output=str(final), layout=layout,
        seconds=round(seconds, 3), bytes_written=written, metadata=reader.info.metadata,
    )


def _convert(reader: Reader, *, base: BaseModel, final: Path, options: ConvertConfig) -> int:
    arch = base.architecture
    plan = make_plan(reader.path, reader.specs(), arch)
    _check_tied(reader, plan)
    with staged_folder(final, overwrite=options.overwrite) as folder:
        write_model_weights(
            folder, plan.outputs, fetcher(reader, plan, arch),
            max_shard_size=options.max_shard_size, label=final.name,
        )
        config = copy.deepcopy(base.config)
        config.architectures = [arch.class_name]
        config.dtype = _main_dtype(plan)
        config.save_pretrained(folder)
        base.save_generation_config(folder)
        base.save_tokenizer(folder)
        _write_marker(folder, reader, plan)
    return sum(spec.nbytes for spec in plan.outputs.values())


def _check_tied(reader: Reader, plan: Plan) -> None:
    for copy_name, source_name in plan.tied_checks:
        if not torch.equal(reader.read(copy_name), reader.read(source_name)):
            raise ConversionError(
                reader.path,
                f"{copy_name} differs from {source_name}, but the config ties them (tie_word_embeddings); "
                f"use a base config with tie_word_embeddings=false",
            )


def _main_dtype(plan: Plan) -> torch.dtype:
    by_dtype: dict[torch.dtype, int] = {}
    for spec in plan.outputs.values():
        if spec.dtype.is_floating_point:
            by_dtype[spec.dtype] = by_dtype.get(spec.dtype, 0) + spec.nbytes
    return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else torch.float32


def _write_marker(folder: Path, reader: Reader, plan: Plan) -> None:
    info = reader.info
    marker = {
        "lmtk_version": __version__,
        "source": str(reader.path.resolve()),
        "layout": info.layout,
        "files": [{"path": str(p), "size": p.stat().st_size, "mtime": p.stat().st_mtime} for p in info.files],
        "location": info.location,
        "metadata": info.metadata,
        "naming": plan.naming.name,
        "renamed": plan.renamed,
        "dropped": plan.dropped,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=2, default=str) + "\n")
