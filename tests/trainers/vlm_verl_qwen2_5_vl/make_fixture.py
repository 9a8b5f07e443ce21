"""Generate the verl vision-language fixture: a Qwen2.5-VL actor checkpoint tree written by verl's own
FSDPCheckpointManager (README contract in ../README.md, multimodal extensions as in
../vlm_hf_trainer_qwen2_5_vl/make_fixture.py).

What it does
------------
base/ (the "pretrained" model the run starts from, actor_rollout_ref.model.path) is a tiny
Qwen2_5_VLForConditionalGeneration with its full processor, built by the same functions as the Trainer VLM
fixture (../vlm_hf_trainer_qwen2_5_vl/make_fixture.py: build_tokenizer, build_processor, tiny_config; seed 10,
fp32, save_pretrained + processor.save_pretrained, generation_config.json dropped), but written by this venv's
transformers 5.10.4.
Two gloo CPU ranks (torch.multiprocessing.spawn) build the actor as verl 0.9.1's TrainingWorker does:
``HFModelConfig(path=base, override_config={"attn_implementation": "sdpa"}, use_remove_padding=False)``
(HFModelConfig also loads the processor with verl's hf_processor: Qwen2_5_VLProcessor) +
``FSDPEngine(model_config, FSDPEngineConfig(strategy="fsdp2"), FSDPOptimizerConfig(lr=1e-2),
CheckpointConfig())`` and ``initialize()``: get_hf_auto_model_class picks AutoModelForImageTextToText,
from_pretrained in fp32, verl's apply_monkey_patch (for qwen2_5_vl it replaces Qwen2_5_VLModel.forward and
Qwen2_5_VLForConditionalGeneration.forward with verl's qwen2_vl_base_forward / forward_with_normal_backend,
which return logits only and expect position_ids of shape (4, batch, seq): one text row + the 3 M-RoPE rows),
``apply_fsdp2`` (fully_shard per _no_split_modules class: Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock; then
embed_tokens / lm_head and the root; MixedPrecisionPolicy bf16 params / fp32 reduce),
``fsdp2_load_full_state_dict``, AdamW (lr 1e-2, weight_decay 0.01), constant LambdaLR, and
``FSDPCheckpointManager(..., processing_class=processor)``.
Each step: 4 image+text chats (random 32 px image, random words, rendered with the processor's chat template and
encoded by the processor, padded to one length), split 2 per rank; position_ids built as verl's agent loop
does (model.get_rope_index vision rows under a text row of arange over the attention mask);
``engine.optimizer_zero_grad()``, ``engine.module(input_ids, attention_mask, position_ids, pixel_values,
image_grid_thw)``, next-token CE on the assistant/text tokens (pad and image tokens masked; verl's PPO loss
replaced), backward, ``engine.optimizer_step()`` (grad clip 1.0 + AdamW), ``engine.lr_scheduler_step()``.
The driver side (rank 0) draws batch indices from a torchdata StatefulDataLoader built like
RayPPOTrainer._create_dataloader (verl's create_rl_sampler, rl_dataset.collate_fn, drop_last, 8 workers) and
broadcasts them.

Checkpoints at global_steps 2 and 4, written exactly as in ../verl/make_fixture.py (RayPPOTrainer._save_checkpoint
of verl 0.9.1 replicated: engine.save_checkpoint(<step>/actor), data.pt, latest_checkpointed_iteration.txt;
cwd=run/, default_local_dir checkpoints/<project>/<experiment>).

CPU workarounds: verl's CPU platform registration, copied from ../verl/make_fixture.py (nothing in verl is
patched), and the torchvision shim of ../vlm_hf_trainer_qwen2_5_vl/make_fixture.py (tv_shim(): defines the
torchvision::nms / qnms op schemas so the CUDA torchvision 0.28.0 wheel imports on CPU torch; the Qwen2-VL
image/video processors only use its pure-Python transforms).

Outputs (deleted and recreated): base/, run/ (the trainer tree), save_pretrained/global_step_N/ (config.json +
model.safetensors that save_pretrained of transformers 5.10.4 writes for the unsharded trained model) and
reference.pt ({"inputs", "input_ids", "logits", "text_logits", "steps"}, same layout as the Trainer VLM
fixtures). Reference logits: each rank gathers the full fp32 state dict with verl's get_fsdp_full_state_dict at
the saved step; the MAIN process (where verl's class-level monkey patches are not applied) loads it into a plain
Qwen2_5_VLForConditionalGeneration built from base/config.json and runs the stock HF forward in fp32.

Checks asserted (max abs diff < 1e-5):
  1. consolidate the rank files by hand (concatenate DTensor local shards along their Shard dim), load strict
     into a plain model, recompute the logits on inputs and on input_ids;
  2. save_pretrained/<unit> reloads with from_pretrained and its state dict equals the hand consolidation;
  3. no tensor of global_step_4 equals its base/ value; global_step_2 and global_step_4 logits differ;
  4. AutoProcessor.from_pretrained(<step>/actor/huggingface) loads;
  5. verl's merger (``python -m verl.model_merger merge --backend fsdp``, run with the torchvision shim applied
     first, since it imports the model class; it writes bf16) reloads with
     from_pretrained to exactly the bf16 cast of the hand consolidation.

Versions used (pip freeze): verl==0.9.1, torch==2.13.0 (+cpu), transformers==5.10.4 (verl 0.9.1 requires
transformers>=5.5.3,<5.11,!=5.6.0; 5.10.4 is the newest it accepts, and it runs Qwen2.5-VL unchanged),
torchvision==0.28.0+cu130 (--no-deps, with the shim), torchdata==0.11.0, tensordict==0.10.0, accelerate==1.16.0,
tokenizers==0.22.2, safetensors==0.8.0, pillow==13.0.0, numpy==2.4.6; Python 3.11.7.

Recreate and run:
    python3 -m venv /work/venvs/verl
    /work/venvs/verl/bin/pip install torch==2.13.0
    /work/venvs/verl/bin/pip install verl==0.9.1 pillow     # plain install, no extras (keeps torch 2.13.0)
    /work/venvs/verl/bin/pip install --no-deps torchvision==0.28.0
    /work/venvs/verl/bin/python tests/trainers/vlm_verl_qwen2_5_vl/make_fixture.py
"""

