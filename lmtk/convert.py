"""The ``convert`` task: every checkpoint under ``convert.checkpoint_path`` becomes a HF model folder."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lmtk import __version__, remote
from lmtk.adapters import (Checked, Lora, LoraScale, adapter_config, adapter_tensors, check, find_lora, merged,
                           differing, scale_of, untrained)
from lmtk.architecture import Architecture
from lmtk.base import BaseModel
from lmtk.card import provenance, write_provenance
from lmtk.config import ConvertConfig, DType, FinalFormat, InitialFormat, LmtkConfig
from lmtk.derived import CHECKPOINT, DerivedReader
from lmtk.discover import Unit, discover
from lmtk.errors import ConversionError, listing
from lmtk.pace import Pace
from lmtk.output import check_replaceable, fingerprint, staged_folder
from lmtk.namings import Naming, choose, load_namings
from lmtk.plan import Plan, fetcher
from lmtk.progress import training_progress
from lmtk.readers import Reader, TensorSpec, open_reader
from lmtk.readers.base import same_bytes
from lmtk.storage import BucketFolder, Uploads, require_local, require_local_or_bucket, scheme_of
from lmtk.stream import equal, streamed
from lmtk.summary import Result, log_summary, write_summary
from lmtk.text_only import extract
from lmtk.verify import reference_logits, verify_folder
from lmtk.writer import write_model_weights, write_safetensors

log = logging.getLogger(__name__)


def run_convert(cfg: LmtkConfig, *, run_dir: Path, since: float | None = None) -> list[Result]:
    """Convert every checkpoint, one failure never stopping the rest; write ``run_dir/summary.json``.

    ``since``: when this run (or the sweep it is a job of) started; folders finished after it are never
    replaced by another checkpoint's conversion.
    """
    options = cfg.convert
    root = options.checkpoint_path
    bases = _Bases(options.base_model, default=cfg.model.name_or_path, model_class=options.model_class)
    try:
        units = find_units(options)
    except ConversionError as e:
        log.error("%s", e)
        results = [Result(checkpoint=f"{root.rstrip('/')}/{options.only}" if options.only else root, status="failed",
                          error=str(e))]
    else:
        log.info("found %d checkpoint(s) under %s", len(units), root)
        since = time.time() if since is None else since
        namings = load_namings(cfg.namings)
        pace = Pace(len(units))
        results = [convert_unit(unit, bases=bases, namings=namings, options=options, since=since, pace=pace)
                   for unit in units]
    write_summary(run_dir / "summary.json", results)
    log_summary(results)
    return results


def find_units(options: ConvertConfig) -> list[Unit]:
    """The checkpoints this run is about, once the checks that stop a whole run have passed (else raise)."""
    check_local(options)
    remote.configure(storage_options=options.storage_options, concurrency=options.remote_concurrency)
    root = remote.location(options.checkpoint_path)
    if options.write_workers < 1:
        raise ConversionError("convert.write_workers", f"must be 1 or more, not {options.write_workers}")
    layout = None if options.initial_format is InitialFormat.fsdp else options.initial_format.value
    units = _selected(discover(root, layout=layout), root=root, only=options.only)
    if scheme_of(options.output_dir) is None:
        _refuse_output_inside(root, Path(options.output_dir))
    return units


def check_local(options: ConvertConfig) -> None:
    """Every path option names a local path or a bucket (``lora.adapter_config``: local only): a URL lmtk cannot
    serve is one line, before anything is read or written."""
    require_local(options.lora.adapter_config, option="convert.lora.adapter_config")
    for option, value in (("convert.checkpoint_path", options.checkpoint_path), ("convert.base_model", options.base_model),
                          ("convert.output_dir", options.output_dir)):
        if value is not None:
            require_local_or_bucket(value, option=option)


def _selected(units: list[Unit], *, root: Any, only: str | None) -> list[Unit]:
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
    warnings: list[str] = field(default_factory=list)


def convert_unit(unit: Unit, *, bases: _Bases, namings: list[Naming], options: ConvertConfig, since: float,
                 pace: Pace | None = None) -> Result:
    if scheme_of(options.output_dir) is not None:
        return _convert_to_bucket(unit, bases=bases, namings=namings, options=options, since=since, pace=pace)
    return _convert_unit(unit, bases=bases, namings=namings, options=options, since=since, pace=pace,
                         final=Path(options.output_dir).absolute() / unit.name)


def _convert_to_bucket(unit: Unit, *, bases: _Bases, namings: list[Naming], options: ConvertConfig, since: float,
                       pace: Pace | None) -> Result:
    """Convert into a local staging folder, as always, its weight files sent to the bucket while they are written
    (S3), then the rest, ``conversion.json`` last (``lmtk.storage``)."""
    url = f"{options.output_dir.rstrip('/')}/{unit.name}"
    try:
        staging = staging_folder(unit.name, options)
    except ConversionError as e:
        log.error("%s failed %s", (pace or Pace(1)).tag, e)
        return Result(checkpoint=str(unit.path), status="failed", layout=unit.layout, error=str(e))
    local = staging / unit.name
    try:
        try:
            bucket = BucketFolder(url, storage_options=options.storage_options)
            bucket.stage_marker(local)  # the bucket's conversion.json decides skip / refuse / replace
        except (ConversionError, OSError) as e:
            error = unit_error(e, unit=unit, final=local)
            log.error("%s failed %s", (pace or Pace(1)).tag, error)
            return Result(checkpoint=str(unit.path), status="failed", layout=unit.layout, error=str(error))
        uploads = Uploads(bucket) if Uploads.usable(bucket) else None
        try:
            result = _convert_unit(unit, bases=bases, namings=namings, options=options, since=since, pace=pace,
                                   final=local, shown=url, destination=uploads)
            if result.status != "ok":
                if uploads is not None:
                    uploads.remove_sent()
                return result
            started = time.perf_counter()
            try:
                sent = bucket.upload(local, sent_already=uploads.sent if uploads else None)
            except ConversionError as e:
                log.error("%s: %s; nothing of it is left as a model in the bucket", unit.path, e)
                result.status, result.error = "failed", str(e)
                return result
        finally:
            if uploads is not None:
                uploads.close()
        early = sum(uploads.sent.values()) if uploads else 0
        log.info("%s: uploaded %s (%s of it while being written), the rest in %.1fs", url, _size(sent), _size(early),
                 time.perf_counter() - started)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def staging_folder(name: str, options: ConvertConfig) -> Path:
    """A new local folder for one conversion into a bucket, in ``convert.staging_dir`` (made when missing)."""
    try:
        if options.staging_dir is not None:
            Path(options.staging_dir).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"lmtk-{name}-", dir=options.staging_dir))
    except OSError as e:
        raise ConversionError(options.staging_dir or tempfile.gettempdir(),
                              f"convert.staging_dir: cannot make a staging folder: {e.strerror or e}") from e


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _convert_unit(unit: Unit, *, bases: _Bases, namings: list[Naming], options: ConvertConfig, since: float,
                  pace: Pace | None, final: Path, shown: str | None = None, destination: Uploads | None = None) -> Result:
    """Convert ``unit`` into the folder ``final``; ``shown`` is where the user sees it go (a bucket URL, when
    ``final`` is its staging folder), in the log, the summary and every error."""
    pace = pace or Pace(1)
    started = pace.start()
    where = shown or str(final)
    trainer = f", {unit.trainer.name}" if unit.trainer else ""
    log.info("%s converting %s (%s layout%s) -> %s", pace.tag, unit.model, unit.layout, trainer, where)
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
                           options=options, metadata=metadata, since=since, destination=destination)
    except Exception as e:
        error = str(unit_error(e, unit=unit, final=final)).replace(str(final), where)
        pace.end(started)
        log.error("%s failed %s%s", pace.tag, error, pace.eta)
        return failed(error=error, metadata=metadata)
    finally:
        if reader is not None:
            reader.close()
    seconds = pace.end(started)
    if outcome.status == "skipped":
        log.info("%s skipped %s: %s is already converted from this very source%s", pace.tag, unit.path, where, pace.eta)
    else:
        log.info("%s done %s in %.1fs, %s%s", pace.tag, where, seconds, pace.size(outcome.bytes_written), pace.eta)
    return Result(
        checkpoint=str(unit.path), status=outcome.status, output=where, layout=unit.layout,  # type: ignore[arg-type]
        seconds=round(seconds, 3), bytes_written=outcome.bytes_written, metadata=metadata, verify=outcome.verify,
        warnings=outcome.warnings,
    )


def unit_error(e: Exception, *, unit: Unit, final: Path) -> ConversionError:
    """The one line a checkpoint fails with, whatever was raised: one failure never stops the batch."""
    if isinstance(e, ConversionError):
        return e
    if isinstance(e, OSError):  # disk full, permissions, a file vanishing mid-run
        return ConversionError(e.filename or final, e.strerror or str(e))
    # A bug, not bad input: the traceback goes to the log.
    log.debug("%s: unexpected %s", unit.path, type(e).__name__, exc_info=e)
    return ConversionError(unit.path, f"unexpected {type(e).__name__}: {e}")


@dataclass
class Prepared:
    """What converting a unit will do, decided from metadata alone (no tensor read): skip it, or write ``outputs``."""

    fingerprint: dict[str, Any]
    # conversion.json of the finished folder already at the output (skipped, or to be replaced), if any.
    existing: dict[str, Any] | None = None
    skipped: bool = False
    adapter: _Adapter | None = None
    naming: Naming | None = None
    reader: Reader | None = None  # what the plan reads from: the reader renamed, merged with its adapter, ...
    plan: Plan | None = None
    dtype: torch.dtype | None = None  # the cast, when convert.dtype asks for one
    # What will be written: the plan's outputs, or the adapter folder's tensors; and the names they come from.
    outputs: dict[str, TensorSpec] = field(default_factory=dict)
    label: str = ""
    # The class written, and its config when it is not the base's (the language model alone, text_only).
    arch: Architecture | None = None
    config: Any = None

    def close(self) -> None:
        if self.adapter is not None and self.adapter.base_weights is not None:
            self.adapter.base_weights.close()


def prepare(reader: Reader, unit: Unit, *, base: BaseModel, namings: list[Naming], final: Path,
            options: ConvertConfig, since: float) -> Prepared:
    """Skip, refuse (raise) or plan one unit; the conversion and ``task=inspect`` both decide here."""
    source = str(unit.path.resolve())
    adapter = _adapter(reader, unit, base=base, options=options)
    prepared = Prepared({}, adapter=adapter)
    try:
        files = reader.info.files + (adapter.files if adapter else [])
        prepared.fingerprint = fingerprint(files, options=_output_options(options, base=base, adapter=adapter),
                                           checksum=options.checksum)
        if final.exists() or final.is_symlink():
            prepared.existing = check_replaceable(final, source=source, overwrite=options.overwrite, since=since)
            if prepared.existing.get("fingerprint") == prepared.fingerprint and not options.overwrite:
                prepared.skipped = True
                return prepared
            if prepared.existing.get("source") == source:
                log.info("%s was converted from an earlier version of %s; converting again", final, unit.path)
        prepared.dtype = dtype = _target_dtype(options.dtype, base.config_dict)
        if adapter is not None and options.final_format is FinalFormat.peft:
            tensors = adapter_tensors(adapter.lora, adapter.checked, reader.specs(), base={})
            prepared.reader, prepared.label = DerivedReader({CHECKPOINT: reader}, tensors), "peft"
            prepared.outputs = {n: _cast(e.spec, dtype) for n, e in tensors.items()}
            return prepared
        if adapter is not None:
            reader = merged(reader, adapter.lora, adapter.checked, base=adapter.base_weights)
        prepared.arch = base.architecture
        prepared.naming, prepared.reader, plan = choose(reader, prepared.arch, namings, config=base.config_dict)
        if options.text_only:
            prepared.reader, plan, prepared.arch, prepared.config = extract(prepared.reader, plan, prepared.arch,
                                                                            config=base.config)
        plan.outputs = {k: _cast(v, dtype) for k, v in plan.outputs.items()}
        prepared.plan, prepared.outputs, prepared.label = plan, plan.outputs, prepared.naming.name
        return prepared
    except BaseException:
        prepared.close()
        raise


def _cast(spec: TensorSpec, dtype: torch.dtype | None) -> TensorSpec:
    return TensorSpec(spec.shape, dtype) if dtype is not None and spec.dtype.is_floating_point else spec


def _convert(reader: Reader, unit: Unit, *, base: BaseModel, base_origin: str, namings: list[Naming], final: Path,
             options: ConvertConfig, metadata: dict[str, Any], since: float, destination: Uploads | None = None
             ) -> _Outcome:
    source = str(unit.path.resolve())

    def may_replace(folder: Path) -> dict[str, Any]:
        return check_replaceable(folder, source=source, overwrite=options.overwrite, since=since)

    prepared = prepare(reader, unit, base=base, namings=namings, final=final, options=options, since=since)
    try:
        if prepared.skipped:
            return _Outcome("skipped")
        adapter = prepared.adapter
        warnings = _adapter_warnings(reader, unit, adapter, metadata=metadata) if adapter else []
        context = _Context(unit=unit, base=base, base_origin=base_origin, final=final, options=options,
                           metadata=metadata, fingerprint=prepared.fingerprint, may_replace=may_replace,
                           warnings=warnings, destination=destination)
        if adapter is not None and options.final_format is FinalFormat.peft:
            return _write_adapter(prepared, base.architecture, context)
        return _write_model(prepared, context)
    finally:
        prepared.close()


@dataclass
class _Context:
    """What every output format needs to know about the checkpoint and where its folder goes."""

    unit: Unit
    base: BaseModel
    base_origin: str
    final: Path
    options: ConvertConfig
    metadata: dict[str, Any]
    fingerprint: dict[str, Any]
    may_replace: Any
    warnings: list[str]
    # Where weight files go while they are written (a bucket's uploads), beside the staging folder.
    destination: Uploads | None = None


def _write_model(prepared: Prepared, ctx: _Context) -> _Outcome:
    options, base, adapter, arch = ctx.options, ctx.base, prepared.adapter, prepared.arch
    naming, reader, plan, dtype = prepared.naming, prepared.reader, prepared.plan, prepared.dtype
    assert naming is not None and reader is not None and plan is not None
    with ThreadPoolExecutor(1, thread_name_prefix="lmtk-tied") as side, \
            staged_folder(ctx.final, may_replace=ctx.may_replace) as folder:
        # Tied copies are compared while the weights are written: the folder is kept only if they are equal.
        tied = side.submit(_check_tied, reader, plan)
        fetch = streamed(fetcher(reader, plan, arch), path=reader.path, dtype=dtype, nonfinite=options.nonfinite)
        write_model_weights(folder, plan.outputs, fetch, max_shard_size=options.max_shard_size, label=ctx.final.name,
                            workers=options.write_workers, destination=ctx.destination)
        tied.result()
        written_dtype = str(_main_dtype(plan.outputs)).removeprefix("torch.")
        config = prepared.config
        base.save_config(folder, architectures=[arch.class_name], dtype=written_dtype,
                         config=config.to_dict() if config is not None else None)
        base.save_generation_config(folder)
        base.save_tokenizer(folder, processor=config is None)
        verified = (_verify(folder, reader, plan, arch, naming, config=config or base.config, options=options)
                    if options.verify else None)
        record = provenance(ctx.unit, reader, plan, fingerprint=ctx.fingerprint, dtype=written_dtype,
                            metadata=ctx.metadata, base_model=base.name_or_path, base_origin=ctx.base_origin,
                            naming=naming.name, verify=verified, warnings=ctx.warnings,
                            adapter=adapter.record("merged") if adapter else None,
                            model_class=(arch.class_name, arch.class_from))
        write_provenance(folder, record, architecture=arch.class_name)
    return _Outcome("ok", sum(spec.nbytes for spec in plan.outputs.values()), verified, ctx.warnings)


def _write_adapter(prepared: Prepared, arch: Architecture, ctx: _Context) -> _Outcome:
    """final_format=peft: adapter_model.safetensors and adapter_config.json as PeftModel.save_pretrained writes them."""
    options, base, adapter, view = ctx.options, ctx.base, prepared.adapter, prepared.reader
    assert adapter is not None and view is not None
    memory = arch.namings[0].params
    config = adapter_config(adapter.lora, adapter.checked, adapter.scale, base_model=_base_id(base),
                            module_names={n.rsplit(".", 1)[0] for n in memory})
    specs = prepared.outputs
    with staged_folder(ctx.final, may_replace=ctx.may_replace) as folder:
        fetch = streamed(view.read_pieces, path=view.path, dtype=prepared.dtype, nonfinite=options.nonfinite)
        write_safetensors(folder / "adapter_model.safetensors", specs, fetch)
        config.save_pretrained(str(folder))
        base.save_tokenizer(folder)
        written = ", ".join(sorted({str(s.dtype).removeprefix("torch.") for s in specs.values()}))
        record = provenance(ctx.unit, view, None, fingerprint=ctx.fingerprint, dtype=written, metadata=ctx.metadata,
                            base_model=base.name_or_path, base_origin=ctx.base_origin, naming="peft", verify=None,
                            warnings=ctx.warnings, adapter=adapter.record("peft"))
        write_provenance(folder, record, architecture=arch.class_name)
    return _Outcome("ok", sum(s.nbytes for s in specs.values()), None, ctx.warnings)


def _base_id(base: BaseModel) -> str:
    """How the adapter folder names its base: a hub id as given, a local folder by its absolute path."""
    local = Path(base.name_or_path)
    return str(local.absolute()) if local.is_dir() else base.name_or_path


@dataclass
class _Adapter:
    """A LoRA checkpoint's adapter, checked against the model, with where its scale and base weights come from."""

    lora: Lora
    scale: LoraScale
    checked: dict[str, Checked]
    base_weights: Reader | None
    # The record and base weights read: part of the fingerprint.
    files: list[Path]

    def record(self, output: str) -> dict[str, Any]:
        ranks = sorted({c.rank for c in self.checked.values()})
        return {"kind": "lora", "output": output, "adapter_name": self.lora.adapter_name,
                "modules": len(self.checked), "r": ranks[0] if len(ranks) == 1 else ranks, "lora_alpha": self.scale.alpha,
                "use_rslora": self.scale.use_rslora, "alpha_from": self.scale.source,
                "dora": any(c.module.magnitude for c in self.checked.values()),
                "modules_to_save": sorted(self.lora.trained_copies),
                "base_weights_from": str(self.base_weights.path) if self.base_weights else "the checkpoint"}


