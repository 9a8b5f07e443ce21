"""Generate the verl LoRA fixtures: LoRA actor checkpoint trees written by verl's own FSDPCheckpointManager.

One script, two folders (the folder name picks the variant; lora_verl_lora_only/make_fixture.py is a link
to lora_verl/make_fixture.py):
  lora_verl/            actor_rollout_ref.model.lora_rank=4, lora_alpha=16, target_modules="all-linear"
                        (verl's default); the rank files hold the whole PeftModel state (base_layer weights,
                        lora_A/lora_B, embeddings, norms, lm_head)
  lora_verl_lora_only/  the same with target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
                        down_proj] (the explicit list; peft resolves "all-linear" to the same modules) and
                        actor_rollout_ref.actor.checkpoint.save_lora_only=True (CheckpointConfig.save_lora_only):
                        FSDPCheckpointManager.save_checkpoint keeps only the keys containing "lora_" or
                        ".adapter_", so the rank files hold only the adapter and the base weights must come from
                        the model path (base/)

What it does
------------
The run starts from a "pretrained" model dir (actor_rollout_ref.model.path) made in a scratch temp dir and
copied to base/: LlamaForCausalLM.from_config(tests/trainers/base config), seed 0, then every parameter
perturbed with seeded noise (N(0, 0.02^2), generator seed 1) so base != a fresh init, save_pretrained
(config.json with architectures, generation_config.json, model.safetensors) plus the base tokenizer.
Two gloo CPU ranks (torch.multiprocessing.spawn) then build the actor exactly as verl 0.9.1's
TrainingWorker does: ``HFModelConfig(path=..., override_config={"attn_implementation": "sdpa"},
use_remove_padding=False, lora_rank=4, lora_alpha=16, target_modules=...)`` + ``FSDPEngine(model_config,
FSDPEngineConfig(strategy="fsdp2"), FSDPOptimizerConfig(lr=1e-2), CheckpointConfig(save_lora_only=...))``
and ``initialize()``. That is verl's own code for: from_pretrained in fp32 (rank 0 real weights, rank 1
meta), ``FSDPEngine._build_lora_module`` (lora_rank > 0: ``enable_input_require_grads()`` and
``get_peft_model(module, LoraConfig(task_type=CAUSAL_LM, r, lora_alpha, target_modules,
target_parameters=None, exclude_modules=None, bias="none"))``; adapter and base are both fp32, so no cast),
``apply_fsdp2`` (fully_shard per LlamaDecoderLayer, embed_tokens, lm_head, then the PeftModel root; default
MixedPrecisionPolicy bf16 params / fp32 reduce), ``fsdp2_load_full_state_dict``, ``build_optimizer``
(torch AdamW over module.parameters(), lr 1e-2, weight_decay 0.01; only the lora params get grads, so only
they get state), the constant LambdaLR schedule, and ``FSDPCheckpointManager(model, optimizer,
lr_scheduler, processing_class=tokenizer, checkpoint_config=CheckpointConfig(...) [save_contents
model/optimizer/extra], trust_remote_code=False)``. torch.manual_seed(0) is set on every rank before the
engine is built (the lora_A init draws from the global RNG on rank 0; rank 1 builds on meta and receives
rank 0's weights).
Each step: ``engine.optimizer_zero_grad()``, next-token CE on random tokens (instead of verl's PPO loss /
forward_backward_batch), backward, ``engine.optimizer_step()`` (fsdp2_clip_grad_norm_ 1.0 + AdamW step),
``engine.lr_scheduler_step()``.

The data side plays the single-controller driver (rank 0) as in tests/trainers/verl: a torchdata
``StatefulDataLoader`` built like ``RayPPOTrainer._create_dataloader`` (verl's ``create_rl_sampler``,
``rl_dataset.collate_fn``, drop_last=True, dataloader_num_workers=8) over 32 random-token prompts, batch size
4, each batch broadcast and split over the 2 ranks.

Checkpoints are written at global_steps 2 and 4 (trainer.save_freq=2), replicating verl 0.9.1
``RayPPOTrainer._save_checkpoint`` exactly as tests/trainers/verl/make_fixture.py does (cwd=run/,
default_local_dir "checkpoints/<project>/<experiment>", FSDPEngine.save_checkpoint(actor_local_path, None,
global_steps, max_ckpt_to_keep=None), then data.pt and latest_checkpointed_iteration.txt from the driver).

CPU workaround: the same ``PlatformCPU`` registration (``PlatformRegistry.register("cpu")``,
``VERL_PLATFORM=cpu``) as tests/trainers/verl/make_fixture.py; nothing in verl is patched.

Outputs (deleted and recreated in the chosen folder):
  base/          the model the run starts from (config.json, generation_config.json, model.safetensors,
                 tokenizer.json, tokenizer_config.json)
  run/           the trainer tree
  reference.pt   README contract: logits of the trained PeftModel at each saved step, in fp32: the full state
                 gathered with verl's ``get_fsdp_full_state_dict`` loaded (strict) into a plain unsharded
                 ``get_peft_model(LlamaForCausalLM.from_pretrained(base/), <the same LoraConfig>)``
  exported/global_step_N/   ``PeftModel.save_pretrained`` of that plain PeftModel (adapter_model.safetensors,
                 adapter_config.json; the README.md model card it also writes is removed). The base model is
                 loaded as "base" from the fixture folder, so adapter_config.json says
                 base_model_name_or_path="base".
Checks asserted:
  1. rebuild from the rank files on disk (concatenate DTensor local shards along their Shard dim) into a
     PeftModel over base/ (strict for the full variant; for lora_only every missing key must be a non-LoRA
     key and nothing unexpected), recompute the logits: max abs diff < 1e-5; the full variant's non-LoRA
     weights equal base/ exactly (frozen); the lora_only rank files hold only lora_A/lora_B keys;
  2. every lora_B is clearly nonzero (max abs > 1e-3) and the two steps' logits differ;
  3. exported/ adapter tensors equal the rank files' lora tensors (key minus ".default");
  4. verl's own resume path: 2 fresh ranks, a fresh FSDPEngine, engine.load_checkpoint (for lora_only verl
     detects the adapter-only file and loads it with strict=False), gather, logits == reference (< 1e-5);
  5. verl's merger (``python -m verl.model_merger merge --backend fsdp``) is run on each unit; what it
     writes is printed and compared, not asserted and not kept: see "verl merger" below.

verl merger (0.9.1) on these trees
----------------------------------
``BaseModelMerger.save_lora_adapter`` pops every "lora_" key into <target>/lora_adapter/
(adapter_model.safetensors: the 28 lora tensors with ".default" stripped, cast to bf16 like everything the
merger writes; adapter_config.json with r and lora_alpha read from actor/lora_train_meta.json -- so the
hard-coded lora_alpha of verl PR #1821 is gone -- target_modules inferred from the key names,
base_model_name_or_path None), renames the remaining keys (drops "base_model.model.", ".base_layer") and
saves them as the "merged" model. The LoRA delta is never applied: for lora_verl the top-level
model.safetensors equals base/ cast to bf16, tensor for tensor (verl#7285), and its lora_adapter/ equals
exported/<unit> cast to bf16. For lora_verl_lora_only the merger writes config.json, generation_config.json,
the tokenizer and lora_adapter/ (same content as above), then exits 1: save_pretrained got an empty state
dict, wrote no weights file, and ``validate_hf_model_output`` raises "Incomplete Hugging Face model output
... no complete model weights". None of its output is kept.

Both variants train the same adapter (same seeds, same 14 target modules; peft does not target lm_head for
"all-linear"): their reference.pt logits are identical; only what the rank files hold differs.

Versions used (pip freeze): verl==0.9.1, torch==2.13.0 (+cpu local build), transformers==5.10.4,
torchdata==0.11.0, tensordict==0.10.0, accelerate==1.15.0, numpy==2.4.6, omegaconf==2.3.1, hydra-core==1.3.8,
peft==0.21.2, tokenizers==0.22.2, safetensors==0.8.0; Python 3.11.7.

Recreate and run:
    python3 -m venv /work/venvs/verl-lora
    /work/venvs/verl-lora/bin/pip install torch==2.13.0
    /work/venvs/verl-lora/bin/pip install verl==0.9.1      # plain install, no extras (keeps torch 2.13.0)
    /work/venvs/verl-lora/bin/python tests/trainers/lora_verl/make_fixture.py
    /work/venvs/verl-lora/bin/python tests/trainers/lora_verl_lora_only/make_fixture.py
(about 2.5 minutes each on 2 shared CPU cores, mostly imports).
"""

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["VERL_PLATFORM"] = "cpu"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

