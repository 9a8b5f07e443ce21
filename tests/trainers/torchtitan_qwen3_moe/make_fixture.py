"""Generate the torchtitan mixture-of-experts fixtures: checkpoints written by torchtitan's own CheckpointManager.

The same file serves two fixture folders (torchtitan_deepseek_v3/ holds a link to it); the folder name picks:
  tests/trainers/torchtitan_qwen3_moe/    Qwen3 MoE: GQA + q/k RMSNorm (CosSinRoPE, theta 1e6), every layer MoE,
                                          4 experts top-2, softmax router with route_norm, no shared expert,
                                          MoE.Config(load_balance_coeff=None): no expert_bias_E (see below)
  tests/trainers/torchtitan_deepseek_v3/  DeepSeek-V3: MLA attention (q_lora_rank 16, kv_lora_rank 16, nope 8,
                                          rope 4, v 8; ComplexRoPE theta 1e4, no yarn), layer 0 dense FFN,
                                          layer 1 MoE (4 routed experts top-2 + 1 shared expert, sigmoid router,
                                          route_norm, route_scale 2.5), load_balance_coeff 1e-3 (torchtitan's
                                          default): expert_bias_E is updated by torchtitan's optimizer pre-hook
                                          and is non-zero in both checkpoints

What runs: the model built from its Model.Config on the meta device (as the Trainer does), sharded with FSDP2
by torchtitan's own parallelize_qwen3 / parallelize_deepseekv3 on 2 gloo CPU ranks, torchtitan's
OptimizersContainer (default_adamw, lr 3e-2), register_moe_load_balancing_hook (the models' own
post_optimizer_build_fn), LRSchedulersContainer (1 warmup step, then constant), HuggingFaceTokenizer
(tests/trainers/base's tokenizer), HuggingFaceTextDataLoader (dataset "c4_test" pointed at a local json file
of random text) and CheckpointManager(interval=2, torchtitan defaults otherwise: last_save_model_only=True,
export_dtype=float32, async disabled).  The training loop is a trimmed copy of
torchtitan.trainer.Trainer.train/train_step (torchtitan's Trainer itself needs a GPU for its memory
monitor).  4 steps; CheckpointManager.save(step, last_step=(step == 4)) writes
run/outputs/checkpoint/step-2 (full: model + optimizer + lr_scheduler + dataloader + train_state) and
run/outputs/checkpoint/step-4 (the last step: model only, torchtitan's default).

CPU workarounds (nothing in torchtitan is edited):
  * torch._utils._get_available_device_type is patched to return "cpu" before torchtitan is imported.
  * triton must be installed (imported unconditionally by torchtitan).
  * attention: torchtitan's ScaledDotProductAttention instead of the default FlexAttention.
  * gloo has no PREMUL_SUM: every FSDPModule gets set_force_sum_reduction_for_comms(True).
  * parallelism.spmd_backend="partial_dtensor" (see tests/trainers/torchtitan_llama3/make_fixture.py).
  * training.mixed_precision_param="float32"; debug.seed=42; optimizer implementation "foreach".
  * the routed experts run through torch._grouped_mm, which torch 2.13 runs on CPU.  torchtitan's
    GroupedExperts.forward casts x and the expert weights to bfloat16 (always, whatever the param dtype),
    so training (and the model's own forward) computes the experts in bf16.
  * the process group is created with dist.init_process_group("gloo").

Reference logits (reference.pt): the unsharded torchtitan model (same Model.Config, plain module, the full
FSDP state loaded) run in float32 at each save, with GroupedExperts.forward swapped, ONLY for that forward,
for a copy of torchtitan's own forward without the three .bfloat16() casts (same torch._grouped_mm calls,
same offsets, in float32).  The codebase's unmodified (bf16-expert) forward is also run and must agree
with the reference to bf16 tolerance (printed; asserted < 5e-2 abs).

Model-config choices made so that an HF model computes the same function (all are torchtitan options):
  * Qwen3: load_balance_coeff=None.  With torchtitan's default (1e-3) MoE keeps a float32 buffer
    layers.N.moe.expert_bias_E [E] that shifts the top-k choice; HF Qwen3MoeForCausalLM has no such
    bias and Qwen3StateDictAdapter.to_hf silently drops the key (it is not in its map).
  * DeepSeek-V3: every RMSNorm eps 1e-6 (torchtitan's RMSNorm default is 1e-5; transformers'
    DeepseekV3 hard-codes eps 1e-6 for q_a_layernorm / kv_a_layernorm and uses rms_norm_eps for the
    rest); sigmoid scores (HF DeepseekV3TopkRouter is sigmoid only; torchtitan's debugmodel uses softmax);
    no yarn scaling; n_group=1, topk_group=1 on the HF side (= torchtitan num_expert_groups=None).

Outputs (in this file's folder; deleted and recreated on each run):
  run/                 the dump folder as torchtitan wrote it (run/outputs/checkpoint/step-{2,4})
  reference.pt         {"input_ids", "logits": {"step-2", "step-4"}, "steps": {"step-2": 2, "step-4": 4}}
  base/                HF Qwen3MoeConfig / DeepseekV3Config (+ tokenizer copied from tests/trainers/base)
  exported/step-N/model.safetensors
                       Qwen3StateDictAdapter / DeepSeekV3StateDictAdapter(model_config, None).to_hf(checkpoint
                       model state), saved with metadata {"format": "pt"} as save_pretrained writes it

Checks done at the end (the script fails if any fails):
  * each checkpoint, read back with DCP (dcp_to_torch_save) into a plain torchtitan model, reproduces
    reference.pt (fp32 forward, max abs diff < 1e-5)
  * AutoModelForCausalLM.from_pretrained(folder with base/config.json + exported/step-N/model.safetensors,
    float32) loads with no missing / unexpected / mismatched keys (transformers fuses the per-expert keys
    into its 3-D experts.gate_up_proj / experts.down_proj on load) and reproduces reference.pt
    (max abs diff <= 1e-4 * max |reference|)
  * DeepSeek-V3: expert_bias_E is non-zero in both checkpoints, and the same HF model with
    e_score_correction_bias zeroed is clearly off (> 1e-3) for at least one of them (printed for both;
    at step 2 it moves no top-k choice for the reference input, at step 4 it does: ~5e-2)

Versions used (pip freeze):
  torch==2.13.0+cpu  torchtitan==0.3.0  torchdata==0.11.0  torch_checkpointing==0.1.1
  spmd_types==0.2.3  triton==3.9.0  transformers==5.24.0  safetensors==0.8.0  tokenizers==0.23.3
  datasets==4.7.0  numpy==2.4.6   (Python 3.11.7)

Recreate the venv and run (from the repo root; a few minutes per variant on 2 CPU cores):
  python3 -m venv /work/venvs/torchtitan
  /work/venvs/torchtitan/bin/pip install torch==2.13.0
  /work/venvs/torchtitan/bin/pip install torchtitan==0.3.0 triton==3.9.0 transformers==5.24.0 safetensors==0.8.0
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 /work/venvs/torchtitan/bin/python tests/trainers/torchtitan_qwen3_moe/make_fixture.py
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 /work/venvs/torchtitan/bin/python tests/trainers/torchtitan_deepseek_v3/make_fixture.py
"""

