"""Generate the torchtitan Llama3 fixture: checkpoints written by torchtitan's own CheckpointManager.

The same file serves two fixture folders (the _tied one holds a link to it); the folder name picks the variant:
  tests/trainers/torchtitan_llama3/       untied tok_embeddings / lm_head
  tests/trainers/torchtitan_llama3_tied/  Llama3Model.Config(enable_weight_tying=True)

What runs: torchtitan's Llama3 model (built from Llama3Model.Config on the meta device, as the
Trainer does), sharded with FSDP2 by torchtitan's own `parallelize_llama` on 2 gloo CPU ranks,
torchtitan's OptimizersContainer (default_adamw, lr 3e-2), LRSchedulersContainer (1 warmup step, then
constant), HuggingFaceTokenizer (tests/trainers/base's tokenizer),
HuggingFaceTextDataLoader (dataset "c4_test" pointed at a local json file of random text) and
CheckpointManager(interval=2, torchtitan defaults otherwise: last_save_model_only=True,
export_dtype=float32, async disabled).  The training loop is a trimmed copy of
torchtitan.trainer.Trainer.train/train_step (torchtitan's Trainer itself needs a GPU for its
memory monitor).  4 steps; CheckpointManager.save(step, last_step=(step == 4)) writes
run/outputs/checkpoint/step-2 (full: model + optimizer + lr_scheduler + dataloader + train_state)
and run/outputs/checkpoint/step-4 (the last step: model only, torchtitan's default).

CPU workarounds (nothing in torchtitan is edited):
  * torch._utils._get_available_device_type is patched to return "cpu" before torchtitan is
    imported (torchtitan.tools.utils picks the device type at import time, default "cuda").
  * triton must be installed (imported unconditionally by torchtitan).
  * attention: torchtitan's ScaledDotProductAttention instead of the default FlexAttention
    (flex needs torch.compile / a GPU); positions are therefore only used by RoPE.
  * gloo has no PREMUL_SUM: every FSDPModule gets set_force_sum_reduction_for_comms(True).
  * parallelism.spmd_backend="partial_dtensor" (the classic FSDP2-on-DTensor path).  The default
    "spmd_types" leaves parameters as annotated plain tensors and relies on a newer fully_shard
    than torch 2.13.0's, which raises "When dp_mesh_dims is provided, all parameters must be
    DTensors on the full SPMD mesh".
  * training.mixed_precision_param="float32" (default bf16) so training math is fp32.
  * debug.seed=42 (default None picks a fresh seed each run) so reruns are reproducible.
  * optimizer implementation "foreach" (default "fused").
  * the process group is created with dist.init_process_group("gloo") instead of
    torchtitan.distributed.utils.init_distributed (which would also create an empty
    comm_traces/ folder in the dump folder for the NCCL flight recorder).

Outputs (in this file's folder; deleted and recreated on each run):
  run/                 the dump folder as torchtitan wrote it (run/outputs/checkpoint/step-{2,4})
  reference.pt         {"input_ids", "logits": {"step-2", "step-4"}, "steps": {"step-2": 2, "step-4": 4}}
                       logits of the unsharded torchtitan model (its own forward, fp32) at each save
  base/                HF LlamaConfig (+ tokenizer copied from tests/trainers/base) that computes the
                       same function as the torchtitan model (llama3 rope scaling, theta 5e5, eps 1e-5)
  exported/step-N/model.safetensors
                       Llama3StateDictAdapter(model_config, None).to_hf(checkpoint model state)

Checks done at the end (the script fails if any fails):
  * each checkpoint, read back with DCP (dcp_to_torch_save) into a plain torchtitan model,
    reproduces reference.pt exactly enough (max abs diff < 1e-5)
  * HF LlamaForCausalLM(base/config.json) with exported/step-N reproduces reference.pt (< 1e-5)
  * the same without torchtitan's Q/K rotary permutation is clearly off (> 1e-3; printed)

Layout notes (what torchtitan writes):
  * model entries sit at the top level of the DCP state dict under torchtitan names; the fused
    wqkv parameter is split by FusedQKVLinear's state_dict hook into layers.N.attention.qkv_linear.
    wq/wk/wv, after redistributing it to Replicate, so those three are stored as ONE full chunk
    (written by one rank), while every other model tensor is FSDP Shard(0) in 2 chunks.
  * optimizer state is flat and FQN-keyed by the PARAMETER names, so it uses the fused name:
    optimizer.state.layers.N.attention.qkv_linear.wqkv.weight.{exp_avg,exp_avg_sq,step}.
  * tied variant: both tok_embeddings.weight and lm_head.weight are stored (equal data);
    optimizer state only under tok_embeddings.weight.
  * .metadata's storage_meta.checkpoint_id is the absolute path of the step folder at save time.

Versions used (pip freeze):
  torch==2.13.0+cpu  torchtitan==0.3.0  torchdata==0.11.0  torch_checkpointing==0.1.1
  spmd_types==0.2.3  triton==3.9.0  transformers==5.24.0  safetensors==0.8.0  tokenizers==0.23.3
  datasets==4.7.0  numpy==2.4.6   (Python 3.11.7)

Recreate the venv and run (from the repo root; ~1 minute per variant on 2 CPU cores):
  python3 -m venv /work/venvs/torchtitan
  /work/venvs/torchtitan/bin/pip install torch==2.13.0
  /work/venvs/torchtitan/bin/pip install torchtitan==0.3.0 triton==3.9.0 transformers==5.24.0 safetensors==0.8.0
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /work/venvs/torchtitan/bin/python tests/trainers/torchtitan_llama3/make_fixture.py
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /work/venvs/torchtitan/bin/python tests/trainers/torchtitan_llama3_tied/make_fixture.py
"""

