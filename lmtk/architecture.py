"""What the converted weights must be, read off the model class built on the meta device.

transformers names some tensors differently in memory and on disk (a Mixtral module holds fused
``mlp.experts.gate_up_proj``; ``save_pretrained`` writes per-expert ``block_sparse_moe.experts.N.w1``).
A checkpoint may use either naming, so both are described here, and the output is always the
on-disk one, made with transformers' own ``revert_weight_conversion`` one small group at a time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lmtk.readers.base import TensorSpec

log = logging.getLogger(__name__)

MEMORY, HUB = "in-memory", "hub"
_LAYER = re.compile(r"^(.*?\.\d+)\.")
# Tried in order when the config names no class of its own: the first whose mapping has the model_type wins
# (AutoModelForImageTextToText first for configs that nest a text_config).
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText")


@dataclass(frozen=True)
class Naming:
    """One way to name the model's tensors."""

    name: str
    # Every persistent tensor under this naming, tied copies included.
    params: dict[str, TensorSpec]
    # Tied weights in effect: copy -> the tensor it equals (``lm_head.weight`` -> the embedding).
    tied: dict[str, str]
    # On-disk name -> the names (in this naming) whose tensors it is converted from, together.
    sources: dict[str, tuple[str, ...]]


@dataclass
class Architecture:
    class_name: str
    base_prefix: str
    # What ``save_pretrained`` writes, in its order (dtypes are the checkpoint's, not these).
    disk: dict[str, TensorSpec]
    namings: tuple[Naming, ...]
    # Names a checkpoint may carry that the output never has (non-persistent buffers, old rotary caches).
    droppable: frozenset[str]
    ignore_patterns: tuple[str, ...]
    # Modules whose weight is stored [in, out] (GPT-2's Conv1D): an adapter's B·A is transposed onto them.
    transposed: frozenset[str]
    # Builds the meta-device module, for transformers' conversion functions (only models that convert).
    model_factory: Callable[[], Any] = field(repr=False, compare=False)
    _model: Any = field(default=None, repr=False, compare=False)
    # Where the class came from: the config's architectures, convert.model_class, or the Auto class that maps it.
    class_from: str = ""

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = self.model_factory()
        return self._model

    @property
    def converts(self) -> bool:
        return len(self.namings) > 1

    def to_json(self) -> dict[str, Any]:
        return {
            "class_name": self.class_name,
            "base_prefix": self.base_prefix,
            "disk": _specs_to_json(self.disk),
            "namings": [
                {"name": n.name, "params": _specs_to_json(n.params), "tied": n.tied,
                 "sources": {k: list(v) for k, v in n.sources.items()}}
                for n in self.namings
            ],
            "droppable": sorted(self.droppable),
            "ignore_patterns": list(self.ignore_patterns),
            "transposed": sorted(self.transposed),
            "class_from": self.class_from,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, model_factory: Callable[[], Any]) -> Architecture:
        return cls(
            class_name=data["class_name"],
            base_prefix=data["base_prefix"],
            disk=_specs_from_json(data["disk"]),
            namings=tuple(
                Naming(name=n["name"], params=_specs_from_json(n["params"]), tied=dict(n["tied"]),
                       sources={k: tuple(v) for k, v in n["sources"].items()})
                for n in data["namings"]
            ),
            droppable=frozenset(data["droppable"]),
            ignore_patterns=tuple(data["ignore_patterns"]),
            transposed=frozenset(data["transposed"]),
            class_from=data["class_from"],
            model_factory=model_factory,
        )

    def droppable_name(self, name: str) -> bool:
        return name in self.droppable or name.endswith(".inv_freq") or any(
            re.search(p, name) for p in self.ignore_patterns
        )

    def to_disk(self, naming: Naming, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One group of tensors under ``naming`` -> the tensors ``save_pretrained`` writes for them."""
        if naming.name == HUB or not self.converts:
            return tensors
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, tensors)


def model_class(config: Any, *, override: str | None = None) -> tuple[type, str]:
    """The transformers class to build: ``override``, else the config's ``architectures``, else an Auto class's."""
    import transformers

    if override:
        cls = _transformers_class(override)
        if cls is None:
            raise ValueError(f"convert.model_class={override} is not a model class of transformers "
                             f"{transformers.__version__}")
        wanted = getattr(cls, "config_class", None)
        if isinstance(wanted, type) and not isinstance(config, wanted):
            raise ValueError(f"convert.model_class={override} is built from a {wanted.__name__}, but the base "
                             f"config is a {type(config).__name__}")
        return cls, "convert.model_class"
    for name in getattr(config, "architectures", None) or ():
        if (cls := _transformers_class(name)) is not None:
            return cls, "the config's architectures"
    # A config nesting a text config is multimodal: AutoModelForCausalLM maps some (mllama, qwen3_5) to their
    # text model alone, which would drop the vision tower.
    multimodal = config.get_text_config() is not config
    for auto in sorted(AUTO_CLASSES, key=lambda a: multimodal and a != "AutoModelForImageTextToText"):
        mapping = getattr(transformers, auto)._model_mapping
        if type(config) in mapping:
            return mapping[type(config)], auto
    raise ValueError(f"no model class for model_type {getattr(config, 'model_type', None)!r}: the config names "
                     f"none in architectures and none of {', '.join(AUTO_CLASSES)} maps it; set convert.model_class")


def _transformers_class(name: str) -> type | None:
    import transformers

    try:
        cls = getattr(transformers, name, None)
    except Exception as e:  # a class whose optional dependency is missing
        log.debug("transformers.%s: %s", name, e)
        return None
    return cls if isinstance(cls, type) and hasattr(cls, "_from_config") else None


def build_architecture(config: Any, *, override: str | None = None) -> Architecture:
    from transformers.core_model_loading import revert_weight_conversion

    cls, class_from = model_class(config, override=override)
    with torch.device("meta"):
        model = cls._from_config(config)
    state = model.state_dict()
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    ignored = set(model._keys_to_ignore_on_save or ())
    saved = {k: v for k, v in state.items() if k not in tied and k not in ignored}
    disk = revert_weight_conversion(model, dict(saved))
    memory = Naming(
        name=MEMORY,
        params={k: TensorSpec.of(v) for k, v in state.items()},
        tied=tied,
        sources=_sources(model, saved, disk),
    )
    namings: tuple[Naming, ...] = (memory,)
    if set(disk) != set(saved):
        namings += (_hub_naming(model, disk, tied),)
    buffers = {name for name, _ in model.named_buffers()}
    return Architecture(
        class_name=type(model).__name__,
        base_prefix=model.base_model_prefix or "",
        disk={k: TensorSpec.of(v) for k, v in disk.items()},
        namings=namings,
        droppable=frozenset(buffers - state.keys()),
        ignore_patterns=tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()),
        transposed=frozenset(name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"),
        class_from=class_from,
        model_factory=lambda: model,
    )


def _specs_to_json(specs: dict[str, TensorSpec]) -> dict[str, Any]:
    return {name: [list(spec.shape), str(spec.dtype).removeprefix("torch.")] for name, spec in specs.items()}


def _specs_from_json(data: dict[str, Any]) -> dict[str, TensorSpec]:
    specs = {}
    for name, (shape, dtype) in data.items():
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"not a dtype: {dtype}")
        specs[name] = TensorSpec(tuple(shape), getattr(torch, dtype))
    return specs


def _sources(model: Any, saved: dict[str, torch.Tensor], disk: dict[str, torch.Tensor]) -> dict[str, tuple[str, ...]]:
    """Group in-memory names so each group converts on its own; per tensor when possible, else per layer."""
    if set(disk) == set(saved):
        return {k: (k,) for k in disk}
    from transformers.core_model_loading import revert_weight_conversion

    for group_of in (lambda key: key, lambda key: (m.group(1) if (m := _LAYER.match(key)) else key)):
        groups: dict[str, list[str]] = {}
        for key in saved:
            groups.setdefault(group_of(key), []).append(key)
        sources: dict[str, tuple[str, ...]] = {}
        try:
            for members in groups.values():
                for out, tensor in revert_weight_conversion(model, {k: saved[k] for k in members}).items():
                    if out in sources or tuple(tensor.shape) != tuple(disk.get(out, tensor).shape):
                        raise ValueError(out)
                    sources[out] = tuple(members)
        except Exception as e:  # this grouping does not reproduce the whole-model conversion
            log.debug("grouping failed at %s", e)
            continue
        if sources.keys() == disk.keys():
            return sources
    raise ValueError(f"{type(model).__name__}: its weight conversion cannot be applied per tensor or per layer")


def _hub_naming(model: Any, disk: dict[str, torch.Tensor], tied: dict[str, str]) -> Naming:
    from transformers.core_model_loading import revert_weight_conversion

    def on_disk(name: str) -> str:
        [out] = revert_weight_conversion(model, {name: torch.empty(0, device="meta")}).keys()
        return out

    tied_on_disk = {on_disk(copy): on_disk(source) for copy, source in tied.items()}
    params = {k: TensorSpec.of(v) for k, v in disk.items()}
    params.update({copy: params[source] for copy, source in tied_on_disk.items()})
    return Naming(name=HUB, params=params, tied=tied_on_disk, sources={k: (k,) for k in disk})
