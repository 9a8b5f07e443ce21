"""Real FSDP2 checkpoints of tiny models, for the bundled example, the tests and the benchmarks.

A few CPU processes (gloo) shard a small model with ``fully_shard``, take one optimizer step and
save it the ways training code does. Rank 0 also saves the sharded model's own logits on a fixed
input, the reference a converted folder must reproduce.

    python -m lmtk.synthetic OUT_DIR --family gpt2 --world-size 2
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# What one run can save; see ``_save`` for what each one is.
LAYOUTS = ("bare", "wrapped", "prefixed", "ddp", "dcp", "ranks", "pytorch_model_fsdp_0", "hf_shards")
FAMILIES = ("gpt2", "llama")
VOCAB_SIZE = 512
CORPUS = (
    "FSDP shards every parameter across ranks and gathers them for the forward pass. "
    "A checkpoint may hold the full state dict, a torch.distributed.checkpoint directory, "
    "or one file per rank. The converter reads each tensor once and writes safetensors. "
)


def tiny_config(family: str, **overrides: Any) -> Any:
    """A config small enough for tests; hidden sizes chosen so 3 ranks shard them unevenly."""
    from transformers import GPT2Config, LlamaConfig

    if family == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB_SIZE, n_positions=64, n_embd=32, n_layer=2, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        )
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


# Model types of the architecture zoo: dense and mixture-of-experts decoders.
ZOO = (
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "gpt_neox", "opt", "olmo2",
    "starcoder2", "bloom", "gptj", "cohere", "granite", "stablelm", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
)
_ZOO_SIZES = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, rotary_dim=4, vocab_size=VOCAB_SIZE, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
    pad_token_id=0,
)
_ZOO_MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                shared_expert_intermediate_size=32)


# Image-text-to-text model types (AutoModelForImageTextToText) that transformers builds from a tiny config.
# Not here: shieldgemma2, whose save_pretrained output transformers 5.24 cannot load back (the language
# model's 29 tensors come back missing, 28 unexpected), so no folder of it loads, whoever wrote it.
VLM_ZOO = (
    "aria", "aya_vision", "blip", "blip-2", "cohere2_vision", "cosmos3_edge", "cosmos3_omni", "deepseek_vl",
    "exaone4_5", "fuyu", "gemma3", "git", "glm46v", "glm4v", "glm4v_moe", "glm_ocr", "got_ocr2",
    "hyperclovax_vision_v2", "idefics", "idefics2", "idefics3", "instructblip", "instructblipvideo", "internvl",
    "kimi_k25", "kosmos-2", "kosmos-2.5", "lfm2_vl", "lighton_ocr", "llava", "llava_next", "llava_next_video",
    "llava_onevision", "minicpm_ocr", "minicpmv4_6", "minicpmv4_7", "mistral3", "mistral_large4", "mllama",
    "nemotron_h_omni", "ovis2", "paddleocr_vl", "paligemma", "pi0", "pix2struct", "qianfan_ocr",
    "qwen2_5_omni_thinker", "qwen2_5_vl", "qwen2_vl", "qwen3_5", "qwen3_5_moe", "qwen3_omni_moe_thinker", "qwen3_vl",
    "qwen3_vl_moe", "qwen4_exp", "smolvlm", "step3p7", "t5gemma2", "video_llama_3", "video_llava",
    "vipllava", "vision-encoder-decoder",
)
# Sizes set wherever a config (or one nested in it: text_config, vision_config, ...) has the attribute.
_VLM_SIZES = dict(
    _ZOO_SIZES, depth=2, num_heads=4, embed_dim=32, out_hidden_size=32, projection_dim=32, text_hidden_size=32,
    vision_hidden_size=32, num_layers=2, d_model=32, encoder_layers=2, decoder_layers=2, **_ZOO_MOE,
    n_routed_experts=4, max_position_embeddings=256, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    kv_lora_rank=16, q_lora_rank=16,
)


def zoo_config(model_type: str) -> Any:
    """A tiny config of any zoo model type (unused keys are harmless extras)."""
    from transformers import AutoConfig

    if model_type in VLM_ZOO:
        return _shrunk(AutoConfig.for_model(model_type))
    return AutoConfig.for_model(model_type, **_ZOO_SIZES, **_ZOO_MOE)


def _shrunk(config: Any, *, depth: int = 0) -> Any:
    """A family's default config with every size it and its nested configs have made tiny."""
    from transformers import PretrainedConfig

    layers = getattr(config, "num_hidden_layers", None)
    for key, value in _VLM_SIZES.items():
        current = getattr(config, key, None)
        if isinstance(current, int) and not isinstance(current, bool):
            setattr(config, key, value)
    for name, value in list(vars(config).items()):  # per-layer lists (layer_types, ...): one entry per layer left
        if isinstance(value, list) and isinstance(layers, int) and len(value) == layers > 2:
            setattr(config, name, value[:2])
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and getattr(config, "num_attention_heads", None):
        # Multimodal rotary splits head_dim / 2 into temporal, height and width parts (its default fits 128 only).
        rope["mrope_section"] = [1, 1, (getattr(config, "head_dim", None) or 8) // 2 - 2]
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and pad >= getattr(config, "vocab_size", pad + 1):
        config.pad_token_id = 0  # an embedding's padding_idx must lie in the shrunk vocabulary
    for name in list(vars(config)):
        if isinstance(sub := getattr(config, name), PretrainedConfig) and depth < 3:
            _shrunk(sub, depth=depth + 1)
    return config


def save_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on the fly (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 8, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)


def make_base_folder(folder: Path, family: str, **overrides: Any) -> Path:
    """config.json + tokenizer files: what ``convert.base_model`` points at."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_config(family, **overrides).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def fixed_input() -> torch.Tensor:
    return torch.arange(24).reshape(2, 12) * 7 % VOCAB_SIZE


def save_checkpoints(
    base_folder: Path,
    out_dir: Path,
    *,
    reference: Path,
    world_size: int = 2,
    layouts: Sequence[str] = LAYOUTS,
    seed: int = 0,
    train: bool = True,
) -> Path:
    """Run FSDP2 on ``world_size`` CPU processes and save the chosen layouts under ``out_dir``.

    ``reference`` receives ``{"input_ids", "logits"}`` from the sharded model after its step
    (``train=False`` skips the step, and the optimizer state with it: for large benchmark models).
    """
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        raise ValueError(f"unknown layouts {sorted(unknown)}; choose from {LAYOUTS}")
    out_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    torch.multiprocessing.spawn(
        _worker,
        args=(world_size, port, str(base_folder), str(out_dir), str(reference), tuple(layouts), seed, train),
        nprocs=world_size,
    )
    return out_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, base: str, out: str, reference: str, layouts: tuple[str, ...], seed: int,
    train: bool,
) -> None:
    import torch.distributed as dist

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        _train_and_save(rank, world_size, Path(base), Path(out), Path(reference), layouts, seed, train)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _build(base: Path, seed: int) -> torch.nn.Module:
    from transformers import AutoConfig

    from lmtk.architecture import model_class

    config = AutoConfig.from_pretrained(base)
    torch.manual_seed(seed)  # every rank builds the same initial weights
    return model_class(config)[0]._from_config(config)


def _train_and_save(
    rank: int, world_size: int, base: Path, out: Path, reference: Path, layouts: tuple[str, ...], seed: int,
    train: bool,
) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import fully_shard

    model = _build(base, seed)
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block)  # activation checkpointing, as large runs use it
    for block in blocks:
        fully_shard(block)
    fully_shard(model)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = fixed_input()
    if train:
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if rank == 0:
        torch.save({"input_ids": ids, "logits": logits}, reference)

    for layout in layouts:
        _save(layout, model, optimizer, rank=rank, world_size=world_size, base=base, out=out, seed=seed)
        dist.barrier()


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    for name in ("transformer.h", "model.layers"):
        module: Any = model
        try:
            for part in name.split("."):
                module = getattr(module, part)
            return module
        except AttributeError:
            continue
    raise ValueError(f"no transformer blocks found in {type(model).__name__}")


def _save(layout: str, model: Any, optimizer: Any, *, rank: int, world_size: int, base: Path, out: Path, seed: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if layout == "bare":  # FSDP's full state dict, saved as is
        sd = get_model_state_dict(model, options=full)
        if rank == 0:
            torch.save(sd, out / "bare.pth")
    elif layout == "wrapped":  # inside a training dict, next to optimizer state and counters
        sd = get_model_state_dict(model, options=full)
        osd = get_optimizer_state_dict(model, optimizer, options=full)
        if rank == 0:
            torch.save({"model": sd, "optimizer": osd, "epoch": 3, "step": 1200, "lr": 1e-2}, out / "wrapped.pth")
    elif layout == "prefixed":  # raw module state dict of a compiled, checkpoint-wrapped model, Lightning-style
        compiled = torch.compile(model)  # never run: only its state_dict() names matter
        sd = {k: v.full_tensor() for k, v in compiled.state_dict().items()}
        if rank == 0:
            torch.save({"state_dict": sd, "global_step": 1200, "epoch": 3}, out / "prefixed.pth")
    elif layout == "ddp":  # the same weights trained under DDP: keys start with ``module.``
        from torch.nn.parallel import DistributedDataParallel

        plain = _build(base, seed)
        plain.load_state_dict(get_model_state_dict(model, options=full), strict=False, assign=True)
        plain.tie_weights()
        sd = DistributedDataParallel(plain).state_dict()
        if rank == 0:
            torch.save({"model_state_dict": sd, "epoch": 3}, out / "ddp.pth")
    elif layout == "dcp":  # torch.distributed.checkpoint, as FSDP2 / torchtitan / Accelerate save it
        state = {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
            "step": 1200,
        }
        dcp.save(state, checkpoint_id=out / "dcp")
    elif layout == "pytorch_model_fsdp_0":  # Accelerate's SHARDED_STATE_DICT save: the model alone
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=out / layout)
    elif layout == "hf_shards":  # torch's DCP HuggingFace storage: each rank's slices as safetensors
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

        tied = set(getattr(model, "all_tied_weights_keys", None) or ())  # safetensors refuses shared tensors
        writer = HuggingFaceStorageWriter(str(out / layout), save_distributed=True)
        dcp.save({k: v for k, v in get_model_state_dict(model).items() if k not in tied}, storage_writer=writer)
    elif layout == "ranks":  # one torch.save per rank of DTensor shards, as verl writes them
        folder = out / "ranks"
        folder.mkdir(exist_ok=True)
        torch.save(model.state_dict(), folder / f"model_world_size_{world_size}_rank_{rank}.pt")


def train_live(base_folder: Path, run_dir: Path, *, references: Path, steps: int = 6, save_every: int = 2,
               keep: int = 2, pause: float = 0.0, world_size: int = 2, seed: int = 0) -> None:
    """A live run for ``task=watch``: FSDP2 trains ``steps`` steps, saving DCP ``run_dir/step-N`` every
    ``save_every`` and removing all but the newest ``keep`` (the Trainer's ``save_total_limit``), ``pause``
    seconds after each step. ``references/step-N.pt`` receives ``{"input_ids", "logits"}`` at each save."""
    run_dir.mkdir(parents=True, exist_ok=True)
    references.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.spawn(
        _live_worker,
        args=(world_size, _free_port(), str(base_folder), str(run_dir), str(references), steps, save_every, keep,
              pause, seed),
        nprocs=world_size,
    )


def _live_worker(rank: int, world_size: int, port: int, base: str, run_dir: str, references: str, steps: int,
                 save_every: int, keep: int, pause: float, seed: int) -> None:
    import shutil
    import time

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = _build(Path(base), seed)
        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = fixed_input()
        saved: list[Path] = []
        for step in range(1, steps + 1):
            model.train()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % save_every == 0:
                model.eval()
                with torch.no_grad():
                    logits = model(input_ids=ids).logits
                if rank == 0:
                    torch.save({"input_ids": ids, "logits": logits}, Path(references) / f"step-{step}.pt")
                folder = Path(run_dir) / f"step-{step}"
                state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
                         "step": step}
                dcp.save(state, checkpoint_id=folder)
                saved.append(folder)
                dist.barrier()
                if rank == 0:
                    while len(saved) > keep:
                        shutil.rmtree(saved.pop(0))
            time.sleep(pause)
    finally:
        dist.barrier()
        dist.destroy_process_group()


FSDP1_LAYOUTS = ("fsdp1_full", "fsdp1_dcp", "fsdp1_local", "fsdp1_sharded_ranks")


def save_fsdp1_checkpoints(base_folder: Path, out_dir: Path, *, reference: Path, world_size: int = 2,
                           seed: int = 0) -> Path:
    """FSDP1 (``FullyShardedDataParallel``, blocks wrapped) on CPU processes, saved four ways:
    ``fsdp1_full.pth`` (FULL_STATE_DICT), ``fsdp1_dcp/`` (SHARDED_STATE_DICT through DCP), and per-rank
    ``torch.save`` files of LOCAL_STATE_DICT (``fsdp1_local/``) and SHARDED_STATE_DICT (``fsdp1_sharded_ranks/``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.spawn(
        _fsdp1_worker, args=(world_size, _free_port(), str(base_folder), str(out_dir), str(reference), seed),
        nprocs=world_size,
    )
    return out_dir


def _fsdp1_worker(rank: int, world_size: int, port: int, base: str, out: str, reference: str, seed: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = _build(Path(base), seed)
        block_class = type(_blocks(model)[0])
        fsdp = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({block_class}), device_id=torch.device("cpu"))
        optimizer = torch.optim.AdamW(fsdp.parameters(), lr=1e-2)
        ids = fixed_input()
        fsdp(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        folder = Path(out)
        full = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, full):
            state = fsdp.state_dict()
        fsdp.eval()
        with torch.no_grad():
            logits = fsdp(input_ids=ids).logits
        if rank == 0:
            torch.save({"input_ids": ids, "logits": logits}, reference)
            torch.save({"model": state, "epoch": 1}, folder / "fsdp1_full.pth")
        with FSDP.state_dict_type(fsdp, StateDictType.SHARDED_STATE_DICT):
            dcp.save({"model": fsdp.state_dict()}, checkpoint_id=folder / "fsdp1_dcp")
            sharded = fsdp.state_dict()
        with FSDP.state_dict_type(fsdp, StateDictType.LOCAL_STATE_DICT):
            local = fsdp.state_dict()
        for name, state in (("fsdp1_sharded_ranks", sharded), ("fsdp1_local", local)):
            (folder / name).mkdir(exist_ok=True)
            torch.save(state, folder / name / f"model_world_size_{world_size}_rank_{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def save_zoo(root: Path, model_types: Sequence[str] = ZOO, *, world_size: int = 2, seed: int = 0) -> Path:
    """For each model type: ``root/TYPE/`` with ``base/`` (config), ``full.pth``, ``dcp/``, ``ranks/``, ``hub.pth``
    (full state dict under the hub's on-disk names) and ``reference/`` (save_pretrained of the same
    weights unsharded) with ``reference.pt`` (its logits on a text-only input; ``None`` for the few
    vision-language models that cannot run without an image)."""
    for model_type in model_types:
        zoo_config(model_type).save_pretrained(root / model_type / "base")
    torch.multiprocessing.spawn(
        _zoo_worker, args=(world_size, _free_port(), str(root), tuple(model_types), seed), nprocs=world_size
    )
    return root


def _zoo_worker(rank: int, world_size: int, port: int, root: str, model_types: tuple[str, ...], seed: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers.core_model_loading import revert_weight_conversion

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for model_type in model_types:
            out = Path(root) / model_type
            model = _build(out / "base", seed)
            # Every block list (text layers, vision blocks, ...) sharded per block, as training wraps them;
            # inner lists first, since FSDP2 shards a module's children before the module itself.
            for module in reversed(list(model.modules())):
                if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
                    for block in module:
                        if any(True for _ in block.parameters()):
                            fully_shard(block)
            fully_shard(model)
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=out / "dcp")
            (out / "ranks").mkdir(exist_ok=True)  # verl's per-rank DTensor shards
            torch.save(model.state_dict(), out / "ranks" / f"model_world_size_{world_size}_rank_{rank}.pt")
            if rank == 0:
                torch.save(full, out / "full.pth")
                plain = _build(out / "base", seed).eval()
                plain.save_pretrained(out / "reference")
                torch.save(revert_weight_conversion(plain, dict(plain.state_dict())), out / "hub.pth")
                torch.save({"input_ids": fixed_input(), "logits": _text_logits(plain)}, out / "reference.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _text_logits(model: torch.nn.Module) -> torch.Tensor | None:
    try:
        with torch.no_grad():
            return model(input_ids=fixed_input()).logits
    except Exception:  # an encoder-decoder or a model that needs its image: the weights are compared alone
        if model.config.model_type in ZOO:
            raise
        return None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", choices=FAMILIES, default="gpt2")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated, from: " + ", ".join(LAYOUTS))
    args = parser.parse_args(argv)
    base = make_base_folder(args.out_dir / "base", args.family)
    checkpoints, reference = args.out_dir / "checkpoints", args.out_dir / "reference.pt"
    save_checkpoints(
        base, checkpoints, reference=reference, world_size=args.world_size, layouts=args.layouts.split(",")
    )
    print(f"base model folder: {base}\ncheckpoints: {checkpoints}\nreference logits: {reference}")


if __name__ == "__main__":
    main()