# --- CPU platform for verl (must be registered before verl modules that resolve the platform are imported) ---
from verl.plugin.platform import PlatformBase, PlatformRegistry  # noqa: E402


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    @property
    def device_name(self):
        return "cpu"

    @property
    def vendor_name(self):
        return "cpu"

    @property
    def device_module(self):
        return torch.cpu  # verl's memory logging special-cases `device == torch.cpu`

    def is_available(self):
        # "no accelerator": verl's is_device_available() is only used by the checkpoint managers' rng helpers;
        # True would make load_rng_state call torch.cpu.set_rng_state (absent) for the saved "cpu" key
        return False

    def current_device(self):
        return "cpu"  # used as a device by verl (.to(device=get_device_id()))

    def device_count(self):
        return 1

    def set_device(self, device_index):
        pass

    def synchronize(self, device_index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings):
        pass

    def empty_cache(self):
        pass

    def get_device_capability(self, device_index=0):
        return None, None

    def communication_backend_name(self):
        return "gloo"

    def visible_devices_envvar(self):
        return "CPU_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg):
        yield

    def profiler_start(self):
        pass

    def profiler_stop(self):
        pass

    def ray_resource_name(self):
        return "CPU"

    def ray_noset_envvars(self):
        return []

    def is_ipc_supported(self):
        return False

    def cudart(self):
        return None


