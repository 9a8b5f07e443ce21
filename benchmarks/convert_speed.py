"""Speed and memory of lmtk against a durable copy of the same bytes, accelerate and torch's own consolidation.

    pip install -e ".[bench]"
    python benchmarks/convert_speed.py --work /tmp/lmtk-bench                 # everything: about an hour
    python benchmarks/convert_speed.py --sizes 774m --sections routes --repeats 2

Sections (each method runs as its own process, interleaved with the others, ``--repeats`` times):

- ``routes``: every layout at 774M (GPT-2 large, saved by real FSDP2 on 2 gloo processes: ``.pth``, DCP,
  rank files, DCP's per-rank safetensors) and at 7B (Llama-2-7B shapes in bf16, synthetic state dicts saved
  with ``torch.save`` / ``dcp.save``, one rank or two; no model runs), with the page cache dropped (cold) and
  with the inputs cached (warm). Fixed cost: the same route on a tiny checkpoint. Marginal cost: the rest,
  compared with ``cp`` + ``fsync`` of the same bytes (lmtk fsyncs every file it writes).
- ``baselines``: ``accelerate merge-weights`` (DCP) and torch's ``consolidate_safetensors_files`` (per-rank
  safetensors, each thread count) at 774M.
- ``workers``: ``convert.write_workers`` 1, 2 and 4 writing 1 GB shards at 774M.
- ``lora``: a LoRA fine-tune of the 774M model (peft's names, r 16 on every attention and MLP projection),
  merged into a model folder: the whole PeftModel in one ``.pth`` (base weights in the checkpoint, as
  accelerate and verl save it) and the adapter alone with the base's own safetensors weights (as the
  Trainer's sharded saves); against the plain ``.pth`` conversion of the same model, interleaved.
- ``sweeps``: ten 124M checkpoints as one multirun on the basic launcher, on joblib with 2 jobs, and as ten
  separate runs.

Memory is sampled from /proc every few ms over the process tree: peak anonymous memory (what the process
holds; not the page cache behind memory-mapped inputs), peak RSS, and the peak of the machine's dirty and
writeback page cache above its level at the start (what a job dirties). "cores" is CPU time over wall time.
Results: ``benchmarks/results.md`` and ``benchmarks/results.png``. ``--cache cold`` needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GPT2 = {  # GPT-2 family shapes
    "tiny": dict(n_embd=64, n_layer=2, n_head=2),  # accelerate's fixed cost (it needs a model-only DCP)
    "124m": dict(n_embd=768, n_layer=12, n_head=12),
    "774m": dict(n_embd=1280, n_layer=36, n_head=20),
}
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                max_position_embeddings=4096)
ROUTES = ("pth", "dcp", "ranks", "hf_shards")
SETTLE = 1.0  # seconds between runs
# The tiny checkpoint of each route, for the fixed cost: (checkpoint, base).
TINY = {
    "pth": (REPO / "examples/checkpoints/bare.pth", REPO / "examples/tiny-gpt2"),
    "dcp": (REPO / "examples/checkpoints/dcp", REPO / "examples/tiny-gpt2"),
    "ranks": (REPO / "examples/checkpoints/ranks", REPO / "examples/tiny-gpt2"),
    "hf_shards": (REPO / "tests/trainers/torch_hf_sharded/run/step-2", REPO / "tests/trainers/base"),
}
CONSOLIDATE = """
import json, os, sys
from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files
src, out, mapping, threads = sys.argv[1:]
os.makedirs(out, exist_ok=True)
consolidate_safetensors_files(src, out, json.loads(open(mapping).read()), num_threads=int(threads))
"""


@dataclass
class Sample:
    seconds: float
    peak_rss: int = 0
    peak_anon: int = 0
    peak_dirty: int = 0
    cpu: float = 0.0


# -- measuring ---------------------------------------------------------------------------------------


def _meminfo(*keys: str) -> int:
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        if name in keys:
            total += int(value.split()[0]) * 1024
    return total


def _tree_memory(pid: int) -> tuple[int, int]:
    rss = anon = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
    return rss, anon


def _children(pid: int) -> list[int]:
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise SystemExit(f"--cache cold needs root (writing /proc/sys/vm/drop_caches): {e}") from e


def warm(paths: list[Path]) -> None:
    """Read the inputs once so they sit in the page cache."""
    subprocess.run(["sync"], check=True)
    for path in paths:
        for file in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


def measure(command: list[str], *, env: dict[str, str], cache: str, inputs: list[Path]) -> Sample:
    drop_caches() if cache == "cold" else warm(inputs)
    time.sleep(SETTLE)  # the disk finishes what earlier runs left (deleted outputs, journal) before this one starts
    dirty0 = _meminfo("Dirty", "Writeback")
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"lmtk-bench-{os.getpid()}.log"
    with open(log, "wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
        sample = Sample(0.0)
        while True:
            done, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if done:
                break
            rss, anon = _tree_memory(proc.pid)
            sample.peak_rss, sample.peak_anon = max(sample.peak_rss, rss), max(sample.peak_anon, anon)
            sample.peak_dirty = max(sample.peak_dirty, _meminfo("Dirty", "Writeback") - dirty0)
            time.sleep(0.005)
        sample.seconds = time.perf_counter() - started
        sample.cpu = usage.ru_utime + usage.ru_stime
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} failed:\n{log.read_text()[-3000:]}")
    return sample


# -- checkpoints ---------------------------------------------------------------------------------------


def build_gpt2(size: str, work: Path, routes: tuple[str, ...]) -> tuple[Path, dict[str, Path]]:
    """Real FSDP2 saves of a GPT-2-shaped model (2 gloo processes), each layout built once."""
    from lmtk.synthetic import make_base_folder, save_checkpoints

    root = work / size
    base, ckpts = root / "base", root / "checkpoints"
    paths = {"pth": ckpts / "bare.pth", "dcp": ckpts / "pytorch_model_fsdp_0", "ranks": ckpts / "ranks",
             "hf_shards": ckpts / "hf_shards"}
    layouts = {"pth": "bare", "dcp": "pytorch_model_fsdp_0", "ranks": "ranks", "hf_shards": "hf_shards"}
    if not (base / "config.json").is_file():
        make_base_folder(base, "gpt2", vocab_size=50257, n_positions=1024, **GPT2[size])
    missing = [layouts[r] for r in routes if not paths[r].exists()]
    if missing:
        save_checkpoints(base, ckpts, reference=root / "reference.pt", train=False, layouts=missing)
    return base, {r: paths[r] for r in routes}


def build_7b(route: str, work: Path) -> tuple[Path, Path]:
    """A Llama-2-7B-shaped bf16 checkpoint in one layout (about 13.5 GB): synthetic values, no model runs."""
    from lmtk.synthetic import make_base_folder

    root = work / "7b"
    base = root / "base"
    if not (base / "config.json").is_file():
        make_base_folder(base, "llama", **LLAMA_7B)
    path = root / {"pth": "full.pth", "dcp": "dcp", "ranks": "ranks", "hf_shards": "hf_shards"}[route]
    if not path.exists():
        if route in ("pth", "dcp"):
            subprocess.run([sys.executable, __file__, "--_save-7b", route, str(base), str(path)], check=True)
        else:
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port",
                            str(_free_port()), __file__, "--_save-7b", route, str(base), str(path)], check=True)
    return base, path


LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def build_lora(work: Path, base: Path, pth: Path) -> dict[str, Path]:
    """The 774M model as a trained LoRA fine-tune under peft's names: whole, and the adapter with a weighted base."""
    import torch
    from safetensors.torch import save_file

    root = work / "774m" / "lora"
    paths = {"whole": root / "whole" / "step-1.pth", "adapter": root / "adapter" / "step-1.pth",
             "base": root / "base"}
    if all(p.exists() for p in paths.values()):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    state = torch.load(pth, weights_only=True, mmap=True)
    generator = torch.Generator().manual_seed(0)
    whole, adapter = {}, {}
    for name, tensor in state.items():
        module = name.rsplit(".", 1)[0]
        if module.endswith(LORA_TARGETS):
            kind = name.rsplit(".", 1)[1]
            whole[f"base_model.model.{module}.base_layer.{kind}"] = tensor
            if kind == "weight":  # Conv1D: [in, out]
                a = torch.randn(16, tensor.shape[0], generator=generator) * 0.01
                b = torch.randn(tensor.shape[1], 16, generator=generator) * 0.01
                for names, suffix in ((whole, ".default.weight"), (adapter, ".weight")):
                    names[f"base_model.model.{module}.lora_A{suffix}"] = a
                    names[f"base_model.model.{module}.lora_B{suffix}"] = b
        else:
            whole[f"base_model.model.{name}"] = tensor
    record = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "fan_in_fan_out": True,
              "target_modules": ["c_attn", "c_proj", "c_fc"]}
    for kind in ("whole", "adapter"):
        paths[kind].parent.mkdir(parents=True)
        torch.save(whole if kind == "whole" else adapter, paths[kind])
        (paths[kind].parent / "adapter_config.json").write_text(json.dumps(record))
    shutil.copytree(base, paths["base"])
    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, paths["base"] / "model.safetensors",
              metadata={"format": "pt"})
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_7b(route: str, base: Path, path: Path) -> None:
    """Runs in the builder's process(es): every tensor filled with a constant, so nothing needs training."""
    import torch
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if route == "pth":
        torch.save({n: torch.full(s, 0.01, dtype=torch.bfloat16) for n, s in shapes.items()}, path)
        return
    if route == "dcp":
        dcp.save({n: torch.full(s, 0.01, dtype=torch.bfloat16) for n, s in shapes.items()}, checkpoint_id=path)
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    state = {}
    for name, shape in shapes.items():
        rows = -(-shape[0] // world)
        local = torch.full((max(0, min(rows, shape[0] - rank * rows)), *shape[1:]), 0.01, dtype=torch.bfloat16)
        stride = tuple(int(torch.tensor(shape[i + 1:]).prod()) for i in range(len(shape)))
        state[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)
    if route == "ranks":
        path.mkdir(parents=True, exist_ok=True)
        torch.save(state, path / f"model_world_size_{world}_rank_{rank}.pt")
    else:
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

        # The writer holds a whole output file's bytes per rank: eight files keep 7B within 24 GiB.
        mapping = {name: 1 + i % 8 for i, name in enumerate(shapes)}
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True,
                                                                fqn_to_index_mapping=mapping))
    dist.barrier()
    dist.destroy_process_group()


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- methods -------------------------------------------------------------------------------------------