import contextlib
import json
import os
import random
import shutil
import socket
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

HERE = Path(os.path.abspath(__file__)).parent  # not resolved: torchtitan_deepseek_v3/ links to this file
VARIANT = HERE.name.removeprefix("torchtitan_")
assert VARIANT in ("qwen3_moe", "deepseek_v3"), HERE
BASE = HERE.parent / "base"  # tests/trainers/base: tokenizer (vocab 261)
RUN = HERE / "run"
DUMP = RUN / "outputs"

VOCAB = 261
DIM = 32
N_LAYERS = 2
N_HEADS = 4
MAX_SEQ_LEN = 64
NUM_EXPERTS = 4
TOP_K = 2
MOE_HIDDEN = 16
# qwen3
N_KV_HEADS = 2
HEAD_DIM = 8
QWEN_THETA = 1000000.0
# deepseek-v3
Q_LORA_RANK = 16
KV_LORA_RANK = 16
QK_NOPE = 8
QK_ROPE = 4
V_HEAD = 8
DENSE_HIDDEN = 64
ROUTE_SCALE = 2.5
DSV3_THETA = 10000.0
DSV3_EPS = 1e-6

STEPS = 4
INTERVAL = 2
LR = 3e-2
SEQ_LEN = 64
LOCAL_BATCH = 2
INPUT_IDS = torch.arange(24).reshape(2, 12) * 7 % VOCAB


