"""Rebuild the bundled example: ``python examples/make_example.py`` (about 15 s on 2 cores).

A tiny GPT-2 (tokenizer trained on the fly) is sharded with FSDP2 over 2 CPU processes, takes one
optimizer step, and is saved as a bare full state dict, inside a training dict, and with the
``_orig_mod.`` prefix of a compiled model, plus a DCP directory and per-rank DTensor shards.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lmtk.synthetic import make_base_folder, save_checkpoints

HERE = Path(__file__).resolve().parent
LAYOUTS = ("bare", "wrapped", "prefixed", "dcp", "ranks")

if __name__ == "__main__":
    for name in ("tiny-gpt2", "checkpoints"):
        shutil.rmtree(HERE / name, ignore_errors=True)
    base = make_base_folder(HERE / "tiny-gpt2", "gpt2")
    save_checkpoints(base, HERE / "checkpoints", reference=HERE / "tiny-gpt2" / "reference.pt", layouts=LAYOUTS)
    for path in sorted((HERE / "checkpoints").iterdir()):
        print(path.relative_to(HERE))
