"""Generate the verl fixture: an actor checkpoint tree written by verl's own FSDPCheckpointManager.

What it does
------------
The run starts from a "pretrained" model dir (actor_rollout_ref.model.path) made in a scratch temp dir:
LlamaForCausalLM.from_config(tests/trainers/base config), seed 0, save_pretrained, plus the base tokenizer
(save_pretrained adds config.architectures, which verl's HFModelConfig asserts and base/config.json lacks).
Two gloo CPU ranks (torch.multiprocessing.spawn) then build the actor exactly as verl 0.9.1's
TrainingWorker does: ``HFModelConfig(path=..., override_config={"attn_implementation": "sdpa"},
use_remove_padding=False)`` + ``FSDPEngine(model_config, FSDPEngineConfig(strategy="fsdp2"),
FSDPOptimizerConfig(lr=1e-2), CheckpointConfig())`` and ``initialize()`` (verl's default strategy is "fsdp",
i.e. FSDP1; fsdp2 is the usual ``actor_rollout_ref.actor.strategy=fsdp2`` setting). That is verl's own code for:
from_pretrained in fp32 (rank 0 real weights, rank 1 meta), ``create_device_mesh`` (1-D "fsdp"),
``apply_fsdp2`` (fully_shard per LlamaDecoderLayer, embed_tokens, lm_head, then the root; default
MixedPrecisionPolicy bf16 params / fp32 reduce), ``fsdp2_load_full_state_dict``, ``build_optimizer``
(torch AdamW, lr 1e-2, weight_decay 0.01, betas (0.9, 0.999)), the constant LambdaLR schedule (0 warmup), and
``FSDPCheckpointManager(model, optimizer, lr_scheduler, processing_class=tokenizer,
checkpoint_config=CheckpointConfig() [save_contents model/optimizer/extra], trust_remote_code=False)``.
Each step: ``engine.optimizer_zero_grad()``, next-token CE on random tokens (instead of verl's PPO loss /
forward_backward_batch), backward, ``engine.optimizer_step()`` (fsdp2_clip_grad_norm_ 1.0 + AdamW step),
``engine.lr_scheduler_step()``.

The data side plays the single-controller driver (rank 0): a torchdata ``StatefulDataLoader`` built like
``RayPPOTrainer._create_dataloader`` (verl's ``create_rl_sampler`` with the default data config
shuffle=True/seed=None, verl's ``rl_dataset.collate_fn``, drop_last=True, the default
``dataloader_num_workers=8``) over 32 random-token prompts, batch size 4; each batch is broadcast and split
across the 2 ranks (2 rows each), as the driver dispatches a batch over data-parallel workers.

Checkpoints are written at global_steps 2 and 4 (trainer.save_freq=2; trainer.global_steps starts at 1 and
is incremented after the save, so global_step_N holds N optimizer steps). The save replicates these lines
of verl 0.9.1 ``verl/trainer/ppo/ray_trainer.py`` ``RayPPOTrainer._save_checkpoint`` (lines 987-992,
1013-1015, 1030-1034, 1046-1050; no critic, no hdfs dir, max_actor_ckpt_to_keep=None,
async_save=False), with cwd=run/ and trainer.default_local_dir = "checkpoints/<project>/<experiment>"
(the default template ``checkpoints/${trainer.project_name}/${trainer.experiment_name}``):

    local_global_step_folder = os.path.join(default_local_dir, f"global_step_{global_steps}")
    actor_local_path = os.path.join(local_global_step_folder, "actor")
    self.actor_rollout_wg.save_checkpoint(actor_local_path, None, global_steps, max_ckpt_to_keep=None)
        # -> ActorRolloutRefWorker -> TrainingWorker -> FSDPEngine.save_checkpoint (called here directly)
        #    -> FSDPCheckpointManager.save_checkpoint(local_path=..., hdfs_path=None, global_step=...,
        #       max_ckpt_to_keep=None), then torch.distributed.barrier()
    local_mkdir_safe(local_global_step_folder)
    torch.save(train_dataloader.state_dict(), os.path.join(local_global_step_folder, "data.pt"))
    with open(os.path.join(default_local_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(global_steps))

CPU workaround: verl resolves its accelerator through ``verl.plugin.platform``; it has no CPU platform, so
this script registers ``PlatformCPU`` (device "cpu", device_module torch.cpu, backend gloo,
current_device() -> "cpu", is_available() -> False so the rng helpers touch no accelerator RNG: with True,
load_rng_state would call the missing torch.cpu.set_rng_state for the saved "cpu" key) with
``PlatformRegistry.register("cpu")`` before importing the rest of verl, and sets ``VERL_PLATFORM=cpu``.
Nothing in verl is patched. (verl logs a warning that platform "cpu" is registered but not available.)

Outputs (deleted and recreated): run/ (the trainer tree) and reference.pt (README contract: logits of the
unsharded fp32 model gathered with verl's ``get_fsdp_full_state_dict`` at each saved step, run through a plain
fp32 LlamaForCausalLM built from tests/trainers/base).
Then it checks its references three ways (max abs diff < 1e-5 each):
  1. consolidate the rank files by hand (concatenate DTensor local shards along their Shard dim) into a plain
     LlamaForCausalLM and recompute the logits;
  2. verl's own resume path: 2 fresh ranks, a fresh FSDPEngine (initial weights), engine.load_checkpoint
     (FSDPCheckpointManager.load_checkpoint), gather, recompute the logits (and reload data.pt into a fresh
     StatefulDataLoader);
  3. verl's merger (``python -m verl.model_merger merge --backend fsdp``; it casts to bf16) must equal the
     bf16 cast of the hand consolidation exactly.

Versions used (pip freeze): verl==0.9.1, torch==2.13.0 (+cpu local build), transformers==5.10.4,
torchdata==0.11.0, tensordict==0.10.0, accelerate==1.15.0, numpy==2.4.6, omegaconf==2.3.1, hydra-core==1.3.8,
peft==0.21.2, tokenizers==0.22.2, safetensors==0.8.0; Python 3.11.7.

Recreate and run:
    python3 -m venv /work/venvs/verl
    /work/venvs/verl/bin/pip install torch==2.13.0
    /work/venvs/verl/bin/pip install verl==0.9.1      # plain install, no extras (keeps torch 2.13.0)
    /work/venvs/verl/bin/python tests/trainers/verl/make_fixture.py
(about 7 minutes on 2 shared CPU cores: ~2 for the run itself, the rest for the three checks; mostly imports).
"""