def patch_cpu():
    import torch._utils as torch_utils

    torch.set_num_threads(1)
    torch_utils._get_available_device_type = lambda: "cpu"


def _sdpa(layers):
    from torchtitan.models.common.attention import ScaledDotProductAttention

    for layer in layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return layers


def qwen3_model_config():
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.qwen3 import (
        _build_qwen3_moe_layers,
        _EMBEDDING_INIT,
        _LINEAR_INIT,
        _qwen3_norm,
    )
    from torchtitan.models.qwen3.model import Qwen3Model

    layers = _build_qwen3_moe_layers(
        fuse_qkv=True,
        n_layers=N_LAYERS,
        dim=DIM,
        n_heads=N_HEADS,
        n_kv_heads=N_KV_HEADS,
        head_dim=HEAD_DIM,
        moe_hidden_dim=MOE_HIDDEN,
        num_experts=NUM_EXPERTS,
        top_k=TOP_K,
        attn_backend="flex",  # replaced below: flex attention needs torch.compile
        moe_comm_backend="standard",
        rope=CosSinRoPE.Config(dim=HEAD_DIM, max_seq_len=MAX_SEQ_LEN, theta=QWEN_THETA),
    )
    for layer in layers:
        layer.moe.load_balance_coeff = None  # HF Qwen3Moe has no routing bias (see docstring)
    return Qwen3Model.Config(
        vocab_size=VOCAB,
        dim=DIM,
        norm=_qwen3_norm(DIM),
        enable_weight_tying=False,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM, param_init=_EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=_LINEAR_INIT),
        layers=_sdpa(layers),
    )


def dsv3_model_config():
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.deepseek_v3 import (
        _build_dsv3_layers,
        _EMBEDDING_INIT,
        _NORM_INIT,
        _output_linear_init,
    )
    from torchtitan.models.deepseek_v3.model import DeepSeekV3Model

    layers = _build_dsv3_layers(
        n_layers=N_LAYERS,
        n_dense_layers=1,
        dim=DIM,
        n_heads=N_HEADS,
        q_lora_rank=Q_LORA_RANK,
        kv_lora_rank=KV_LORA_RANK,
        qk_nope_head_dim=QK_NOPE,
        qk_rope_head_dim=QK_ROPE,
        v_head_dim=V_HEAD,
        mscale=1.0,
        dense_hidden_dim=DENSE_HIDDEN,
        moe_hidden_dim=MOE_HIDDEN,
        num_experts=NUM_EXPERTS,
        num_shared_experts=1,
        router_top_k=TOP_K,
        router_score_func="sigmoid",
        router_route_norm=True,
        router_route_scale=ROUTE_SCALE,
        attn_backend="flex",  # replaced below
        moe_comm_backend="standard",
        non_blocking_capacity_factor=None,
        rope=ComplexRoPE.Config(dim=QK_ROPE, max_seq_len=MAX_SEQ_LEN, theta=DSV3_THETA),
    )
    for layer in layers:
        for norm in (layer.attention_norm, layer.ffn_norm, layer.attention.q_norm, layer.attention.kv_norm):
            norm.eps = DSV3_EPS
    return DeepSeekV3Model.Config(
        vocab_size=VOCAB,
        dim=DIM,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=DIM, eps=DSV3_EPS, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=_output_linear_init(DIM)),
        layers=_sdpa(layers),
        mtp_layers=[],
    )


def model_config():
    return qwen3_model_config() if VARIANT == "qwen3_moe" else dsv3_model_config()


def adapter_cls():
    if VARIANT == "qwen3_moe":
        from torchtitan.models.qwen3 import Qwen3StateDictAdapter

        return Qwen3StateDictAdapter
    from torchtitan.models.deepseek_v3 import DeepSeekV3StateDictAdapter

    return DeepSeekV3StateDictAdapter