def _adapter(reader: Reader, unit: Unit, *, base: BaseModel, options: ConvertConfig) -> _Adapter | None:
    """The checkpoint's LoRA adapter, when it holds one, checked from metadata (names, shapes, the record)."""
    specs = reader.specs()
    lora = find_lora(reader.path, specs, adapter_name=options.lora.adapter_name)
    if lora is None:
        if options.final_format is FinalFormat.peft:
            raise ConversionError(unit.path, "convert.final_format=peft writes a LoRA adapter, but this checkpoint "
                                  "holds no lora_A / lora_B tensors")
        return None
    scale = scale_of(unit.adapter_records(), alpha=options.lora.alpha, use_rslora=options.lora.use_rslora,
                     adapter_config=options.lora.adapter_config, where=unit.path)
    arch = base.architecture
    memory = arch.namings[0]
    held = set(lora.base) | set(lora.trained_copies)
    needs_base = options.final_format is FinalFormat.huggingface and any(
        p not in held for p in memory.params if p not in memory.tied)
    base_weights = base.weights() if needs_base else None
    try:
        checked = check(reader.path, lora, scale, specs, base=base_weights.specs() if base_weights else {},
                        transposed=arch.transposed, model_params=memory.params)
    except BaseException:
        if base_weights is not None:
            base_weights.close()
        raise
    log.info("%s: LoRA adapter on %d modules (r %s, lora_alpha %s from %s)%s", unit.path, len(checked),
             "/".join(map(str, sorted({c.rank for c in checked.values()}))), scale.alpha, scale.source,
             f"; base weights from {base_weights.path}" if base_weights else "")
    files = [Path(scale.source)] if Path(scale.source).is_file() else []
    return _Adapter(lora, scale, checked, base_weights, files + (base_weights.info.files if base_weights else []))


