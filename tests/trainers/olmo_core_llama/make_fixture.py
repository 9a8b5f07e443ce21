"""Generate an OLMo-core fixture with OLMo-core's own Trainer + checkpointer.

The folder the script is run from picks VARIANT (olmo_core_olmo2/ holds a link to this file).

VARIANT "olmo2": OLMo2-style block (TransformerBlockType.reordered_norm, q/k norms), HF counterpart
Olmo2Config (the config is produced by OLMo-core's own ``get_hf_config``); OLMo-core's
``HFConverterCallback`` is enabled (dtype=float32 instead of its bf16 default so it can be compared
exactly, max_sequence_length=64, validate=True; tokenizer source: TokenizerConfig.identifier="base",
i.e. this folder's base/, resolved relative to the cwd the script sets), so after training the run also
has ``run/step4-hf/`` (it converts only the final checkpoint), as real runs do.
VARIANT "llama": Llama-like block (TransformerBlockType.default, no q/k norm), HF counterpart LlamaConfig
(OLMo-core has no HF config builder for this block; written here by hand to compute the same function).

Both: TransformerConfig.llama_like(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=261 (no
padding: the embedding has exactly 261 rows), FFN hidden 64, rope theta 10000, RMSNorm eps 1e-6,
no biases, untied embeddings, fp32), trained 4 steps on random tokens (olmo2: OLMo-core's LionConfig
lr 1e-3; llama: AdamWConfig lr 1e-2; constant LR scheduler, grad clipping 1.0) by
``olmo_core.train.Trainer`` on 2 gloo CPU ranks (torchrun) with FSDP (``TransformerDataParallelConfig(
name=DataParallelType.fsdp)``, param/reduce dtype fp32). ``CheckpointerCallback(save_interval=2,
pre_train_checkpoint=False, max_checkpoints=None, save_async=False)`` saves ``run/step2`` and
``run/step4``; no extra final checkpoint is written (step 4 is the last step). save_async=False works
around a race in OLMo-core 3.0.0 (see the comment in train()); the same files are written (a sync save
goes to run/stepN-tmp/ and is renamed, so the DCP .metadata's storage_meta.checkpoint_id names
.../stepN-tmp/model_and_optim). The helper callback "record_logits" (RecordLogits below, writes only to
scratch) is part of the trainer, so it shows in stepN/config.json and train/rankR.pt["callbacks"].

Outputs (this script's folder; deleted and recreated on every run):
  run/                              the trainer's save_folder, untouched
  base/config.json + tokenizer      HF config computing the same function as the OLMo-core model
  exported/stepN/model.safetensors  OLMo-core's exporter: unshard_checkpoint + convert_state_to_hf
  reference.pt                      {"input_ids", "logits": {"step2", "step4"}, "steps"}; the logits are
                                    OLMo-core's own unsharded model, computed inside the training run
                                    from the full (gathered) FSDP state right after steps 2 and 4.
Checks (asserted, max abs diff < 1e-5): reference logits == OLMo-core model loaded from the DCP
checkpoint == HF model (base/config.json + exported/stepN) [== run/step4-hf for olmo2].

Versions (pip freeze): ai2-olmo-core==3.0.0, torch==2.13.0+cpu, transformers==5.24.0,
safetensors==0.8.0, tokenizers==0.23.3, numpy==2.4.6, huggingface_hub==1.33.0; Python 3.11.7.

Recreate the venv and run (2 CPU cores are enough; ~1 min):
  python3 -m venv /work/venvs/olmo
  /work/venvs/olmo/bin/pip install torch==2.13.0          # CPU build, first
  /work/venvs/olmo/bin/pip install ai2-olmo-core==3.0.0 transformers safetensors
  HF_HUB_OFFLINE=1 /work/venvs/olmo/bin/python tests/trainers/olmo_core_<variant>/make_fixture.py
Scratch (random-token data, dataset cache, logits recorded during training) goes to
/tmp/olmo_core_fixture_<variant>/ (deleted and recreated).
"""

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VOCAB = 261
SEQ_LEN = 16
STEPS = (2, 4)
HERE = Path(os.path.abspath(__file__)).parent  # not resolved: olmo_core_olmo2/ links to this file
VARIANT = HERE.name.removeprefix("olmo_core_")
assert VARIANT in ("llama", "olmo2"), HERE
SHARED_BASE = HERE.parent / "base"
SCRATCH = Path(f"/tmp/olmo_core_fixture_{VARIANT}")


def input_ids():
    import torch

    return torch.arange(24).reshape(2, 12) * 7 % VOCAB


def model_config():
    from olmo_core.nn.feed_forward import FeedForwardConfig
    from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig

    return TransformerConfig.llama_like(
        d_model=32,
        vocab_size=VOCAB,  # not padded: the embedding has exactly 261 rows
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        rope_theta=10_000,
        layer_norm_eps=1e-6,
        attn_backend="torch",
        feed_forward=FeedForwardConfig(hidden_size=64, bias=False),
        block_name=(
            TransformerBlockType.reordered_norm if VARIANT == "olmo2" else TransformerBlockType.default
        ),
        qk_norm=(VARIANT == "olmo2"),
        init_seed=1234,
    )