def trainer_config(data_dir):
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.components.optimizer import default_adamw, LRSchedulersContainer
    from torchtitan.components.optimizer import register_moe_load_balancing_hook
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.config.configs import DebugConfig
    from torchtitan.distributed.activation_checkpoint import SelectiveAC
    from torchtitan.distributed.pipeline_parallel import pipeline_llm
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
    from torchtitan.protocols.model_spec import ModelSpec
    from torchtitan.trainer import Trainer

    if VARIANT == "qwen3_moe":
        from torchtitan.models.qwen3 import parallelize_qwen3 as parallelize_fn
    else:
        from torchtitan.models.deepseek_v3 import parallelize_deepseekv3 as parallelize_fn

    optimizer = default_adamw(lr=LR)
    optimizer.implementation = "foreach"
    spec = ModelSpec(
        name="qwen3" if VARIANT == "qwen3_moe" else "deepseek_v3",
        flavor="tiny",
        model=model_config(),
        parallelize_fn=parallelize_fn,
        pipelining_fn=pipeline_llm,
        post_optimizer_build_fn=register_moe_load_balancing_hook,
        state_dict_adapter=adapter_cls(),
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
        debug=DebugConfig(seed=42),
    )


def full_state(model):
    """Unsharded model state (incl. persistent buffers such as expert_bias_E); collective over all ranks."""
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def plain_model(cfg):
    from torchtitan.tools import utils

    with torch.device("meta"), utils.set_default_dtype(torch.float32):
        m = cfg.build()
    m.to_empty(device="cpu")
    with torch.no_grad():
        m.init_weights(buffer_device=None)
    return m.eval()


def _grouped_experts_forward_fp32(self, x_RD, num_tokens_per_expert_E):
    """torchtitan's GroupedExperts.forward (plain-tensor path) without its .bfloat16() casts."""
    import torch.nn.functional as F

    offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
    h_RF = F.silu(self._grouped_mm(A=x_RD, B_t=self.w1_EFD.transpose(-2, -1), offs=offsets_E))
    h_RF = h_RF * self._grouped_mm(A=x_RD, B_t=self.w3_EFD.transpose(-2, -1), offs=offsets_E)
    return self._grouped_mm(A=h_RF, B_t=self.w2_EDF.transpose(-2, -1), offs=offsets_E).type_as(x_RD)


@contextlib.contextmanager
def fp32_experts():
    from torchtitan.models.common.moe import GroupedExperts

    orig = GroupedExperts.forward
    GroupedExperts.forward = _grouped_experts_forward_fp32
    try:
        yield
    finally:
        GroupedExperts.forward = orig


@torch.no_grad()
def tt_logits(cfg, state, fp32=True):
    m = plain_model(cfg)
    m.load_state_dict(state, strict=True)
    with fp32_experts() if fp32 else contextlib.nullcontext():
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
    if spec.post_optimizer_build_fn is not None:  # MoE load-balancing (expert_bias_E) pre-step hook
        spec.post_optimizer_build_fn(optimizers, model_parts, parallel_dims)
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
                refs[f"step-{train_state.step}"] = (
                    train_state.step,
                    tt_logits(model_config, state, fp32=True),
                    tt_logits(model_config, state, fp32=False),
                )
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
    common = dict(
        vocab_size=VOCAB,
        hidden_size=DIM,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        hidden_act="silu",
        max_position_embeddings=MAX_SEQ_LEN,
        attention_bias=False,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )
    if VARIANT == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        cfg = Qwen3MoeConfig(
            **common,
            num_key_value_heads=N_KV_HEADS,
            head_dim=HEAD_DIM,
            intermediate_size=64,  # unused: every layer is MoE
            moe_intermediate_size=MOE_HIDDEN,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=True,  # torchtitan route_norm=True
            decoder_sparse_step=1,
            mlp_only_layers=[],
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": QWEN_THETA},
        )
        cfg.architectures = ["Qwen3MoeForCausalLM"]
    else:
        from transformers import DeepseekV3Config

        cfg = DeepseekV3Config(
            **common,
            num_key_value_heads=N_HEADS,
            intermediate_size=DENSE_HIDDEN,
            moe_intermediate_size=MOE_HIDDEN,
            n_shared_experts=1,
            n_routed_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            routed_scaling_factor=ROUTE_SCALE,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            first_k_dense_replace=1,
            q_lora_rank=Q_LORA_RANK,
            kv_lora_rank=KV_LORA_RANK,
            qk_nope_head_dim=QK_NOPE,
            qk_rope_head_dim=QK_ROPE,
            v_head_dim=V_HEAD,
            rope_interleave=True,  # torchtitan ComplexRoPE rotates interleaved pairs
            rms_norm_eps=DSV3_EPS,
            rope_parameters={"rope_type": "default", "rope_theta": DSV3_THETA},
        )
        cfg.architectures = ["DeepseekV3ForCausalLM"]
    return cfg


