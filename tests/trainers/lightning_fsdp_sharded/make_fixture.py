"""Generate the three Lightning fixtures on 2 gloo CPU processes; the folder it is run from picks which (the other two
folders' ``make_fixture.py`` link here):

- ``lightning_fsdp_sharded``: a ``Trainer`` with ``FSDPStrategy`` (FSDP1, ``state_dict_type="sharded"``). Lightning's own
  ``FSDPStrategy.save_checkpoint`` writes a torch.distributed.checkpoint (DCP) directory
  ``run/lightning_logs/version_0/checkpoints/epoch=0-step=N.ckpt/`` holding ``.metadata``, one ``__<rank>_0.distcp``
  per rank (model under the DCP root ``model``, optimizer under ``optimizer_0``) and ``meta.pt`` (everything else of
  the Lightning checkpoint dict, pickled by rank 0).
- ``lightning_modelparallel_full``: a ``Trainer`` with ``ModelParallelStrategy(save_distributed_checkpoint=False)``
  (FSDP2: ``fully_shard`` applied in ``configure_model``). Its ``save_checkpoint`` writes one regular Lightning
  checkpoint file ``run/lightning_logs/version_0/checkpoints/epoch=0-step=N.ckpt`` (``torch.save`` by rank 0) holding
  the full (unsharded) ``state_dict`` and ``optimizer_states``. The LightningModule calls ``self.save_hyperparameters()``
  with a ``transformers.LlamaConfig`` among its init args, so ``hyper_parameters["config"]`` pickles a ``LlamaConfig``
  object next to the weights (the file needs ``weights_only=False`` or an allow-listed global to load).
- ``lightning_fabric``: a Fabric training loop with ``FSDPStrategy`` (FSDP1, ``state_dict_type="sharded"``), saving with
  ``fabric.save(run / "checkpoints" / f"step-{step:06d}.ckpt", {"model": model, "optimizer": optimizer, "step": step})``.
  Fabric's own ``FSDPStrategy.save_checkpoint`` writes a DCP directory ``run/checkpoints/step-00000N.ckpt/`` (model
  under the DCP root ``model``, optimizer under ``optimizer``: the keys given to ``fabric.save``) and ``meta.pt`` (the
  non-module, non-optimizer entries, here ``{"step": N}``). Fabric has no logger here, so ``run/`` holds only the
  checkpoints.

Every run saves at steps 2 and 4.

Versions used (``pip freeze``): lightning==2.6.6, pytorch-lightning==2.6.6, lightning-utilities==0.15.3,
torch==2.13.0+cpu, transformers==5.24.0, safetensors==0.8.0, numpy==2.4.6; Python 3.11.7.

Recreate the venv and run (from the repository root)::

    python3 -m venv /work/venvs/lightning
    /work/venvs/lightning/bin/pip install torch==2.13.0      # CPU build, first
    /work/venvs/lightning/bin/pip install lightning transformers
    for name in lightning_fsdp_sharded lightning_modelparallel_full lightning_fabric; do
        HF_HUB_OFFLINE=1 /work/venvs/lightning/bin/python tests/trainers/$name/make_fixture.py
    done

Run it with plain ``python`` (not torchrun): Lightning's launcher (``fabric.launch()`` for Fabric) re-runs this script,
through the same path, for rank 1.

CPU workarounds: Lightning and Fabric refuse ``FSDPStrategy`` unless the accelerator is CUDA (the check is
``type(strategy) is FSDPStrategy``), so a trivial subclass is passed instead; it also wraps with
``device_id=torch.device("cpu")`` (they pass ``root_device.index``, i.e. None, on CPU). ``ModelParallelStrategy`` runs on
CPU/gloo as is; ``data_parallel_size=2, tensor_parallel_size=1`` are given explicitly ("auto" would make the 2 devices
a tensor-parallel group). Everything that writes the checkpoints is Lightning's unmodified code.

Writes (after deleting them): ``run/`` (the Trainer's ``default_root_dir`` with a CSVLogger; Fabric's checkpoints) and
``reference.pt``. The reference logits are computed during training from the gathered (unsharded) parameters right after
each saved step, and are checked against the checkpoint itself loaded into a plain ``LlamaForCausalLM``: the DCP
directories consolidated with Lightning's own tool (``python -m lightning.pytorch.utilities.consolidate_checkpoint``,
Fabric's ``lightning.fabric.utilities.consolidate_checkpoint``), the full file as saved.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(os.path.abspath(__file__)).parent  # not resolve(): the link's folder names the fixture
VARIANT = HERE.name.removeprefix("lightning_")
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


def training_data(vocab_size):
    g = torch.Generator().manual_seed(1234)
    data = torch.randint(0, vocab_size, (16, 16), generator=g)  # 8 samples/rank -> 4 batches of 2
    return torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)


def cpu_fsdp_strategy(strategy_class, *, wrap_method, kwargs_attribute):
    """``strategy_class`` (Lightning's or Fabric's FSDPStrategy) wrapping on CPU; the rest of its wrap method as is."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    helpers = sys.modules[strategy_class.__module__]  # lightning.pytorch's or lightning.fabric's strategies.fsdp

    def wrap(self, module):
        if not any(isinstance(m, FSDP) for m in module.modules()):
            module = FSDP(
                module=module,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **getattr(self, kwargs_attribute),
            )
        helpers._move_torchmetrics_to_device(module, self.root_device)
        helpers._setup_activation_checkpointing(module, self._activation_checkpointing_kwargs)
        return module

    return type(f"CPU{strategy_class.__name__}", (strategy_class,), {wrap_method: wrap})