import json
import os
import random
import shutil
import re
import socket
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

HERE = Path(os.path.abspath(__file__)).parent  # not resolved: the _tied folder links to this file
TIED = HERE.name.endswith("_tied")
BASE = HERE.parent / "base"  # tests/trainers/base: tokenizer (vocab 261)
RUN = HERE / "run"
DUMP = RUN / "outputs"

VOCAB = 261
DIM = 32
N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2
MAX_SEQ_LEN = 64
ROPE_THETA = 500000.0
STEPS = 4
INTERVAL = 2
LR = 3e-2  # constant (after a 1-step warmup); large enough that the Q/K rotary permutation matters
SEQ_LEN = 64
LOCAL_BATCH = 2
INPUT_IDS = torch.arange(24).reshape(2, 12) * 7 % VOCAB


def patch_cpu():
    import torch._utils as torch_utils

    torch.set_num_threads(1)
    torch_utils._get_available_device_type = lambda: "cpu"


def model_config():
    """A tiny Llama3Model.Config assembled the way torchtitan's llama3 flavors are."""
    from torchtitan.models.common import ComplexRoPE, compute_ffn_hidden_dim, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import (
        _build_llama3_layers,
        _EMBEDDING_INIT,
        _EMBEDDING_SKIP_INIT,
        _NORM_INIT,
        _output_linear_init,
    )
    from torchtitan.models.llama3.model import Llama3Model

    hidden = compute_ffn_hidden_dim(DIM, multiple_of=64, ffn_dim_multiplier=0.75)  # = 64
    assert hidden == 64
    layers = _build_llama3_layers(
        fuse_qkv=True,
        n_layers=N_LAYERS,
        dim=DIM,
        n_heads=N_HEADS,
        n_kv_heads=N_KV_HEADS,
        hidden_dim=hidden,
        rope=ComplexRoPE.Config(
            dim=DIM // N_HEADS, max_seq_len=MAX_SEQ_LEN, theta=ROPE_THETA, scaling="llama"
        ),
        attn_backend="flex",  # replaced below: flex attention needs torch.compile
    )
    for layer in layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return Llama3Model.Config(
        dim=DIM,
        vocab_size=VOCAB,
        enable_weight_tying=TIED,
        tok_embeddings=Embedding.Config(
            num_embeddings=VOCAB,
            embedding_dim=DIM,
            param_init=_EMBEDDING_SKIP_INIT if TIED else _EMBEDDING_INIT,
        ),
        norm=RMSNorm.Config(normalized_shape=DIM, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=_output_linear_init(DIM)),
        layers=layers,
    )