def main():
    patch_cpu()
    import torch.multiprocessing as mp
    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    for p in ("run", "reference.pt", "base", "exported"):
        path = HERE / p
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    RUN.mkdir()
    scratch = Path(tempfile.mkdtemp(prefix="tt_moe_fixture_"))
    os.environ["HF_DATASETS_CACHE"] = str(scratch / "hf_cache")
    data_dir = scratch / "data"
    data_dir.mkdir()
    write_random_text(data_dir)
    result_path = scratch / "result.pt"

    old_cwd = os.getcwd()
    os.chdir(scratch)
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
    for name, (_, ref, own) in sorted(refs.items()):
        d = (own - ref).abs().max().item()
        print(f"{name}: torchtitan's own forward (bf16 experts) vs fp32 reference: {d:.3e} (max |ref| {ref.abs().max():.3f})")
        assert d < 5e-2

    (HERE / "base").mkdir()
    hf_cfg = hf_config()
    hf_cfg.save_pretrained(HERE / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BASE / name, HERE / "base" / name)

    cfg = model_config()
    adapter = adapter_cls()(cfg, None)
    no_bias_diffs = []
    for name, (step, ref, _) in sorted(refs.items()):
        ckpt = DUMP / "checkpoint" / name
        flat = scratch / f"{name}.pt"
        dcp_to_torch_save(str(ckpt), str(flat))
        sd = torch.load(flat, weights_only=False)
        model_sd = {k: v for k, v in sd.items() if k not in ("optimizer", "lr_scheduler", "dataloader", "train_state")}
        if VARIANT == "deepseek_v3":
            bias = model_sd["layers.1.moe.expert_bias_E"]
            print(f"{name}: layers.1.moe.expert_bias_E = {bias.tolist()}")
            assert bias.abs().max() > 0
        # 1) DCP checkpoint -> plain torchtitan model
        d = (tt_logits(cfg, model_sd) - ref).abs().max().item()
        print(f"{name}: torchtitan model from DCP checkpoint vs reference: {d:.3e}")
        assert d < 1e-5
        # 2) torchtitan's own HF export, loaded by transformers' from_pretrained
        hf_sd = {k: v.contiguous() for k, v in adapter.to_hf(model_sd).items()}
        out = HERE / "exported" / name
        out.mkdir(parents=True)
        save_file(hf_sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        probe = scratch / f"hf_{name}"
        probe.mkdir()
        shutil.copy(HERE / "base" / "config.json", probe / "config.json")
        shutil.copy(out / "model.safetensors", probe / "model.safetensors")
        hf, info = AutoModelForCausalLM.from_pretrained(probe, dtype=torch.float32, output_loading_info=True)
        print(f"{name}: from_pretrained loading info: {info}")
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        hf.eval()
        with torch.no_grad():
            d = (hf(INPUT_IDS).logits.float() - ref).abs().max().item()
        tol = 1e-4 * ref.abs().max().item()
        print(f"{name}: HF {type(hf).__name__}(base/config.json) + exported vs reference: {d:.3e} (tol {tol:.3e})")
        assert d <= tol
        if VARIANT == "deepseek_v3":
            # 3) the same without the routing bias
            with torch.no_grad():
                for layer in hf.model.layers:
                    if hasattr(layer.mlp, "gate"):
                        layer.mlp.gate.e_score_correction_bias.zero_()
                d = (hf(INPUT_IDS).logits.float() - ref).abs().max().item()
            print(f"{name}: same with e_score_correction_bias zeroed: {d:.3e}")
            no_bias_diffs.append(d)
    if VARIANT == "deepseek_v3":  # the bias moved at least one top-k choice for the reference input
        assert max(no_bias_diffs) > 1e-3, no_bias_diffs
    shutil.rmtree(scratch)
    print("done")


if __name__ == "__main__":
    main()