HERE = os.path.dirname(os.path.abspath(__file__))  # not realpath: the link's folder picks the variant
VARIANT = os.path.basename(HERE)
assert VARIANT in ("lora_verl", "lora_verl_lora_only"), VARIANT
LORA_ONLY = VARIANT == "lora_verl_lora_only"
BASE_CONFIG = os.path.normpath(os.path.join(HERE, "..", "base"))
BASE = os.path.join(HERE, "base")  # the fixture's copy of the model the run starts from
RUN = os.path.join(HERE, "run")
EXPORTED = os.path.join(HERE, "exported")
REFERENCE = os.path.join(HERE, "reference.pt")

PROJECT = "lmtk_fixture"  # trainer.project_name
EXPERIMENT = "tiny_llama_lora_only" if LORA_ONLY else "tiny_llama_lora"  # trainer.experiment_name
DEFAULT_LOCAL_DIR = os.path.join("checkpoints", PROJECT, EXPERIMENT)  # relative to cwd = run/, as in verl
WORLD_SIZE = 2
TOTAL_STEPS = 4
SAVE_FREQ = 2
TRAIN_BATCH_SIZE = 4  # data.train_batch_size
NUM_PROMPTS = 32
SEQ_LEN = 16
DATALOADER_NUM_WORKERS = 8  # verl default data.dataloader_num_workers
LR = 1e-2
LORA_RANK = 4  # actor_rollout_ref.model.lora_rank
LORA_ALPHA = 16  # actor_rollout_ref.model.lora_alpha
TARGET_MODULES = (
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] if LORA_ONLY else "all-linear"
)  # actor_rollout_ref.model.target_modules
OUTPUT_NAMES = [f"global_step_{n}" for n in range(SAVE_FREQ, TOTAL_STEPS + 1, SAVE_FREQ)]


def reference_input_ids(vocab_size):
    return torch.arange(24).reshape(2, 12) * 7 % vocab_size


