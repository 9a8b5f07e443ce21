"""Fixture generator: torch's own DCP HuggingFace storage writer (FSDP2, 2 gloo CPU ranks).

MODE, from the folder the script is run from (torch_hf_consolidated/ holds a link to this file):
  - "sharded":      HuggingFaceStorageWriter(save_distributed=True), no consolidation
                    -> run/step-N/shard-0000R-model-0000F-of-00002.safetensors (one per rank and output file,
                       each holding that rank's local DTensor slices + DCP_SHARDING_INFO in __metadata__)
  - "consolidated": HuggingFaceStorageWriter(save_distributed=True, enable_consolidation=True)
                    -> run/step-N/sharded/shard-*.safetensors (as above) and, written by rank 0 in the
                       writer's finish(), run/step-N/model-0000F-of-00002.safetensors + model.safetensors.index.json

Training: HF LlamaForCausalLM.from_config(tests/trainers/base), FSDP2 (fully_shard per decoder layer + root),
AdamW lr 1e-2, 4 steps on random tokens; at steps 2 and 4:
    state = get_model_state_dict(model)   # DTensor shards, HF names
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(path=run/step-N, fqn_to_index_mapping=...))
fqn_to_index_mapping: model.embed_tokens.weight + model.layers.0.* -> file 1, everything else -> file 2.

reference.pt: {"input_ids": arange(24).reshape(2,12)*7 % 261,
               "logits": {"step-2": ..., "step-4": ...}, "steps": {"step-2": 2, "step-4": 4}}
The logits come from the unsharded model (full state dict gathered from FSDP2 at the save) in a plain HF model, fp32.
They are then checked against the files just written (max abs diff < 1e-5): the per-rank shards are read back
by torch's own HuggingFaceStorageReader (dcp.load, single process); consolidated files by safetensors.load_file.

Versions (pip freeze): torch==2.13.0+cpu, transformers==5.24.0, safetensors==0.8.0, numpy==2.4.6,
tokenizers==0.23.3, huggingface_hub==2.4.0, Python 3.11.

Made with the repository's dev venv (/work/main/.venv, which has exactly those versions). An equivalent venv:
    python3.11 -m venv /work/venvs/torchhf
    /work/venvs/torchhf/bin/pip install torch==2.13.0
    /work/venvs/torchhf/bin/pip install transformers==5.24.0 safetensors==0.8.0
Run (from the repository root; deletes and recreates run/ and reference.pt next to this file;
about 30 s of CPU, 100-110 s wall on a busy 2-core machine):
    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python tests/trainers/torch_hf_sharded/make_fixture.py
    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python tests/trainers/torch_hf_consolidated/make_fixture.py
"""

import os
import shutil
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

HERE = Path(os.path.abspath(__file__)).parent  # not resolved: torch_hf_consolidated/ links to this file
MODE = HERE.name.removeprefix("torch_hf_")
assert MODE in ("sharded", "consolidated"), HERE
BASE = HERE.parent / "base"
RUN = HERE / "run"
WORLD = 2
SAVE_STEPS = (2, 4)
LR = 1e-2


def input_ids(vocab):
    return torch.arange(24).reshape(2, 12) * 7 % vocab


def build_model():
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(BASE)
    return LlamaForCausalLM._from_config(config, dtype=torch.float32)


def fqn_to_index(names):
    first = lambda n: n == "model.embed_tokens.weight" or n.startswith("model.layers.0.")
    return {n: 1 if first(n) else 2 for n in names}


def worker(rank, port, tmp):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = build_model()
    vocab = model.config.vocab_size
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(1234 + rank)
    for step in range(1, max(SAVE_STEPS) + 1):
        batch = torch.randint(0, vocab, (2, 12), generator=gen)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
        if step in SAVE_STEPS:
            name = f"step-{step}"
            state = get_model_state_dict(model)
            writer = HuggingFaceStorageWriter(
                path=str(RUN / name),
                fqn_to_index_mapping=fqn_to_index(state.keys()),
                save_distributed=True,
                enable_consolidation=(MODE == "consolidated"),
                thread_count_consolidation=1,
            )
            dcp.save(state, storage_writer=writer)
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                torch.save({k: v.clone() for k, v in full.items()}, Path(tmp) / f"{name}.pt")
            dist.barrier()
    dist.destroy_process_group()


@torch.no_grad()
def logits_of(state):
    model = build_model().eval()
    missing, unexpected = model.load_state_dict(state, strict=True)
    return model(input_ids=input_ids(model.config.vocab_size)).logits.float()


def read_back(folder):
    """Full state dict from what the writer put in `folder`, using torch's/safetensors' own readers."""
    from safetensors.torch import load_file

    if MODE == "sharded":
        model = build_model()
        state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
        dcp.load(state, storage_reader=HuggingFaceStorageReader(path=str(folder)), no_dist=True)
        return state
    state = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        state.update(load_file(f))
    return state


def main():
    torch.set_num_threads(1)
    for p in (RUN, HERE / "reference.pt"):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"torch_hf_{MODE}_fixture"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(tmp)), nprocs=WORLD, join=True)

    ids = input_ids(261)
    ref = {"input_ids": ids, "logits": {}, "steps": {}}
    for step in SAVE_STEPS:
        name = f"step-{step}"
        full = torch.load(tmp / f"{name}.pt")
        logits = logits_of(full)
        check = logits_of(read_back(RUN / name))
        diff = (logits - check).abs().max().item()
        print(f"{name}: reference vs read-back max abs diff {diff:.3g}")
        assert diff < 1e-5, diff
        ref["logits"][name] = logits.contiguous()
        ref["steps"][name] = step
    d = (ref["logits"]["step-2"] - ref["logits"]["step-4"]).abs().max().item()
    print(f"step-2 vs step-4 logits max abs diff {d:.3g}")
    assert d > 1e-3
    torch.save(ref, HERE / "reference.pt")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
