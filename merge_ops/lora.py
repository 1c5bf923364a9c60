"""PEFT LoRA adapters as merge sources: ``BASE+ADAPTER`` is the base model with each adapted weight ``W + scale * B @ A``.

The adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's format: tensors named
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, ``lora_embedding_A`` / ``lora_embedding_B`` for
embeddings, and whole tensors for ``modules_to_save``). Only headers are read when planning; the engine computes
each adapted weight (or each row block of it) while it streams, in float32, rounded back to the stored dtype as
PEFT's ``merge_and_unload`` leaves it.

``scale`` is ``lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``), with ``r`` the module's rank (its ``lora_A``
rows, which is what ``rank_pattern`` sets) and ``lora_alpha`` from ``alpha_pattern`` where a key matches the module.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from safetensors import safe_open

from merge_ops.errors import ModelNotFoundError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "use_qalora": "QALoRA", "target_parameters": "target_parameters"}
"""Adapter options that change the arithmetic beyond ``W + scale * B @ A``: refused, by name."""
CHUNK_ELEMENTS = 1 << 20
"""Rows of an update computed at once: float32 working memory of ``apply_lora``."""


class LoraTerm(BaseModel):
    """What an adapter adds to one base tensor: ``scale * B @ A`` (transposed for embeddings and fan_in_fan_out)."""

    file: str
    a: str
    b: str
    scale: float
    transpose: bool


class AdapterPatch(BaseModel):
    """An adapter's effect on its base, by base tensor name: terms to add, and tensors it replaces outright."""

    terms: dict[str, LoraTerm]
    replaced: dict[str, tuple[str, str, str]]
    """Base tensor -> (dtype, file, name in that file): ``modules_to_save`` and saved base layers."""


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def read_adapter(key: str, folder: Path, base_tensors: dict[str, tuple[int, ...]]) -> AdapterPatch:
    """The patch a PEFT LoRA adapter folder makes to a base whose tensors have the shapes ``base_tensors``.

    Raises:
        ModelNotFoundError: not an adapter folder, an adapter type or option mergeflow does not apply (named), or
            a module the base lacks or whose shape does not fit.
    """
    folder = Path(folder).resolve()
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise ModelNotFoundError(key, f"{folder} is not a PEFT adapter folder ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} are needed)")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelNotFoundError(key, f"{config['peft_type']} adapters are not supported; mergeflow applies LoRA adapters only")
    used = [name for option, name in UNSUPPORTED.items() if config.get(option)]
    if used:
        raise ModelNotFoundError(key, f"the adapter uses {', '.join(used)}, which mergeflow does not apply; merge it with PEFT's merge_and_unload first")
    file = str(folder / ADAPTER_WEIGHTS)
    with safe_open(file, framework="pt") as handle:
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        dtypes = {name: handle.get_slice(name).get_dtype() for name in shapes}
    rslora, alpha, fan_in_fan_out = bool(config.get("use_rslora")), float(config.get("lora_alpha", 8)), bool(config.get("fan_in_fan_out"))
    terms: dict[str, LoraTerm] = {}
    replaced: dict[str, tuple[str, str, str]] = {}
    problems = []
    for name, shape in shapes.items():
        local = name.removeprefix(PREFIX)
        for a_suffix, b_suffix, embedding in ((".lora_A.weight", ".lora_B.weight", False), (".lora_embedding_A", ".lora_embedding_B", True)):
            if local.endswith(a_suffix):
                module = local.removesuffix(a_suffix)
                target, b = f"{module}.weight", name.removesuffix(a_suffix.removeprefix(".")) + b_suffix.removeprefix(".")
                rank = shape[0]
                transpose = embedding or fan_in_fan_out
                delta = (shapes[b][0], shape[1]) if b in shapes else None
                expected = base_tensors.get(target)
                if delta is None or expected is None or (delta[::-1] if transpose else delta) != expected:
                    problems.append(f"{module}: the adapter's update {delta} does not fit the base's {target} {expected}")
                    break
                module_alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha))
                scale = module_alpha / (math.sqrt(rank) if rslora else rank)
                terms[target] = LoraTerm(file=file, a=name, b=b, scale=scale, transpose=transpose)
                break
        else:
            if ".lora_" in local:
                continue  # the B half of a pair, read with its A
            target = local.replace(".base_layer.", ".")
            if base_tensors.get(target) != shape:
                problems.append(f"{local}: replaces {target}, but the base has {base_tensors.get(target)}, not {shape}")
                continue
            replaced[target] = (dtypes[name], file, name)
    if problems:
        raise ModelNotFoundError(key, "the adapter does not fit its base: " + "; ".join(problems))
    return AdapterPatch(terms=terms, replaced=replaced)


def apply_lora(weight: torch.Tensor, term: LoraTerm, factors: tuple[torch.Tensor, torch.Tensor], rows: tuple[int, int] | None) -> torch.Tensor:
    """``weight`` (all rows, or rows ``[start, end)`` of the base tensor) plus the adapter's term, in float32, rounded to
    ``weight``'s dtype.

    ``factors`` are the term's A and B as stored (whole tensors: the caller keeps them loaded across a tensor's row
    blocks). The update is computed ``CHUNK_ELEMENTS`` at a time, so a whole large tensor needs no float32 copy.
    """
    a, b = factors
    first = rows[0] if rows else 0
    out = torch.empty_like(weight)
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(weight.shape[1:])))
    for start in range(0, weight.shape[0], step):
        end = min(start + step, weight.shape[0])
        lo, hi = first + start, first + end
        delta = (b.float() @ a[:, lo:hi].float()).T if term.transpose else b[lo:hi].float() @ a.float()
        out[start:end] = delta.mul_(term.scale).add_(weight[start:end].float())
    return out
