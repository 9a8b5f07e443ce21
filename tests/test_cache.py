"""The architecture cache: a warm run skips the model code, a broken cache entry is rebuilt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from helpers import FsdpRun, assert_matches_reference, convert

RUN_AND_LIST_MODULES = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from helpers import convert
[result] = convert(Path({tmp!r}), checkpoint=Path({ckpt!r}), base=Path({base!r}), out=Path({out!r}))
print(json.dumps({{"status": result.status, "modeling": sorted(m for m in sys.modules if ".modeling_" in m)}}))
"""


def _convert_in_fresh_process(gpt2: FsdpRun, tmp_path: Path, out: Path, cache: Path) -> dict:
    code = RUN_AND_LIST_MODULES.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), ckpt=str(gpt2["bare"]),
                                       base=str(gpt2.base), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LMTK_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_warm_run_never_imports_the_model_code(gpt2: FsdpRun, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold = _convert_in_fresh_process(gpt2, tmp_path, tmp_path / "cold", cache)
    assert cold["status"] == "ok" and "transformers.models.gpt2.modeling_gpt2" in cold["modeling"]
    assert len(list((cache / "architectures").glob("*.json"))) == 1
    warm = _convert_in_fresh_process(gpt2, tmp_path, tmp_path / "warm", cache)
    assert warm["status"] == "ok" and warm["modeling"] == []
    a, b = load_file(tmp_path / "cold" / "bare" / "model.safetensors"), load_file(tmp_path / "warm" / "bare" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert_matches_reference(tmp_path / "warm" / "bare", gpt2.reference)


def test_a_broken_cache_entry_is_rebuilt(gpt2: FsdpRun, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMTK_CACHE", str(tmp_path / "cache"))
    convert(tmp_path, checkpoint=gpt2["bare"], base=gpt2.base, out=tmp_path / "first")
    [entry] = (tmp_path / "cache" / "architectures").glob("*.json")
    entry.write_text('{"class_name": "GPT2LMHeadModel", "disk": {"x": [[1], "not_a_dtype"]}')
    [result] = convert(tmp_path, checkpoint=gpt2["bare"], base=gpt2.base, out=tmp_path / "second")
    assert result.status == "ok", result.error
    assert json.loads(entry.read_text())["class_name"] == "GPT2LMHeadModel"
    assert_matches_reference(tmp_path / "second" / "bare", gpt2.reference)
