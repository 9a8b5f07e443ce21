"""Generate the LoRA (peft) transformers-Trainer / accelerate FSDP fixtures (README contract in ../README.md).

This one script writes five sibling fixture folders:

  lora_hf_trainer_fsdp2_sharded/   transformers Trainer + peft LoRA, FSDP2 (fully_shard), SHARDED_STATE_DICT
  lora_hf_trainer_fsdp2_full/      the same, FULL_STATE_DICT, and modules_to_save=["lm_head"]
  lora_hf_trainer_fsdp1_sharded/   Trainer + LoRA, FSDP1 (FullyShardedDataParallel), SHARDED_STATE_DICT, peft 0.20
  lora_accelerate_fsdp2_sharded/   plain accelerate loop on a PeftModel, FSDP2, SHARDED_STATE_DICT,
                                   accelerator.save_state() at steps 2 and 4 (ProjectConfiguration(
                                   automatic_checkpoint_naming=True) -> run/checkpoints/checkpoint_{0,1})
  lora_hf_trainer_fsdp1_sharded_peft021/  run/ only: what peft 0.21 writes for the FSDP1 SHARDED case (see below)

Each of the first four: base/ (the "pretrained" model the run starts from), run/, reference.pt (logits of the
trained PeftModel), exported/<unit>/ (PeftModel.save_pretrained of the trained adapter at that step).
The other folders' make_fixture.py are links here: run through one, the script writes that folder only.

Versions used (pip freeze, CPU-only machine, Python 3.11.7):
  torch==2.13.0+cpu  transformers==5.24.0  accelerate==1.15.0  safetensors==0.8.0  tokenizers==0.23.3
  huggingface_hub==2.4.0  numpy==2.4.6
  peft==0.21.2 (newest 0.21) for all but lora_hf_trainer_fsdp1_sharded, which uses peft==0.20.0 (newest 0.20;
  it installs next to transformers 5.24.0 without complaint). Two venvs, identical but for peft.

Recreate the venvs and run (from the repo root; 20-50 s per folder on 2 shared CPU cores):
  python3 -m venv /work/venvs/lora-hf
  /work/venvs/lora-hf/bin/pip install torch==2.13.0          # first: the local CPU build
  /work/venvs/lora-hf/bin/pip install transformers==5.24.0 accelerate==1.15.0 peft==0.21.2
  python3 -m venv /work/venvs/lora-hf-peft020
  /work/venvs/lora-hf-peft020/bin/pip install torch==2.13.0
  /work/venvs/lora-hf-peft020/bin/pip install transformers==5.24.0 accelerate==1.15.0 peft==0.20.0
  HF_HUB_OFFLINE=1 /work/venvs/lora-hf/bin/python tests/trainers/lora_hf_trainer_fsdp2_sharded/make_fixture.py
  HF_HUB_OFFLINE=1 /work/venvs/lora-hf-peft020/bin/python tests/trainers/lora_hf_trainer_fsdp1_sharded/make_fixture.py
(no VARIANT = every variant of the installed peft series; VARIANT ... or tests/trainers/VARIANT/make_fixture.py
= those; a variant run with the wrong peft series is refused.)

Each run: base/ = LlamaForCausalLM from ../base/config.json (seeded init, fp32), every tensor plus seeded
N(0, 0.05) noise, save_pretrained (config.json, generation_config.json, model.safetensors) + ../base's
tokenizer.json / tokenizer_config.json; the workers run with the fixture folder as cwd and load it as
from_pretrained("base"), so adapter_config.json records base_model_name_or_path "base" (relative to the fixture
folder) and TrainingArguments.output_dir is "run". LoRA: LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0,
target_modules=[q,k,v,o,gate,up,down]_proj, task_type="CAUSAL_LM") (+ modules_to_save=["lm_head"] in
lora_hf_trainer_fsdp2_full), get_peft_model with a seeded LoRA init (same on both ranks). Random-token dataset
(32 x 16), AdamW lr 1e-2 linear decay, 2 ranks x batch 2, 4 optimizer steps, checkpoint every 2 steps
(checkpoint-2, checkpoint-4), then trainer.save_model() into run/. For the sharded Trainer variants the final
save follows the HF FSDP docs: the plugin is switched to FULL_STATE_DICT first (SHARDED save_model() writes
nothing). FSDP wrapping: the Trainer replaces the auto wrap policy with peft's fsdp_auto_wrap_policy
(transformers' update_fsdp_plugin_peft: decoder layers and the LoRA leaf modules are wrapped separately); the
accelerate loop uses transformer_based_wrap on LlamaDecoderLayer, optimizer over the trainable params only.

CPU workarounds (the trainers' own save code is untouched), as in ../hf_trainer_fsdp2_sharded/make_fixture.py:
  * accelerate only enables FSDP for GPU-like distributed types; each worker replaces
    PartialState._prepare_backend with one returning ("gloo", DistributedType.MULTI_GPU) and sets
    ACCELERATE_TORCH_DEVICE=cpu, so the device is cpu, the process group gloo and DistributedType.FSDP is on.
  * FSDP1: fsdp_config["sync_module_states"] = "false" (both ranks build identical weights from one seed), and
    patch_fsdp1_offload_to_cpu() (the final FULL_STATE_DICT save_model() segfaults on CPU otherwise).
  * accelerate loop: the scheduler is built for MAX_STEPS * world_size steps (the prepared scheduler steps once
    per process per optimizer step).
  * data_collator=default_data_collator (the base tokenizer has no pad token).

What the trainers write (names below for layer 0 q_proj; all 2 layers x 7 modules present; all float32):
  * Trainer, SHARDED (FSDP2, and FSDP1 with peft 0.20): checkpoint-N/pytorch_model_fsdp_0/ is a DCP with 28
    entries, adapter-format names (no adapter name, no base weights) under "model.":
    model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight [4, 32] / ...lora_B.weight [32, 4]
    (accelerate's save_fsdp_model(adapter_only=True) -> peft's get_peft_model_state_dict); optimizer_0/ DCP
    with optimizer.state.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight.{step,exp_avg,
    exp_avg_sq} and optimizer.param_groups.{0,1}.*; no adapter_config.json in checkpoint-N (r/lora_alpha are
    only in run/adapter_config.json, written by the final save_model()).
  * Trainer, FSDP2 FULL: checkpoint-N/pytorch_model_fsdp.bin = torch.save of a dict with module-format names
    (get_model_state_dict(ignore_frozen_params=True)): base_model.model.model.layers.0.self_attn.q_proj.
    lora_A.default.weight, base_model.model.lm_head.modules_to_save.default.weight [261, 32] (29 tensors; no
    base_layer.weight, no lm_head.original_module.weight); optimizer.bin keyed by the same names; and
    checkpoint-N/adapter_model.safetensors + adapter_config.json + README.md (PeftModel.save_pretrained of
    accelerator.get_state_dict): the FULL adapter, equal to exported/checkpoint-N (not rank 0's slice), with
    base_model.model.lm_head.weight for the modules_to_save copy.
  * accelerate save_state (FSDP2 SHARDED, adapter_only is not passed): pytorch_model_fsdp_0/ DCP with the whole
    model, 49 entries: model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight,
    ...q_proj.lora_A.default.weight, model.base_model.model.model.embed_tokens.weight, ...lm_head.weight, ...;
    no adapter_config.json / LoRA hyper-parameters anywhere in run/.
  * peft 0.21 + FSDP1 SHARDED (lora_hf_trainer_fsdp1_sharded_peft021): pytorch_model_fsdp_0/ is a DCP with NO
    entries (.metadata only, 0-byte __0_0.distcp / __1_0.distcp): peft 0.21 selects the LoRA keys by module
    names from model.named_modules() and strips only a leading "_fsdp_wrapped_module.", while the nested FSDP1
    units add more of them inside the names; the final run/adapter_model.safetensors has no tensors either.
    The optimizer_0/ DCP still holds the full LoRA optimizer state. No base/, reference.pt or exported/.

Reference logits / exports: in an on_save callback (Trainer) / right after save_state (accelerate), all ranks
gather the full state dict (torch.distributed.checkpoint.state_dict.get_model_state_dict, full_state_dict=True);
rank 0 loads it (strict) into a plain, unsharded PeftModel over base/, runs input_ids in fp32 and writes
exported/<unit>/ with its save_pretrained (adapter_model.safetensors, adapter_config.json, README.md).

Checks asserted after the run (main process, from disk): each checkpoint's DCP is consolidated with accelerate's
merge_fsdp_weights, pytorch_model_fsdp.bin is read with torch.load, and loaded into a plain PeftModel over base/
(adapter-format keys through peft's set_peft_model_state_dict, module-format keys through load_state_dict; no
unexpected key, every trainable tensor covered, base weights in the checkpoint equal base/): logits == reference
(< 1e-5) and the loaded adapter equals exported/<unit> tensor for tensor; the Trainer's own adapter_model.safetensors
equals exported/<unit> and PeftModel.from_pretrained(base, checkpoint) reproduces the reference; the root
run/adapter_model.safetensors equals the last export; the two steps' logits differ; every lora_B is nonzero and
every adapter tensor moved from its init and between the two saves; adapter_config.json has r=4, lora_alpha=16.
"""
import json
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
BASE_SRC = os.path.join(TRAINERS, "base")
WORLD = 2
MAX_STEPS, SAVE_STEPS, LR, BATCH = 4, 2, 1e-2, 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 16