def hf_config(model):
    """The transformers config whose model computes the same function as ``model``."""
    if VARIANT == "olmo2":
        from olmo_core.nn.hf import get_hf_config

        cfg = get_hf_config(model)  # OLMo-core's own: Olmo2Config
    else:
        from transformers import LlamaConfig

        blk = model.blocks["0"]
        cfg = LlamaConfig(
            vocab_size=model.vocab_size,
            hidden_size=model.d_model,
            intermediate_size=blk.feed_forward.hidden_size,
            num_hidden_layers=model.n_layers,
            num_attention_heads=blk.attention.n_heads,
            num_key_value_heads=blk.attention.n_kv_heads,
            head_dim=blk.attention.head_dim,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            rms_norm_eps=blk.feed_forward_norm.eps,
            rope_theta=blk.attention.rope.theta,
            tie_word_embeddings=model.tie_word_embeddings,
        )
    cfg.max_position_embeddings = 64
    cfg.bos_token_id = 0
    cfg.eos_token_id = 0
    cfg.pad_token_id = None
    cfg.architectures = ["Olmo2ForCausalLM" if VARIANT == "olmo2" else "LlamaForCausalLM"]
    return cfg


# ----------------------------------------------------------------------------------------------
# Training (runs under torchrun, 2 gloo CPU ranks)
# ----------------------------------------------------------------------------------------------


def train():
    import torch

    torch.set_num_threads(1)
    import torch.distributed.checkpoint.state_dict as dist_cp_sd

    from olmo_core.config import Config, DType
    from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
    from olmo_core.distributed.parallel import DataParallelType
    from olmo_core.distributed.utils import get_rank
    from olmo_core.nn.transformer import TransformerConfig
    from olmo_core.optim import AdamWConfig, ConstantScheduler, LionConfig
    from olmo_core.train import (
        Duration,
        TrainerConfig,
        prepare_training_environment,
        teardown_training_environment,
    )
    from olmo_core.train.callbacks import (
        Callback,
        CheckpointerCallback,
        ConfigSaverCallback,
        HFConverterCallback,
    )
    from olmo_core.train.train_module import (
        TransformerDataParallelConfig,
        TransformerTrainModuleConfig,
    )
    from olmo_core.utils import seed_all

    @dataclass
    class ExperimentConfig(Config):
        model: TransformerConfig
        dataset: NumpyFSLDatasetConfig
        data_loader: NumpyDataLoaderConfig
        trainer: TrainerConfig
        train_module: TransformerTrainModuleConfig
        init_seed: int = 12536

    @dataclass
    class RecordLogits(Callback):
        """Not part of the run's output: logs the unsharded model's logits to scratch at save steps."""

        def post_train_batch(self):
            if self.step not in STEPS:
                return
            model = self.trainer.train_module.model
            opts = dist_cp_sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
            sd = dist_cp_sd.get_model_state_dict(model, options=opts)  # collective
            if get_rank() == 0:
                plain = model_config().build(init_device="cpu")
                plain.load_state_dict(sd)
                plain.eval()
                with torch.no_grad():
                    logits = plain(input_ids()).float()
                torch.save(logits, SCRATCH / f"logits_step{self.step}.pt")

    prepare_training_environment(backend="gloo", seed=0)

    tokenizer = TokenizerConfig(
        vocab_size=VOCAB, eos_token_id=0, pad_token_id=0, bos_token_id=0, identifier="base"
    )
    trainer_config = (
        TrainerConfig(
            save_folder=str(HERE / "run"),
            save_overwrite=True,
            device="cpu",
            max_duration=Duration.steps(STEPS[-1]),
            metrics_collect_interval=1,
        )
        .with_callback(
            "checkpointer",
            # save_async=False: with async saves (the gloo default) OLMo-core records the metric
            # "checkpoint/save_async_duration_s" from the save future's done-callback, at a different
            # moment on each rank, so the ranks' metric all-reduces can mismatch and hang (seen here).
            CheckpointerCallback(
                save_interval=2, pre_train_checkpoint=False, max_checkpoints=None, save_async=False
            ),
        )
        .with_callback("config_saver", ConfigSaverCallback())
        .with_callback("record_logits", RecordLogits())
    )
    if VARIANT == "olmo2":
        trainer_config = trainer_config.with_callback(
            "hf_converter",
            HFConverterCallback(dtype=DType.float32, max_sequence_length=64, validate=True),
        )
    config = ExperimentConfig(
        model=model_config(),
        dataset=NumpyFSLDatasetConfig(
            paths=[str(SCRATCH / "tokens.npy")],
            sequence_length=SEQ_LEN,
            tokenizer=tokenizer,
            work_dir=str(SCRATCH / "dataset-cache"),
        ),
        data_loader=NumpyDataLoaderConfig(global_batch_size=4 * SEQ_LEN, seed=0, num_workers=0),
        train_module=TransformerTrainModuleConfig(
            rank_microbatch_size=2 * SEQ_LEN,
            max_sequence_length=SEQ_LEN,
            # olmo2: OLMo-core's Lion (1 state tensor, 3 group keys) keeps this fixture (which also
            # holds run/step4-hf) well under 3 MB; llama: AdamW. Both are OLMo-core optimizer configs.
            optim=(
                LionConfig(lr=1e-3, weight_decay=0.0)
                if VARIANT == "olmo2"
                else AdamWConfig(lr=1e-2, weight_decay=0.0)
            ),
            scheduler=ConstantScheduler(),
            dp_config=TransformerDataParallelConfig(
                name=DataParallelType.fsdp, param_dtype=DType.float32, reduce_dtype=DType.float32
            ),
            max_grad_norm=1.0,
        ),
        trainer=trainer_config,
    )

    seed_all(config.init_seed)
    model = config.model.build(init_device="meta")
    train_module = config.train_module.build(model)
    dataset = config.dataset.build()
    data_loader = config.data_loader.build(dataset, dp_process_group=train_module.dp_process_group)
    trainer = config.trainer.build(train_module, data_loader)
    trainer.callbacks["config_saver"].config = config.as_config_dict()
    trainer.fit()
    teardown_training_environment()