import contextlib
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["VERL_PLATFORM"] = "cpu"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "vlm_trainer_fixture", os.path.join(HERE, "..", "vlm_hf_trainer_qwen2_5_vl", "make_fixture.py"))
VLM = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(VLM)  # also applies the torchvision shim (tv_shim) before anything imports torchvision

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


BASE = os.path.join(HERE, "base")
RUN = os.path.join(HERE, "run")
SAVE_PRETRAINED = os.path.join(HERE, "save_pretrained")
REFERENCE = os.path.join(HERE, "reference.pt")
FAMILY = "qwen2_5_vl"
SEED = 10
PROJECT = "lmtk_fixture"  # trainer.project_name
EXPERIMENT = "tiny_qwen2_5_vl_fsdp2"  # trainer.experiment_name
DEFAULT_LOCAL_DIR = os.path.join("checkpoints", PROJECT, EXPERIMENT)  # relative to cwd = run/, as in verl
WORLD_SIZE = 2
TOTAL_STEPS = 4
SAVE_FREQ = 2
TRAIN_BATCH_SIZE = 4  # data.train_batch_size
NUM_PROMPTS = 16
DATALOADER_NUM_WORKERS = 8  # verl default data.dataloader_num_workers
LR = 1e-2
MERGER_WITH_SHIM = (
    "import runpy, sys, torch\n"
    "lib = torch.library.Library('torchvision', 'DEF')\n"
    "lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
    "lib.define('qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor')\n"
    "sys.argv[0] = 'verl.model_merger'\n"
    "runpy.run_module('verl.model_merger', run_name='__main__', alter_sys=True)\n"
)
OUTPUT_NAMES = [f"global_step_{n}" for n in range(SAVE_FREQ, TOTAL_STEPS + 1, SAVE_FREQ)]