def lora_config():
    """The LoraConfig verl's FSDPEngine._build_lora_module builds from the model config."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        target_modules=TARGET_MODULES,
        target_parameters=None,
        exclude_modules=None,
        bias="none",
    )


class RandomPromptDataset(torch.utils.data.Dataset):
    """Stands in for verl's RLHFDataset: dicts of tensors + non-tensor fields, collated by verl's collate_fn."""

    def __init__(self, vocab_size):
        g = torch.Generator().manual_seed(1234)
        self.input_ids = torch.randint(1, vocab_size, (NUM_PROMPTS, SEQ_LEN), generator=g)

    def __len__(self):
        return NUM_PROMPTS

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "index": i, "data_source": "random"}


def _init_dist(rank, port):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(WORLD_SIZE)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)


def _build_actor(init_dir):
    """The LoRA actor engine exactly as verl's TrainingWorker builds it: HFModelConfig(lora_rank > 0) +
    FSDPEngine(strategy=fsdp2); initialize() applies peft (FSDPEngine._build_lora_module) before apply_fsdp2."""
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    model_config = HFModelConfig(
        path=init_dir,
        override_config={"attn_implementation": "sdpa"},  # verl defaults to flash_attention_2
        use_remove_padding=False,
        lora_rank=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        target_modules=TARGET_MODULES,
    )
    engine_config = FSDPEngineConfig(strategy="fsdp2")  # actor_rollout_ref.actor.strategy=fsdp2
    optimizer_config = FSDPOptimizerConfig(lr=LR, total_training_steps=TOTAL_STEPS)
    checkpoint_config = CheckpointConfig(save_lora_only=LORA_ONLY)  # actor_rollout_ref.actor.checkpoint.*
    engine = FSDPEngine(model_config, engine_config, optimizer_config, checkpoint_config)
    engine.initialize()
    assert type(engine.checkpoint_manager).__name__ == "FSDPCheckpointManager"
    assert engine._is_lora and hasattr(engine.module, "peft_config")
    return engine


def _make_dataloader(vocab_size):
    from omegaconf import OmegaConf
    from torchdata.stateful_dataloader import StatefulDataLoader

    from verl.trainer.ppo.utils import create_rl_sampler
    from verl.utils.dataset.rl_dataset import collate_fn

    dataset = RandomPromptDataset(vocab_size)
    data_config = OmegaConf.create({"shuffle": True, "seed": None})  # verl defaults (data.shuffle, data.seed)
    sampler = create_rl_sampler(data_config, dataset)
    return StatefulDataLoader(
        dataset=dataset,
        batch_size=TRAIN_BATCH_SIZE,
        num_workers=DATALOADER_NUM_WORKERS,
        drop_last=True,
        collate_fn=collate_fn,
        sampler=sampler,
    )


def _gather(module):
    """The unsharded fp32 PeftModel state (verl's helper), on rank 0."""
    from verl.utils.fsdp_utils import get_fsdp_full_state_dict

    full = get_fsdp_full_state_dict(module, offload_to_cpu=True, rank0_only=True)
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().float().clone() for k, v in full.items()}