def lmtk(checkpoint: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmtk", f"convert.checkpoint_path={checkpoint}", f"convert.base_model={base}",
            f"convert.output_dir={out}", f"hydra.run.dir={out}/run", "convert.overwrite=true", *extra]


def durable_copy(source: Path, out: Path) -> list[str]:
    """cp, then fsync every file written: the floor for anything that writes the same bytes durably."""
    target = out / "copy"
    return ["sh", "-c", f"cp -r '{source}' '{target}' && find '{target}' -type f -exec sync {{}} +"]


class Bench:
    def __init__(self, work: Path, repeats: int, caches: list[str], *, resume: bool) -> None:
        self.work, self.repeats, self.caches = work, repeats, caches
        self.out = work / "out"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMTK_CACHE": str(work / "lmtk-cache")}
        # Every sample is saved as it is taken; --resume takes up where a stopped run left off.
        self.saved = work / "samples.json"
        self.samples: dict[tuple[str, ...], list[Sample]] = {}
        if resume and self.saved.exists():
            self.samples = {tuple(k.split(" | ")): [Sample(**s) for s in v]
                            for k, v in json.loads(self.saved.read_text()).items()}

    def run(self, key: tuple[str, ...], command: list[str], *, cache: str, inputs: list[Path]) -> Sample | None:
        if len(self.samples.get(key, [])) >= self.repeats:
            return None  # taken already (--resume)
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        sample = measure(command, env=self.env, cache=cache, inputs=inputs)
        self.samples.setdefault(key, []).append(sample)
        self.saved.write_text(json.dumps({" | ".join(k): [s.__dict__ for s in v] for k, v in self.samples.items()}))
        print(f"{' | '.join(key)}: {sample.seconds:.2f}s anon {sample.peak_anon / 2**20:.0f} MiB "
              f"dirty {sample.peak_dirty / 2**20:.0f} MiB cores {sample.cpu / sample.seconds:.2f}", flush=True)
        shutil.rmtree(self.out, ignore_errors=True)
        return sample

    def done(self, *keys: tuple[str, ...]) -> bool:
        return all(len(self.samples.get(key, [])) >= self.repeats for key in keys)

    def routes(self, size: str, route: str, base: Path, path: Path) -> None:
        """lmtk on the route, the same route on a tiny checkpoint, and cp + fsync of the same bytes."""
        self.samples[(size, route, "bytes")] = [Sample(float(_bytes(path)))]
        if self.done(*[(size, route, c, m) for c in self.caches for m in ("lmtk", "tiny", "floor")]):
            return
        tiny, tiny_base = TINY[route]
        measure(lmtk(tiny, tiny_base, self.out), env=self.env, cache="warm", inputs=[])  # fill the caches
        measure(lmtk(path, base, self.out), env=self.env, cache="warm", inputs=[])
        for _ in range(self.repeats):
            for cache in self.caches:
                self.run((size, route, cache, "lmtk"), lmtk(path, base, self.out), cache=cache, inputs=[path])
                self.run((size, route, cache, "tiny"), lmtk(tiny, tiny_base, self.out), cache=cache, inputs=[tiny])
                self.run((size, route, cache, "floor"), durable_copy(path, self.out), cache=cache, inputs=[path])

    def baselines(self, base: Path, paths: dict[str, Path]) -> None:
        mapping = self.work / "774m" / "fqn_to_index.json"
        mapping.write_text(json.dumps({name: 1 for name in _tensor_names(paths["hf_shards"])}))
        beside = Path(sys.executable).with_name("accelerate")  # the venv's, also when it is not activated
        accelerate = str(beside) if beside.exists() else shutil.which("accelerate") or "accelerate"
        _, tiny = build_gpt2("tiny", self.work, ("dcp",))
        for _ in range(self.repeats):
            for cache in self.caches:
                self.run(("774m", "dcp", cache, "accelerate merge-weights"),
                         [accelerate, "merge-weights", str(paths["dcp"]), str(self.out / "merged")],
                         cache=cache, inputs=[paths["dcp"]])
                self.run(("774m", "dcp", cache, "accelerate merge-weights, tiny"),
                         [accelerate, "merge-weights", str(tiny["dcp"]), str(self.out / "merged")],
                         cache=cache, inputs=[tiny["dcp"]])
                for threads in (1, 2, 4):
                    self.run(("774m", "hf_shards", cache, f"torch consolidate, {threads} threads"),
                             [sys.executable, "-c", CONSOLIDATE, str(paths["hf_shards"]), str(self.out / "merged"),
                              str(mapping), str(threads)], cache=cache, inputs=[paths["hf_shards"]])

    def workers(self, base: Path, pth: Path) -> None:
        for _ in range(self.repeats):
            for workers in (1, 2, 4):
                self.run(("774m", "pth", "warm", f"write_workers={workers}"),
                         lmtk(pth, base, self.out, "convert.max_shard_size=1GB", f"convert.write_workers={workers}"),
                         cache="warm", inputs=[pth])

    def lora(self, base: Path, pth: Path, lora: dict[str, Path]) -> None:
        """Merged LoRA against the plain conversion of the same model, interleaved, with the same fixed cost."""
        tiny, tiny_base = TINY["pth"]
        self.samples[("774m", "lora", "bytes")] = [Sample(float(_bytes(pth)))]
        methods = {"merged, base in the checkpoint": (lmtk(lora["whole"], base, self.out), [lora["whole"]]),
                   "merged, base from convert.base_model": (lmtk(lora["adapter"], lora["base"], self.out),
                                                            [lora["adapter"], lora["base"]]),
                   "plain .pth": (lmtk(pth, base, self.out), [pth]),
                   "tiny": (lmtk(tiny, tiny_base, self.out), [tiny])}
        for command, _ in methods.values():
            measure(command, env=self.env, cache="warm", inputs=[])  # fill the caches
        order = list(methods)
        for repeat in range(self.repeats):
            # Each repeat starts at another method, so none always follows the same predecessor's freed blocks.
            turn = order[repeat % len(order):] + order[:repeat % len(order)]
            for cache in self.caches:
                for method in turn:
                    command, inputs = methods[method]
                    self.run(("774m", "lora", cache, method), command, cache=cache, inputs=inputs)

    def sweeps(self, base: Path, pth: Path) -> None:
        folder = self.work / "sweep-inputs"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for i in range(10):
            (folder / f"step-{i:02d}.pth").symlink_to(pth)
        sweep = ["--multirun", "sweep=checkpoints", f"sweep.glob={folder}/step-*.pth", f"convert.base_model={base}",
                 f"convert.output_dir={self.out}", f"hydra.sweep.dir={self.out}/sweep", "convert.overwrite=true"]
        measure(lmtk(pth, base, self.out), env=self.env, cache="warm", inputs=[])  # fill the caches
        for _ in range(self.repeats):
            self.run(("124m", "pth", "warm", "one conversion"), lmtk(pth, base, self.out), cache="warm", inputs=[pth])
            self.run(("124m", "pth", "warm", "multirun of 10, basic launcher"),
                     [sys.executable, "-m", "lmtk", *sweep], cache="warm", inputs=[pth])
            self.run(("124m", "pth", "warm", "multirun of 10, joblib n_jobs=2"),
                     [sys.executable, "-m", "lmtk", *sweep, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                     cache="warm", inputs=[pth])
            ten = ["sh", "-c", " && ".join(" ".join(f"'{a}'" for a in lmtk(folder / f"step-{i:02d}.pth", base, self.out))
                                           for i in range(10))]
            self.run(("124m", "pth", "warm", "10 separate runs"), ten, cache="warm", inputs=[pth])
        tiny, tiny_base = TINY["pth"]
        for _ in range(self.repeats):
            self.run(("124m", "pth", "warm", "tiny"), lmtk(tiny, tiny_base, self.out), cache="warm", inputs=[tiny])
        self.samples[("124m", "pth", "bytes")] = [Sample(float(_bytes(pth)))]


def _tensor_names(folder: Path) -> list[str]:
    names = set()
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            names |= {k for k in json.loads(f.read(length)) if k != "__metadata__"}
    return sorted(names)


# -- report --------------------------------------------------------------------------------------------


def _med(runs: list[Sample], attr: str = "seconds") -> float:
    return statistics.median(getattr(s, attr) for s in runs)


def _spread(runs: list[Sample]) -> str:
    return f"{min(s.seconds for s in runs):.2f}-{max(s.seconds for s in runs):.2f}"


def _mib(runs: list[Sample], attr: str) -> str:
    return f"{max(getattr(s, attr) for s in runs) / 2**20:.0f}"


def _cores(runs: list[Sample]) -> str:
    return f"{statistics.median(s.cpu / s.seconds for s in runs):.2f}"


def report(samples: dict[tuple[str, ...], list[Sample]]) -> str:
    counts = ", ".join(sorted({f"{len(v)} at {k[0]}" for k, v in samples.items() if len(k) == 4}))
    lines = [
        "# lmtk conversion benchmark", "",
        f"Machine: {machine()}. Median of the interleaved runs of each row ({counts}), each a whole process "
        "(start-up included); min-max in brackets. cold: page cache dropped before every run; warm: inputs read into the "
        "cache first. Fixed: the same route on a tiny checkpoint. Marginal: the rest, against cp + fsync of the "
        "same bytes (the floor: lmtk fsyncs what it writes). Peak anon: memory the process holds (not the page "
        "cache behind its memory-mapped inputs); dirty: the machine's dirty + writeback page cache above its "
        "level at the start; cores: CPU time / wall time.", "",
        "## Every route", "",
        "| size | route | cache | GB | lmtk (s) | fixed (s) | marginal (s) | cp + fsync (s) | marginal / floor "
        "| peak anon (MiB) | peak RSS (MiB) | peak dirty (MiB) | cores |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in [k for k in samples if len(k) == 4 and k[3] == "lmtk"]:
        size, route, cache, _ = key
        runs, tiny, floor = samples[key], samples[(size, route, cache, "tiny")], samples[(size, route, cache, "floor")]
        marginal = _med(runs) - _med(tiny)
        lines.append(
            f"| {size} | {route} | {cache} | {samples[(size, route, 'bytes')][0].seconds / 1e9:.2f} | "
            f"{_med(runs):.2f} [{_spread(runs)}] | {_med(tiny):.2f} | {marginal:.2f} | {_med(floor):.2f} "
            f"[{_spread(floor)}] | **{marginal / _med(floor):.2f}** | {_mib(runs, 'peak_anon')} | "
            f"{_mib(runs, 'peak_rss')} | {_mib(runs, 'peak_dirty')} | {_cores(runs)} |")
    lines += _lora(samples)
    others = [k for k in samples if len(k) == 4 and k[3] not in ("lmtk", "tiny", "floor")
              and not k[3].endswith(", tiny") and k[1] != "lora"]
    if others:
        lines += ["", "## Against other tools, write workers, sweeps", "",
                  "| size | route | cache | method | wall (s) | vs lmtk | peak anon (MiB) | cores |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for key in others:
            size, route, cache, method = key
            ours = samples.get((size, route, cache, "lmtk")) or samples.get((size, route, cache, "one conversion"))
            versus = f"{_med(samples[key]) / _med(ours):.2f}x" if ours and "multirun" not in method else ""
            lines.append(f"| {size} | {route} | {cache} | {method} | {_med(samples[key]):.2f} [{_spread(samples[key])}] | "
                         f"{versus} | {_mib(samples[key], 'peak_anon')} | {_cores(samples[key])} |")
    if ("124m", "pth", "warm", "multirun of 10, basic launcher") in samples:
        gb = samples[("124m", "pth", "bytes")][0].seconds / 1e9
        fixed = _med(samples[("124m", "pth", "warm", "tiny")])
        one = (_med(samples[("124m", "pth", "warm", "one conversion")]) - fixed) / gb
        lines += ["", "Sweeps, marginal seconds per GB (total minus one start-up, over the bytes): one conversion "
                  f"{one:.2f}"]
        for method in ("multirun of 10, basic launcher", "multirun of 10, joblib n_jobs=2", "10 separate runs"):
            per_gb = (_med(samples[("124m", "pth", "warm", method)]) - fixed) / (10 * gb)
            lines[-1] += f"; {method} {per_gb:.2f}"
        lines[-1] += "."
    lines += _against_accelerate(samples)
    return "\n".join(lines) + "\n"


def _lora(samples: dict[tuple[str, ...], list[Sample]]) -> list[str]:
    """Merged LoRA: marginal cost (the tiny run subtracted) over the plain conversion's, and memory."""
    lines = []
    for cache in ("warm", "cold"):
        key = ("774m", "lora", cache)
        if (*key, "plain .pth") not in samples:
            continue
        fixed, plain = _med(samples[(*key, "tiny")]), samples[(*key, "plain .pth")]
        if not lines:
            lines += ["", "## LoRA merged (774M, r 16 on attention and MLP, peft's names)", "",
                      "| cache | method | wall (s) | marginal (s) | marginal / plain | peak anon (MiB) | cores |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for method in ("plain .pth", "merged, base in the checkpoint", "merged, base from convert.base_model"):
            runs = samples[(*key, method)]
            ratio = (_med(runs) - fixed) / (_med(plain) - fixed)
            lines.append(f"| {cache} | {method} | {_med(runs):.2f} [{_spread(runs)}] | {_med(runs) - fixed:.2f} | "
                         f"**{ratio:.2f}** | {_mib(runs, 'peak_anon')} | {_cores(runs)} |")
    return lines


def _against_accelerate(samples: dict[tuple[str, ...], list[Sample]]) -> list[str]:
    """DCP: lmtk over accelerate merge-weights, whole runs and start-up excluded, and the copy floor's own ratio."""
    lines = []
    for cache in ("warm", "cold"):
        key = ("774m", "dcp", cache)
        names = ("lmtk", "tiny", "floor", "accelerate merge-weights", "accelerate merge-weights, tiny")
        if not all((*key, n) in samples for n in names):
            continue
        ours, our_fixed, floor, theirs, their_fixed = (_med(samples[(*key, n)]) for n in names)
        if not lines:
            lines += ["", "DCP against accelerate merge-weights (774M): lmtk's time over accelerate's for whole runs, "
                      "for the bytes alone (each tool's run on a tiny DCP checkpoint subtracted), and cp + fsync of "
                      "the same bytes over accelerate's whole run (what any tool that writes them durably needs)."]
        lines.append(f"- {cache}: whole {ours / theirs:.2f}x ({ours:.2f} s / {theirs:.2f} s); bytes alone "
                     f"{(ours - our_fixed) / (theirs - their_fixed):.2f}x ({ours - our_fixed:.2f} s / "
                     f"{theirs - their_fixed:.2f} s; start-up {our_fixed:.2f} s / {their_fixed:.2f} s); "
                     f"cp + fsync {floor / theirs:.2f}x.")
    return lines


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch
    import transformers

    return (f"{cpu}, {os.cpu_count()} cores, {_meminfo('MemTotal') / 2**30:.0f} GiB RAM; Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


def plot(samples: dict[tuple[str, ...], list[Sample]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in samples if len(k) == 4 and k[3] == "lmtk"]
    labels = [f"{s} {r}\n{c}" for s, r, c, _ in keys]
    ratios = [(_med(samples[k]) - _med(samples[(*k[:3], "tiny")])) / _med(samples[(*k[:3], "floor")]) for k in keys]
    anon = [max(s.peak_anon for s in samples[k]) / 2**20 for k in keys]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    left.bar(range(len(keys)), ratios)
    left.axhline(1.0, color="gray", linestyle="--")
    left.set_title("marginal cost / (cp + fsync of the same bytes)")
    right.bar(range(len(keys)), anon)
    right.axhline(256, color="gray", linestyle="--")
    right.set_title("peak anonymous memory (MiB)")
    for ax in (left, right):
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.suptitle("lmtk: FSDP checkpoint -> HuggingFace folder (2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_save-7b":
        _save_7b(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="774m,7b")
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--sections", default="routes,baselines,workers,lora,sweeps")
    parser.add_argument("--cache", default="warm,cold", help="warm, cold (root) or both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmtk-bench"))
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--keep-7b", action="store_true", help="keep the 7B checkpoints (about 54 GB) for a rerun")
    parser.add_argument("--resume", action="store_true", help="keep the samples of a run that stopped, take the rest")
    args = parser.parse_args()
    sizes, routes, sections = args.sizes.split(","), tuple(args.routes.split(",")), args.sections.split(",")
    bench = Bench(args.work, args.repeats, args.cache.split(","), resume=args.resume)
    if "774m" in sizes:
        base, paths = build_gpt2("774m", args.work, ROUTES if {"routes", "baselines"} & set(sections) else ("pth",))
        if "routes" in sections:
            for route in routes:
                bench.routes("774m", route, base, paths[route])
        if "baselines" in sections:
            bench.baselines(base, paths)
        if "workers" in sections:
            bench.workers(base, paths["pth"])
        if "lora" in sections:
            bench.lora(base, paths["pth"], build_lora(args.work, base, paths["pth"]))
    if "7b" in sizes and "routes" in sections:
        for route in routes:  # one at a time: each is 13.5 GB
            keys = [("7b", route, c, m) for c in bench.caches for m in ("lmtk", "tiny", "floor")]
            if bench.done(*keys):
                continue
            base, path = build_7b(route, args.work)
            bench.routes("7b", route, base, path)
            if not args.keep_7b:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    if "sweeps" in sections:
        base, paths = build_gpt2("124m", args.work, ("pth",))
        bench.sweeps(base, paths["pth"])
    table = report(bench.samples)
    (args.out / "results.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps(
        {" | ".join(k): [s.__dict__ for s in v] for k, v in bench.samples.items()}, indent=1))
    plot(bench.samples, args.out / "results.png")
    print(table)


if __name__ == "__main__":
    main()