def trainer_config(data_dir):
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.components.optimizer import default_adamw, LRSchedulersContainer
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.config.configs import DebugConfig
    from torchtitan.distributed.activation_checkpoint import SelectiveAC
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
    from torchtitan.models.llama3 import Llama3StateDictAdapter, parallelize_llama
    from torchtitan.models.llama3 import pipeline_llm
    from torchtitan.protocols.model_spec import ModelSpec
    from torchtitan.trainer import Trainer

    optimizer = default_adamw(lr=LR)
    optimizer.implementation = "foreach"
    spec = ModelSpec(
        name="llama3",
        flavor="tiny",
        model=model_config(),
        parallelize_fn=parallelize_llama,
        pipelining_fn=pipeline_llm,
        post_optimizer_build_fn=None,
        state_dict_adapter=Llama3StateDictAdapter,
    )
    return Trainer.Config(
        model_spec=spec,
        hf_assets_path=str(BASE),
        dump_folder=str(DUMP),
        loss=CrossEntropyLoss.Config(global_vocab_size=VOCAB),
        optimizer=optimizer,
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=1, decay_ratio=0.0),  # constant lr
        training=TrainingConfig(
            local_batch_size=LOCAL_BATCH,
            seq_len=SEQ_LEN,
            steps=STEPS,
            mixed_precision_param="float32",
            disable_cuda_graphs=True,
        ),
        dataloader=HuggingFaceTextDataLoader.Config(dataset="c4_test", dataset_path=str(data_dir)),
        parallelism=ParallelismConfig(data_parallel_shard_degree=2, spmd_backend="partial_dtensor"),
        checkpoint=CheckpointManager.Config(enable=True, interval=INTERVAL),
        activation_checkpoint=SelectiveAC.Config(),
        compile=CompileConfig(),
        debug=DebugConfig(seed=42),  # default None = a fresh random seed each run
    )


def full_state(model):
    """Unsharded, canonical (wq/wk/wv) model state; collective over all ranks."""
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def plain_model(cfg):
    """Unsharded torchtitan model (same config), for reference forwards."""
    from torchtitan.tools import utils

    with torch.device("meta"), utils.set_default_dtype(torch.float32):
        m = cfg.build()
    m.to_empty(device="cpu")
    with torch.no_grad():
        m.init_weights(buffer_device=None)
    return m.eval()


@torch.no_grad()
def tt_logits(cfg, state):
    m = plain_model(cfg)
    m.load_state_dict(state, strict=True)
    return m(INPUT_IDS).float()