import contextlib
import glob
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


HERE = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.normpath(os.path.join(HERE, "..", "base"))
RUN = os.path.join(HERE, "run")
REFERENCE = os.path.join(HERE, "reference.pt")

PROJECT = "lmtk_fixture"  # trainer.project_name
EXPERIMENT = "tiny_llama_fsdp2"  # trainer.experiment_name
DEFAULT_LOCAL_DIR = os.path.join("checkpoints", PROJECT, EXPERIMENT)  # relative to cwd = run/, as in verl
WORLD_SIZE = 2
TOTAL_STEPS = 4
SAVE_FREQ = 2
TRAIN_BATCH_SIZE = 4  # data.train_batch_size
NUM_PROMPTS = 32
SEQ_LEN = 16
DATALOADER_NUM_WORKERS = 8  # verl default data.dataloader_num_workers
LR = 1e-2
OUTPUT_NAMES = [f"global_step_{n}" for n in range(SAVE_FREQ, TOTAL_STEPS + 1, SAVE_FREQ)]


def reference_input_ids(vocab_size):
    return torch.arange(24).reshape(2, 12) * 7 % vocab_size


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
    """The actor engine exactly as verl's TrainingWorker builds it: HFModelConfig + FSDPEngine(strategy=fsdp2).

    FSDPEngine.initialize() loads the model with from_pretrained (rank 0 real weights, other ranks on meta),
    wraps it with apply_fsdp2 + fsdp2_load_full_state_dict, builds AdamW (build_optimizer) and the constant
    LambdaLR schedule, and creates the FSDPCheckpointManager(model, optimizer, lr_scheduler,
    processing_class=tokenizer, checkpoint_config=CheckpointConfig()).
    """
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    model_config = HFModelConfig(
        path=init_dir,
        # verl defaults to flash_attention_2; on CPU use sdpa (the usual
        # +actor_rollout_ref.model.override_config.attn_implementation=sdpa override)
        override_config={"attn_implementation": "sdpa"},
        use_remove_padding=False,
    )
    engine_config = FSDPEngineConfig(strategy="fsdp2")  # actor_rollout_ref.actor.strategy=fsdp2
    optimizer_config = FSDPOptimizerConfig(lr=LR, total_training_steps=TOTAL_STEPS)
    engine = FSDPEngine(model_config, engine_config, optimizer_config, CheckpointConfig())
    engine.initialize()
    assert type(engine.checkpoint_manager).__name__ == "FSDPCheckpointManager"
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


def _full_logits(module, config, input_ids):
    """Gather the unsharded fp32 weights (verl's helper) and run a plain HF model on rank 0."""
    from transformers import AutoModelForCausalLM

    from verl.utils.fsdp_utils import get_fsdp_full_state_dict

    full = get_fsdp_full_state_dict(module, offload_to_cpu=True, rank0_only=True)
    if dist.get_rank() != 0:
        return None
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict({k: v.float() for k, v in full.items()}, strict=True)
    plain.eval()
    with torch.no_grad():
        return plain(input_ids=input_ids).logits.float().clone()


