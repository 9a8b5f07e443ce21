"""Wall time and memory of lmtk against cp, ``accelerate merge-weights`` and load + save_pretrained.

    pip install -e ".[bench]"
    python benchmarks/convert_speed.py --sizes 124m,774m --repeats 3 --work /tmp/lmtk-bench

For each size, a GPT-2-shaped model is sharded by real FSDP2 on 2 CPU processes (gloo) and saved as
a full state dict (.pth) and as Accelerate's DCP folder. Every method then runs as its own process,
interleaved, ``--repeats`` times; a sampler reads /proc every few ms for the peak resident memory
(RSS) and peak anonymous memory (RssAnon: heap, not the page cache behind memory-mapped files) of
the process tree. Results: ``benchmarks/results.md`` and ``benchmarks/results.png``.
With ``--cold`` (root) the page cache is dropped before every run; otherwise inputs stay cached.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {  # GPT-2 family shapes
    "124m": dict(n_embd=768, n_layer=12, n_head=12),
    "355m": dict(n_embd=1024, n_layer=24, n_head=16),
    "774m": dict(n_embd=1280, n_layer=36, n_head=20),
}
SAVE_PRETRAINED = """
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
base, ckpt, out = sys.argv[1:]
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
model.load_state_dict(torch.load(ckpt, weights_only=True), strict=False)
model.save_pretrained(out)
"""


@dataclass
class Sample:
    seconds: float
    peak_rss: int
    peak_anon: int


def build(size: str, work: Path) -> tuple[Path, Path, Path]:
    from lmtk.synthetic import make_base_folder, save_checkpoints

    root = work / size
    base, checkpoints = root / "base", root / "checkpoints"
    if not (checkpoints / "bare.pth").exists():
        shutil.rmtree(root, ignore_errors=True)
        make_base_folder(base, "gpt2", vocab_size=50257, n_positions=1024, **SIZES[size])
        save_checkpoints(base, checkpoints, reference=root / "reference.pt", train=False,
                         layouts=("bare", "pytorch_model_fsdp_0"))
    return base, checkpoints / "bare.pth", checkpoints / "pytorch_model_fsdp_0"


def _memory(pid: int) -> tuple[int, int]:
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


def measure(command: list[str], *, env: dict[str, str]) -> Sample:
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0, 0]

    def sample() -> None:
        while proc.poll() is None:
            rss, anon = _memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - started
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{err.decode()[-3000:]}")
    return Sample(seconds, peak[0], peak[1])


def methods(base: Path, pth: Path, dcp: Path, out: Path) -> dict[str, list[str]]:
    py = sys.executable
    lmtk = [py, "-m", "lmtk", f"convert.base_model={base}", f"convert.output_dir={out}",
            f"hydra.run.dir={out}/run", "convert.overwrite=true"]
    return {
        "cp .pth": ["cp", str(pth), str(out / "copy.pth")],
        "cp .pth + sync": ["sh", "-c", f"cp {pth} {out}/copy.pth && sync {out}/copy.pth"],
        "cp -r DCP": ["cp", "-r", str(dcp), str(out / "copy-dcp")],
        "lmtk .pth": [*lmtk, f"convert.checkpoint_path={pth}"],
        # a base model seen for the first time: the architecture is built from the model code
        "lmtk .pth, first run on this base": ["env", f"LMTK_CACHE={out}/empty-cache", *lmtk,
                                              f"convert.checkpoint_path={pth}"],
        "lmtk DCP": [*lmtk, f"convert.checkpoint_path={dcp}"],
        "accelerate merge-weights DCP": [shutil.which("accelerate") or "accelerate", "merge-weights", str(dcp),
                                         str(out / "accelerate")],
        "load_state_dict + save_pretrained .pth": [py, "-c", SAVE_PRETRAINED, str(base), str(pth), str(out / "hf")],
    }


def drop_caches() -> bool:
    """Start each run with the inputs on disk, not in memory (root only)."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def run(size: str, work: Path, repeats: int, *, cold: bool) -> dict[str, list[Sample]]:
    base, pth, dcp = build(size, work)
    out = work / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMTK_CACHE": str(work / "lmtk-cache")}
    samples: dict[str, list[Sample]] = {}
    # Untimed: fill lmtk's architecture cache, so "lmtk .pth" and "lmtk DCP" are warm from rep 1.
    out.mkdir(parents=True, exist_ok=True)
    measure(methods(base, pth, dcp, out)["lmtk .pth"], env=env)
    for rep in range(repeats):
        for name, command in methods(base, pth, dcp, out).items():  # interleaved: each rep runs every method
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            if cold and not drop_caches():
                raise SystemExit("--cold needs root (writing /proc/sys/vm/drop_caches)")
            samples.setdefault(name, []).append(measure(command, env=env))
            s = samples[name][-1]
            print(f"{size} rep {rep + 1} {name}: {s.seconds:.2f}s rss {s.peak_rss / 2**20:.0f} MiB "
                  f"anon {s.peak_anon / 2**20:.0f} MiB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return samples


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) / 2**20
    import torch
    import transformers

    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def report(results: dict[str, dict[str, list[Sample]]], *, repeats: int, cold: bool) -> str:
    cache = ("page cache dropped before every run (inputs read from disk)" if cold
             else "files warm in the page cache")
    lines = [
        "# lmtk conversion benchmark", "",
        f"Machine: {machine()}.", f"Median of {repeats} interleaved runs per method, whole process including "
        f"start-up; {cache}. lmtk fsyncs what it writes; plain cp does not (see cp + sync). lmtk caches "
        "each base model's architecture (names, shapes) after its first run; the 'first run on this base' row "
        "builds it from the model code. Peak anonymous memory (RssAnon) excludes the page cache behind "
        "memory-mapped files.", "",
        "| model | method | median wall (s) | x cp | peak RSS (MiB) | peak anon (MiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for size, samples in results.items():
        floor = {".pth": _median(samples["cp .pth"]), "DCP": _median(samples["cp -r DCP"])}
        for name, runs in samples.items():
            wall = _median(runs)
            kind = "DCP" if "DCP" in name else ".pth"
            lines.append(f"| {size} | {name} | {wall:.2f} | {wall / floor[kind]:.2f} | "
                         f"{max(s.peak_rss for s in runs) / 2**20:.0f} | {max(s.peak_anon for s in runs) / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def _median(runs: list[Sample]) -> float:
    return statistics.median(s.seconds for s in runs)


def plot(results: dict[str, dict[str, list[Sample]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (wall_ax, mem_ax) = plt.subplots(1, 2, figsize=(13, 5))
    names = list(next(iter(results.values())))
    width = 0.8 / len(results)
    for i, (size, samples) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(names))]
        wall_ax.bar(xs, [_median(samples[n]) for n in names], width, label=size)
        mem_ax.bar(xs, [max(s.peak_anon for s in samples[n]) / 2**20 for n in names], width, label=size)
    for ax, title in ((wall_ax, "median wall time (s)"), (mem_ax, "peak anonymous memory (MiB)")):
        ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("FSDP checkpoint -> HuggingFace folder (GPT-2 shapes, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="124m,774m", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmtk-bench"))
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    args = parser.parse_args()
    results = {size: run(size, args.work, args.repeats, cold=args.cold) for size in args.sizes.split(",")}
    table = report(results, repeats=args.repeats, cold=args.cold)
    (args.out / "results.md").write_text(table)
    plot(results, args.out / "results.png")
    print(table)


if __name__ == "__main__":
    main()
