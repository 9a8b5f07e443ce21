"""The base model: its folder (config, tokenizer and processor files), and the architecture its config describes.

Config, tokenizer and processor files are copied as they are. The architecture (names and shapes from the model
class on the meta device) is cached per config and transformers version, so later runs on the same
base skip importing the model code: most of lmtk's start-up time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import version
from pathlib import Path
from typing import Any

from lmtk import __version__, remote
from lmtk.architecture import Architecture, build_architecture
from lmtk.errors import ConversionError
from lmtk.layouts import HF_WEIGHTS_FILE
from lmtk.readers.base import Reader
from lmtk.readers.safetensors import INDEX, SafetensorsReader
from lmtk.storage import scheme_of

log = logging.getLogger(__name__)

# What AutoTokenizer reads and save_pretrained writes, across tokenizer kinds.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "tokenizer.tiktoken",
)
# What AutoProcessor reads besides the tokenizer (vision-language models); copied as files, so lmtk needs
# neither PIL nor torchvision.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
_HUB_PATTERNS = ["config.json", "generation_config.json", *TOKENIZER_FILES, *PROCESSOR_FILES]


@dataclass
class BaseModel:
    """``convert.base_model``: a local folder, or a hub id (from the local cache when offline)."""

    name_or_path: str
    # convert.model_class: the transformers class to build instead of the one the config names.
    model_class: str | None = None

    @cached_property
    def remote(self) -> Any:
        """The base's folder in a bucket (``s3://...``), or None."""
        return remote.location(self.name_or_path, listed=False) if scheme_of(self.name_or_path) else None

    @cached_property
    def folder(self) -> Path:
        if self.remote is not None:
            return self._local_copy(self.remote)
        local = Path(self.name_or_path)
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise ConversionError(local, "not a model folder: it has no config.json")
            return local
        from huggingface_hub import snapshot_download

        try:  # config and tokenizer files only, never the hub's weights
            return Path(snapshot_download(self.name_or_path, allow_patterns=_HUB_PATTERNS, local_files_only=_offline()))
        except Exception as e:
            log.debug("%s: %s", self.name_or_path, e)
            raise ConversionError(
                self.name_or_path,
                "base model not found: not a local folder, not in the HuggingFace cache, and the hub is "
                "unreachable or offline; set convert.base_model=/path/to/folder holding config.json "
                "(and tokenizer files)",
            ) from e

    def _local_copy(self, folder: Any) -> Path:
        """A base folder in a bucket: its config, tokenizer and processor files (small) in a local temp folder,
        for transformers to read; its weights stay in the bucket."""
        if not (folder / "config.json").is_file():
            raise ConversionError(folder, "not a model folder: it has no config.json")
        local = Path(tempfile.mkdtemp(prefix="lmtk-base-"))
        weakref.finalize(self, shutil.rmtree, local, True)
        for name in _HUB_PATTERNS:
            if (folder / name).is_file():
                (local / name).write_bytes((folder / name).read_bytes())
        return local

    @cached_property
    def config_dict(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ConversionError(self.folder / "config.json", f"unreadable: {e}") from e

    @cached_property
    def config(self) -> Any:
        """The transformers config object (imports transformers: only on a cache miss or for verify)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConversionError(self.folder / "config.json", f"not a transformers config: {e}") from e

    @cached_property
    def architecture(self) -> Architecture:
        cache = _cache_dir() / f"{self._architecture_key()}.json"
        try:
            arch = Architecture.from_json(json.loads(cache.read_text()), model_factory=self._meta_model)
            log.debug("architecture from %s", cache)
            return arch
        except (OSError, ValueError, KeyError, TypeError):
            pass
        try:
            arch = build_architecture(self.config, override=self.model_class)
        except ValueError as e:  # no model class for it, or a weight mapping we cannot stream
            raise ConversionError(self.name_or_path, f"cannot convert to this model: {e}") from e
        _write_atomically(cache, json.dumps(arch.to_json()))
        return arch

    def weights(self) -> Reader:
        """The base model's own weights (safetensors, memory-mapped), for checkpoints that hold only an adapter."""
        folder = self.remote if self.remote is not None else self.folder
        if not _has_weights(folder) and self.remote is None and not Path(self.name_or_path).is_dir():
            from huggingface_hub import snapshot_download

            try:
                folder = Path(snapshot_download(self.name_or_path, allow_patterns=["*.safetensors", INDEX],
                                                local_files_only=_offline()))
            except Exception as e:
                log.debug("%s: %s", self.name_or_path, e)
        if not _has_weights(folder):
            raise ConversionError(folder, "the base model has no safetensors weights (model.safetensors or an index), "
                                  "and the checkpoint holds only a LoRA adapter: point convert.base_model at the "
                                  "model the adapter was trained on, with its weights")
        return SafetensorsReader(folder)

    def _architecture_key(self) -> str:
        canonical = json.dumps(self.config_dict, sort_keys=True)
        key = f"{canonical}|{self.model_class}|{version('transformers')}|{__version__}"
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    def _meta_model(self) -> Any:
        return build_architecture(self.config, override=self.model_class).model

    def save_config(self, folder: Path, *, architectures: list[str], dtype: str,
                    config: dict[str, Any] | None = None) -> None:
        """The base's config.json (or ``config``: a text model extracted from it) with the written class and dtype."""
        config = {**(self.config_dict if config is None else config), "architectures": architectures, "dtype": dtype}
        config.pop("torch_dtype", None)  # the older name of "dtype"
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def save_generation_config(self, folder: Path) -> None:
        """The base's generation_config.json, or the one save_pretrained derives from the config."""
        if (self.folder / "generation_config.json").is_file():
            shutil.copyfile(self.folder / "generation_config.json", folder / "generation_config.json")
            return
        # A vision-language config keeps its special tokens in text_config.
        sources = (self.config_dict, self.config_dict.get("text_config") or {})
        derived = {k: v for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if (v := next((c[k] for c in sources if c.get(k) is not None), None)) is not None}
        if derived:
            derived["_from_model_config"] = True
            (folder / "generation_config.json").write_text(json.dumps(derived, indent=2, sort_keys=True) + "\n")

    def save_tokenizer(self, folder: Path, *, processor: bool = True) -> list[str]:
        """Copy the base's tokenizer (and processor) files; nothing (and a warning, once) when it has none."""
        names = (*TOKENIZER_FILES, *PROCESSOR_FILES) if processor else TOKENIZER_FILES
        found = [name for name in names if (self.folder / name).is_file()]
        if not found:
            if not getattr(self, "_warned", False):
                log.warning("%s: no tokenizer files; outputs get weights and config only", self.name_or_path)
                self._warned = True
            return []
        for name in found:
            shutil.copyfile(self.folder / name, folder / name)
        return found


def _has_weights(folder: Any) -> bool:
    return (folder / INDEX).is_file() or any(HF_WEIGHTS_FILE.match(p.name) for p in folder.iterdir())


def _cache_dir() -> Path:
    root = os.environ.get("LMTK_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmtk"
    return Path(root) / "architectures"


def _write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temp.write_text(text)
        os.replace(temp, path)
    except OSError as e:  # a read-only home: no cache, only slower start-ups
        log.debug("cannot cache the architecture at %s: %s", path, e)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