class IndexDataset(torch.utils.data.Dataset):
    """Stands in for verl's RLHFDataset on the driver: the index of each chat (the chats live on the workers)."""

    def __len__(self):
        return NUM_PROMPTS

    def __getitem__(self, i):
        return {"index": torch.tensor(i), "data_source": "random"}


def _init_dist(rank, port):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)


def _build_actor():
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    model_config = HFModelConfig(path=BASE, override_config={"attn_implementation": "sdpa"},
                                 use_remove_padding=False)
    assert type(model_config.processor).__name__ == "Qwen2_5_VLProcessor", model_config.processor
    engine = FSDPEngine(model_config, FSDPEngineConfig(strategy="fsdp2"),
                        FSDPOptimizerConfig(lr=LR, total_training_steps=TOTAL_STEPS), CheckpointConfig())
    engine.initialize()
    assert type(engine.checkpoint_manager).__name__ == "FSDPCheckpointManager"
    return engine


def _make_dataloader():
    from omegaconf import OmegaConf
    from torchdata.stateful_dataloader import StatefulDataLoader

    from verl.trainer.ppo.utils import create_rl_sampler
    from verl.utils.dataset.rl_dataset import collate_fn

    dataset = IndexDataset()
    sampler = create_rl_sampler(OmegaConf.create({"shuffle": True, "seed": None}), dataset)
    return StatefulDataLoader(dataset=dataset, batch_size=TRAIN_BATCH_SIZE, num_workers=DATALOADER_NUM_WORKERS,
                              drop_last=True, collate_fn=collate_fn, sampler=sampler)


def position_ids_4d(model, ex):
    """verl's layout (agent_loop._compute_position_ids): [text positions; 3 M-RoPE rows] -> (4, batch, seq)."""
    inner = getattr(model, "model", model)
    vision, _ = inner.get_rope_index(input_ids=ex["input_ids"], mm_token_type_ids=ex["mm_token_type_ids"],
                                     image_grid_thw=ex["image_grid_thw"], attention_mask=ex["attention_mask"])
    mask = ex["attention_mask"].bool()
    text = torch.ones_like(ex["input_ids"])
    for b in range(text.shape[0]):
        text[b, mask[b]] = torch.arange(int(mask[b].sum()))
    return torch.cat([text.unsqueeze(0), vision.to(text.dtype)], dim=0)


