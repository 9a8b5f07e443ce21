"""Generate the ``lightning_fsdp_sharded`` fixture: a PyTorch Lightning ``Trainer`` run with ``FSDPStrategy`` (FSDP1,
``state_dict_type="sharded"``) on 2 gloo CPU processes.

Each checkpoint is written by Lightning's own ``FSDPStrategy.save_checkpoint``: a torch.distributed.checkpoint (DCP)
directory ``run/lightning_logs/version_0/checkpoints/epoch=0-step=N.ckpt/`` holding ``.metadata``, one
``__<rank>_0.distcp`` per rank (model under the DCP root ``model``, optimizer under ``optimizer_0``) and ``meta.pt``
(everything else of the Lightning checkpoint dict, pickled by rank 0).

Versions used (``pip freeze``): lightning==2.6.6, pytorch-lightning==2.6.6, lightning-utilities==0.15.3,
torch==2.13.0+cpu, transformers==5.24.0, safetensors==0.8.0, numpy==2.4.6; Python 3.11.7.

Recreate the venv and run (from the repository root)::

    python3 -m venv /work/venvs/lightning
    /work/venvs/lightning/bin/pip install torch==2.13.0      # CPU build, first
    /work/venvs/lightning/bin/pip install lightning transformers
    HF_HUB_OFFLINE=1 /work/venvs/lightning/bin/python tests/trainers/lightning_fsdp_sharded/make_fixture.py

Run it with plain ``python`` (not torchrun): Lightning's own launcher re-runs this script for rank 1.

CPU workaround: Lightning refuses ``FSDPStrategy`` unless the accelerator is CUDA (the check is
``type(strategy) is FSDPStrategy``), so a trivial subclass is passed instead; it also wraps with
``device_id=torch.device("cpu")`` (Lightning passes ``root_device.index``, i.e. None, on CPU). Everything that writes the
checkpoint is Lightning's unmodified code.

Writes (after deleting them): ``run/`` (the Trainer's ``default_root_dir``; CSVLogger) and ``reference.pt``. The reference
logits are computed during training from the gathered (unsharded) parameters right after each saved step, and are
checked against the checkpoint itself, consolidated with Lightning's own tool
(``python -m lightning.pytorch.utilities.consolidate_checkpoint``) and loaded into a plain ``LlamaForCausalLM``.
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
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    launcher_child = "LOCAL_RANK" in os.environ  # set by Lightning's launcher for rank 1 only
    if not launcher_child:
        shutil.rmtree(RUN, ignore_errors=True)
        REFERENCE.unlink(missing_ok=True)

    config = AutoConfig.from_pretrained(BASE)

    class CPUFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model):
            if not any(isinstance(m, FSDP) for m in model.modules()):
                model = FSDP(
                    module=model,
                    cpu_offload=self.cpu_offload,
                    mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy,
                    device_id=torch.device("cpu"),
                    **self.kwargs,
                )
            # the rest of FSDPStrategy._setup_model
            _move_torchmetrics_to_device(model, self.root_device)
            _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
            return model

    class LitLlama(L.LightningModule):
        def __init__(self, lr):
            super().__init__()
            self.save_hyperparameters()
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

        def training_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch, labels=batch).loss
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    class RecordReference(Callback):
        """At each saved step, gather the full parameters (all ranks) and compute the logits (rank 0)."""

        def __init__(self):
            self.logits = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % SAVE_EVERY:
                return
            with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
                full = {
                    name.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                    for name, p in pl_module.model.named_parameters()
                }
            if trainer.global_rank == 0:
                self.logits[step] = plain_logits(config, full)

    L.seed_everything(0)
    module = LitLlama(lr=LR)
    g = torch.Generator().manual_seed(1234)
    data = torch.randint(0, config.vocab_size, (16, 16), generator=g)  # 8 samples/rank -> 4 batches of 2
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)

    recorder = RecordReference()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=CPUFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="sharded"),
        precision="32-true",
        max_steps=MAX_STEPS,
        default_root_dir=RUN,
        logger=CSVLogger(save_dir=RUN, name="lightning_logs"),
        callbacks=[recorder, ModelCheckpoint(every_n_train_steps=SAVE_EVERY, save_top_k=-1)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader)
    if trainer.global_rank != 0:
        return

    ckpt_dir = RUN / "lightning_logs" / "version_0" / "checkpoints"
    refs = {"input_ids": input_ids(config.vocab_size), "logits": {}, "steps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in sorted(ckpt_dir.iterdir()):
            name = ckpt.name[: -len(".ckpt")]
            out = Path(tmp) / f"{name}.pt"
            # Lightning's own consolidation tool (DCP dir -> one regular Lightning checkpoint file)
            subprocess.run(
                [sys.executable, "-m", "lightning.pytorch.utilities.consolidate_checkpoint", str(ckpt),
                 "--output_file", str(out)],
                check=True,
            )
            consolidated = torch.load(out, map_location="cpu", weights_only=False)
            step = int(consolidated["global_step"])
            sd = {k[len("model."):]: v for k, v in consolidated["state_dict"].items()}
            logits = plain_logits(config, sd)
            diff = (logits - recorder.logits[step]).abs().max().item()
            print(f"{name}: step {step}, max |logits(consolidated ckpt) - logits(in-training)| = {diff:.3g}")
            assert diff < 1e-5, diff
            refs["logits"][name] = recorder.logits[step]
            refs["steps"][name] = step
    names = list(refs["logits"])
    assert names == ["epoch=0-step=2", "epoch=0-step=4"], names
    assert (refs["logits"][names[0]] - refs["logits"][names[1]]).abs().max() > 1e-3
    torch.save(refs, REFERENCE)
    print("wrote", REFERENCE, refs["steps"])


if __name__ == "__main__":
    main()