# name -> (kind, fsdp_version, state_dict_type, modules_to_save, peft series, writes reference/base/exported)
VARIANTS = {
    "lora_hf_trainer_fsdp2_sharded": ("trainer", 2, "SHARDED_STATE_DICT", None, "0.21", True),
    "lora_hf_trainer_fsdp2_full": ("trainer", 2, "FULL_STATE_DICT", ["lm_head"], "0.21", True),
    "lora_hf_trainer_fsdp1_sharded": ("trainer", 1, "SHARDED_STATE_DICT", None, "0.20", True),
    "lora_accelerate_fsdp2_sharded": ("accelerate", 2, "SHARDED_STATE_DICT", None, "0.21", True),
    "lora_hf_trainer_fsdp1_sharded_peft021": ("trainer", 1, "SHARDED_STATE_DICT", None, "0.21", False),
}


def input_ids(vocab_size):
    return torch.arange(24).reshape(2, 12) * 7 % vocab_size


def random_data(vocab_size):
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (32, 16), generator=g)


def lora_config(modules_to_save):
    from peft import LoraConfig

    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS),
                      modules_to_save=modules_to_save, task_type="CAUSAL_LM")


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


def make_base(folder, seed):
    """base/: seeded LlamaForCausalLM from ../base/config.json, every tensor perturbed by seeded noise (so the
    base differs from any fresh init), save_pretrained (safetensors) + ../base's tokenizer files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base_dir = os.path.join(folder, "base")
    shutil.rmtree(base_dir, ignore_errors=True)
    cfg = AutoConfig.from_pretrained(BASE_SRC)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float()
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(base_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(BASE_SRC, f), os.path.join(base_dir, f))
    return base_dir


def plain_peft_model(modules_to_save):
    """Unsharded PeftModel over base/ (the process's cwd is the fixture folder), LoRA freshly initialised."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained("base", dtype=torch.float32)
    return get_peft_model(base, lora_config(modules_to_save)).float().eval()


def gathered_state(model):
    """Collective: the full (unsharded) model state dict of the FSDP-wrapped PeftModel, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().float().cpu().clone() for k, v in sd.items()}


def reference_and_export(model, modules_to_save, key, export_dir):
    """Collective. Rank 0 loads the gathered state into a plain PeftModel over base/, returns its fp32 logits on
    input_ids and writes exported/<key>/ with PeftModel.save_pretrained."""
    sd = gathered_state(model)
    if torch.distributed.get_rank() != 0:
        return None
    plain = plain_peft_model(modules_to_save)
    plain.load_state_dict(sd, strict=True)
    with torch.no_grad():
        out = plain(input_ids=input_ids(plain.config.vocab_size)).logits.float().clone()
    if export_dir is not None:
        plain.save_pretrained(os.path.join(export_dir, key))
    return out


def worker(rank, name, folder, ref_tmp, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # relative paths: adapter_config.json records base_model_name_or_path "base" (= <fixture>/base), not a
    # path of the machine that made the fixture
    os.chdir(folder)
    patch_accelerate_for_cpu_fsdp()
    kind, fsdp_version, sdt, modules_to_save, _, full = VARIANTS[name]
    if fsdp_version == 1:
        patch_fsdp1_offload_to_cpu()
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_dir = os.path.join(folder, "exported") if full else None
    base = AutoModelForCausalLM.from_pretrained("base", dtype=torch.float32)
    torch.manual_seed(100 + list(VARIANTS).index(name))  # same LoRA init on both ranks
    model = get_peft_model(base, lora_config(modules_to_save))
    init = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    vocab = model.config.vocab_size
    data = random_data(vocab)
    refs, steps, info = {}, {}, {}

    if kind == "trainer":
        from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

        tok = AutoTokenizer.from_pretrained("base")

        class DS(torch.utils.data.Dataset):
            def __len__(self):
                return len(data)

            def __getitem__(self, i):
                return {"input_ids": data[i], "labels": data[i]}

        class RefLogits(TrainerCallback):
            def on_save(self, args, state, control, model=None, **kw):
                key = f"checkpoint-{state.global_step}"
                out = reference_and_export(model, modules_to_save, key, export_dir)
                if out is not None:
                    refs[key], steps[key] = out, state.global_step

        fsdp_config = {"version": fsdp_version, "state_dict_type": sdt,
                       "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
        if fsdp_version == 1:
            fsdp_config["sync_module_states"] = "false"
        args = TrainingArguments(output_dir="run", max_steps=MAX_STEPS, save_steps=SAVE_STEPS, learning_rate=LR,
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
                                  project_config=ProjectConfiguration(project_dir="run",
                                                                      automatic_checkpoint_naming=True))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=BATCH, shuffle=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
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
                key = os.path.basename(loc)
                out = reference_and_export(model, modules_to_save, key, export_dir)
                if out is not None:
                    refs[key], steps[key] = out, step
            if step == MAX_STEPS:
                break
        accelerator.wait_for_everyone()
    if rank == 0:
        torch.save({"logits": refs, "steps": steps, "info": info, "init": init}, ref_tmp)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------- checks


def describe(sd):
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()}


def read_dcp(dcp_dir):
    """A DCP model dir, consolidated with accelerate's merge_fsdp_weights (into a scratch dir)."""
    from accelerate.utils import merge_fsdp_weights
    from safetensors.torch import load_file

    out = tempfile.mkdtemp(prefix="lora_dcp_")
    try:
        merge_fsdp_weights(dcp_dir, out, safe_serialization=True)
        return load_file(os.path.join(out, "model.safetensors"))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def load_into_plain(sd, modules_to_save):
    """A plain PeftModel over base/ with the checkpoint's tensors loaded: adapter-format keys (no adapter name,
    as get_peft_model_state_dict / save_pretrained write them) go through peft's set_peft_model_state_dict;
    module-format keys (`.default.`, as torch's get_model_state_dict writes them) through load_state_dict.
    Asserts every checkpoint tensor lands in the model and every LoRA / modules_to_save tensor is covered."""
    from peft import set_peft_model_state_dict

    plain = plain_peft_model(modules_to_save)
    trainable = {k for k, p in plain.named_parameters() if p.requires_grad}
    if any(".default." in k for k in sd):
        # frozen tensors the checkpoint also holds (accelerate's save_state: the whole model) are base/'s
        frozen = {k: v for k, v in plain.state_dict().items() if k not in trainable and k in sd}
        assert all(torch.equal(sd[k], v) for k, v in frozen.items()), "checkpoint base weights != base/"
        res = plain.load_state_dict(sd, strict=False)
        assert not res.unexpected_keys, res.unexpected_keys
        assert not trainable & set(res.missing_keys), sorted(trainable & set(res.missing_keys))
    else:
        res = set_peft_model_state_dict(plain, sd)
        assert not res.unexpected_keys, res.unexpected_keys
        assert not trainable & set(res.missing_keys), sorted(trainable & set(res.missing_keys))
    return plain


def logits_of(plain):
    with torch.no_grad():
        return plain(input_ids=input_ids(plain.config.vocab_size)).logits.float()


def check(name, folder, ref):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    kind, fsdp_version, sdt, modules_to_save, _, full = VARIANTS[name]
    run_dir = os.path.join(folder, "run")
    report = {}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for key, logits in ref["logits"].items():
            ckpt = os.path.join(run_dir, "checkpoints", key) if kind == "accelerate" else os.path.join(run_dir, key)
            exported = load_file(os.path.join(folder, "exported", key, "adapter_model.safetensors"))
            assert all(v.abs().sum() > 0 for k, v in exported.items() if "lora_B" in k), key
            loaded = {}
            dcp = os.path.join(ckpt, "pytorch_model_fsdp_0")
            if os.path.isdir(dcp):
                loaded["pytorch_model_fsdp_0 (DCP)"] = read_dcp(dcp)
            if os.path.isfile(os.path.join(ckpt, "pytorch_model_fsdp.bin")):
                loaded["pytorch_model_fsdp.bin"] = torch.load(os.path.join(ckpt, "pytorch_model_fsdp.bin"),
                                                              weights_only=True)
            assert loaded, f"no model weights in {ckpt}"
            for what, sd in loaded.items():
                report[f"{key}/{what}"] = describe(sd)
                plain = load_into_plain(sd, modules_to_save)
                d = (logits_of(plain) - logits).abs().max().item()
                print(f"  {name} {key} {what}: {len(sd)} tensors, max|logits - reference| = {d:.2e}")
                assert d < 1e-5, (name, key, what, d)
                # what the checkpoint holds == the exported adapter, tensor for tensor
                got = get_peft_model_state_dict(plain)
                assert got.keys() == exported.keys(), (sorted(got.keys() ^ exported.keys()))[:6]
                assert all(torch.equal(got[k], exported[k]) for k in got), what
            # the Trainer's own adapter_model.safetensors (FULL_STATE_DICT saves), read with peft's own loader
            ad = os.path.join(ckpt, "adapter_model.safetensors")
            if os.path.isfile(ad):
                sd = load_file(ad)
                report[f"{key}/adapter_model.safetensors"] = describe(sd)
                same = sd.keys() == exported.keys() and all(torch.equal(sd[k], exported[k]) for k in sd)
                print(f"  {name} {key} adapter_model.safetensors equals exported/{key}: {same}")
                assert same, describe(sd)
                base = AutoModelForCausalLM.from_pretrained("base", dtype=torch.float32)
                pm = PeftModel.from_pretrained(base, ckpt).float().eval()
                d = (logits_of(pm) - logits).abs().max().item()
                print(f"  {name} {key} PeftModel.from_pretrained({key}): max|logits - reference| = {d:.2e}")
                assert d < 1e-5, (name, key, "adapter_model.safetensors", d)
            with open(os.path.join(folder, "exported", key, "adapter_config.json")) as f:
                acfg = json.load(f)
            assert (acfg["r"], acfg["lora_alpha"]) == (R, ALPHA), acfg
            report[f"exported/{key}/adapter_model.safetensors"] = describe(exported)
        keys = sorted(ref["logits"], key=lambda k: ref["steps"][k])
        d = (ref["logits"][keys[0]] - ref["logits"][keys[-1]]).abs().max().item()
        print(f"  {name} {keys[0]} vs {keys[-1]} reference logits differ by {d:.3e}")
        assert d > 1e-3
        e0 = load_file(os.path.join(folder, "exported", keys[0], "adapter_model.safetensors"))
        e1 = load_file(os.path.join(folder, "exported", keys[-1], "adapter_model.safetensors"))
        init = ref["init"]
        assert init.keys() == e0.keys(), sorted(init.keys() ^ e0.keys())
        for k in e0:
            assert not torch.equal(e0[k], e1[k]), k  # every adapter tensor moved between the two saves
            assert not torch.equal(e0[k], init[k]), k  # ... and away from its initial value
        root = os.path.join(run_dir, "adapter_model.safetensors")
        if os.path.isfile(root):
            sd = load_file(root)
            report["run/adapter_model.safetensors"] = describe(sd)
            same = sd.keys() == e1.keys() and all(torch.equal(sd[k], e1[k]) for k in sd)
            print(f"  {name} run/adapter_model.safetensors equals exported/{keys[-1]}: {same}")
            assert same
    finally:
        os.chdir(cwd)
    return report


def check_peft021_fsdp1(name, folder):
    """peft 0.21 + FSDP1 + SHARDED_STATE_DICT: the model DCP of each checkpoint holds no entry at all (its two
    .distcp files are empty), the optimizer DCP holds the whole LoRA optimizer state, and the final FULL
    save_model() writes an adapter_model.safetensors without tensors. Asserted, so a changed peft shows up."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    report = {}
    for key in ("checkpoint-2", "checkpoint-4"):
        ckpt = os.path.join(folder, "run", key)
        md = dcp.FileSystemReader(os.path.join(ckpt, "pytorch_model_fsdp_0")).read_metadata()
        report[f"{key}/pytorch_model_fsdp_0"] = sorted(md.state_dict_metadata)
        assert not md.state_dict_metadata, sorted(md.state_dict_metadata)[:4]
        for f in ("__0_0.distcp", "__1_0.distcp"):
            assert os.path.getsize(os.path.join(ckpt, "pytorch_model_fsdp_0", f)) == 0, f
        om = dcp.FileSystemReader(os.path.join(ckpt, "optimizer_0")).read_metadata().state_dict_metadata
        lora = [k for k in om if k.startswith("optimizer.state.") and ".lora_" in k]
        report[f"{key}/optimizer_0"] = len(om)
        assert len(lora) == 2 * len(TARGETS) * 2 * 3, len(lora)  # layers x modules x A/B x 3 Adam states
        print(f"  {name} {key}: model DCP has {len(md.state_dict_metadata)} entries, optimizer DCP {len(om)}")
    root = load_file(os.path.join(folder, "run", "adapter_model.safetensors"))
    report["run/adapter_model.safetensors"] = sorted(root)
    assert not root, sorted(root)[:4]
    print(f"  {name} run/adapter_model.safetensors holds {len(root)} tensors")
    return report


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(names):
    import peft

    for name in names:
        want = VARIANTS[name][4]
        if not peft.__version__.startswith(want + "."):
            sys.exit(f"{name} needs peft {want}.x (this venv has peft {peft.__version__}); see the docstring")
    for name in names:
        t0 = time.time()
        full = VARIANTS[name][5]
        folder = os.path.join(TRAINERS, name)
        os.makedirs(folder, exist_ok=True)
        for sub in ("run", "exported", "base"):
            shutil.rmtree(os.path.join(folder, sub), ignore_errors=True)
        ref_path = os.path.join(folder, "reference.pt")
        if os.path.exists(ref_path):
            os.remove(ref_path)
        base_dir = make_base(folder, list(VARIANTS).index(name))
        fd, ref_tmp = tempfile.mkstemp(suffix=".pt")
        os.close(fd)
        try:
            mp.spawn(worker, args=(name, folder, ref_tmp, free_port()), nprocs=WORLD)
            ref = torch.load(ref_tmp, weights_only=True)
        finally:
            os.remove(ref_tmp)
        print(f"{name}: {ref['info']}")
        assert ref["info"]["distributed_type"] == "DistributedType.FSDP", ref["info"]
        assert ref["info"]["is_fsdp2"] == (VARIANTS[name][1] == 2), ref["info"]
        if not full:
            report = check_peft021_fsdp1(name, folder)
            shutil.rmtree(base_dir)
        else:
            report = check(name, folder, ref)
            vocab = ref["logits"][next(iter(ref["logits"]))].shape[-1]
            torch.save({"input_ids": input_ids(vocab), "logits": ref["logits"], "steps": ref["steps"]}, ref_path)
        if os.environ.get("LORA_FIXTURE_REPORT"):
            with open(os.path.join(os.environ["LORA_FIXTURE_REPORT"], name + ".json"), "w") as f:
                json.dump(report, f, indent=1)
        print(f"{name}: done, steps={ref['steps']} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    # Run through a sibling folder's link, the folder names the variant; run here, no argument means every
    # variant of the installed peft series.
    linked = os.path.basename(HERE) != os.path.basename(os.path.dirname(os.path.realpath(__file__)))
    if sys.argv[1:]:
        chosen = sys.argv[1:]
    elif linked:
        chosen = [os.path.basename(HERE)]
    else:
        import peft

        chosen = [n for n, v in VARIANTS.items() if peft.__version__.startswith(v[4] + ".")]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
    main(chosen)
