"""LoRA adapters in a checkpoint: which tensors they are, their scale, and the two outputs made from them.

A checkpoint of a PEFT model holds, beside or instead of the base weights, each target module's ``lora_A``
and ``lora_B`` (``lora_embedding_A``/``_B`` for embeddings, ``lora_magnitude_vector`` for DoRA) under
``base_model.model.`` and, when several adapters live in one model, their names. They are recognised by
those names alone (``PEFT`` below), whatever the layout. Merged, each target weight is one ``Derived``
tensor: W + scale · B·A from its three sources; as an adapter folder, the tensors keep the names
``PeftModel.save_pretrained`` gives them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmtk import keys
from lmtk.derived import BASE, CHECKPOINT, Derived, DerivedReader, LoraMerge, Source
from lmtk.errors import ConversionError, listing
from lmtk.readers.base import Reader, TensorSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeftNames:
    """peft's vocabulary for LoRA, as it names tensors in memory and in the files it saves."""

    prefix: str = "base_model.model"
    # Segment -> which factor it is.
    factors: tuple[tuple[str, str], ...] = (
        ("lora_A", "A"), ("lora_B", "B"), ("lora_embedding_A", "A"), ("lora_embedding_B", "B"),
        ("lora_magnitude_vector", "magnitude"),
    )
    embedding_factors: tuple[str, ...] = ("lora_embedding_A", "lora_embedding_B")
    # The wrapped original layer of a target module: its weights are the base weights.
    base_layer: str = "base_layer"
    # modules_to_save: the trained copy, and the frozen original beside it.
    trained_copy: str = "modules_to_save"
    frozen_copy: str = "original_module"


PEFT = PeftNames()


@dataclass
class LoraModule:
    """One target module's adapter tensors (checkpoint keys)."""

    name: str
    a: str = ""
    b: str = ""
    magnitude: str | None = None
    embedding: bool = False


@dataclass
class Lora:
    """The LoRA part of a checkpoint, for one adapter; every other tensor is a base weight."""

    adapter_name: str | None
    modules: dict[str, LoraModule]
    # Model parameter name -> checkpoint key: base weights (a target's base_layer under its plain name).
    base: dict[str, str]
    # modules_to_save: parameter name -> the trained copy's key.
    trained_copies: dict[str, str]
    dropped: list[str] = field(default_factory=list)


@dataclass
class LoraScale:
    """lora_alpha and how it scales, from the trainer's record or the config; never guessed."""

    alpha: float
    use_rslora: bool
    source: str
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    r: int | None = None
    # The whole record when it is peft's adapter_config.json (the adapter folder starts from it).
    record: dict[str, Any] = field(default_factory=dict)

    def of(self, module: str, rank: int) -> float:
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha)
        return float(alpha) / (math.sqrt(rank) if self.use_rslora else rank)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module name or its dotted tail."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def find_lora(path: Path, specs: dict[str, TensorSpec], *, adapter_name: str | None) -> Lora | None:
    """The checkpoint's LoRA tensors, or None when it holds none."""
    factors = dict(PEFT.factors)
    parsed: list[tuple[str, str, str | None, str, str]] = []  # (key, kind, adapter, module or param, factor)
    for key in specs:
        parts = _model_parts(key)
        at = next((i for i, p in enumerate(parts) if p in factors or p in (PEFT.base_layer, PEFT.trained_copy,
                                                                           PEFT.frozen_copy)), None)
        if at is None:
            parsed.append((key, "base", None, ".".join(parts), ""))
            continue
        segment, module, rest = parts[at], ".".join(parts[:at]), parts[at + 1:]
        if segment == PEFT.base_layer:
            parsed.append((key, "base", None, ".".join(parts[:at] + rest), ""))
        elif segment == PEFT.frozen_copy:
            parsed.append((key, "frozen", None, ".".join(parts[:at] + rest), ""))
        elif segment == PEFT.trained_copy:
            if not rest[1:]:
                raise ConversionError(path, f"{key}: a modules_to_save entry without an adapter name")
            parsed.append((key, "copy", rest[0], ".".join(parts[:at] + rest[1:]), ""))
        else:
            if rest in ([], ["weight"]):
                adapter = None
            elif len(rest) == 1 or rest[1:] == ["weight"]:
                adapter = rest[0]
            else:
                raise ConversionError(path, f"{key}: not a LoRA tensor peft writes (a bias of lora_B? "
                                      "lora_bias=True is not supported)")
            if adapter == "bias" or rest[-1:] == ["bias"]:
                raise ConversionError(path, f"{key}: lora_bias=True adapters are not supported")
            parsed.append((key, "factor", adapter, module, segment))
    if not any(kind == "factor" for _, kind, *_ in parsed):
        return None
    names = sorted({a or "" for _, kind, a, *_ in parsed if kind in ("factor", "copy")})
    chosen = _choose_adapter(path, names, adapter_name)
    modules: dict[str, LoraModule] = {}
    base: dict[str, str] = {}
    copies: dict[str, str] = {}
    dropped: list[str] = []
    for key, kind, adapter, name, segment in parsed:
        if kind in ("factor", "copy") and (adapter or "") != chosen:
            dropped.append(key)
        elif kind == "base":
            if name in base:
                raise ConversionError(path, f"{base[name]} and {key} are both the base weight {name}")
            base[name] = key
        elif kind == "frozen":
            dropped.append(key)
        elif kind == "copy":
            copies[name] = key
        else:
            module = modules.setdefault(name, LoraModule(name))
            factor = factors[segment]
            if factor == "magnitude":
                module.magnitude = key
            else:
                setattr(module, factor.lower(), key)
                module.embedding = segment in PEFT.embedding_factors
    if not any(f"{m.name}.weight" in base for m in modules.values() if not m.embedding):
        # Only the adapter was saved (peft's own names): a plain weight beside it is a modules_to_save copy.
        embedding_bases = {f"{m.name}.weight" for m in modules.values() if m.embedding}
        copies.update({name: key for name, key in base.items() if name not in embedding_bases})
        base = {name: key for name, key in base.items() if name in embedding_bases}
    half = [m.name for m in modules.values() if not (m.a and m.b)]
    if half:
        raise ConversionError(path, f"LoRA modules with lora_A or lora_B missing: {listing(half)}")
    return Lora(adapter_name=chosen or None, modules=modules, base=base, trained_copies=copies, dropped=dropped)


