"""What training frameworks write: one entry per trainer, read by discovery (``lmtk.discover``).

A trainer saves each checkpoint as a *unit*: a directory (or file) that holds the model part (the
checkpoint lmtk converts) beside training state it skips. Each entry says how to recognise a unit,
where its model part sits, what the other files are, where the trainer records its progress, and
where the model's own HuggingFace config may be. Adding a trainer is adding an entry here.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

# Tokenizer, processor and config files a trainer may copy into a unit; reused as the unit's base model.
_HF_FILES = {
    "config.json": "the model's HF config",
    "generation_config.json": "the model's HF generation config",
    "tokenizer*": "tokenizer files",
    "special_tokens_map.json": "tokenizer files",
    "vocab.json": "tokenizer files",
    "merges.txt": "tokenizer files",
    "chat_template.*": "tokenizer files",
    "processor_config.json": "processor files",
    "preprocessor_config.json": "processor files",
    "video_preprocessor_config.json": "processor files",
}
# What peft writes beside a checkpoint of a PEFT model.
_PEFT_FILES = {
    "adapter_model.safetensors": "the trainer's own copy of the LoRA adapter (checked against the FSDP part)",
    "adapter_config.json": "the LoRA adapter's settings (read for lora_alpha)",
    "README.md": "peft's model card",
}
_ACCELERATE_MODEL = ("pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")


@dataclass(frozen=True)
class Trainer:
    name: str
    # The unit's file or directory name (a full match). Groups named step, epoch or iteration are progress.
    unit: str
    # Where the model part sits in the unit, the first that exists wins; "" is the unit itself.
    model: tuple[str, ...] = ("",)
    # Globs that must match something in the unit as well (for units whose name says little).
    requires: tuple[str, ...] = ()
    # What else a unit holds (glob -> what it is): skipped, one log line each.
    skip: dict[str, str] = field(default_factory=dict)
    # The trainer's own progress records in the unit: file -> {"step": keys, "epoch": keys}, the first key found wins.
    records: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    # Folders in the unit that may hold the model's HF config.json and tokenizer ("" is the unit itself).
    config: tuple[str, ...] = ()
    # Files, relative to the unit, where the trainer records a LoRA adapter's settings (lora_alpha), first found wins.
    adapter_records: tuple[str, ...] = ()
    # The trainer's own copy of the adapter beside the FSDP part (checked against it; the FSDP part wins).
    adapter_copy: str | None = None
    # When a unit is finished being written (``task=watch``, ``lmtk.watch``); each rule comes from the trainer's
    # save code, cited at its entry. Globs, relative to a directory unit, that must match once the save is done:
    complete: tuple[str, ...] = ()
    # Names the trainer stages a save under before renaming it into place: never a unit, nor anything inside.
    staging: str | None = None
    # A file beside the units where the trainer records the last step it finished saving (a unit is complete
    # once that number reaches the unit's step).
    latest: str | None = None


TRAINERS = (
    Trainer(
        name="transformers Trainer",
        unit=r"checkpoint-(?P<step>\d+)",
        model=_ACCELERATE_MODEL,
        skip={
            "optimizer*": "optimizer state", "scheduler.pt": "LR scheduler state", "rng_state*.pth": "RNG state",
            "trainer_state.json": "trainer state", "training_args.bin": "training arguments",
            "model*.safetensors": "HF weights the Trainer wrote beside FSDP's",
            "model.safetensors.index.json": "HF weights the Trainer wrote beside FSDP's",
            "pytorch_model*.bin": "HF weights the Trainer wrote beside FSDP's",
            **_HF_FILES, **_PEFT_FILES,
        },
        records={"trainer_state.json": {"step": ("global_step",), "epoch": ("epoch",)}},
        # FULL_STATE_DICT checkpoints carry the config; the run's output_dir has it once save_model ran.
        config=("", ".."),
        # FULL_STATE_DICT checkpoints carry peft's files; the run's output_dir has them once save_model ran.
        adapter_records=("adapter_config.json", "../adapter_config.json"),
        adapter_copy="adapter_model.safetensors",
        # transformers trainer.py, Trainer._save_checkpoint: model, optimizer, scheduler and RNG state first, then
        # self.state.save_to_json(trainer_state.json); versions 4.36-4.38 staged all of it in tmp-checkpoint-N and
        # renamed it to checkpoint-N at the end.
        complete=("trainer_state.json",),
        staging=r"tmp-checkpoint-\d+",
    ),
    Trainer(
        name="accelerate save_state",
        # Automatic naming numbers the saves; any other folder holding FSDP's model part is one too.
        unit=r"checkpoint_(?P<iteration>\d+)|.+",
        model=_ACCELERATE_MODEL,
        requires=("random_states_*.pkl",),
        skip={
            "optimizer*": "optimizer state", "scheduler*.bin": "LR scheduler state",
            "random_states_*.pkl": "RNG state", "sampler*.bin": "sampler state", "dl_state_dict*.bin": "dataloader state",
            "custom_checkpoint_*.pkl": "registered custom state",
        },
        # accelerate accelerator.py, Accelerator.save_state: model, optimizer, scheduler, sampler, then
        # save_accelerator_state writes random_states_{process_index}.pkl last (requires above already asks for it).
        complete=("random_states_*.pkl",),
    ),
    Trainer(
        name="verl",
        unit=r"global_step_(?P<step>\d+)",
        model=("actor",),
        skip={"data.pt": "dataloader state", "critic": "the critic (a value model, not a causal LM)",
              "optim_world_size_*": "optimizer state per rank", "extra_state_world_size_*": "LR scheduler and RNG state per rank",
              "fsdp_config.json": "FSDP settings", "latest_checkpointed_iteration.txt": "verl's pointer to its latest step",
              "lora_train_meta.json": "verl's LoRA settings (read for the scale)"},
        config=("actor/huggingface",),
        adapter_records=("actor/lora_train_meta.json", "lora_train_meta.json"),
        # verl trainer/ppo/ray_trainer.py, RayPPOTrainer._save_checkpoint: actor (and critic) save_checkpoint, the
        # dataloader's data.pt, and only then latest_checkpointed_iteration.txt is written with the step.
        latest="latest_checkpointed_iteration.txt",
    ),
    Trainer(
        name="OLMo-core",
        unit=r"step(?P<step>\d+)",
        model=("model_and_optim",),
        skip={"train": "trainer state per rank", "config.json": "OLMo-core's experiment config",
              ".metadata.json": "OLMo-core's checkpoint metadata"},
        # olmo_core/train/checkpoint.py, Checkpointer.save: writes into stepN-tmp, then .metadata.json, then renames
        # the folder to stepN.
        complete=(".metadata.json",),
        staging=r"step\d+-tmp",
    ),
    Trainer(
        # torchtitan's CheckpointManager, and torch's DCP HuggingFaceStorageWriter, save step-N directories.
        name="torchtitan / DCP",
        unit=r"step-(?P<step>\d+)",
        skip={"sharded": "the per-rank shards the consolidated weights were made from"},
        # torchtitan components/checkpoint.py, CheckpointManager.save -> dcp.save (async too): torch's
        # FileSystemWriter.finish writes .metadata last (via .metadata.tmp, then a rename). Checked for every
        # DCP part of every trainer (lmtk.watch.dcp_complete).
        complete=(".metadata",),
    ),
    Trainer(
        # Lightning Trainer and Fabric: a .ckpt file, or a DCP directory of that name with meta.pt.
        name="Lightning",
        unit=r".+\.ckpt",
        records={"meta.pt": {"step": ("global_step", "step"), "epoch": ("epoch",)}},
        # lightning fabric/strategies/fsdp.py, FSDPStrategy.save_checkpoint (sharded): the DCP save, then rank 0
        # torch.save's the metadata to meta.pt. A .ckpt file is one torch.save: the quiet period alone.
        complete=("meta.pt",),
    ),
)


def describe(name: str, trainers: tuple[Trainer, ...] | None = None) -> str | None:
    """What a file or folder called ``name`` is to the trainers (their ``skip`` globs), if anything."""
    for trainer in TRAINERS if trainers is None else trainers:
        for glob, what in trainer.skip.items():
            if fnmatch.fnmatch(name, glob):
                return what
    return None