def worker(rank, world, port, data_dir, result_path):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    patch_cpu()
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from torchtitan.components.loss import IGNORE_INDEX
    from torchtitan.config import TORCH_DTYPE_MAP
    from torchtitan.distributed import ParallelDims, utils as dist_utils
    from torchtitan.trainer import Trainer
    from torchtitan.tools import utils

    config = trainer_config(data_dir)
    spec = config.model_spec
    device = torch.device("cpu")

    # --- Trainer.__init__, trimmed ---
    dist.init_process_group("gloo")
    parallel_dims = ParallelDims.from_config(config.parallelism, dist.get_world_size())
    dist_utils.set_spmd_backend(config.parallelism.spmd_backend)
    batch_mesh = parallel_dims.get_mesh("batch")
    batch_degree, batch_rank = batch_mesh.size(), batch_mesh.get_local_rank()
    dist_utils.set_determinism(parallel_dims, device, config.debug, distinct_seed_mesh_dims=["pp"])

    model_config = spec.model
    model_config.update_from_config(config=config)
    with torch.device("meta"), utils.set_default_dtype(TORCH_DTYPE_MAP[config.training.dtype]):
        model = model_config.build()
    model.verify_module_protocol()
    loss_fn = config.loss.build(compile_config=config.compile)
    model = spec.parallelize_fn(
        model,
        parallel_dims=parallel_dims,
        training=config.training,
        parallelism=config.parallelism,
        compile_config=config.compile,
        ac_config=config.activation_checkpoint,
        dump_folder=config.dump_folder,
    )
    for m in model.modules():  # gloo rejects FSDP2's PREMUL_SUM reduce-scatter
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    model_parts = [model]

    optimizers = config.optimizer.build(model_parts=model_parts)
    lr_schedulers = config.lr_scheduler.build(optimizers=optimizers, training_steps=config.training.steps)

    class TrainState(torch.distributed.checkpoint.stateful.Stateful):
        """The "train_state" entry: torchtitan passes the Trainer itself; these are its methods."""

        state_dict = Trainer.state_dict
        load_state_dict = Trainer.load_state_dict

        def __init__(self):
            self.step = 0
            self.ntokens_seen = 0

    train_state = TrainState()
    tokenizer = config.tokenizer.build(tokenizer_path=config.hf_assets_path)
    dataloader = config.dataloader.build(
        dp_world_size=batch_degree,
        dp_rank=batch_rank,
        tokenizer=tokenizer,
        seq_len=config.training.seq_len,
        local_batch_size=config.training.local_batch_size,
        snapshot_every_n_steps=config.checkpoint.interval,
    )
    checkpointer = config.checkpoint.build(
        dataloader=dataloader,
        model_parts=model_parts,
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        states={"train_state": train_state},
        sd_adapter=spec.state_dict_adapter(model_config, config.hf_assets_path),
        base_folder=config.dump_folder,
    )
    train_context = dist_utils.get_spmd_context(parallel_dims=parallel_dims, spmd_typechecking=False)

    # --- Trainer.train / train_step, trimmed ---
    checkpointer.load(step=config.checkpoint.load_step)
    refs, losses = {}, []
    data_iterator = iter(dataloader)
    while train_state.step < config.training.steps:
        train_state.step += 1
        optimizers.zero_grad(set_to_none=True)
        input_dict, labels = next(data_iterator)
        local_valid_tokens = (labels != IGNORE_INDEX).sum()
        global_valid_tokens = dist_utils.dist_sum_tensor(local_valid_tokens, batch_mesh)
        inputs = input_dict["input"]
        positions = input_dict.get("positions")
        train_state.ntokens_seen += labels.numel()
        with train_context():
            pred = model(inputs, positions=positions)
            loss, _ = loss_fn(pred, labels, global_valid_tokens)
            del pred
            loss.backward()
        dist_utils.clip_grad_norm_(
            [p for m in model_parts for p in m.parameters()],
            config.training.max_norm,
            foreach=True,
            pp_mesh=parallel_dims.get_optional_mesh("pp"),
            ep_enabled=parallel_dims.ep_enabled,
        )
        checkpointer.maybe_wait_for_staging()
        optimizers.step()
        lr_schedulers.step()
        l = loss.detach().clone()
        dist.all_reduce(l)
        losses.append(float(l))
        saved = checkpointer.save(train_state.step, last_step=(train_state.step == config.training.steps))
        if saved:
            state = full_state(model)
            if rank == 0:
                refs[f"step-{train_state.step}"] = (train_state.step, tt_logits(model_config, state))
    checkpointer.close()
    if rank == 0:
        print("losses", losses, flush=True)
        torch.save({"refs": refs, "losses": losses}, result_path)
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_random_text(data_dir):
    rng = random.Random(1234)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?-'"
    with open(Path(data_dir) / "train.jsonl", "w") as f:
        for _ in range(64):
            n = rng.randint(40, 160)
            f.write(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(n))}) + "\n")


def hf_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        head_dim=DIM // N_HEADS,
        hidden_act="silu",
        max_position_embeddings=MAX_SEQ_LEN,
        rms_norm_eps=1e-5,  # torchtitan RMSNorm.Config default
        rope_parameters={
            # torchtitan ComplexRoPE.Config(scaling="llama") defaults
            "rope_type": "llama3",
            "rope_theta": ROPE_THETA,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=TIED,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )


