"""The ``convert`` task: every checkpoint under ``convert.checkpoint_path`` becomes a HF model folder."""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lmtk import __version__
from lmtk.architecture import Architecture
from lmtk.base import BaseModel
from lmtk.card import provenance, write_provenance
from lmtk.config import ConvertConfig, DType, InitialFormat, LmtkConfig
from lmtk.discover import Unit, discover
from lmtk.errors import ConversionError
from lmtk.output import check_replaceable, fingerprint, staged_folder
from lmtk.namings import Naming, choose, load_namings
from lmtk.plan import Plan, fetcher
from lmtk.progress import training_progress
from lmtk.readers import Reader, TensorSpec, open_reader
from lmtk.stream import equal, streamed
from lmtk.summary import Result, log_summary, write_summary
from lmtk.text_only import extract
from lmtk.verify import reference_logits, verify_folder
from lmtk.writer import write_model_weights

log = logging.getLogger(__name__)


def run_convert(cfg: LmtkConfig, *, run_dir: Path, since: float | None = None) -> list[Result]:
    """Convert every checkpoint, one failure never stopping the rest; write ``run_dir/summary.json``.

    ``since``: when this run (or the sweep it is a job of) started; folders finished after it are never
    replaced by another checkpoint's conversion.
    """
    options = cfg.convert
    root = Path(options.checkpoint_path)
    bases = _Bases(options.base_model, default=cfg.model.name_or_path, model_class=options.model_class)
    try:
        if options.write_workers < 1:
            raise ConversionError("convert.write_workers", f"must be 1 or more, not {options.write_workers}")
        layout = None if options.initial_format is InitialFormat.fsdp else options.initial_format.value
        units = _selected(discover(root, layout=layout), root=root, only=options.only)
        _refuse_output_inside(root, Path(options.output_dir))
    except ConversionError as e:
        log.error("%s", e)
        results = [Result(checkpoint=str(root / (options.only or "")), status="failed", error=str(e))]
    else:
        log.info("found %d checkpoint(s) under %s", len(units), root)
        since = time.time() if since is None else since
        namings = load_namings(cfg.namings)
        results = [convert_unit(unit, bases=bases, namings=namings, options=options, since=since) for unit in units]
    write_summary(run_dir / "summary.json", results)
    log_summary(results)
    return results


def _selected(units: list[Unit], *, root: Path, only: str | None) -> list[Unit]:
    if only is None:
        return units
    wanted = (root / only).resolve()
    chosen = [u for u in units if wanted in (u.path.resolve(), u.model.resolve())]
    if not chosen:
        raise ConversionError(root / only, f"not one of the {len(units)} checkpoint(s) found under {root}")
    return chosen


def _refuse_output_inside(checkpoint_path: Path, output_dir: Path) -> None:
    if checkpoint_path.is_dir() and output_dir.resolve().is_relative_to(checkpoint_path.resolve()):
        raise ConversionError(output_dir, f"convert.output_dir is inside the checkpoint directory {checkpoint_path}; "
                              "choose a folder outside it")


class _Bases:
    """The base model of each checkpoint: ``convert.base_model``, else the checkpoint's own, else the model group's."""

    def __init__(self, explicit: str | None, *, default: str, model_class: str | None = None) -> None:
        self._explicit, self._default, self._model_class = explicit, default, model_class
        self._loaded: dict[str, BaseModel] = {}  # one architecture build per base, however many checkpoints

    def of(self, unit: Unit) -> tuple[BaseModel, str]:
        if self._explicit:
            name, origin = self._explicit, "convert.base_model"
        elif (own := unit.config_folder()) is not None:
            name, origin = str(own), "the checkpoint" if own.is_relative_to(unit.path) else "the training run"
        else:
            name, origin = self._default, "model.name_or_path"
        return self._loaded.setdefault(name, BaseModel(name, model_class=self._model_class)), origin


@dataclass
class _Outcome:
    status: str
    bytes_written: int = 0
    verify: dict[str, Any] | None = None


