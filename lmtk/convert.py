"""The ``convert`` task: every checkpoint under ``convert.checkpoint_path`` becomes a HF model folder."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtk import __version__
from lmtk.architecture import Architecture
from lmtk.base import BaseModel
from lmtk.card import provenance, write_provenance
from lmtk.config import ConvertConfig, DType, LmtkConfig
from lmtk.errors import ConversionError
from lmtk.output import existing_state, fingerprint, staged_folder
from lmtk.plan import Plan, fetcher, make_plan
from lmtk.readers import Reader, TensorSpec, find_checkpoints, open_reader
from lmtk.stream import equal, streamed
from lmtk.summary import Result, log_summary, write_summary
from lmtk.verify import reference_logits, verify_folder
from lmtk.writer import write_model_weights

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
    verify: dict[str, Any] | None = None


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
        verify=outcome.verify,
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
    dtype = _target_dtype(options.dtype, base.config_dict)
    if dtype is not None:
        plan.outputs = {k: TensorSpec(v.shape, dtype) if v.dtype.is_floating_point else v for k, v in plan.outputs.items()}
    with staged_folder(final, replace=True) as folder:
        fetch = streamed(fetcher(reader, plan, arch), path=reader.path, dtype=dtype, nonfinite=options.nonfinite)
        write_model_weights(folder, plan.outputs, fetch, max_shard_size=options.max_shard_size, label=final.name)
        written_dtype = str(_main_dtype(plan)).removeprefix("torch.")
        base.save_config(folder, architectures=[arch.class_name], dtype=written_dtype)
        base.save_generation_config(folder)
        base.save_tokenizer(folder)
        verified = _verify(folder, reader, plan, arch, base=base, options=options) if options.verify else None
        record = provenance(reader, plan, fingerprint=source, dtype=written_dtype,
                            base_model=options.base_model, verify=verified)
        write_provenance(folder, record, architecture=arch.class_name)
    return _Outcome("ok", sum(spec.nbytes for spec in plan.outputs.values()), verified)


def _output_options(options: ConvertConfig) -> dict[str, Any]:
    """The settings that change what is written: a rerun with other values converts again."""
    return {"base_model": options.base_model, "max_shard_size": options.max_shard_size, "lmtk": __version__,
            "dtype": options.dtype.value if options.dtype else None}


def _target_dtype(choice: DType | None, config: dict[str, Any]) -> torch.dtype | None:
    if choice is None:
        return None
    if choice is DType.auto:
        name = config.get("dtype") or config.get("torch_dtype")
        return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None
    return getattr(torch, choice.value)


def _verify(folder: Path, reader: Reader, plan: Plan, arch: Architecture, *, base: BaseModel,
            options: ConvertConfig) -> dict[str, Any]:
    params = sum(math.prod(spec.shape) for spec in plan.outputs.values())
    reference = reference_logits(base.config, reader, plan, arch) if params <= options.verify_max_params else None
    result = verify_folder(folder, reference, params=params, max_params=options.verify_max_params)
    if result["passed"] is False:
        raise ConversionError(reader.path, f"verify failed: the written model's logits differ from the source by "
                              f"{result['max_abs_diff']:.3g} (tolerance {result['tolerance']:.3g})")
    return result


def _check_tied(reader: Reader, plan: Plan) -> None:
    for copy_name, source_name in plan.tied_checks:
        if not equal(reader.read_pieces(copy_name), reader.read_pieces(source_name)):
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
