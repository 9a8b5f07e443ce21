"""Session fixtures: real FSDP2 checkpoints, made once per test session on CPU processes (gloo)."""

from __future__ import annotations

import os

import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["LMTK_CACHE"] = tempfile.mkdtemp(prefix="lmtk-cache-")  # this session's architecture cache

import hashlib
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from helpers import FIXTURES, Convert, FsdpRun, base_of, run_lmtk
from s3server import S3Server, start_s3_server
from lmtk.synthetic import LAYOUTS, make_base_folder, save_checkpoints, save_fsdp1_checkpoints


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say plainly whether the SLURM tests ran against a live cluster (CI must show they did)."""
    outcomes = [(report.outcome, report.when) for reports in terminalreporter.stats.values() for report in reports
                if isinstance(report, pytest.TestReport) and report.nodeid.startswith("tests/test_slurm.py")
                and (report.when == "call" or report.outcome != "passed")]
    if outcomes:
        counts = {o: sum(outcome == o for outcome, _ in outcomes) for o in ("passed", "failed", "skipped")}
        where = os.environ.get("SLURM_CONF") or "no cluster"
        terminalreporter.write_line(f"SLURM tests: {counts['passed']} passed, {counts['failed']} failed, "
                                    f"{counts['skipped']} skipped (cluster: {where})")


def _with_one_retry(make: Callable[[], Path], folder: Path) -> Path:
    """Make FSDP fixtures again once when a rank was killed by a signal: on 2 cores, gloo's threads now and then
    abort a rank at exit ("terminate called without an active exception") after a save that is sound."""
    from torch.multiprocessing.spawn import ProcessExitedException

    try:
        return make()
    except ProcessExitedException as e:
        if not e.signal_name:
            raise
        warnings.warn(f"FSDP fixture: a rank ended with {e.signal_name}; made again")
        shutil.rmtree(folder, ignore_errors=True)
        return make()


@pytest.fixture(scope="session")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., FsdpRun]]:
    """``fsdp("gpt2")`` or ``fsdp("llama", world_size=3)``: every layout of one real FSDP2 run.

    At the end of the session every checkpoint must still be byte for byte what FSDP wrote.
    """
    runs: dict[tuple[str, int], FsdpRun] = {}
    sums: dict[Path, dict[str, str]] = {}

    def get(family: str, world_size: int = 2) -> FsdpRun:
        key = (family, world_size)
        if key not in runs:
            root = tmp_path_factory.mktemp(f"fsdp-{family}-ws{world_size}")
            base = make_base_folder(root / "base", family)
            layouts = LAYOUTS if world_size == 2 else ("dcp", "ranks", "hf_shards")
            checkpoints = _with_one_retry(lambda: save_checkpoints(
                base, root / "checkpoints", reference=root / "reference.pt", world_size=world_size, layouts=layouts
            ), root / "checkpoints")
            runs[key] = FsdpRun(base=base, checkpoints=checkpoints, reference=root / "reference.pt")
            sums[checkpoints] = _checksums(checkpoints)
        return runs[key]

    yield get
    for folder, before in sums.items():
        assert _checksums(folder) == before, f"an input under {folder} changed"


@pytest.fixture(scope="session")
def fsdp1(tmp_path_factory: pytest.TempPathFactory) -> FsdpRun:
    """Real FSDP1 (FullyShardedDataParallel on CPU, gloo) GPT-2 checkpoints: see save_fsdp1_checkpoints."""
    root = tmp_path_factory.mktemp("fsdp1-gpt2")
    base = make_base_folder(root / "base", "gpt2")
    checkpoints = save_fsdp1_checkpoints(base, root / "checkpoints", reference=root / "reference.pt")
    return FsdpRun(base=base, checkpoints=checkpoints, reference=root / "reference.pt")


@pytest.fixture
def gpt2(fsdp: Callable[..., FsdpRun]) -> FsdpRun:
    return fsdp("gpt2")


@pytest.fixture
def llama(fsdp: Callable[..., FsdpRun]) -> FsdpRun:
    return fsdp("llama")


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Convert:
    """``converted(name)``: ``python -m lmtk`` over the fixture's run directory, once per session."""
    done: dict[tuple[str, bool], tuple[subprocess.CompletedProcess[str], Path, Path]] = {}

    def get(name: str, *, with_base: bool = True) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
        if (name, with_base) not in done:
            work = tmp_path_factory.mktemp(name)
            base = [f"convert.base_model={base_of(name)}"] if with_base else []
            proc = run_lmtk("task=convert", f"convert.checkpoint_path={FIXTURES / name / 'run'}", *base,
                            f"convert.output_dir={work / 'out'}", f"hydra.run.dir={work / 'run'}", cwd=work)
            done[name, with_base] = proc, work / "out", work / "run"
        return done[name, with_base]

    return get


@pytest.fixture(scope="session")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A ~300 MB GPT-2 state dict: big enough to kill its conversion mid-write."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("big")
    base = make_base_folder(root / "base", "gpt2", vocab_size=60000, n_embd=1024, n_head=8)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    state = {k: torch.full(v.shape, 0.5, dtype=v.dtype) for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    torch.save(state, root / "big.pth")
    return base, root / "big.pth"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One real S3 server (SeaweedFS) for the session, on 127.0.0.1 with its own ports and data dir."""
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()