def _model_parts(key: str) -> list[str]:
    """A key's segments from the model's own names on: wrappers and everything up to ``base_model.model`` gone."""
    parts = keys.strip_wrappers(key).split(".")
    prefix = PEFT.prefix.split(".")
    for i in range(len(parts) - len(prefix)):
        if parts[i : i + len(prefix)] == prefix:
            return parts[i + len(prefix):]
    return parts


def _choose_adapter(path: Path, names: list[str], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in names:
            raise ConversionError(path, f"convert.lora.adapter_name={wanted}: the checkpoint holds the adapter(s) "
                                  f"{', '.join(n or '(unnamed)' for n in names)}")
        return wanted
    if len(names) > 1:
        raise ConversionError(path, f"holds {len(names)} LoRA adapters ({', '.join(n or '(unnamed)' for n in names)}); "
                              "choose one with convert.lora.adapter_name=NAME")
    return names[0]


def read_record(path: Path) -> dict[str, Any] | None:
    """A trainer's record of the adapter's settings (peft's adapter_config.json, verl's lora_train_meta.json)."""
    try:
        record = json.loads(path.read_text())
    except OSError:
        return None
    except ValueError as e:
        raise ConversionError(path, f"unreadable LoRA record ({e})") from e
    if not isinstance(record, dict) or "lora_alpha" not in record:
        return None
    return record


def scale_of(records: list[Path], *, alpha: float | None, use_rslora: bool | None, adapter_config: str | None,
             where: Path) -> LoraScale:
    """The scale's settings: an adapter_config the user names, else convert.lora.alpha, else the trainer's record."""
    found = next(((p, r) for p in records if (r := read_record(p)) is not None), None)
    if adapter_config is not None:
        record = read_record(Path(adapter_config))
        if record is None:
            raise ConversionError(adapter_config, "convert.lora.adapter_config: not a LoRA adapter_config.json "
                                  "(no such file, or no lora_alpha in it)")
        return _from_record(record, source=str(Path(adapter_config).absolute()), use_rslora=use_rslora)
    if alpha is not None:
        if found and float(found[1]["lora_alpha"]) != float(alpha):
            log.warning("%s: convert.lora.alpha=%s, but %s records lora_alpha=%s; using %s", where, alpha, found[0],
                        found[1]["lora_alpha"], alpha)
        rslora = use_rslora if use_rslora is not None else bool(found and found[1].get("use_rslora"))
        return LoraScale(alpha=float(alpha), use_rslora=rslora, source="convert.lora.alpha")
    if found is None:
        looked = ", ".join(str(p) for p in records) or "nowhere"
        raise ConversionError(where, f"a LoRA checkpoint, but no lora_alpha is recorded (looked at {looked}); set "
                              "convert.lora.alpha=ALPHA (or convert.lora.adapter_config=/path/to/adapter_config.json)")
    return _from_record(found[1], source=str(found[0].absolute()), use_rslora=use_rslora)


def _from_record(record: dict[str, Any], *, source: str, use_rslora: bool | None) -> LoraScale:
    return LoraScale(
        alpha=float(record["lora_alpha"]),
        use_rslora=bool(record.get("use_rslora")) if use_rslora is None else use_rslora,
        source=source, alpha_pattern=dict(record.get("alpha_pattern") or {}),
        rank_pattern=dict(record.get("rank_pattern") or {}), r=record.get("r"),
        record=record if "peft_type" in record else {},
    )


@dataclass
class Checked:
    """A LoRA module with what merging it needs: the base weight's source and shape, rank and scale."""

    module: LoraModule
    weight: Source
    weight_spec: TensorSpec
    rank: int
    scale: float
    transpose: bool


def check(path: Path, lora: Lora, scale: LoraScale, specs: dict[str, TensorSpec], *, base: dict[str, TensorSpec],
          transposed: frozenset[str], model_params: dict[str, TensorSpec]) -> dict[str, Checked]:
    """Every module's shapes agree with its rank and its base weight; the ranks with the record."""
    problems: list[str] = []
    checked: dict[str, Checked] = {}
    for name, module in lora.modules.items():
        a, b = specs[module.a].shape, specs[module.b].shape
        weight = f"{name}.weight"
        if weight in lora.base:
            source, spec = Source(lora.base[weight]), specs[lora.base[weight]]
        elif weight in base:
            source, spec = Source(weight, BASE), base[weight]
        elif weight in model_params:
            source, spec = Source(weight, BASE), model_params[weight]  # the peft folder needs only the shape
        else:
            problems.append(f"{module.a}: the model has no {weight}")
            continue
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            problems.append(f"{module.a} {list(a)} and {module.b} {list(b)} do not share a rank")
            continue
        rank = a[0]
        recorded = _pattern_value(scale.rank_pattern, name, scale.r)
        if isinstance(recorded, int) and recorded != rank:
            problems.append(f"{module.a} has rank {rank}, but {scale.source} says r={recorded}")
            continue
        transpose = module.embedding or name in transposed
        expected = (a[1], b[0]) if transpose else (b[0], a[1])
        if tuple(spec.shape) != expected:
            problems.append(f"{module.a} {list(a)} and {module.b} {list(b)} do not fit {weight} {list(spec.shape)}")
            continue
        if module.magnitude is not None:
            if transpose:
                problems.append(f"{module.magnitude}: DoRA on a transposed or embedding layer is not supported")
                continue
            if tuple(specs[module.magnitude].shape) != (b[0],):
                problems.append(f"{module.magnitude} {list(specs[module.magnitude].shape)} does not fit {weight}")
                continue
        checked[name] = Checked(module, source, spec, rank, scale.of(name, rank), transpose)
    if problems:
        raise ConversionError(path, f"LoRA tensors do not fit the model: {listing(problems)}")
    return checked


def untrained(reader: Reader, lora: Lora) -> bool:
    """Every lora_B exactly zero: the adapter was never trained, or was mis-gathered."""
    return all(not bool(reader.read(m.b).any()) for m in lora.modules.values())


def merged(reader: Reader, lora: Lora, checked: dict[str, Checked], *, base: Reader | None) -> DerivedReader:
    """The checkpoint as the merged model: base weights, each target one W + s·B·A, trained copies swapped in."""
    specs = reader.specs()
    readers: dict[str, Reader] = {CHECKPOINT: reader}
    tensors: dict[str, Derived] = {}
    if base is not None:
        readers[BASE] = base
        tensors.update({name: Derived(spec, (Source(name, BASE),)) for name, spec in base.specs().items()})
    tensors.update({name: Derived(specs[key], (Source(key),)) for name, key in lora.base.items()})
    for name, c in checked.items():
        m = c.module
        sources = (c.weight, Source(m.a), Source(m.b)) + ((Source(m.magnitude),) if m.magnitude else ())
        tensors[f"{name}.weight"] = Derived(c.weight_spec, sources,
                                            LoraMerge(c.scale, transpose=c.transpose, dora=m.magnitude is not None))
    for name, key in lora.trained_copies.items():
        tensors[name] = Derived(specs[key], (Source(key),))
    renamed = {name: key for name, key in {**lora.base, **lora.trained_copies}.items() if key != name}
    return DerivedReader(readers, tensors, renamed=renamed, dropped=list(lora.dropped))


def adapter_tensors(lora: Lora, checked: dict[str, Checked], specs: dict[str, TensorSpec],
                    *, base: dict[str, TensorSpec]) -> dict[str, Derived]:
    """The tensors of the adapter folder, under the names ``PeftModel.save_pretrained`` writes."""
    out: dict[str, Derived] = {}
    prefix = PEFT.prefix
    for name, c in sorted(checked.items()):
        m = c.module
        if m.embedding:
            # peft saves a targeted embedding's base layer too (save_embedding_layers="auto").
            if c.weight.reader == CHECKPOINT or f"{name}.weight" in base:
                out[f"{prefix}.{name}.base_layer.weight"] = Derived(c.weight_spec, (c.weight,))
            out[f"{prefix}.{name}.lora_embedding_A"] = Derived(specs[m.a], (Source(m.a),))
            out[f"{prefix}.{name}.lora_embedding_B"] = Derived(specs[m.b], (Source(m.b),))
        else:
            out[f"{prefix}.{name}.lora_A.weight"] = Derived(specs[m.a], (Source(m.a),))
            out[f"{prefix}.{name}.lora_B.weight"] = Derived(specs[m.b], (Source(m.b),))
        if m.magnitude:
            out[f"{prefix}.{name}.lora_magnitude_vector"] = Derived(specs[m.magnitude], (Source(m.magnitude),))
    for name, key in sorted(lora.trained_copies.items()):
        out[f"{prefix}.{name}"] = Derived(specs[key], (Source(key),))
    return out


def adapter_config(lora: Lora, checked: dict[str, Checked], scale: LoraScale, *, base_model: str,
                   module_names: set[str]) -> Any:
    """peft's own LoraConfig for the adapter folder: it fills in, checks and writes every field of adapter_config.json."""
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ConversionError("convert.final_format=peft", "writes adapter_config.json with peft's own schema: "
                              "pip install \"lmtk[peft]\"") from e
    ranks = {name: c.rank for name, c in checked.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    fields = {k: v for k, v in scale.record.items() if k in LoraConfig.__dataclass_fields__}
    fields.update(
        r=r, lora_alpha=scale.alpha, use_rslora=scale.use_rslora, base_model_name_or_path=base_model,
        task_type=fields.get("task_type") or "CAUSAL_LM", target_modules=_target_modules(set(checked), module_names),
        modules_to_save=sorted({n.rsplit(".", 2)[-2] for n in lora.trained_copies}) or None,
        rank_pattern={**fields.get("rank_pattern", {}), **{n: k for n, k in ranks.items() if k != r}},
        alpha_pattern=scale.alpha_pattern, use_dora=any(c.module.magnitude for c in checked.values()),
        fan_in_fan_out=any(c.transpose and not c.module.embedding for c in checked.values()),
        inference_mode=True,
    )
    fields.pop("peft_version", None)
    return LoraConfig(**fields)


def _target_modules(targets: set[str], module_names: set[str]) -> list[str]:
    """The last names of the targets when they pick exactly these modules of the model, else the full names."""
    tails = {t.rsplit(".", 1)[-1] for t in targets}
    picked = {m for m in module_names if m.rsplit(".", 1)[-1] in tails}
    return sorted(tails) if picked == targets else sorted(targets)


def differing(ours: Reader, theirs: dict[str, torch.Tensor], tensors: dict[str, Derived]) -> list[str]:
    """Names where the trainer's own adapter file differs from the adapter taken from the FSDP part."""
    differ = []
    for name, entry in tensors.items():
        other = theirs.get(name)
        if other is None:
            continue
        mine = ours.read(entry.sources[0].key)
        if tuple(other.shape) != tuple(mine.shape):
            differ.append(f"{name} {list(other.shape)} != {list(mine.shape)}")
        elif not torch.equal(other.to(mine.dtype), mine):
            differ.append(name)
    return differ
