"""The base model: its config, its architecture built on the meta device, its tokenizer."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from lmtk.architecture import Architecture, build_architecture
from lmtk.errors import ConversionError

log = logging.getLogger(__name__)


@dataclass
class BaseModel:
    """``convert.base_model``: a local folder or a hub id found in the local cache."""

    name_or_path: str

    @cached_property
    def config(self) -> Any:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.name_or_path, **self._hub_kwargs())
        except (OSError, ValueError) as e:
            raise ConversionError(self.name_or_path, self._not_found(e)) from e

    @cached_property
    def architecture(self) -> Architecture:
        try:
            return build_architecture(self.config)
        except ValueError as e:  # not a causal LM, or a weight mapping we cannot stream
            raise ConversionError(self.name_or_path, f"cannot convert to this model: {e}") from e

    def save_generation_config(self, folder: Path) -> bool:
        from transformers import GenerationConfig

        try:
            generation = GenerationConfig.from_pretrained(self.name_or_path, **self._hub_kwargs())
        except (OSError, ValueError):
            generation = GenerationConfig.from_model_config(self.config)
        if generation.to_diff_dict():
            generation.save_pretrained(folder)
            return True
        return False

    @cached_property
    def tokenizer(self) -> Any | None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, **self._hub_kwargs())
        except (OSError, ValueError, TypeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        else:
            if tokenizer.vocab_size:
                return tokenizer
            reason = "it has no tokenizer files"  # transformers builds an empty one from config.json alone
        log.warning("%s: no tokenizer to copy (%s); outputs get weights and config only", self.name_or_path, reason)
        return None

    def save_tokenizer(self, folder: Path) -> list[str]:
        """Write the base model's tokenizer files into ``folder``; nothing (and a warning) when it has none."""
        if self.tokenizer is None:
            return []
        before = set(os.listdir(folder))
        self.tokenizer.save_pretrained(folder)
        return sorted(set(os.listdir(folder)) - before)

    def _hub_kwargs(self) -> dict[str, Any]:
        # A local folder never touches the network; a hub id is looked up in the cache first.
        return {"local_files_only": True} if Path(self.name_or_path).is_dir() or _offline() else {}

    def _not_found(self, e: Exception) -> str:
        if Path(self.name_or_path).is_dir():
            return f"not a model folder: {str(e).splitlines()[0]}"
        return (
            f"base model not found: not a local folder, not in the HuggingFace cache, and the hub is "
            f"unreachable or offline; set convert.base_model=/path/to/folder holding config.json "
            f"(and tokenizer files)"
        )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