def train_with_trainer(config):
    """Trainer.fit with ModelCheckpoint every SAVE_EVERY steps; the in-training logits of each saved step (rank 0)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    full_save = VARIANT == "modelparallel_full"

    class LitLlama(L.LightningModule):
        def __init__(self, config, lr):
            super().__init__()
            # ModelParallel: pickles the LlamaConfig into every checkpoint; FSDP: lr only, as before
            self.save_hyperparameters(*(() if full_save else ("lr",)))
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

        def configure_model(self):
            if full_save:
                dp_mesh = self.device_mesh["data_parallel"]
                for layer in self.model.model.layers:
                    fully_shard(layer, mesh=dp_mesh)
                fully_shard(self.model, mesh=dp_mesh)

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
            if full_save:
                full = {name: p.detach().full_tensor().clone() for name, p in pl_module.model.named_parameters()}
            else:
                with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
                    full = {
                        name.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                        for name, p in pl_module.model.named_parameters()
                    }
            if trainer.global_rank == 0:
                self.logits[step] = plain_logits(config, full)

    if full_save:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    else:
        strategy = cpu_fsdp_strategy(FSDPStrategy, wrap_method="_setup_model", kwargs_attribute="kwargs")(
            auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="sharded")
    L.seed_everything(0)
    module = LitLlama(config=config, lr=LR)
    recorder = RecordReference()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
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
    trainer.fit(module, training_data(config.vocab_size))
    return trainer.global_rank, recorder.logits


def train_with_fabric(config):
    """A plain Fabric loop saving every SAVE_EVERY steps; the in-training logits of each saved step (rank 0)."""
    import lightning as L
    from lightning.fabric.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    strategy = cpu_fsdp_strategy(FSDPStrategy, wrap_method="setup_module", kwargs_attribute="_fsdp_kwargs")
    fabric = L.Fabric(
        accelerator="cpu",
        devices=2,
        strategy=strategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="sharded"),
        precision="32-true",
    )
    fabric.launch()
    fabric.seed_everything(0)

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=LR))
    loader = fabric.setup_dataloaders(training_data(config.vocab_size))

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
    return fabric.global_rank, in_training


def saved_weights(ckpt, tmp):
    """(step, the model's state dict) as the checkpoint holds them; DCP directories through Lightning's consolidation."""
    from transformers import LlamaConfig

    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)  # holds a pickled LlamaConfig
        assert isinstance(saved["hyper_parameters"]["config"], LlamaConfig)
    else:
        tool = "fabric" if VARIANT == "fabric" else "pytorch"
        out = Path(tmp) / f"{ckpt.name}.pt"
        subprocess.run([sys.executable, "-m", f"lightning.{tool}.utilities.consolidate_checkpoint", str(ckpt),
                        "--output_file", str(out)], check=True)
        saved = torch.load(out, map_location="cpu", weights_only=False)
    if VARIANT == "fabric":
        return int(saved["step"]), saved["model"]
    return int(saved["global_step"]), {k[len("model."):]: v for k, v in saved["state_dict"].items()}


def main():
    torch.set_num_threads(1)
    from transformers import LlamaConfig

    launcher_child = "LOCAL_RANK" in os.environ  # set by Lightning's launcher for rank 1 only
    if not launcher_child:
        shutil.rmtree(RUN, ignore_errors=True)
        REFERENCE.unlink(missing_ok=True)

    config = LlamaConfig.from_pretrained(BASE)
    rank, in_training = (train_with_fabric if VARIANT == "fabric" else train_with_trainer)(config)
    if rank != 0:
        return

    ckpt_dir = RUN / "checkpoints" if VARIANT == "fabric" else RUN / "lightning_logs" / "version_0" / "checkpoints"
    refs = {"input_ids": input_ids(config.vocab_size), "logits": {}, "steps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in sorted(ckpt_dir.iterdir()):
            name = ckpt.name[: -len(".ckpt")]
            step, state_dict = saved_weights(ckpt, tmp)
            diff = (plain_logits(config, state_dict) - in_training[step]).abs().max().item()
            print(f"{name}: step {step}, max |logits(saved ckpt) - logits(in-training)| = {diff:.3g}")
            assert diff < 1e-5, diff
            refs["logits"][name] = in_training[step]
            refs["steps"][name] = step
    names = list(refs["logits"])
    expected = ["step-000002", "step-000004"] if VARIANT == "fabric" else ["epoch=0-step=2", "epoch=0-step=4"]
    assert names == expected, names
    assert (refs["logits"][names[0]] - refs["logits"][names[1]]).abs().max() > 1e-3
    torch.save(refs, REFERENCE)
    print("wrote", REFERENCE, refs["steps"])


if __name__ == "__main__":
    main()