# ----------------------------------------------------------------------------------------------
# Driver (single process): data, torchrun, export, references, checks
# ----------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    import numpy as np
    import torch

    torch.set_num_threads(1)

    for p in ("run", "base", "exported", "reference.pt"):
        path = HERE / p
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    (HERE / "base").mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHARED_BASE / f, HERE / "base" / f)

    # Random token data (uint16 token IDs, as OLMo-core's numpy datasets expect).
    rng = np.random.default_rng(0)
    rng.integers(1, VOCAB, size=64 * SEQ_LEN, dtype=np.uint16).tofile(SCRATCH / "tokens.npy")

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        os.path.abspath(__file__), "--train",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=HERE, env=env, check=True)  # cwd: tokenizer identifier "base"

    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from olmo_core.distributed.checkpoint import load_model_and_optim_state, unshard_checkpoint
    from olmo_core.nn.hf.convert import convert_state_to_hf

    ids = input_ids()
    model = model_config().build(init_device="cpu")
    cfg = hf_config(model)
    cfg.save_pretrained(HERE / "base")

    ref = {"input_ids": ids, "logits": {}, "steps": {}}
    for step in STEPS:
        name = f"step{step}"
        ckpt = HERE / "run" / name
        logits = torch.load(SCRATCH / f"logits_{name}.pt")

        # OLMo-core's own exporter: unshard, then convert_state_to_hf.
        unsharded, _ = unshard_checkpoint(
            ckpt / "model_and_optim", SCRATCH / "unsharded" / name, optim=False, use_safetensors=True
        )
        olmo_state = load_file(unsharded)
        hf_state = convert_state_to_hf(cfg, olmo_state)
        (HERE / "exported" / name).mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in hf_state.items()},
            HERE / "exported" / name / "model.safetensors",
            metadata={"format": "pt"},
        )

        # Check 1: OLMo-core model loaded from the DCP checkpoint by OLMo-core's loader.
        m = model_config().build(init_device="cpu")
        load_model_and_optim_state(ckpt / "model_and_optim", m, work_dir=SCRATCH / "work")
        m.eval()
        with torch.no_grad():
            d1 = (m(ids).float() - logits).abs().max().item()
        # Check 2: HF model from base/config.json + exported weights.
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(HERE / "base"))
        hf.load_state_dict(load_file(HERE / "exported" / name / "model.safetensors"), strict=True)
        hf.float().eval()
        with torch.no_grad():
            d2 = (hf(ids).logits.float() - logits).abs().max().item()
        print(f"{name}: |ref - olmo_core(DCP)| = {d1:.3g}, |ref - HF(exported)| = {d2:.3g}")
        assert d1 < 1e-5 and d2 < 1e-5, (d1, d2)
        # Check 3 (olmo2): the run's own step4-hf folder from HFConverterCallback.
        hf_dir = HERE / "run" / f"{name}-hf"
        if hf_dir.is_dir():
            hf3 = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
            with torch.no_grad():
                d3 = (hf3(ids).logits.float() - logits).abs().max().item()
            print(f"{name}: |ref - HF({hf_dir.name})| = {d3:.3g}")
            assert d3 < 1e-5, d3
        ref["logits"][name] = logits.contiguous()
        ref["steps"][name] = step

    assert not torch.equal(ref["logits"]["step2"], ref["logits"]["step4"])
    torch.save(ref, HERE / "reference.pt")
    shutil.rmtree(SCRATCH, ignore_errors=True)
    print("done")


if __name__ == "__main__":
    if "--train" in sys.argv:
        train()
    else:
        main()
