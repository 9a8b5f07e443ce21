"""Generate the OLMo-core MoE fixture with OLMo-core's own Trainer + checkpointer.

What runs: an OLMo-core ``MoETransformer`` (TransformerConfig.llama_like_moe, the tiny counterpart of
OLMo-core's olmoe_1B_7B config: block TransformerBlockType.moe_reordered_norm (OLMo2-style post-norms),
q/k RMSNorm over the full q / k projections, d_model 32, 2 layers, 4 heads, 2 kv heads, vocab 261 (no
padding), rope theta 10000, RMSNorm eps 1e-6, untied embeddings, fp32; every block's feed-forward is a
``DroplessMoE`` (MoEType.dropless) with 4 experts of hidden size 16, softmax router top-2 without weight
normalization, no shared expert, no router bias, load-balancing loss 0.01 and router z-loss 0.001),
trained 4 steps on random tokens (OLMo-core's LionConfig lr 3e-3, constant scheduler, grad clipping 1.0) by
``olmo_core.train.Trainer`` on 2 gloo CPU ranks (torchrun) with FSDP
(``TransformerDataParallelConfig(name=DataParallelType.fsdp)``, param/reduce dtype fp32).
``CheckpointerCallback(save_interval=2, pre_train_checkpoint=False, max_checkpoints=None, save_async=False)``
saves ``run/step2`` and ``run/step4`` (save_async=False: see tests/trainers/olmo_core_llama/make_fixture.py).
The helper callback "record_logits" (RecordLogits below, writes only to scratch) is part of the trainer,
so it shows in stepN/config.json and train/rankR.pt["callbacks"].

HF counterpart: OLMo-core's own ``get_hf_config`` maps a MoETransformer to transformers' FlexOlmoConfig
(model_type "flex_olmo", FlexOlmoForCausalLM: OLMo2-style post-norm blocks with a sparse MoE MLP); it is
not OLMoE (pre-norm).  base/config.json is that config with max_position_embeddings=64 and bos/eos 0
(OLMo-core writes -1 / None there), as the olmo2 fixture does.

CPU workarounds (nothing in OLMo-core is edited):
  * TRITON_INTERPRET=1 (set before anything imports triton): the dropless token dispatch
    (olmo_core.kernels.moe gather/scatter, megablocks-style) exists only as Triton kernels; Triton's
    interpreter runs them on CPU tensors.
  * triton.runtime.autotuner.Autotuner.prune_configs is patched to keep only the first config, so
    the autotuner takes its single-config path and skips benchmarking (its benchmarker needs a GPU).
  * grouped_gemm is not installed: DroplessMoEMLP.gmm then uses its own per-expert matmul loop (fp32).

Exporter (exported/stepN/model.safetensors): OLMo-core's own ``convert_checkpoint_to_hf`` (and so the
HFConverterCallback that calls it) does not work with transformers 5.24: it builds the HF model with
``from_config`` and calls a plain ``load_state_dict`` with the per-expert keys
(model.layers.N.mlp.experts.E.gate_proj.weight, ...), while transformers 5's FlexOlmoExperts holds fused
3-D ``experts.gate_up_proj`` [E, 2I, D] / ``experts.down_proj`` [E, D, I] (the per-expert -> fused conversion
happens only inside ``from_pretrained``).  So the export is done here with the same steps it does, minus
the load: ``unshard_checkpoint`` (model only), the dropless reshape that convert_checkpoint_to_hf applies
(w1 / w3: ``v.reshape(E, I, -1).permute(0, 2, 1).reshape(-1, I)``, because OLMo-core's templates assume
the non-dropless MoEMLP layout [E*D, I] for w1/w3), then ``convert_state_to_hf(get_hf_config(model), state)``,
saved with safetensors metadata {"format": "pt"} as save_pretrained writes it.

Outputs (this script's folder; deleted and recreated on every run):
  run/                              the trainer's save_folder, untouched
  base/config.json + tokenizer      FlexOlmoConfig (OLMo-core's get_hf_config) + tests/trainers/base tokenizer
  exported/stepN/model.safetensors  unshard_checkpoint + dropless reshape + convert_state_to_hf
  reference.pt                      {"input_ids", "logits": {"step2", "step4"}, "steps"}; the logits are
                                    OLMo-core's own unsharded model (fp32 everywhere: router, Triton
                                    gather/scatter, per-expert fp32 matmuls), computed inside the training
                                    run from the full (gathered) FSDP state right after steps 2 and 4.
Checks (asserted): reference logits == OLMo-core model loaded from the DCP checkpoint (max abs < 1e-5);
AutoModelForCausalLM.from_pretrained(base/config.json + exported/stepN, float32) loads with no missing /
unexpected / mismatched keys and reproduces the reference (max abs <= 1e-4 * max |reference|).

Versions (pip freeze): ai2-olmo-core==3.0.0, torch==2.13.0+cpu, triton==3.9.0, transformers==5.24.0,
safetensors==0.8.0, tokenizers==0.23.3, numpy==2.4.6; Python 3.11.7.

Recreate the venv and run (2 CPU cores are enough; a few minutes, Triton's interpreter is slow):
  python3 -m venv /work/venvs/olmo
  /work/venvs/olmo/bin/pip install torch==2.13.0          # CPU build, first
  /work/venvs/olmo/bin/pip install ai2-olmo-core==3.0.0 triton==3.9.0 transformers==5.24.0 safetensors==0.8.0
  HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 /work/venvs/olmo/bin/python tests/trainers/olmo_core_moe/make_fixture.py
Scratch (random-token data, dataset cache, logits recorded during training) goes to
/tmp/olmo_core_fixture_moe/ (deleted and recreated).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VOCAB = 261
SEQ_LEN = 16
STEPS = (2, 4)
NUM_EXPERTS = 4
EXPERT_HIDDEN = 16
HERE = Path(os.path.abspath(__file__)).parent
SHARED_BASE = HERE.parent / "base"
SCRATCH = Path("/tmp/olmo_core_fixture_moe")


def patch_triton_autotuner():
    """Single-config autotuning: no benchmark run (the benchmarker needs a GPU)."""
    from triton.runtime.autotuner import Autotuner

    Autotuner.prune_configs = lambda self, kwargs: self.configs[:1]


def input_ids():
    import torch

    return torch.arange(24).reshape(2, 12) * 7 % VOCAB


def model_config():
    from olmo_core.nn.transformer import TransformerConfig

    return TransformerConfig.llama_like_moe(
        d_model=32,
        vocab_size=VOCAB,  # not padded
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        num_experts=NUM_EXPERTS,
        top_k=2,
        expert_hidden_size=EXPERT_HIDDEN,
        dropless=True,
        lb_loss_weight=0.01,
        z_loss_weight=0.001,
        reordered_norm=True,  # moe_reordered_norm block, qk_norm=True
        rope_theta=10_000,
        layer_norm_eps=1e-6,
        attn_backend="torch",
        init_seed=1234,
    )


def hf_config(model):
    from olmo_core.nn.hf import get_hf_config

    cfg = get_hf_config(model)  # OLMo-core's own: FlexOlmoConfig
    cfg.max_position_embeddings = 64
    cfg.bos_token_id = 0
    cfg.eos_token_id = 0
    cfg.pad_token_id = None
    cfg.architectures = ["FlexOlmoForCausalLM"]
    return cfg


def dropless_to_moemlp_layout(state):
    """The reshape OLMo-core's convert_checkpoint_to_hf applies to dropless w1/w3 before converting."""
    out = dict(state)
    for k, v in state.items():
        if k.endswith(".feed_forward_moe.experts.mlp.w1") or k.endswith(".feed_forward_moe.experts.mlp.w3"):
            out[k] = v.reshape(NUM_EXPERTS, EXPERT_HIDDEN, -1).permute(0, 2, 1).reshape(-1, EXPERT_HIDDEN)
    return out