def train_worker(rank, port, init_dir):
    _init_dist(rank, port)
    from transformers import AutoConfig

    from verl.utils.fs import local_mkdir_safe

    os.chdir(RUN)  # the trainer's default_local_dir is relative to its cwd
    config = AutoConfig.from_pretrained(BASE)
    engine = _build_actor(init_dir)
    input_ids_ref = reference_input_ids(config.vocab_size)

    train_dataloader = _make_dataloader(config.vocab_size) if rank == 0 else None
    data_iter = iter(train_dataloader) if rank == 0 else None

    logits, steps = {}, {}
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
            # ---- reference logits of the unsharded model at this state ----
            out = _full_logits(engine.module, config, input_ids_ref)
            if rank == 0:
                logits[f"global_step_{global_steps}"] = out
                steps[f"global_step_{global_steps}"] = global_steps
        global_steps += 1

    if rank == 0:
        torch.save({"input_ids": input_ids_ref, "logits": logits, "steps": steps}, REFERENCE)
    dist.barrier()
    dist.destroy_process_group()


def resume_worker(rank, port, init_dir):
    """verl's own resume path: a fresh engine (initial weights), load_checkpoint, gather, compare."""
    _init_dist(rank, port)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(BASE)
    ref = torch.load(REFERENCE)
    for name in OUTPUT_NAMES:
        engine = _build_actor(init_dir)
        step_dir = os.path.join(RUN, DEFAULT_LOCAL_DIR, name)
        engine.load_checkpoint(os.path.join(step_dir, "actor"), del_local_after_load=False)
        out = _full_logits(engine.module, config, ref["input_ids"])
        if rank == 0:
            diff = (out - ref["logits"][name]).abs().max().item()
            print(f"[check 2] verl FSDPEngine.load_checkpoint {name}: max abs diff {diff:.3e}", flush=True)
            assert diff < 1e-5, diff
            dl = _make_dataloader(config.vocab_size)
            dl.load_state_dict(torch.load(os.path.join(step_dir, "data.pt"), weights_only=False))
            print(f"[check 2] data.pt reloads into StatefulDataLoader ({len(list(dl))} batches left)", flush=True)
        dist.barrier()
    dist.destroy_process_group()


def consolidate(actor_dir):
    """Hand consolidation of model_world_size_2_rank_*.pt (DTensor local shards)."""
    from torch.distributed.tensor import DTensor, Shard

    shards = [
        torch.load(os.path.join(actor_dir, f"model_world_size_{WORLD_SIZE}_rank_{r}.pt"), weights_only=False)
        for r in range(WORLD_SIZE)
    ]
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


def main():
    for path in (RUN,):
        shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(REFERENCE):
        os.remove(REFERENCE)
    os.makedirs(RUN)

    # The "pretrained" model the run starts from (actor_rollout_ref.model.path): the base config + tokenizer,
    # random init (seed 0), written with save_pretrained to a scratch dir. verl's HFModelConfig needs
    # config.architectures, which tests/trainers/base/config.json lacks; save_pretrained adds it.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    init_tmp = tempfile.TemporaryDirectory(prefix="verl_init_model_")
    init_dir = init_tmp.name
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(BASE), dtype=torch.float32).save_pretrained(init_dir)
    AutoTokenizer.from_pretrained(BASE).save_pretrained(init_dir)

    mp.spawn(train_worker, args=(29611, init_dir), nprocs=WORLD_SIZE, join=True)

    ref = torch.load(REFERENCE)
    config = AutoConfig.from_pretrained(BASE)
    for name in OUTPUT_NAMES:
        actor_dir = os.path.join(RUN, DEFAULT_LOCAL_DIR, name, "actor")
        full = consolidate(actor_dir)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        plain.load_state_dict(full, strict=True)
        with torch.no_grad():
            out = plain(input_ids=ref["input_ids"]).logits
        diff = (out - ref["logits"][name]).abs().max().item()
        print(f"[check 1] hand consolidation {name}: max abs diff {diff:.3e}", flush=True)
        assert diff < 1e-5, diff

        # [check 3] verl's merger (bf16 output) equals our consolidation cast to bf16
        with tempfile.TemporaryDirectory() as target:
            subprocess.run(
                [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
                 "--local_dir", actor_dir, "--target_dir", target],
                check=True, stdout=subprocess.DEVNULL, env={**os.environ, "VERL_PLATFORM": ""},
            )
            from safetensors.torch import load_file

            merged = {}
            for f in glob.glob(os.path.join(target, "*.safetensors")):
                merged.update(load_file(f))
            assert set(merged) == set(full), (set(merged) ^ set(full))
            worst = max((merged[k].float() - full[k].bfloat16().float()).abs().max().item() for k in full)
            print(f"[check 3] verl.model_merger {name}: max abs diff vs bf16 consolidation {worst:.3e}", flush=True)
            assert worst == 0.0, worst

    mp.spawn(resume_worker, args=(29612, init_dir), nprocs=WORLD_SIZE, join=True)
    init_tmp.cleanup()

    a, b = (ref["logits"][n] for n in OUTPUT_NAMES)
    assert (a - b).abs().max().item() > 1e-3, "checkpoints should differ"
    print("reference steps:", ref["steps"])
    print("OK")


if __name__ == "__main__":
    main()
