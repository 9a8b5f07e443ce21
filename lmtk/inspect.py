"""The ``inspect`` task: what ``task=convert`` would do with each checkpoint, decided from metadata alone.

Discovery, the base model, the reader, the naming and the plan are the conversion's own (``lmtk.convert``),
so the decisions are the same. No tensor byte is read: readers open headers, indexes and pickles only (a
``.pth`` is memory-mapped and its tensor pages are never touched), nothing is read ahead, and nothing is
written to ``convert.output_dir``. What only the bytes can tell (NaN/Inf, tied copies that differ, a corrupt
chunk, ``convert.verify``) shows when converting.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtk.config import ConvertConfig, LmtkConfig
from lmtk.convert import _Bases, _main_dtype, find_units, prepare, staging_folder, unit_error
from lmtk.discover import Unit
from lmtk.errors import ConversionError
from lmtk.namings import Naming, load_namings
from lmtk.pace import Pace
from lmtk.progress import training_progress
from lmtk.readers import open_reader
from lmtk.storage import BucketFolder, scheme_of
from lmtk.summary import Result, write_summary

log = logging.getLogger(__name__)

# What each status means in the table: the same words a conversion's summary would then hold, as "ok", ...
DECISIONS = {"planned": "convert", "skipped": "skip", "failed": "refuse"}


@dataclass
class Planned(Result):
    """A ``summary.json`` entry of ``task=inspect``: the conversion's ``Result`` plus what it would be made of.

    ``status`` is ``planned`` where the conversion would say ``ok``; ``skipped`` and ``failed`` (with the
    conversion's own one-line error) mean what they mean there.
    """

    trainer: str | None = None
    base_model: str | None = None
    base_model_from: str | None = None
    # The naming of conf/naming/ the tensors carry (hf, torchtitan_llama3, ...), as conversion.json's codebase_naming.
    naming: str | None = None
    # The dtype config.json would say (the cast of convert.dtype, else the checkpoint's).
    dtype: str | None = None
    tensors: int = 0
    bytes_to_write: int = 0
    # Why a folder already there is converted again or replaced.
    note: str | None = None


def run_inspect(cfg: LmtkConfig, *, run_dir: Path, since: float | None = None) -> list[Planned]:
    """Plan every checkpoint as ``run_convert`` would, print the plan as a table, write ``run_dir/summary.json``."""
    options = cfg.convert
    root = Path(options.checkpoint_path)
    try:
        units = find_units(options)
    except ConversionError as e:
        log.error("%s", e)
        results = [Planned(checkpoint=str(root / options.only) if options.only else options.checkpoint_path, status="failed", error=str(e))]
    else:
        log.info("found %d checkpoint(s) under %s", len(units), root)
        if options.checksum:  # skip decisions then compare sha256 sums, as the conversion's do
            log.warning("convert.checksum=true: the dry run reads every byte of the checkpoints to fingerprint them")
        since = time.time() if since is None else since
        bases = _Bases(options.base_model, default=cfg.model.name_or_path, model_class=options.model_class)
        namings = load_namings(cfg.namings)
        results = [inspect_unit(unit, bases=bases, namings=namings, options=options, since=since) for unit in units]
    write_summary(run_dir / "summary.json", results)
    output_dir = options.output_dir if scheme_of(options.output_dir) else Path(options.output_dir).absolute()
    print(table(results, root=root, output_dir=output_dir), flush=True)
    return results


def inspect_unit(unit: Unit, *, bases: _Bases, namings: list[Naming], options: ConvertConfig, since: float) -> Planned:
    if scheme_of(options.output_dir) is None:
        return _inspect_unit(unit, bases=bases, namings=namings, options=options, since=since,
                             final=Path(options.output_dir).absolute() / unit.name)
    url = f"{options.output_dir.rstrip('/')}/{unit.name}"
    staging = None
    try:
        staging = staging_folder(unit.name, options)
        local = staging / unit.name
        try:  # the bucket's conversion.json, read only: a dry run removes nothing
            BucketFolder(url, storage_options=options.storage_options).stage_marker(local, clean=False)
        except ConversionError as e:
            log.warning("would fail: %s", e)
            return Planned(checkpoint=str(unit.path), status="failed", output=url, layout=unit.layout, error=str(e))
        entry = _inspect_unit(unit, bases=bases, namings=namings, options=options, since=since, final=local)
    except ConversionError as e:
        return Planned(checkpoint=str(unit.path), status="failed", output=url, layout=unit.layout, error=str(e))
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    entry.output = url
    if entry.error:  # named as the user sees it: the bucket, not its staging folder
        entry.error = entry.error.replace(str(local), url)
    return entry


def _inspect_unit(unit: Unit, *, bases: _Bases, namings: list[Naming], options: ConvertConfig, since: float,
                  final: Path) -> Planned:
    entry = Planned(checkpoint=str(unit.path), status="planned", output=str(final), layout=unit.layout,
                    trainer=unit.trainer.name if unit.trainer else None)
    for sibling, what in unit.siblings():
        log.info("%s: skipping %s (%s)", unit.path, sibling.name, what)
    reader = None
    try:
        base, entry.base_model_from = bases.of(unit)
        entry.base_model = base.name_or_path
        reader = open_reader(unit.model, unit.layout, allowed_globals=options.allowed_globals, readahead=False)
        entry.metadata = training_progress(unit, reader.info.metadata)
        prepared = prepare(reader, unit, base=base, namings=namings, final=final, options=options, since=since)
    except Exception as e:
        entry.status, entry.error = "failed", str(unit_error(e, unit=unit, final=final))
        log.warning("would fail: %s", entry.error)
        return entry
    finally:
        if reader is not None:
            reader.close()
    prepared.close()
    if prepared.skipped:
        marker = prepared.existing or {}
        entry.status, entry.naming, entry.dtype = "skipped", marker.get("codebase_naming"), marker.get("dtype")
        entry.note = "already converted from this very source"
        return entry
    entry.naming = prepared.label
    entry.dtype = str(_main_dtype(prepared.outputs)).removeprefix("torch.")
    entry.tensors = len(prepared.outputs)
    entry.bytes_to_write = sum(spec.nbytes for spec in prepared.outputs.values())
    entry.note = _replacing(prepared.existing, source=str(unit.path.resolve()), overwrite=options.overwrite)
    return entry


def _replacing(existing: dict[str, Any] | None, *, source: str, overwrite: bool) -> str | None:
    if existing is None:
        return None
    if existing.get("source") != source:
        return f"replaces the conversion of {existing.get('source')} (convert.overwrite=true)"
    return "converted again (convert.overwrite=true)" if overwrite else "converted again: the source or options changed"


def table(results: list[Planned], *, root: Path, output_dir: Path | str) -> str:
    """The plan, one row per checkpoint, then the reason for each refusal and the totals."""
    header = ["#", "checkpoint", "trainer", "layout", "step", "naming", "base model (from)", "dtype", "size",
              "output", "decision"]
    rows = [[str(i), _under(Path(r.checkpoint), root), *_columns(r, root=root)] for i, r in enumerate(results, 1)]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    lines = [f"lmtk inspect: {len(results)} checkpoint(s) under {root} -> {output_dir} (metadata read only; "
             "nothing converted, nothing written there)", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    notes = [f"  {i}: {r.error or r.note}" for i, r in enumerate(results, 1) if r.error or r.note]
    if notes:
        lines += ["", *notes]
    planned = [r for r in results if r.status == "planned"]
    count = {s: sum(r.status == s for r in results) for s in DECISIONS}
    size = f" ({Pace.size(sum(r.bytes_to_write for r in planned))})" if planned else ""
    lines += ["", f"{count['planned']} to convert{size}, {count['skipped']} skipped as finished, {count['failed']} refused"]
    return "\n".join(lines)


def _columns(r: Planned, *, root: Path) -> list[str]:
    base = f"{_under(Path(r.base_model), root)} ({r.base_model_from})" if r.base_model else "-"
    step = r.metadata.get("step", r.metadata.get("iteration"))
    size = Pace.size(r.bytes_to_write) if r.bytes_to_write else "-"
    output = Path(r.output).name if r.output else "-"
    return [r.trainer or "-", r.layout or "-", "-" if step is None else str(step), r.naming or "-", base,
            r.dtype or "-", size, output, DECISIONS[r.status]]


def _under(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when below it (the run's own names), else as given."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        return str(path)
    return str(relative) if relative.parts else path.name
