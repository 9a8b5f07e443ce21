"""Key normalisation: pure functions over names."""

from __future__ import annotations

import pytest

from lmtk import keys

KNOWN = {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "lm_head.weight", "model.module.weight"}


@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        ("transformer.wte.weight", "transformer.wte.weight"),
        ("_orig_mod.transformer.wte.weight", "transformer.wte.weight"),
        ("module.transformer.wte.weight", "transformer.wte.weight"),
        ("_fsdp_wrapped_module.transformer.h.0._fsdp_wrapped_module.attn.c_attn.weight",
         "transformer.h.0.attn.c_attn.weight"),
        ("transformer.h.0._checkpoint_wrapped_module.attn.c_attn.weight", "transformer.h.0.attn.c_attn.weight"),
        ("module._orig_mod.lm_head.weight", "lm_head.weight"),
        ("model.lm_head.weight", "lm_head.weight"),  # Lightning's attribute name
        ("wte.weight", "transformer.wte.weight"),  # a base model saved without its head class
        ("model.module.weight", "model.module.weight"),  # a real submodule named `module` is kept
        ("optimizer.state.0.exp_avg", None),
    ],
)
def test_match(saved: str, expected: str | None) -> None:
    assert keys.match(saved, KNOWN, base_prefix="transformer") == expected


def test_describe_renames_counts_what_was_removed() -> None:
    text = keys.describe_renames({"_orig_mod.a.b": "a.b", "_orig_mod.module.c": "c"})
    assert "-'_orig_mod.' x2" in text and "-'module.' x1" in text