def plain_peft_model():
    """A plain unsharded fp32 PeftModel over base/ (loaded as "base" from the fixture folder)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        base = AutoModelForCausalLM.from_pretrained("base", dtype=torch.float32)
    finally:
        os.chdir(cwd)
    with torch.random.fork_rng():
        model = get_peft_model(base, lora_config())
    return model.eval()


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float().clone()


def train_worker(rank, port, init_dir, gathered_dir):
    _init_dist(rank, port)
    from transformers import AutoConfig

    from verl.utils.fs import local_mkdir_safe

    os.chdir(RUN)  # the trainer's default_local_dir is relative to its cwd
    config = AutoConfig.from_pretrained(BASE_CONFIG)
    torch.manual_seed(0)
    engine = _build_actor(init_dir)

    train_dataloader = _make_dataloader(config.vocab_size) if rank == 0 else None
    data_iter = iter(train_dataloader) if rank == 0 else None

    global_steps = 1
    for _ in range(TOTAL_STEPS):
        batch = torch.empty(TRAIN_BATCH_SIZE, SEQ_LEN, dtype=torch.long)
        if rank == 0:
            batch_dict = next(data_iter)
            batch.copy_(batch_dict["input_ids"])
        dist.broadcast(batch, src=0)
        chunk = batch.chunk(WORLD_SIZE)[rank]

        with engine.train_mode():
            engine.optimizer_zero_grad()
            loss = engine.module(input_ids=chunk, labels=chunk).loss
            loss.backward()
            grad_norm = engine.optimizer_step()  # fsdp2_clip_grad_norm_(clip_grad=1.0) + optimizer.step()
            engine.lr_scheduler_step()
        if rank == 0:
            print(f"step {global_steps}: loss {loss.item():.4f} grad_norm {float(grad_norm):.4f}", flush=True)

        if global_steps % SAVE_FREQ == 0:
            # ---- RayPPOTrainer._save_checkpoint (verl 0.9.1), replicated ----
            local_global_step_folder = os.path.join(DEFAULT_LOCAL_DIR, f"global_step_{global_steps}")
            actor_local_path = os.path.join(local_global_step_folder, "actor")
            # actor_rollout_wg.save_checkpoint -> ActorRolloutRefWorker -> TrainingWorker -> FSDPEngine
            engine.save_checkpoint(actor_local_path, None, global_steps, max_ckpt_to_keep=None)
            if rank == 0:  # the driver
                local_mkdir_safe(local_global_step_folder)
                dataloader_local_path = os.path.join(local_global_step_folder, "data.pt")
                dataloader_state_dict = train_dataloader.state_dict()
                torch.save(dataloader_state_dict, dataloader_local_path)
                local_latest_checkpointed_iteration = os.path.join(
                    DEFAULT_LOCAL_DIR, "latest_checkpointed_iteration.txt"
                )
                with open(local_latest_checkpointed_iteration, "w") as f:
                    f.write(str(global_steps))
            dist.barrier()
            # ---- the unsharded state at this step (the reference is computed from it in the parent) ----
            full = _gather(engine.module)
            if rank == 0:
                torch.save(full, os.path.join(gathered_dir, f"global_step_{global_steps}.pt"))
        global_steps += 1

    dist.barrier()
    dist.destroy_process_group()


def resume_worker(rank, port, init_dir):
    """verl's own resume path: a fresh engine (base + fresh adapter), load_checkpoint, gather, compare."""
    _init_dist(rank, port)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(BASE_CONFIG)
    ref = torch.load(REFERENCE)
    model = plain_peft_model() if rank == 0 else None
    for name in OUTPUT_NAMES:
        engine = _build_actor(init_dir)
        step_dir = os.path.join(RUN, DEFAULT_LOCAL_DIR, name)
        engine.load_checkpoint(os.path.join(step_dir, "actor"), del_local_after_load=False)
        full = _gather(engine.module)
        if rank == 0:
            model.load_state_dict(full, strict=True)
            diff = (logits_of(model, ref["input_ids"]) - ref["logits"][name]).abs().max().item()
            print(f"[check 4] verl FSDPEngine.load_checkpoint {name}: max abs diff {diff:.3e}", flush=True)
            assert diff < 1e-5, diff
            dl = _make_dataloader(config.vocab_size)
            dl.load_state_dict(torch.load(os.path.join(step_dir, "data.pt"), weights_only=False))
        dist.barrier()
    dist.destroy_process_group()


def consolidate(actor_dir):
    """Hand consolidation of model_world_size_2_rank_*.pt (DTensor local shards)."""
    from torch.distributed.tensor import DTensor, Shard

    shards = [
        torch.load(os.path.join(actor_dir, f"model_world_size_{WORLD_SIZE}_rank_{r}.pt"), weights_only=False)
        for r in range(WORLD_SIZE)
    ]
    assert list(shards[0]) == list(shards[1])
    full = {}
    for key in shards[0]:
        parts = [s[key] for s in shards]
        if isinstance(parts[0], DTensor):
            (placement,) = parts[0].placements
            assert isinstance(placement, Shard), placement
            full[key] = torch.cat([p._local_tensor for p in parts], dim=placement.dim)
            assert tuple(full[key].shape) == tuple(parts[0].shape), key
        else:
            full[key] = parts[0]
    return full


