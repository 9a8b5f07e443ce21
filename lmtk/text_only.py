"""``convert.text_only``: a vision-language checkpoint's language model alone, as a CausalLM folder.

The text model's class is the one AutoModelForCausalLM maps the config's ``text_config`` to (Gemma 3's
Gemma3ForCausalLM, LLaVA's LlamaForCausalLM), or for Qwen2-VL, Qwen2.5-VL and Qwen3-VL, whose text
configs have no causal-LM class of their own, Qwen2 / Qwen3: on text alone their multimodal rotary
embedding is the plain one. The checkpoint is matched against the full model first (either naming), so
every tensor is accounted for; the language model's are then shown under the text class's names and the
rest (vision tower, projector) is dropped and listed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lmtk.architecture import HUB, Architecture, build_architecture
from lmtk.errors import ConversionError
from lmtk.plan import Plan, make_plan
from lmtk.readers.base import Reader, SourceInfo, TensorSpec, same_bytes

log = logging.getLogger(__name__)

# Text configs with no causal-LM class, and the text family whose class runs them on text alone.
_TEXT_FAMILY = {"qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3"}


def text_config(config: Any) -> Any:
    """The language model's config, as its own causal-LM family."""
    from transformers import AutoConfig, AutoModelForCausalLM

    text = config.get_text_config()
    if text is config:
        raise ValueError(f"convert.text_only: a {type(config).__name__} nests no text_config; it is a text model")
    if type(text) in AutoModelForCausalLM._model_mapping:
        return text
    family = _TEXT_FAMILY.get(text.model_type)
    if family is None:
        raise ValueError(f"convert.text_only: transformers has no causal-LM class for {text.model_type}")
    values = {k: v for k, v in text.to_dict().items() if k not in ("model_type", "architectures")}
    rope = dict(values.get("rope_parameters") or {})
    rope.pop("mrope_section", None)
    rope.pop("mrope_interleaved", None)
    values["rope_parameters"] = rope
    return AutoConfig.for_model(family, **values)


class TextOnly:
    """A reader's checkpoint under the text model's names; the other tensors are left out."""

    def __init__(self, reader: Reader, original: dict[str, str], dropped: list[str]) -> None:
        self.path: Path = reader.path
        self.info: SourceInfo = reader.info
        self._reader, self.original, self.dropped = reader, original, dropped

    def specs(self) -> dict[str, TensorSpec]:
        specs = self._reader.specs()
        return {name: specs[key] for name, key in self.original.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._reader.read(self.original[name])

    def read_pieces(self, name: str) -> Iterable[torch.Tensor]:
        return self._reader.read_pieces(self.original[name])

    def same_bytes(self, a: str, b: str) -> bool:
        return same_bytes(self._reader, self.original[a], self.original[b])

    def close(self) -> None:
        self._reader.close()


def extract(reader: Reader, plan: Plan, arch: Architecture, *, config: Any) -> tuple[Reader, Plan, Architecture, Any]:
    """The text model's view of a checkpoint planned against the full model, its plan, architecture and config."""
    try:
        text = text_config(config)
        text_arch = build_architecture(text)
    except ValueError as e:
        raise ConversionError(reader.path, f"convert.text_only: {e}") from e
    renames = _prefixes(arch, text_arch)
    memory_of = _memory_names(arch) if plan.naming.name == HUB else {}
    original: dict[str, str] = {}
    for name, key in plan.matched.items():
        memory = memory_of.get(name, name)
        for old, new in renames:
            if memory.startswith(old):
                original[new + memory[len(old):]] = key
                break
    dropped = sorted(set(plan.matched.values()) - set(original.values()))
    view = TextOnly(reader, original, dropped)
    text_plan = make_plan(reader.path, view.specs(), text_arch)
    text_plan.renamed = {key: name for name, key in original.items() if key != name}
    text_plan.dropped += dropped
    log.info("%s: text only: %d tensors of the language model kept as %s, %d dropped (vision tower, projector)",
             reader.path, len(original), text_arch.class_name, len(dropped))
    return view, text_plan, text_arch, text


def _prefixes(arch: Architecture, text_arch: Architecture) -> list[tuple[str, str]]:
    """(in-memory prefix in the full model, prefix in the text model) of the decoder and the LM head."""
    full, text = arch.model, text_arch.model
    pairs = []
    for part in ("get_decoder", "get_output_embeddings"):
        pairs.append((_name_of(full, getattr(full, part)()), _name_of(text, getattr(text, part)())))
    return [(f"{old}.", f"{new}.") for old, new in pairs]


def _name_of(model: Any, module: Any) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not part of {type(model).__name__}")


def _memory_names(arch: Architecture) -> dict[str, str]:
    """Hub (on-disk) name -> in-memory name, for checkpoints saved under the older names."""
    from transformers.core_model_loading import revert_weight_conversion

    memory = arch.namings[0]
    found = {}
    for name in memory.params:
        [disk] = revert_weight_conversion(arch.model, {name: torch.empty(0, device="meta")}).keys()
        found[disk] = name
    return found