def main():
    patch_cpu()
    import torch.multiprocessing as mp
    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import LlamaForCausalLM

    from torchtitan.models.llama3 import Llama3StateDictAdapter

    for p in ("run", "reference.pt", "base", "exported"):
        path = HERE / p
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    RUN.mkdir()
    scratch = Path(tempfile.mkdtemp(prefix="tt_fixture_"))
    os.environ["HF_DATASETS_CACHE"] = str(scratch / "hf_cache")
    data_dir = scratch / "data"
    data_dir.mkdir()
    write_random_text(data_dir)
    result_path = scratch / "result.pt"

    old_cwd = os.getcwd()
    os.chdir(scratch)  # nothing stray lands in the repo
    try:
        mp.spawn(worker, args=(2, free_port(), str(data_dir), str(result_path)), nprocs=2, join=True)
    finally:
        os.chdir(old_cwd)
    result = torch.load(result_path)
    refs = result["refs"]
    assert sorted(refs) == ["step-2", "step-4"], sorted(refs)
    torch.save(
        {
            "input_ids": INPUT_IDS.clone(),
            "logits": {k: v[1].contiguous() for k, v in sorted(refs.items())},
            "steps": {k: v[0] for k, v in sorted(refs.items())},
        },
        HERE / "reference.pt",
    )
    assert not torch.allclose(refs["step-2"][1], refs["step-4"][1])

    # base/: HF config computing the same function, + tokenizer
    (HERE / "base").mkdir()
    hf_config().save_pretrained(HERE / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BASE / name, HERE / "base" / name)

    cfg = model_config()
    adapter = Llama3StateDictAdapter(cfg, None)
    hf_cfg = hf_config()
    for name, (step, ref) in sorted(refs.items()):
        ckpt = DUMP / "checkpoint" / name
        flat = scratch / f"{name}.pt"
        dcp_to_torch_save(str(ckpt), str(flat))
        sd = torch.load(flat, weights_only=False)
        model_sd = {k: v for k, v in sd.items() if k not in ("optimizer", "lr_scheduler", "dataloader", "train_state")}
        # 1) DCP checkpoint -> plain torchtitan model
        d = (tt_logits(cfg, model_sd) - ref).abs().max().item()
        print(f"{name}: torchtitan model from DCP checkpoint vs reference: {d:.3e}")
        assert d < 1e-5
        # 2) torchtitan's own HF export
        hf_sd = {k: v.contiguous() for k, v in adapter.to_hf(model_sd).items()}
        out = HERE / "exported" / name
        out.mkdir(parents=True)
        save_file(hf_sd, str(out / "model.safetensors"))
        hf = LlamaForCausalLM(hf_cfg).eval()
        res = hf.load_state_dict(load_file(str(out / "model.safetensors")), strict=False)
        assert not res.unexpected_keys and set(res.missing_keys) <= ({"lm_head.weight"} if TIED else set()), res
        if TIED:
            hf.tie_weights()
        with torch.no_grad():
            d = (hf(INPUT_IDS).logits - ref).abs().max().item()
        print(f"{name}: HF LlamaForCausalLM(base/config.json) + exported vs reference: {d:.3e}")
        assert d < 1e-5
        # 3) the same without the Q/K rotary permutation
        to_hf = {v: k for k, v in adapter.from_hf_map.items() if v is not None}
        raw = {}
        for k, v in model_sd.items():
            if TIED and k == "lm_head.weight":
                continue
            ak = re.sub(r"(\d+)", "{}", k, count=1)
            n = re.search(r"\d+", k)
            raw[to_hf[ak].format(n.group(0)) if n else to_hf[k]] = v
        hf2 = LlamaForCausalLM(hf_cfg).eval()
        hf2.load_state_dict(raw, strict=False)
        if TIED:
            hf2.tie_weights()
        with torch.no_grad():
            d = (hf2(INPUT_IDS).logits - ref).abs().max().item()
        print(f"{name}: same WITHOUT rotary permutation: {d:.3e}")
        assert d > 1e-3
    shutil.rmtree(scratch)
    print("done")


if __name__ == "__main__":
    main()