def describe_rank_files(actor_dir):
    from torch.distributed.tensor import DTensor

    for r in range(WORLD_SIZE):
        sd = torch.load(os.path.join(actor_dir, f"model_world_size_{WORLD_SIZE}_rank_{r}.pt"), weights_only=False)
        print(f"  model rank {r}: {len(sd)} keys", flush=True)
        for k, v in sd.items():
            if r == 0 and ("layers.0." in k or "layers" not in k):
                kind = f"DTensor{tuple(v.placements)} local {tuple(v._local_tensor.shape)}" if isinstance(
                    v, DTensor) else type(v).__name__
                print(f"    {k} {tuple(v.shape)} {v.dtype} {kind}", flush=True)
    osd = torch.load(os.path.join(actor_dir, f"optim_world_size_{WORLD_SIZE}_rank_0.pt"), weights_only=False)
    state_keys = list(osd["state"])
    print(f"  optim rank 0: keys {list(osd)}; state entries {len(state_keys)} e.g. {state_keys[:3]};"
          f" param_groups[0] params {len(osd['param_groups'][0]['params'])}", flush=True)
    if state_keys:
        s0 = osd["state"][state_keys[0]]
        print(f"    state[{state_keys[0]!r}] -> {{{', '.join(f'{k}: {type(v).__name__}' for k, v in s0.items())}}}",
              flush=True)


def run_merger(actor_dir, name, full, base_sd, exported_sd):
    """verl's merger on one unit: print what it writes and how it compares (nothing kept)."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as target:
        proc = subprocess.run(
            [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
             "--local_dir", actor_dir, "--target_dir", target],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "VERL_PLATFORM": ""},
        )
        print(f"[check 5] verl.model_merger {name}: rc {proc.returncode}", flush=True)
        if proc.returncode != 0:
            print("  merger output tail:\n" + "\n".join("    " + s for s in proc.stdout.splitlines()[-15:]),
                  flush=True)
        for root, _, files in sorted(os.walk(target)):
            for f in sorted(files):
                p = os.path.join(root, f)
                print(f"  wrote {os.path.relpath(p, target)} ({os.path.getsize(p)} bytes)", flush=True)
        merged = {}
        for f in glob.glob(os.path.join(target, "*.safetensors")):
            merged.update(load_file(f))
        if merged:
            same_as_base = all(
                torch.equal(merged[k].float(), base_sd[k].bfloat16().float()) for k in merged if k in base_sd
            ) and set(merged) == set(base_sd)
            print(f"  merged model: {len(merged)} tensors, dtypes {sorted({str(v.dtype) for v in merged.values()})}"
                  f", equals base/ cast to bf16: {same_as_base}", flush=True)
        adapter = os.path.join(target, "lora_adapter")
        if os.path.isdir(adapter):
            cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
            print(f"  lora_adapter/adapter_config.json: r={cfg.get('r')} lora_alpha={cfg.get('lora_alpha')} "
                  f"target_modules={sorted(cfg.get('target_modules') or [])} task_type={cfg.get('task_type')} "
                  f"base_model_name_or_path={cfg.get('base_model_name_or_path')}", flush=True)
            ad = load_file(os.path.join(adapter, "adapter_model.safetensors"))
            eq = set(ad) == set(exported_sd) and all(
                torch.equal(ad[k].float(), exported_sd[k].to(ad[k].dtype).float()) for k in ad
            )
            print(f"  lora_adapter/adapter_model.safetensors: {len(ad)} tensors, e.g. {sorted(ad)[0]} "
                  f"{ad[sorted(ad)[0]].dtype}; equals exported/{name} cast to that dtype: {eq}", flush=True)


def make_base(path):
    """The "pretrained" model: seeded init, then seeded noise on every parameter (base != init)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(BASE_CONFIG), dtype=torch.float32)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    assert all(not torch.equal(init[k], v) for k, v in model.state_dict().items())
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(BASE_CONFIG).save_pretrained(path)