def train_worker(rank, port, gathered_dir):
    _init_dist(rank, port)
    from transformers import AutoConfig, AutoProcessor

    from verl.utils.fs import local_mkdir_safe
    from verl.utils.fsdp_utils import get_fsdp_full_state_dict

    config = AutoConfig.from_pretrained(BASE)
    processor = AutoProcessor.from_pretrained(BASE)
    examples = VLM.make_examples(processor, FAMILY, config)
    assert len(examples) == NUM_PROMPTS
    os.chdir(RUN)  # the trainer's default_local_dir is relative to its cwd
    engine = _build_actor()
    train_dataloader = _make_dataloader() if rank == 0 else None
    data_iter = iter(train_dataloader) if rank == 0 else None

    global_steps = 1
    for _ in range(TOTAL_STEPS):
        idx = torch.empty(TRAIN_BATCH_SIZE, dtype=torch.long)
        if rank == 0:
            idx.copy_(next(data_iter)["index"])
        dist.broadcast(idx, src=0)
        mine = idx.chunk(WORLD_SIZE)[rank].tolist()
        ex = VLM.collate([examples[i] for i in mine])
        with engine.train_mode():
            engine.optimizer_zero_grad()
            position_ids = position_ids_4d(engine.module, ex)
            out = engine.module(input_ids=ex["input_ids"], attention_mask=ex["attention_mask"],
                                position_ids=position_ids, pixel_values=ex["pixel_values"],
                                image_grid_thw=ex["image_grid_thw"])
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ex["labels"][:, 1:].reshape(-1), ignore_index=-100)
            loss.backward()
            grad_norm = engine.optimizer_step()
            engine.lr_scheduler_step()
        if rank == 0:
            print(f"step {global_steps}: loss {loss.item():.4f} grad_norm {float(grad_norm):.4f}", flush=True)

        if global_steps % SAVE_FREQ == 0:
            # ---- RayPPOTrainer._save_checkpoint (verl 0.9.1), replicated ----
            local_global_step_folder = os.path.join(DEFAULT_LOCAL_DIR, f"global_step_{global_steps}")
            actor_local_path = os.path.join(local_global_step_folder, "actor")
            engine.save_checkpoint(actor_local_path, None, global_steps, max_ckpt_to_keep=None)
            if rank == 0:  # the driver
                local_mkdir_safe(local_global_step_folder)
                torch.save(train_dataloader.state_dict(), os.path.join(local_global_step_folder, "data.pt"))
                with open(os.path.join(DEFAULT_LOCAL_DIR, "latest_checkpointed_iteration.txt"), "w") as f:
                    f.write(str(global_steps))
            dist.barrier()
            # ---- the unsharded state at this step, for the reference logits (computed in the main process) ----
            full = get_fsdp_full_state_dict(engine.module, offload_to_cpu=True, rank0_only=True)
            if rank == 0:
                torch.save({k: v.detach().float().cpu().clone() for k, v in full.items()},
                           os.path.join(gathered_dir, f"global_step_{global_steps}.pt"))
            dist.barrier()
        global_steps += 1
    dist.barrier()
    dist.destroy_process_group()


def consolidate(actor_dir):
    """Hand consolidation of model_world_size_2_rank_*.pt (DTensor local shards)."""
    from torch.distributed.tensor import DTensor, Shard

    shards = [torch.load(os.path.join(actor_dir, f"model_world_size_{WORLD_SIZE}_rank_{r}.pt"), weights_only=False)
              for r in range(WORLD_SIZE)]
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


