"""Generate the transformers-Trainer / accelerate FSDP fixtures (README contract in ../README.md).

This one script writes five sibling fixture folders (each: run/ + reference.pt):

  hf_trainer_fsdp2_sharded/  transformers Trainer, FSDP2 (fully_shard), SHARDED_STATE_DICT
  hf_trainer_fsdp2_full/     transformers Trainer, FSDP2 (fully_shard), FULL_STATE_DICT
  hf_trainer_fsdp1_sharded/  transformers Trainer, FSDP1 (FullyShardedDataParallel), SHARDED_STATE_DICT
  hf_trainer_fsdp1_full/     transformers Trainer, FSDP1 (FullyShardedDataParallel), FULL_STATE_DICT
  accelerate_fsdp2_sharded/  plain accelerate loop, FSDP2, SHARDED_STATE_DICT, accelerator.save_state() twice
                             (ProjectConfiguration(automatic_checkpoint_naming=True) -> run/checkpoints/checkpoint_{0,1})

The other folders' make_fixture.py are links here: run through one, the script writes that folder only.

Versions used (pip freeze, CPU-only machine, Python 3.11.7):
  torch==2.13.0+cpu  transformers==5.24.0  accelerate==1.15.0  safetensors==0.8.0
  tokenizers==0.23.3  huggingface_hub==2.4.0  numpy==2.4.6  (datasets==5.2.0 installed, not used)

Recreate the venv and run (from the repo root; takes about 2.5-4 minutes for all five on 2 shared CPU cores):
  python3 -m venv /work/venvs/hf
  /work/venvs/hf/bin/pip install torch==2.13.0          # first: the local CPU build
  /work/venvs/hf/bin/pip install transformers==5.24.0 accelerate==1.15.0
  HF_HUB_OFFLINE=1 /work/venvs/hf/bin/python tests/trainers/hf_trainer_fsdp2_sharded/make_fixture.py [VARIANT ...]
(no VARIANT = all five; tests/trainers/VARIANT/make_fixture.py = that one).

Each run: LlamaForCausalLM from ../base/config.json (seeded init, fp32), tokenizer ../base passed as
processing_class, random-token dataset (32 x 16 tokens), AdamW lr 1e-2 with linear decay, 2 ranks x batch 2,
4 optimizer steps, checkpoint every 2 steps (checkpoint-2, checkpoint-4), then trainer.save_model() into run/.
For the sharded Trainer variants the final save follows the HF FSDP docs: switch the plugin to
FULL_STATE_DICT before trainer.save_model() (with SHARDED_STATE_DICT save_model() writes nothing at all).

CPU workarounds (the trainers' own save code is untouched):
  * accelerate only enables FSDP for GPU-like distributed types; on CPU it picks MULTI_CPU and silently
    trains without FSDP. Each worker replaces PartialState._prepare_backend with one returning
    ("gloo", DistributedType.MULTI_GPU) and sets ACCELERATE_TORCH_DEVICE=cpu, so the device is cpu,
    the process group is gloo and AcceleratorState turns on DistributedType.FSDP.
  * FSDP1 (Trainer): fsdp_config["sync_module_states"] = "false" (FSDP1 raises "The module has CPU parameters or buffers when `sync_module_states=True`");
    both ranks build identical weights from the same seed instead.
  * FSDP1 FULL_STATE_DICT (checkpoint saves of hf_trainer_fsdp1_full, and the final FULL save_model() of
    hf_trainer_fsdp1_sharded) segfaults on CPU: see patch_fsdp1_offload_to_cpu() below (torch-internal
    use-after-free; the patch makes flat_param.to("cpu") copy, as it does from a GPU).
  * accelerate loop: the prepared scheduler steps once per process per optimizer step, so it is built
    for MAX_STEPS * world_size steps (otherwise lr hits 0 after 2 steps and both checkpoints are equal).
  * data_collator=default_data_collator (the base tokenizer has no pad token; the default padding
    collator would refuse).

Reference logits: in an on_save callback (Trainer) / right after save_state (accelerate), all ranks gather the
full state dict (torch.distributed.checkpoint.state_dict.get_model_state_dict, full_state_dict=True) and
rank 0 loads it into a plain, unsharded LlamaForCausalLM and runs input_ids in fp32. After the run the
main process re-checks every checkpoint FROM DISK: DCP dirs are consolidated with accelerate's own
merge_fsdp_weights, pytorch_model_fsdp.bin / model.safetensors are loaded directly, into a plain model,
and the logits must match the reference to < 1e-5; the root model.safetensors must equal the last checkpoint.
"""
import os
import shutil
import socket
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
TRAINERS = os.path.dirname(HERE)
BASE = os.path.join(TRAINERS, "base")
WORLD = 2
MAX_STEPS, SAVE_STEPS, LR, BATCH = 4, 2, 1e-2, 2