# ----------------------------------------------------------------------------------------------
# Training (runs under torchrun, 2 gloo CPU ranks)
# ----------------------------------------------------------------------------------------------


def train():
    import torch

    torch.set_num_threads(1)
    patch_triton_autotuner()
    import torch.distributed.checkpoint.state_dict as dist_cp_sd

    from olmo_core.config import Config, DType
    from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
    from olmo_core.distributed.parallel import DataParallelType
    from olmo_core.distributed.utils import get_rank
    from olmo_core.nn.transformer import TransformerConfig
    from olmo_core.optim import ConstantScheduler, LionConfig
    from olmo_core.train import (
        Duration,
        TrainerConfig,
        prepare_training_environment,
        teardown_training_environment,
    )
    from olmo_core.train.callbacks import Callback, CheckpointerCallback, ConfigSaverCallback
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
            CheckpointerCallback(
                save_interval=2, pre_train_checkpoint=False, max_checkpoints=None, save_async=False
            ),
        )
        .with_callback("config_saver", ConfigSaverCallback())
        .with_callback("record_logits", RecordLogits())
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
            # OLMo-core's Lion (1 state tensor per parameter) keeps the fixture small (as in olmo_core_olmo2)
            optim=LionConfig(lr=3e-3, weight_decay=0.0),
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
    patch_triton_autotuner()

    for p in ("run", "base", "exported", "reference.pt"):
        path = HERE / p
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    (HERE / "base").mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHARED_BASE / f, HERE / "base" / f)

    rng = np.random.default_rng(0)
    rng.integers(1, VOCAB, size=64 * SEQ_LEN, dtype=np.uint16).tofile(SCRATCH / "tokens.npy")

    env = dict(
        os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TRITON_INTERPRET="1"
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        os.path.abspath(__file__), "--train",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=HERE, env=env, check=True)  # cwd: tokenizer identifier "base"

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

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

        # OLMo-core's exporter steps: unshard, dropless reshape, convert_state_to_hf.
        unsharded, _ = unshard_checkpoint(
            ckpt / "model_and_optim", SCRATCH / "unsharded" / name, optim=False, use_safetensors=True
        )
        olmo_state = load_file(unsharded)
        hf_state = convert_state_to_hf(cfg, dropless_to_moemlp_layout(olmo_state))
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
        # Check 2: HF model from base/config.json + exported weights, through from_pretrained.
        probe = SCRATCH / f"hf_{name}"
        probe.mkdir()
        shutil.copy(HERE / "base" / "config.json", probe / "config.json")
        shutil.copy(HERE / "exported" / name / "model.safetensors", probe / "model.safetensors")
        hf, info = AutoModelForCausalLM.from_pretrained(probe, dtype=torch.float32, output_loading_info=True)
        print(f"{name}: from_pretrained loading info: {info}")
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        hf.eval()
        with torch.no_grad():
            d2 = (hf(ids).logits.float() - logits).abs().max().item()
        tol = 1e-4 * logits.abs().max().item()
        print(f"{name}: |ref - olmo_core(DCP)| = {d1:.3g}, |ref - {type(hf).__name__}(exported)| = {d2:.3g} (tol {tol:.3g})")
        assert d1 < 1e-5 and d2 <= tol, (d1, d2)
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
