"""Generate the ``lightning_fabric`` fixture: a Lightning Fabric training loop with ``FSDPStrategy`` (FSDP1,
``state_dict_type="sharded"``) on 2 gloo CPU processes, saving with
``fabric.save(run / "checkpoints" / f"step-{step:06d}.ckpt", {"model": model, "optimizer": optimizer, "step": step})``
at steps 2 and 4.

Each checkpoint is written by Fabric's own ``FSDPStrategy.save_checkpoint``: a torch.distributed.checkpoint (DCP)
directory ``run/checkpoints/step-00000N.ckpt/`` holding ``.metadata``, one ``__<rank>_0.distcp`` per rank (model under
the DCP root ``model``, optimizer under ``optimizer``: the keys given to ``fabric.save``) and ``meta.pt`` (the
non-module, non-optimizer entries, here ``{"step": N}``, pickled by rank 0). Fabric has no logger here, so ``run/``
holds only the checkpoints.

Versions used (``pip freeze``): lightning==2.6.6, lightning-utilities==0.15.3, torch==2.13.0+cpu, transformers==5.24.0,
safetensors==0.8.0, numpy==2.4.6; Python 3.11.7.

Recreate the venv and run (from the repository root)::

    python3 -m venv /work/venvs/lightning
    /work/venvs/lightning/bin/pip install torch==2.13.0      # CPU build, first
    /work/venvs/lightning/bin/pip install lightning transformers
    HF_HUB_OFFLINE=1 /work/venvs/lightning/bin/python tests/trainers/lightning_fabric/make_fixture.py

Run it with plain ``python`` (not torchrun): ``fabric.launch()`` re-runs this script for rank 1.

CPU workaround: Fabric refuses ``FSDPStrategy`` unless the accelerator is CUDA (the check is
``type(strategy) is FSDPStrategy``), so a trivial subclass is passed instead; it also wraps with
``device_id=torch.device("cpu")`` (Fabric passes ``root_device.index``, i.e. None, on CPU). Everything that writes the
checkpoint is Fabric's unmodified code.

Writes (after deleting them): ``run/`` and ``reference.pt``. The reference logits are computed during training from the
gathered (unsharded) parameters at each saved step, and are checked against the checkpoint itself, consolidated with
Fabric's own tool (``python -m lightning.fabric.utilities.consolidate_checkpoint``) and loaded into a plain
``LlamaForCausalLM``.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BASE = HERE.parent / "base"
RUN = HERE / "run"
REFERENCE = HERE / "reference.pt"
SAVE_EVERY = 2
MAX_STEPS = 4
LR = 1e-2


def input_ids(vocab_size):
    return torch.arange(24).reshape(2, 12) * 7 % vocab_size


def plain_logits(config, state_dict):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids(config.vocab_size)).logits.float()


def main():
    torch.set_num_threads(1)
    import lightning as L
    from lightning.fabric.strategies import FSDPStrategy
    from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    launcher_child = "LOCAL_RANK" in os.environ  # set by Fabric's launcher for rank 1 only
    if not launcher_child:
        shutil.rmtree(RUN, ignore_errors=True)
        REFERENCE.unlink(missing_ok=True)

    config = AutoConfig.from_pretrained(BASE)

    class CPUFSDPStrategy(FSDPStrategy):
        def setup_module(self, module):
            if not any(isinstance(m, FSDP) for m in module.modules()):
                module = FSDP(
                    module=module,
                    cpu_offload=self.cpu_offload,
                    mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy,
                    device_id=torch.device("cpu"),
                    **self._fsdp_kwargs,
                )
            # the rest of FSDPStrategy.setup_module
            _move_torchmetrics_to_device(module, self.root_device)
            _setup_activation_checkpointing(module, self._activation_checkpointing_kwargs)
            return module

    fabric = L.Fabric(
        accelerator="cpu",
        devices=2,
        strategy=CPUFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="sharded"),
        precision="32-true",
    )
    fabric.launch()
    fabric.seed_everything(0)

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=LR))
    g = torch.Generator().manual_seed(1234)
    data = torch.randint(0, config.vocab_size, (16, 16), generator=g)  # 8 samples/rank -> 4 batches of 2
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(data, batch_size=2, shuffle=False))

    in_training = {}
    model.train()
    step = 0
    for batch in loader:
        loss = model(input_ids=batch, labels=batch).loss
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        fabric.print(f"step {step} loss {loss.item():.4f}")
        if step % SAVE_EVERY == 0:
            fabric.save(RUN / "checkpoints" / f"step-{step:06d}.ckpt", {"model": model, "optimizer": optimizer, "step": step})
            # gather the full parameters (all ranks), logits on rank 0
            with FSDP.summon_full_params(model._forward_module, writeback=False):
                full = {
                    name.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                    for name, p in model._original_module.named_parameters()
                }
            if fabric.global_rank == 0:
                in_training[step] = plain_logits(config, full)
        if step == MAX_STEPS:
            break
    fabric.barrier()
    if fabric.global_rank != 0:
        return

    refs = {"input_ids": input_ids(config.vocab_size), "logits": {}, "steps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in sorted((RUN / "checkpoints").iterdir()):
            name = ckpt.name[: -len(".ckpt")]
            out = Path(tmp) / f"{name}.pt"
            # Fabric's own consolidation tool (DCP dir -> one regular checkpoint file)
            subprocess.run(
                [sys.executable, "-m", "lightning.fabric.utilities.consolidate_checkpoint", str(ckpt),
                 "--output_file", str(out)],
                check=True,
            )
            consolidated = torch.load(out, map_location="cpu", weights_only=False)
            step = int(consolidated["step"])
            logits = plain_logits(config, consolidated["model"])
            diff = (logits - in_training[step]).abs().max().item()
            print(f"{name}: step {step}, max |logits(consolidated ckpt) - logits(in-training)| = {diff:.3g}")
            assert diff < 1e-5, diff
            refs["logits"][name] = in_training[step]
            refs["steps"][name] = step
    names = list(refs["logits"])
    assert names == ["step-000002", "step-000004"], names
    assert (refs["logits"][names[0]] - refs["logits"][names[1]]).abs().max() > 1e-3
    torch.save(refs, REFERENCE)
    print("wrote", REFERENCE, refs["steps"])


if __name__ == "__main__":
    main()
