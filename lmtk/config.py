"""Typed schemas for every config group; the YAML files in ``conf/`` fill them in."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from importlib.resources import files
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from lmtk.sweep import sweep_units, sweep_values


class Task(str, Enum):
    convert = "convert"
    # What convert would do with each checkpoint, from metadata alone: nothing converted, nothing written
    # to convert.output_dir (lmtk.inspect).
    inspect = "inspect"
    # Follow a live training run: convert each checkpoint once its trainer has finished writing it (lmtk.watch).
    watch = "watch"


class InitialFormat(str, Enum):
    """``fsdp`` detects the layout; the others pin one layout (see ``lmtk.layouts``)."""

    fsdp = "fsdp"
    full = "full"
    dcp = "dcp"
    ranks = "ranks"
    hf_shards = "hf_shards"
    safetensors = "safetensors"


class FinalFormat(str, Enum):
    """``huggingface``: a model folder (a LoRA checkpoint merged into its base); ``peft``: a PEFT adapter folder."""

    huggingface = "huggingface"
    peft = "peft"


class DType(str, Enum):
    """``auto`` takes the base config's dtype; leaving ``convert.dtype`` null keeps the checkpoint's."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    auto = "auto"


class NonFinite(str, Enum):
    """What a NaN or Inf weight does: fail the checkpoint, or only warn."""

    fail = "fail"
    warn = "warn"


class Transform(str, Enum):
    """Tensor surgery a naming may need on the way to HF's layout (``lmtk.namings`` implements each)."""

    # Rotary q/k rows from the interleaved (Meta, torchtitan) order to HF's half-split order.
    rotary_half_split = "rotary_half_split"
    # The same elements in another shape (OLMo-core's router, saved flat), its sizes from the base config.
    reshape = "reshape"


@dataclass
class TensorTransform:
    kind: Transform = MISSING
    # The base config field whose head count groups the rows (num_attention_heads, num_key_value_heads).
    heads: str = "num_attention_heads"
    # reshape: the base config fields giving each dimension, e.g. [num_experts, hidden_size].
    shape: list[str] = field(default_factory=list)


@dataclass
class ExpertSplit:
    """One stacked tensor of every expert ([E, I, D], or [E*I, D]) -> one HF tensor per expert."""

    # The HF name of expert {e}'s tensor, "{}" standing for the layer as in keys.
    to: str = MISSING
    # The base config field(s) holding the expert count, the first present wins.
    experts: list[str] = field(default_factory=lambda: ["num_experts"])
    # The codebase stores the expert's matrix transposed against HF's ([I, D] for HF's [D, I]).
    transpose: bool = False


@dataclass
class NamingConfig:
    """How another codebase names a model's tensors (``conf/naming/*.yaml``)."""

    codebase: str = MISSING
    family: str = MISSING
    # HF classes these names map onto; the base config's must be one of them (empty: any).
    architectures: list[str] = field(default_factory=list)
    # Checkpoint name -> HF name, "{}" standing for a layer (or expert) number; empty: the names are HF's.
    keys: dict[str, str] = field(default_factory=dict)
    # HF name (as in keys) -> the transform its tensor needs.
    transforms: dict[str, TensorTransform] = field(default_factory=dict)
    # Checkpoint names dropped on purpose (buffers the codebase saves that HF recomputes), "{}" as in keys.
    drop: list[str] = field(default_factory=list)
    # Checkpoint name -> how its stack of experts splits into HF's per-expert tensors.
    split: dict[str, ExpertSplit] = field(default_factory=dict)
    # Checkpoint names the HF class has no place for: dropped while exactly zero (the model is the same without
    # them), refused otherwise (a load-balancing bias that steers the routing).
    drop_if_zero: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    # A HuggingFace hub id or a local folder holding config.json (and tokenizer files).
    name_or_path: str = MISSING


@dataclass
class PathsConfig:
    root: str = MISSING
    checkpoints: str = "${.root}/output"
    converted: str = "${.root}/converted"


@dataclass
class LoraConfig:
    """How a LoRA checkpoint's scale is known when its trainer recorded none (``lmtk.adapters``)."""

    # lora_alpha; null: from the trainer's record (adapter_config.json, verl's lora_train_meta.json).
    alpha: Optional[float] = None
    # rsLoRA scales by alpha/sqrt(r); null: as the record says, else false.
    use_rslora: Optional[bool] = None
    # A peft adapter_config.json to take alpha (and the adapter folder's settings) from.
    adapter_config: Optional[str] = None
    # Which adapter, when the checkpoint holds several.
    adapter_name: Optional[str] = None