def build_base():
    shutil.rmtree(BASE, ignore_errors=True)
    tokenizer = VLM.build_tokenizer(FAMILY)
    processor = VLM.build_processor(FAMILY, tokenizer)
    cfg = VLM.tiny_config(FAMILY, tokenizer)
    torch.manual_seed(SEED)
    model = VLM.model_class(FAMILY)._from_config(cfg, dtype=torch.float32)
    model.save_pretrained(BASE)
    processor.save_pretrained(BASE)
    gen = os.path.join(BASE, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    print("base/:", sorted(os.listdir(BASE)), sum(t.numel() for t in model.state_dict().values()), "parameters")


def main():
    from transformers import AutoConfig, AutoProcessor

    for path in (RUN, SAVE_PRETRAINED):
        shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(REFERENCE):
        os.remove(REFERENCE)
    os.makedirs(RUN)
    build_base()

    gathered = tempfile.TemporaryDirectory(prefix="verl_vlm_full_")
    mp.spawn(train_worker, args=(29631, gathered.name), nprocs=WORLD_SIZE, join=True)

    cls = VLM.model_class(FAMILY)
    config = AutoConfig.from_pretrained(BASE)
    inputs, text_ids = VLM.reference_inputs(BASE, FAMILY)
    base_sd = cls.from_pretrained(BASE, dtype=torch.float32).state_dict()
    logits, text_logits, steps = {}, {}, {}
    for name in OUTPUT_NAMES:
        full = torch.load(os.path.join(gathered.name, f"{name}.pt"), weights_only=True)
        plain = cls._from_config(config, dtype=torch.float32).eval()
        plain.load_state_dict(full, strict=True)
        logits[name], text_logits[name] = VLM.logits_of(plain, inputs, text_ids)
        steps[name] = int(name.rsplit("_", 1)[1])
        out = os.path.join(SAVE_PRETRAINED, name)
        plain.save_pretrained(out)
        for f in os.listdir(out):
            if not (f.endswith(".safetensors") or f == "config.json" or f.endswith(".safetensors.index.json")):
                os.remove(os.path.join(out, f))
    gathered.cleanup()

    for name in OUTPUT_NAMES:
        actor_dir = os.path.join(RUN, DEFAULT_LOCAL_DIR, name, "actor")
        full = consolidate(actor_dir)
        plain = cls._from_config(config, dtype=torch.float32).eval()
        plain.load_state_dict(full, strict=True)
        a, b = VLM.logits_of(plain, inputs, text_ids)
        da, db = (a - logits[name]).abs().max().item(), (b - text_logits[name]).abs().max().item()
        print(f"[check 1] hand consolidation {name}: {len(full)} tensors, max abs diff {da:.3e}, text {db:.3e}")
        assert da < 1e-5 and db < 1e-5, (da, db)
        sp = cls.from_pretrained(os.path.join(SAVE_PRETRAINED, name), dtype=torch.float32).state_dict()
        ck = plain.state_dict()
        assert sp.keys() == ck.keys() and all(torch.equal(sp[k], ck[k]) for k in ck), name
        print(f"[check 2] save_pretrained/{name} equals the hand consolidation")
        if name == OUTPUT_NAMES[-1]:
            same = [k for k in ck if torch.equal(ck[k], base_sd[k])]
            print(f"[check 3] {name}: tensors equal to base/: {same}")
            assert not same, same
        proc = AutoProcessor.from_pretrained(os.path.join(actor_dir, "huggingface"))
        print(f"[check 4] {name}/actor/huggingface: AutoProcessor -> {type(proc).__name__}")
        # [check 5] verl's merger (bf16 output) equals the bf16 cast of the hand consolidation
        with tempfile.TemporaryDirectory() as target:
            # `python -m verl.model_merger merge ...`, with the torchvision shim applied first in that process
            subprocess.run([sys.executable, "-c", MERGER_WITH_SHIM, "merge", "--backend", "fsdp",
                            "--local_dir", actor_dir, "--target_dir", target],
                           check=True, stdout=subprocess.DEVNULL, env={**os.environ, "VERL_PLATFORM": ""})
            from safetensors.torch import load_file

            merged_file = {}
            for f in sorted(glob.glob(os.path.join(target, "*.safetensors"))):
                merged_file.update(load_file(f))
            merged = cls.from_pretrained(target, dtype=torch.bfloat16).state_dict()
            assert merged.keys() == ck.keys()
            worst = max((merged[k].float() - ck[k].bfloat16().float()).abs().max().item() for k in ck)
            print(f"[check 5] verl.model_merger {name}: {sorted(os.listdir(target))}, {len(merged_file)} tensors "
                  f"(e.g. {sorted(merged_file)[:2]}), max abs diff vs bf16 consolidation {worst:.3e}")
            assert worst == 0.0, worst

    a, b = (logits[n] for n in OUTPUT_NAMES)
    d = (a - b).abs().max().item()
    print(f"[check 3] {OUTPUT_NAMES[0]} vs {OUTPUT_NAMES[-1]} logits differ by {d:.3e}")
    assert d > 1e-3, "checkpoints should differ"
    torch.save({"inputs": inputs, "input_ids": text_ids, "logits": logits, "text_logits": text_logits,
                "steps": steps}, REFERENCE)
    print("reference steps:", steps)
    print("OK")


if __name__ == "__main__":
    main()