# name -> (kind, fsdp_version, state_dict_type)
VARIANTS = {
    "hf_trainer_fsdp2_sharded": ("trainer", 2, "SHARDED_STATE_DICT"),
    "hf_trainer_fsdp2_full": ("trainer", 2, "FULL_STATE_DICT"),
    "hf_trainer_fsdp1_sharded": ("trainer", 1, "SHARDED_STATE_DICT"),
    "hf_trainer_fsdp1_full": ("trainer", 1, "FULL_STATE_DICT"),
    "accelerate_fsdp2_sharded": ("accelerate", 2, "SHARDED_STATE_DICT"),
}


def input_ids(vocab_size):
    return torch.arange(24).reshape(2, 12) * 7 % vocab_size


def random_data(vocab_size):
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (32, 16), generator=g)


def patch_accelerate_for_cpu_fsdp():
    import accelerate.state as st
    from accelerate.utils import DistributedType

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    st.PartialState._prepare_backend = _prepare_backend


def patch_fsdp1_offload_to_cpu():
    """FSDP1 FULL_STATE_DICT with offload_to_cpu=True (what accelerate uses for multi-process FULL saves)
    segfaults when the compute device is the CPU: FlatParamHandle.to_cpu() calls flat_param.to("cpu"),
    which is a no-op on CPU, then frees the unsharded storage that the flat param still points to; the
    state_dict clone() then reads freed memory. From a GPU, .to("cpu") makes a fresh copy; do the same here."""
    from torch.distributed.fsdp._flat_param import FlatParamHandle

    orig = FlatParamHandle.flat_param_to

    def flat_param_to(self, *args, **kwargs):
        if args and torch.device(args[0]).type == "cpu" and self.flat_param.device.type == "cpu":
            kwargs["copy"] = True
        return orig(self, *args, **kwargs)

    FlatParamHandle.flat_param_to = flat_param_to


def unsharded_logits(model, cfg):
    """Collective: gather the full state dict on every rank; rank 0 returns the plain model's logits."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if torch.distributed.get_rank() != 0:
        return None
    plain = AutoModelForCausalLM.from_config(cfg).float().eval()
    plain.load_state_dict({k: v.detach().float().cpu() for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        return plain(input_ids(cfg.vocab_size)).logits.float().clone()


def worker(rank, name, run_dir, ref_tmp, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    patch_accelerate_for_cpu_fsdp()
    kind, fsdp_version, sdt = VARIANTS[name]
    if fsdp_version == 1:
        patch_fsdp1_offload_to_cpu()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(BASE)
    torch.manual_seed(list(VARIANTS).index(name))  # same on both ranks; differs between fixtures
    model = AutoModelForCausalLM.from_config(cfg).float()
    data = random_data(cfg.vocab_size)
    refs, steps, info = {}, {}, {}

    if kind == "trainer":
        from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

        tok = AutoTokenizer.from_pretrained(BASE)

        class DS(torch.utils.data.Dataset):
            def __len__(self):
                return len(data)

            def __getitem__(self, i):
                return {"input_ids": data[i], "labels": data[i]}

        class RefLogits(TrainerCallback):
            def on_save(self, args, state, control, model=None, **kw):
                out = unsharded_logits(model, cfg)
                if out is not None:
                    key = f"checkpoint-{state.global_step}"
                    refs[key], steps[key] = out, state.global_step

        fsdp_config = {"version": fsdp_version, "state_dict_type": sdt,
                       "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
        if fsdp_version == 1:
            fsdp_config["sync_module_states"] = "false"
        args = TrainingArguments(output_dir=run_dir, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, learning_rate=LR,
                                 per_device_train_batch_size=BATCH, fsdp=True, fsdp_config=fsdp_config,
                                 report_to=[], logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=DS(), processing_class=tok,
                          data_collator=default_data_collator, callbacks=[RefLogits()])
        trainer.train()
        info["distributed_type"] = str(trainer.accelerator.distributed_type)
        info["wrapped"] = type(trainer.model_wrapped).__module__ + "." + type(trainer.model_wrapped).__name__
        info["is_fsdp2"] = trainer.accelerator.is_fsdp2
        if trainer.is_fsdp_enabled and sdt != "FULL_STATE_DICT":
            # HF docs: "trainer.accelerator.state.fsdp_plugin.set_state_dict_type('FULL_STATE_DICT')" before saving
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model()
    else:
        from accelerate import Accelerator
        from accelerate.utils import FullyShardedDataParallelPlugin, ProjectConfiguration
        from transformers import get_linear_schedule_with_warmup

        plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp_version, state_dict_type=sdt,
                                                auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                                reshard_after_forward=True)
        accelerator = Accelerator(fsdp_plugin=plugin,
                                  project_config=ProjectConfiguration(project_dir=run_dir,
                                                                      automatic_checkpoint_naming=True))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=BATCH, shuffle=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        # accelerate's prepared scheduler steps num_processes times per optimizer step (split_batches=False)
        scheduler = get_linear_schedule_with_warmup(optimizer, 0, MAX_STEPS * WORLD)
        # FSDP2 in accelerate: model and optimizer must go through one prepare() call
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        info["distributed_type"] = str(accelerator.distributed_type)
        info["wrapped"] = type(model).__module__ + "." + type(model).__name__
        info["is_fsdp2"] = accelerator.is_fsdp2
        step = 0
        model.train()
        for (batch,) in loader:
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step % SAVE_STEPS == 0:
                loc = accelerator.save_state()
                out = unsharded_logits(model, cfg)
                if out is not None:
                    key = os.path.basename(loc)
                    refs[key], steps[key] = out, step
            if step == MAX_STEPS:
                break
        accelerator.wait_for_everyone()
    if rank == 0:
        torch.save({"logits": refs, "steps": steps, "info": info}, ref_tmp)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def load_checkpoint_weights(ckpt, scratch):
    """Model weights of one saved checkpoint, read from disk with the frameworks' own tools."""
    from accelerate.utils import merge_fsdp_weights
    from safetensors.torch import load_file

    found = {}
    dcp = os.path.join(ckpt, "pytorch_model_fsdp_0")
    if os.path.isdir(dcp):
        out = os.path.join(scratch, os.path.basename(ckpt))
        merge_fsdp_weights(dcp, out, safe_serialization=True)
        found["pytorch_model_fsdp_0 (DCP, merge_fsdp_weights)"] = load_file(os.path.join(out, "model.safetensors"))
    full = os.path.join(ckpt, "pytorch_model_fsdp.bin")
    if os.path.isfile(full):
        found["pytorch_model_fsdp.bin"] = torch.load(full, weights_only=True)
    st = os.path.join(ckpt, "model.safetensors")
    if os.path.isfile(st):
        found["model.safetensors"] = load_file(st)
    return found