def _adapter_warnings(reader: Reader, unit: Unit, adapter: _Adapter, *, metadata: dict[str, Any]) -> list[str]:
    """What the adapter's bytes say (read before writing): never trained, or the trainer's own copy disagreeing."""
    warnings = []
    if metadata.get("step") != 0 and untrained(reader, adapter.lora):
        at = f" at step {metadata['step']}" if "step" in metadata else ""
        warnings.append(f"every lora_B is exactly zero{at}: the adapter is untrained or was mis-gathered, so "
                        "the merged model equals its base")
    if (copy := unit.adapter_copy()) is not None:
        from safetensors.torch import load, load_file

        tensors = adapter_tensors(adapter.lora, adapter.checked, reader.specs(), base={})
        differ = differing(reader, load(copy.read_bytes()) if remote.is_remote(copy) else load_file(copy), tensors)
        if differ:
            warnings.append(f"the trainer's own {copy.name} differs from the FSDP part in {len(differ)} tensor(s) "
                            f"({listing(differ, limit=3)}; only rank 0's slice?); converting the FSDP part")
    for warning in warnings:
        log.warning("%s: %s", unit.path, warning)
    return warnings


def _output_options(options: ConvertConfig, *, base: BaseModel, adapter: _Adapter | None) -> dict[str, Any]:
    """The settings that change what is written: a rerun with other values converts again."""
    chosen = {"base_model": base.name_or_path, "max_shard_size": options.max_shard_size, "lmtk": __version__,
              "dtype": options.dtype.value if options.dtype else None,
              **({"model_class": options.model_class} if options.model_class else {}),
              **({"text_only": True} if options.text_only else {})}
    if adapter is not None:
        chosen.update(final_format=options.final_format.value, lora_alpha=adapter.scale.alpha,
                      use_rslora=adapter.scale.use_rslora, adapter_name=adapter.lora.adapter_name)
    return chosen


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
        if not same_bytes(reader, copy_name, source_name) and \
                not equal(reader.read_pieces(copy_name), reader.read_pieces(source_name)):
            raise ConversionError(
                reader.path,
                f"{copy_name} differs from {source_name}, but the config ties them (tie_word_embeddings); "
                f"use a base config with tie_word_embeddings=false",
            )


def _main_dtype(outputs: dict[str, TensorSpec]) -> torch.dtype:
    by_dtype: dict[torch.dtype, int] = {}
    for spec in outputs.values():
        if spec.dtype.is_floating_point:
            by_dtype[spec.dtype] = by_dtype.get(spec.dtype, 0) + spec.nbytes
    return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else torch.float32
