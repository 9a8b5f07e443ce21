"""Run the written folder and the source side by side: the check that catches silent mapping bugs.

Cost: the model twice in RAM (a float32 reference built from the source tensors, and the output as
``from_pretrained`` loads it) and two forward passes over 32 tokens on the CPU; seconds for small
models, minutes and ~6x the bf16 size in RAM for 7B. ``convert.verify_max_params`` skips larger ones.

The input is text only, also for vision-language models: an image input needs the family's processor
(PIL, torchvision), which lmtk does not depend on. The result says so (``input``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from lmtk.architecture import HUB, Architecture
from lmtk.plan import Plan
from lmtk.readers.base import Reader

log = logging.getLogger(__name__)

# Largest |logit difference| allowed, as a fraction of the reference's largest |logit| (at least 1).
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 5e-2, torch.bfloat16: 1e-1}
TEXT_ONLY = "32 text tokens, no image: an image input needs the family's processor (PIL, torchvision)"


def fixed_input(vocab_size: int) -> torch.Tensor:
    return (torch.arange(32) * 7919 % vocab_size).reshape(1, 32)


def vocab_size(config: Any) -> int:
    """The vocabulary, from text_config where the config nests it (vision-language models)."""
    return int(config.get_text_config().vocab_size)


def _class(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def _is_multimodal(config: Any) -> bool:
    return config.get_text_config() is not config


def reference_logits(config: Any, reader: Reader, plan: Plan, arch: Architecture) -> torch.Tensor | None:
    """Logits of a float32 model holding the source tensors, loaded the way the training code named them."""
    if plan.naming.name == HUB and arch.converts:
        return None  # the source is in on-disk form: no reference independent of the conversion itself
    model = _class(arch.class_name)._from_config(config, dtype=torch.float32)
    state = {name: reader.read(key).to(torch.float32) for name, key in plan.matched.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= set(plan.naming.tied), (missing, unexpected)
    model.eval()
    with torch.no_grad():
        return model(input_ids=fixed_input(vocab_size(config))).logits


def verify_folder(folder: Path, reference: torch.Tensor | None, *, params: int, max_params: int,
                  label: str, class_name: str = "AutoModelForCausalLM") -> dict[str, Any]:
    """``{"passed", "max_abs_diff", "tolerance", ...}`` for ``folder`` against the reference logits."""
    if params > max_params:
        return {"passed": None, "skipped": f"{params} parameters > convert.verify_max_params={max_params}"}
    if reference is None:
        return {"passed": None, "skipped": "hub-named source of a converted architecture: no independent reference"}
    started = time.perf_counter()
    model = _class(class_name).from_pretrained(folder).eval()
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        logits = model(input_ids=fixed_input(vocab_size(model.config))).logits.to(torch.float32)
    diff = float((logits - reference).abs().max())
    tolerance = TOLERANCE.get(dtype, 1e-1) * max(1.0, float(reference.abs().max()))
    result = {"passed": diff <= tolerance, "max_abs_diff": diff, "tolerance": tolerance, "dtype": str(dtype).removeprefix("torch."),
              "seconds": round(time.perf_counter() - started, 3)}
    if _is_multimodal(model.config):
        result["input"] = TEXT_ONLY
    log.info("%s: verify %s (max |diff| %.3g, tolerance %.3g)", label, "passed" if result["passed"] else "FAILED",
             diff, tolerance)
    return result
