"""Find the checkpoints under ``convert.checkpoint_path``: one file, a directory, or a whole training run.

Each checkpoint found is a *unit* (see ``lmtk.trainers``): what a trainer saved at one step, with the
model part lmtk converts and the training state it skips. Torch-free, so it can run before the heavy
imports and inside a sweep's launcher.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lmtk.errors import ConversionError
from lmtk.layouts import FULL_SUFFIXES, HF_CONFIG, detect, is_hf_model, output_stem
from lmtk.trainers import TRAINERS, Trainer, describe

log = logging.getLogger(__name__)

# How far below checkpoint_path units are looked for (verl's checkpoints/project/experiment/global_step_N
# is four levels down, Lightning's lightning_logs/version_0/checkpoints/*.ckpt too).
MAX_DEPTH = 6
# Progress in a unit's name, for trainers whose pattern names none: epoch=0-step=4, step-000004, global_step_4.
_NAME_PROGRESS = (re.compile(r"(?<![a-z])epoch[=_-]?(?P<epoch>\d+)"), re.compile(r"step[=_-]?(?P<step>\d+)"))


@dataclass(frozen=True)
class Unit:
    """One checkpoint: ``path`` as the trainer wrote it, ``model`` the part lmtk converts (often ``path``)."""

    path: Path
    model: Path
    layout: str
    trainer: Trainer | None = None
    # The output folder's name (set by ``discover`` once every unit of the run is known).
    name: str = ""

    def progress_in_name(self) -> dict[str, int]:
        """Step, epoch or save count in the unit's name (``checkpoint-4``, ``epoch=0-step=4.ckpt``)."""
        found: dict[str, int] = {}
        if self.trainer and (match := re.fullmatch(self.trainer.unit, self.path.name)):
            found = {k: int(v) for k, v in match.groupdict().items() if v is not None}
        for pattern in _NAME_PROGRESS:
            if match := pattern.search(output_stem(self.path.name)):
                for key, value in match.groupdict().items():
                    found.setdefault(key, int(value))
        return found

    def config_folder(self) -> Path | None:
        """Where the unit carries the model's own HF config (verl's actor/huggingface, a Trainer checkpoint)."""
        for relative in self.trainer.config if self.trainer else ():
            folder = _normal(self.path / relative)
            if _is_hf_config(folder / HF_CONFIG):
                return folder
        return None

    def adapter_records(self) -> list[Path]:
        """Where a LoRA adapter's settings may be recorded: the trainer's places, then beside the checkpoint."""
        places = [self.path / r for r in (self.trainer.adapter_records if self.trainer else ())]
        places += [self.path / "adapter_config.json", self.path.parent / "adapter_config.json"]
        unique = dict.fromkeys(_normal(p) for p in places if p.parent.is_dir())
        return list(unique)

    def adapter_copy(self) -> Path | None:
        """The trainer's own copy of the adapter beside the FSDP part, when it wrote one."""
        copy = self.path / self.trainer.adapter_copy if self.trainer and self.trainer.adapter_copy else None
        return copy if copy is not None and copy.is_file() and copy != self.model else None

    def siblings(self) -> list[tuple[Path, str]]:
        """What the unit holds beside the model part (and what the trainer put inside it), skipped."""
        if self.trainer is None or not self.path.is_dir():
            return []
        if self.path == self.model:  # torch's consolidated weights keep the per-rank shards in sharded/
            return [(c, what) for c in sorted(self.path.iterdir()) if (what := describe(c.name, (self.trainer,)))]
        own = {self.model, *(self.path / c for c in self.trainer.config if c)}
        found = []
        for child in sorted(self.path.iterdir()):
            if not any(o == child or o.is_relative_to(child) for o in own if o != self.path):
                found.append((child, describe(child.name, (self.trainer,)) or "not the model"))
        if self.model.is_dir():  # verl keeps optimizer and RNG rank files in the model's own folder
            found += [(c, what) for c in sorted(self.model.iterdir()) if (what := describe(c.name, (self.trainer,)))]
        return found