@dataclass
class ConvertConfig:
    # Config and tokenizer: a hub id or a local folder. Unset: the checkpoint's own (verl's actor/huggingface,
    # a Trainer checkpoint's config.json) when it carries one, else model.name_or_path.
    base_model: Optional[str] = None
    # A checkpoint, a directory of checkpoints, or a training run's output directory; local, or in a bucket
    # (s3://bucket/run, gs://bucket/run), read in place by ranged GETs.
    checkpoint_path: str = "${paths.checkpoints}"
    # Convert only this one of the checkpoints found under checkpoint_path (its path relative to it).
    only: Optional[str] = None
    initial_format: InitialFormat = InitialFormat.fsdp
    final_format: FinalFormat = FinalFormat.huggingface
    # A local folder, or a bucket: s3://bucket/prefix, gs://bucket/prefix (pip install "lmtk[s3]" / "lmtk[gcs]").
    output_dir: str = "${paths.converted}"
    # fsspec options for buckets (key, secret, client_kwargs.endpoint_url, ...); null: the standard
    # credential chains (AWS env vars, profiles, instance roles, AWS_ENDPOINT_URL; Google's default credentials).
    # A mapping, typed Any so that one override sets it whole: convert.storage_options={key:...,secret:...}.
    storage_options: Any = None
    # Where a conversion into a bucket is made before it is uploaded; null: the system's temp dir.
    staging_dir: Optional[str] = None
    # Ranged GETs in flight while reading from a bucket (16 MiB each): memory beyond a local conversion's.
    remote_concurrency: int = 4
    # A shard never exceeds this size unless one tensor does (huggingface_hub's rule).
    max_shard_size: str = "5GB"
    # Shard files written at once; on a 2-core machine with one disk more workers gained less than the noise
    # (benchmarks/results.md), so one is the default.
    write_workers: int = 1
    # Reconvert even when a finished output of lmtk's matches the source (a changed source always is).
    overwrite: bool = False
    # Also fingerprint the sources by sha256 (reads every byte once more), not only size and mtime.
    checksum: bool = False
    nonfinite: NonFinite = NonFinite.fail
    # Cast floating-point weights while streaming; null keeps what the checkpoint holds.
    dtype: Optional[DType] = None
    # Load the written folder with from_pretrained and compare logits with the source (float32, CPU).
    verify: bool = False
    # Verify needs the model twice in RAM; larger models skip it (recorded in the summary).
    verify_max_params: int = 3_000_000_000
    # The transformers class to convert to (e.g. Qwen2_5_VLForConditionalGeneration); unset: the base config's
    # architectures, else the first of AutoModelForCausalLM, AutoModelForImageTextToText that maps its model_type.
    model_class: Optional[str] = None
    # A vision-language checkpoint's language model alone, as a CausalLM folder (the vision tower dropped, listed).
    text_only: bool = False
    # Types a weights-only load refuses but you trust, e.g. ["argparse.Namespace"]; never needed for weights.
    allowed_globals: list[str] = field(default_factory=list)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class WatchConfig:
    """``task=watch``: how often to look, how long a checkpoint must be quiet, when to stop, what to run after."""

    # Seconds between two looks at convert.checkpoint_path at most (filesystem events bring the next look sooner).
    interval: float = 30.0
    # Seconds no file of a checkpoint may change (size or mtime) before it is converted, on top of its trainer's rule.
    settle: float = 60.0
    # Stop once this many seconds pass with nothing new; null: only a trainer's end marker or a signal stops it.
    idle_timeout: Optional[float] = 3600.0
    # Wake on filesystem events (inotify) as well as every interval; false: look every interval only.
    events: bool = True
    # Commands run after each converted folder, one argv each; {output}, {checkpoint}, {step} are filled in.
    on_converted: list[list[str]] = field(default_factory=list)


@dataclass
class SweepConfig:
    # sweep=checkpoints: every file or directory matching it (sorted) becomes one job's convert.checkpoint_path.
    # (sweep=units needs none: it sweeps convert.only over the checkpoints found under convert.checkpoint_path.)
    glob: Optional[str] = None


@dataclass
class LmtkConfig:
    task: Task = MISSING
    experiment_name: str = "lmtk"
    # 0 warnings only, 1 progress, 2 debug
    verbose_level: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    # Set by the sweep group (sweep=checkpoints), only with --multirun.
    sweep: SweepConfig | None = None
    # The tensor namings a checkpoint may use, from the naming group: all shipped ones unless pinned (naming=NAME).
    namings: dict[str, NamingConfig] = field(default_factory=dict)


def example_path(name: str) -> str:
    """``${lmtk.example:NAME}``: a file of the bundled example, wherever lmtk is installed."""
    return str(files("lmtk.examples") / name)


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=LmtkConfig)
    _register_launchers()
    OmegaConf.register_new_resolver("lmtk.example", example_path, replace=True)
    OmegaConf.register_new_resolver("lmtk.files", sweep_values, replace=True)
    OmegaConf.register_new_resolver("lmtk.units", sweep_units, replace=True)


def _register_launchers() -> None:
    """lmtk's launchers (``hydra_plugins.lmtk_launchers``), also where Hydra's plugin scan cannot list them:
    it walks the ``hydra_plugins`` folders on disk, and an editable install maps the module elsewhere."""
    try:
        import hydra_plugins.lmtk_launchers as launchers
    except ImportError:  # the slurm extra is not installed
        return
    from hydra.core.plugins import Plugins

    for name in ("ConvertSlurmLauncher", "ConvertLocalLauncher"):
        if (launcher := getattr(launchers, name, None)) is not None:
            Plugins.instance().register(launcher)