def convert_unit(unit: Unit, *, bases: _Bases, namings: list[Naming], options: ConvertConfig, since: float) -> Result:
    final = Path(options.output_dir).absolute() / unit.name
    started = time.perf_counter()
    trainer = f", {unit.trainer.name}" if unit.trainer else ""
    log.info("converting %s (%s layout%s) -> %s", unit.model, unit.layout, trainer, final)
    for sibling, what in unit.siblings():
        log.info("%s: skipping %s (%s)", unit.path, sibling.name, what)
    reader, metadata = None, {}
    failed = partial(Result, checkpoint=str(unit.path), status="failed", layout=unit.layout)
    try:
        base, origin = bases.of(unit)
        log.info("%s: config and tokenizer from %s (%s)", unit.path, base.name_or_path, origin)
        reader = open_reader(unit.model, unit.layout, allowed_globals=options.allowed_globals)
        metadata = training_progress(unit, reader.info.metadata)
        outcome = _convert(reader, unit, base=base, base_origin=origin, namings=namings, final=final,
                           options=options, metadata=metadata, since=since)
    except ConversionError as e:
        log.error("%s", e)
        return failed(error=str(e), metadata=metadata)
    except OSError as e:  # disk full, permissions, a file vanishing mid-run
        error = ConversionError(e.filename or final, e.strerror or str(e))
        log.error("%s", error)
        return failed(error=str(error), metadata=metadata)
    except Exception as e:  # a bug, not bad input: keep the batch going, keep the traceback in the log
        log.error("%s: unexpected %s: %s", unit.path, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        return failed(error=str(ConversionError(unit.path, f"unexpected {type(e).__name__}: {e}")), metadata=metadata)
    finally:
        if reader is not None:
            reader.close()
    seconds = time.perf_counter() - started
    if outcome.status == "skipped":
        log.info("skipped %s: %s is already converted from this very source", unit.path, final)
    else:
        log.info("done %s in %.1fs (%.1f MB)", final, seconds, outcome.bytes_written / 1e6)
    return Result(
        checkpoint=str(unit.path), status=outcome.status, output=str(final), layout=unit.layout,  # type: ignore[arg-type]
        seconds=round(seconds, 3), bytes_written=outcome.bytes_written, metadata=metadata, verify=outcome.verify,
    )


def _convert(reader: Reader, unit: Unit, *, base: BaseModel, base_origin: str, namings: list[Naming], final: Path,
             options: ConvertConfig, metadata: dict[str, Any], since: float) -> _Outcome:
    source = str(unit.path.resolve())
    current = fingerprint(reader.info.files, options=_output_options(options, base=base), checksum=options.checksum)

    def may_replace(folder: Path) -> dict[str, Any]:
        return check_replaceable(folder, source=source, overwrite=options.overwrite, since=since)

    if final.exists() or final.is_symlink():
        marker = may_replace(final)
        if marker.get("fingerprint") == current and not options.overwrite:
            return _Outcome("skipped")
        if marker.get("source") == source:
            log.info("%s was converted from an earlier version of %s; converting again", final, unit.path)

    arch = base.architecture
    naming, reader, plan = choose(reader, arch, namings, config=base.config_dict)
    config = None  # the base's, unless the language model is extracted
    if options.text_only:
        reader, plan, arch, config = extract(reader, plan, arch, config=base.config)
    dtype = _target_dtype(options.dtype, base.config_dict)
    if dtype is not None:
        plan.outputs = {k: TensorSpec(v.shape, dtype) if v.dtype.is_floating_point else v for k, v in plan.outputs.items()}
    with ThreadPoolExecutor(1, thread_name_prefix="lmtk-tied") as side, \
            staged_folder(final, may_replace=may_replace) as folder:
        # Tied copies are compared while the weights are written: the folder is kept only if they are equal.
        tied = side.submit(_check_tied, reader, plan)
        fetch = streamed(fetcher(reader, plan, arch), path=reader.path, dtype=dtype, nonfinite=options.nonfinite)
        write_model_weights(folder, plan.outputs, fetch, max_shard_size=options.max_shard_size, label=final.name,
                            workers=options.write_workers)
        tied.result()
        written_dtype = str(_main_dtype(plan)).removeprefix("torch.")
        base.save_config(folder, architectures=[arch.class_name], dtype=written_dtype,
                         config=config.to_dict() if config is not None else None)
        base.save_generation_config(folder)
        base.save_tokenizer(folder, processor=config is None)
        verified = (_verify(folder, reader, plan, arch, naming, config=config or base.config, options=options)
                    if options.verify else None)
        record = provenance(unit, reader, plan, fingerprint=current, dtype=written_dtype, metadata=metadata,
                            base_model=base.name_or_path, base_origin=base_origin, naming=naming, verify=verified,
                            model_class=(arch.class_name, arch.class_from))
        write_provenance(folder, record, architecture=arch.class_name)
    return _Outcome("ok", sum(spec.nbytes for spec in plan.outputs.values()), verified)


def _output_options(options: ConvertConfig, *, base: BaseModel) -> dict[str, Any]:
    """The settings that change what is written: a rerun with other values converts again."""
    return {"base_model": base.name_or_path, "max_shard_size": options.max_shard_size, "lmtk": __version__,
            "dtype": options.dtype.value if options.dtype else None,
            **({"model_class": options.model_class} if options.model_class else {}),
            **({"text_only": True} if options.text_only else {})}


def _target_dtype(choice: DType | None, config: dict[str, Any]) -> torch.dtype | None:
    if choice is None:
        return None
    if choice is DType.auto:
        name = config.get("dtype") or config.get("torch_dtype")
        return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None
    return getattr(torch, choice.value)


def _verify(folder: Path, reader: Reader, plan: Plan, arch: Architecture, naming: Naming, *, config: Any,
            options: ConvertConfig) -> dict[str, Any]:
    params = sum(math.prod(spec.shape) for spec in plan.outputs.values())
    reference = reference_logits(config, reader, plan, arch) if params <= options.verify_max_params else None
    result = verify_folder(folder, reference, params=params, max_params=options.verify_max_params, label=str(reader.path),
                           class_name=arch.class_name)
    # Say what the comparison can catch: the reference holds the tensors as lmtk named them.
    result["reference"] = (
        "a float32 model holding the source tensors under the training code's names" if naming.is_hf else
        f"a float32 model holding the source tensors after lmtk's {naming.title} -> transformers mapping: it checks "
        "the writing, not the mapping itself (names, rotary permutation), which the test suite proves")
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