def check(name, run_dir, ref, cfg):
    from transformers import AutoModelForCausalLM

    ids = input_ids(cfg.vocab_size)
    scratch = tempfile.mkdtemp(prefix=f"{name}_verify_")
    try:
        for key, logits in ref["logits"].items():
            ckpt = os.path.join(run_dir, "checkpoints", key) if key.startswith("checkpoint_") else os.path.join(run_dir, key)
            weights = load_checkpoint_weights(ckpt, scratch)
            assert weights, f"no model weights found in {ckpt}"
            for what, sd in weights.items():
                plain = AutoModelForCausalLM.from_config(cfg).float().eval()
                plain.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
                with torch.no_grad():
                    got = plain(ids).logits
                d = (got - logits).abs().max().item()
                print(f"  {name} {key} {what}: max|logits - reference| = {d:.2e}")
                assert d < 1e-5, (name, key, what, d)
        keys = sorted(ref["logits"], key=lambda k: ref["steps"][k])
        d = (ref["logits"][keys[0]] - ref["logits"][keys[-1]]).abs().max().item()
        print(f"  {name} {keys[0]} vs {keys[-1]} reference logits differ by {d:.3e}")
        assert d > 1e-3
        root = os.path.join(run_dir, "model.safetensors")
        if os.path.isfile(root):
            from safetensors.torch import load_file

            last = load_checkpoint_weights(os.path.join(run_dir, keys[-1]), scratch)
            final = load_file(root)
            for what, sd in last.items():
                assert sd.keys() == final.keys() and all(torch.equal(sd[k], final[k]) for k in sd), what
            print(f"  {name} run/model.safetensors equals {keys[-1]}'s weights")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(names):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(BASE)
    for name in names:
        t0 = time.time()
        folder = os.path.join(TRAINERS, name)
        os.makedirs(folder, exist_ok=True)
        run_dir = os.path.join(folder, "run")
        ref_path = os.path.join(folder, "reference.pt")
        shutil.rmtree(run_dir, ignore_errors=True)
        if os.path.exists(ref_path):
            os.remove(ref_path)
        fd, ref_tmp = tempfile.mkstemp(suffix=".pt")
        os.close(fd)
        try:
            mp.spawn(worker, args=(name, run_dir, ref_tmp, free_port()), nprocs=WORLD)
            ref = torch.load(ref_tmp, weights_only=True)
        finally:
            os.remove(ref_tmp)
        print(f"{name}: {ref['info']}")
        assert ref["info"]["distributed_type"] == "DistributedType.FSDP", ref["info"]
        assert ref["info"]["is_fsdp2"] == (VARIANTS[name][1] == 2), ref["info"]
        check(name, run_dir, ref, cfg)
        torch.save({"input_ids": input_ids(cfg.vocab_size), "logits": ref["logits"], "steps": ref["steps"]}, ref_path)
        print(f"{name}: wrote {ref_path} steps={ref['steps']} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    # Run through a sibling folder's link, the folder names the variant; run here, no argument means all five.
    linked = os.path.basename(HERE) != os.path.basename(os.path.dirname(os.path.realpath(__file__)))
    chosen = sys.argv[1:] or ([os.path.basename(HERE)] if linked else list(VARIANTS))
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
    main(chosen)