def discover(path: Path, *, layout: str | None = None) -> list[Unit]:
    """The units ``path`` stands for, each with its output name; ``layout`` keeps only that layout."""
    if not path.exists():
        raise ConversionError(path, "no such file or directory")
    unit = _unit_at(path, top=True)
    if unit is not None:
        units = [unit]
    elif path.is_file():
        raise ConversionError(path, f"not a checkpoint file (expected one of {', '.join(FULL_SUFFIXES)})")
    else:
        if is_hf_model(path):
            log.info("skipping the model files in %s: a HuggingFace model already (config.json + weights)", path)
        units = []
        _walk(path, depth=1, seen={path.resolve(): path}, units=units)
    if layout is not None:
        for u in [u for u in units if u.layout != layout]:
            log.info("skipping %s: a %s checkpoint, but convert.initial_format=%s", u.model, u.layout, layout)
        units = [u for u in units if u.layout == layout]
    if not units:
        raise ConversionError(path, "no checkpoints found in this directory")
    return _named(units, root=path)


def _unit_at(path: Path, *, top: bool) -> Unit | None:
    for trainer in TRAINERS:
        if re.fullmatch(trainer.unit, path.name) and _has_all(path, trainer.requires):
            for relative in trainer.model:
                model = path / relative if relative else path
                if found := (detect(model) if model.exists() else None):
                    return Unit(path, model, found, trainer)
    if top:
        # The model part inside a unit (checkpoint-4/pytorch_model_fsdp_0): the unit it belongs to.
        parent = path.parent
        for trainer in TRAINERS:
            if re.fullmatch(trainer.unit, parent.name) and _has_all(parent, trainer.requires):
                if any(r and parent / r == path for r in trainer.model) and (found := detect(path)):
                    return Unit(parent, path, found, trainer)
        if path.is_file():
            return Unit(path, path, "full")  # a file named by the user is a checkpoint, whatever its suffix
    found = detect(path)
    return Unit(path, path, found) if found else None


def _normal(path: Path) -> Path:
    """``a/b/../c`` as ``a/c``, for a local path or one in a bucket alike."""
    return type(path)(os.path.normpath(path.as_posix()))


def _has_all(path: Path, globs: tuple[str, ...]) -> bool:
    return all(path.is_dir() and any(path.glob(g)) for g in globs)


def _is_hf_config(file: Path) -> bool:
    import json

    try:
        return "model_type" in json.loads(file.read_text())
    except (OSError, ValueError, TypeError):
        return False


def _walk(folder: Path, *, depth: int, seen: dict[Path, Path], units: list[Unit]) -> None:
    hf_model = is_hf_model(folder)
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        real = child.resolve()
        if real in seen:  # a symlink to something already found (Lightning's last.ckpt), or a loop
            log.info("skipping %s: the same as %s", child, seen[real])
            continue
        seen[real] = child
        if child.is_file() and (what := describe(child.name)):
            log.info("skipping %s (%s)", child, what)
            continue
        if child.is_file() and hf_model:
            log.debug("skipping %s: part of the HuggingFace model there", child)
            continue
        unit = _unit_at(child, top=False)
        if unit is not None:
            units.append(unit)
        elif child.is_dir():
            if is_hf_model(child):
                log.info("skipping the model files in %s: a HuggingFace model already (config.json + weights)", child)
            if depth < MAX_DEPTH:
                _walk(child, depth=depth + 1, seen=seen, units=units)
            else:
                log.info("not looking below %s: more than %d levels under convert.checkpoint_path", child, MAX_DEPTH)
        else:
            log.debug("skipping %s: not a checkpoint", child)


def _named(units: list[Unit], *, root: Path) -> list[Unit]:
    """Name each unit after itself; units that would share a name are named by their path under ``root``."""
    stems = [output_stem(u.path.name) for u in units]
    named = []
    for unit, stem in zip(units, stems):
        if stems.count(stem) > 1 and unit.path.is_relative_to(root) and unit.path != root:
            *parents, last = unit.path.relative_to(root).parts
            stem = "--".join([*parents, output_stem(last)])
        named.append(Unit(unit.path, unit.model, unit.layout, unit.trainer, stem))
    return named
