"""Provenance in every output folder: ``conversion.json`` (also the completion marker) and a model card."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmtk import __version__
from lmtk.discover import Unit
from lmtk.output import MARKER
from lmtk.plan import Plan
from lmtk.readers.base import Reader


def provenance(unit: Unit, reader: Reader, plan: Plan | None, *, fingerprint: dict[str, Any], dtype: str,
               metadata: dict[str, Any], base_model: str, base_origin: str, naming: str,
               verify: dict[str, Any] | None, warnings: list[str], adapter: dict[str, Any] | None,
               model_class: tuple[str, str] = ("", "")) -> dict[str, Any]:
    info = reader.info
    return {
        "lmtk_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": str(unit.path.resolve()),
        "model_part": str(unit.model.resolve()),
        "trainer": unit.trainer.name if unit.trainer else None,
        "layout": info.layout,
        "files": [{k: v for k, v in f.items() if k != "mtime_ns"} for f in fingerprint["files"]],
        "location": info.location,
        "metadata": metadata,
        "base_model": base_model,
        "base_model_from": base_origin,
        "dtype": dtype,
        "model_class": model_class[0],
        "model_class_from": model_class[1],
        "codebase_naming": naming,
        "naming": plan.naming.name if plan else "peft",
        "renamed": plan.renamed if plan else {},
        "dropped": plan.dropped if plan else [],
        "adapter": adapter,
        "verify": verify,
        "warnings": warnings,
        "fingerprint": fingerprint,
    }


def write_provenance(folder: Path, record: dict[str, Any], *, architecture: str) -> None:
    """The model card first, ``conversion.json`` last: its presence means the folder is finished."""
    multimodal = any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))
    (folder / "README.md").write_text(model_card(record, architecture=architecture, multimodal=multimodal))
    (folder / MARKER).write_text(json.dumps(record, indent=2, default=str) + "\n")


def _front_matter(base: str, *, library: str, multimodal: bool) -> str:
    """The card's metadata, as the hub reads it (JSON strings are YAML strings); a local base is no hub id."""
    pipeline = "image-text-to-text" if multimodal else "text-generation"
    lines = [f"library_name: {library}", f"pipeline_tag: {pipeline}", "tags:", "- lmtk", "- fsdp"]
    if not Path(base).exists():
        lines.append(f"base_model: {json.dumps(base)}")
    return "\n".join(lines)


def _usage(architecture: str, *, multimodal: bool) -> str:
    if not multimodal:
        return _USAGE
    return f"""```python
from transformers import AutoProcessor, {architecture}

model = {architecture}.from_pretrained("path/to/this/folder")
processor = AutoProcessor.from_pretrained("path/to/this/folder")
```
"""


def model_card(record: dict[str, Any], *, architecture: str, multimodal: bool = False) -> str:
    base = record["base_model"]
    meta = record["metadata"]
    trained = ", ".join(f"{k} {meta[k]}" for k in ("epoch", "step", "iteration") if k in meta) or "not recorded"
    if "progress_from" in meta:
        trained += f" (from {meta['progress_from']})"
    verify = record["verify"]
    checked = ("not run" if not verify else
               f"skipped ({verify['skipped']})" if verify.get("skipped") else
               f"{'passed' if verify['passed'] else 'FAILED'}: max |logit diff| {verify['max_abs_diff']:.3g} "
               f"against the source in float32 (tolerance {verify['tolerance']:.3g})")
    name = Path(record["source"]).name
    adapter = record.get("adapter")
    peft = bool(adapter and adapter["output"] == "peft")
    what = (f"A LoRA adapter (r {adapter['r']}, lora_alpha {adapter['lora_alpha']}, from {adapter['alpha_from']}) "
            f"for `{architecture}`" if peft else
            f"A `{architecture}` with its LoRA adapter merged (r {adapter['r']}, lora_alpha {adapter['lora_alpha']})"
            if adapter else f"A `{architecture}`")
    weights = (f"{record['dtype']}, `adapter_model.safetensors`, names as `PeftModel.save_pretrained` writes them"
               if peft else f"{record['dtype']}, safetensors, names as `save_pretrained` writes them")
    usage = _PEFT_USAGE.format(base=base) if peft else _usage(architecture, multimodal=multimodal)
    warnings = "".join(f"\n> **Warning**: {w}\n" for w in record.get("warnings") or [])
    return f"""---
{_front_matter(base, library="peft" if peft else "transformers", multimodal=multimodal)}
---

# {name}

{what} converted by lmtk {record['lmtk_version']} from an FSDP training checkpoint.
{warnings}
| | |
| --- | --- |
| source | `{record['source']}` ({record['layout']} layout{f", {record['trainer']}" if record['trainer'] else ""}) |
| training progress | {trained} |
| base model (config, tokenizer) | `{base}` (from {record['base_model_from']}) |
| weights | {weights} |
| names in the checkpoint | {record['codebase_naming']} ({record['naming']}) |
| logits check | {checked} |
| converted | {record['created']} |

{usage}
`conversion.json` lists the source files, the keys renamed and dropped, and the fingerprint that lets
a rerun skip this folder.
"""


_USAGE = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```
"""

_PEFT_USAGE = """```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```
"""