def main():
    from safetensors.torch import load_file

    for path in (RUN, EXPORTED, BASE):
        shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(REFERENCE):
        os.remove(REFERENCE)
    os.makedirs(RUN)

    scratch = tempfile.TemporaryDirectory(prefix="verl_lora_")
    init_dir = os.path.join(scratch.name, "init_model")  # actor_rollout_ref.model.path
    gathered_dir = os.path.join(scratch.name, "gathered")
    os.makedirs(gathered_dir)
    make_base(init_dir)
    shutil.copytree(init_dir, BASE)

    mp.spawn(train_worker, args=(29621 + 10 * LORA_ONLY, init_dir, gathered_dir), nprocs=WORLD_SIZE, join=True)

    # ---- reference.pt and exported/ from the gathered unsharded state ----
    input_ids = reference_input_ids(261)
    model = plain_peft_model()
    base_sd = load_file(os.path.join(BASE, "model.safetensors"))
    logits, steps, exported = {}, {}, {}
    for name in OUTPUT_NAMES:
        full = torch.load(os.path.join(gathered_dir, f"{name}.pt"))
        model.load_state_dict(full, strict=True)
        logits[name] = logits_of(model, input_ids)
        steps[name] = int(name.rsplit("_", 1)[1])
        out = os.path.join(EXPORTED, name)
        model.save_pretrained(out)
        os.remove(os.path.join(out, "README.md"))  # the model card peft writes alongside
        exported[name] = load_file(os.path.join(out, "adapter_model.safetensors"))
    torch.save({"input_ids": input_ids, "logits": logits, "steps": steps}, REFERENCE)
    print("exported:", sorted(os.listdir(os.path.join(EXPORTED, OUTPUT_NAMES[0]))),
          json.load(open(os.path.join(EXPORTED, OUTPUT_NAMES[0], "adapter_config.json"))), flush=True)

    # ---- checks on the tree as written ----
    ref = torch.load(REFERENCE)
    for name in OUTPUT_NAMES:
        actor_dir = os.path.join(RUN, DEFAULT_LOCAL_DIR, name, "actor")
        print(f"{name}/actor: {sorted(os.listdir(actor_dir))}; huggingface/: "
              f"{sorted(os.listdir(os.path.join(actor_dir, 'huggingface')))}", flush=True)
        for meta in ("lora_train_meta.json", "fsdp_config.json"):
            print(f"  {meta}: {json.load(open(os.path.join(actor_dir, meta)))}", flush=True)
        describe_rank_files(actor_dir)
        full = consolidate(actor_dir)
        lora_keys = [k for k in full if "lora_" in k]
        check = plain_peft_model()
        if LORA_ONLY:
            assert set(lora_keys) == set(full), set(full) - set(lora_keys)
            result = check.load_state_dict(full, strict=False)
            assert not result.unexpected_keys, result.unexpected_keys
            assert result.missing_keys and all("lora_" not in k for k in result.missing_keys)
        else:
            check.load_state_dict(full, strict=True)
            for k, v in full.items():  # frozen: the non-LoRA weights are base/'s, bit for bit
                if "lora_" not in k:
                    base_key = k.replace("base_model.model.", "", 1).replace(".base_layer.", ".")
                    assert torch.equal(v, base_sd[base_key]), k
        diff = (logits_of(check, ref["input_ids"]) - ref["logits"][name]).abs().max().item()
        print(f"[check 1] rank files -> PeftModel over base/ {name}: max abs diff {diff:.3e}", flush=True)
        assert diff < 1e-5, diff
        lora_b = [k for k in lora_keys if ".lora_B." in k]
        assert len(lora_b) == 7 * 2, lora_b
        smallest = min(full[k].abs().max().item() for k in lora_b)
        print(f"[check 2] {len(lora_b)} lora_B tensors, smallest max|B| {smallest:.3e}", flush=True)
        assert smallest > 1e-3, smallest
        exp = {k.replace(".default.weight", ".weight"): v for k, v in full.items() if "lora_" in k}
        assert set(exp) == set(exported[name]) and all(torch.equal(exp[k], exported[name][k]) for k in exp)
        print(f"[check 3] exported/{name} == rank-file lora tensors ({len(exp)} tensors)", flush=True)
        run_merger(actor_dir, name, full, base_sd, exported[name])

    a, b = (ref["logits"][n] for n in OUTPUT_NAMES)
    assert (a - b).abs().max().item() > 1e-3, "checkpoints should differ"

    mp.spawn(resume_worker, args=(29622 + 10 * LORA_ONLY, init_dir), nprocs=WORLD_SIZE, join=True)
    scratch.cleanup()
    print("reference steps:", ref["steps"])
    print("OK")


if __name__ == "__main__":
    main()
