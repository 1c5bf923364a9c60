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

import math
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from merge_ops.errors import ModelNotFoundError
from merge_ops.model_files import folder_file, read_json_object, read_safetensors_header
from merge_ops.safetensors_io import load_tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "use_qalora": "QALoRA", "target_parameters": "target_parameters"}
"""Adapter options that change the arithmetic beyond ``W + scale * B @ A``: refused, by name."""
CHUNK_ELEMENTS = 1 << 20
"""Rows of an update computed at once: float32 working memory of ``apply_lora``."""


class LoraTerm(BaseModel):
    """What an adapter adds to one base tensor: ``scale * B @ A`` (transposed for embeddings and fan_in_fan_out).

    ``file`` is the adapter's weights file: relative to the adapter folder in headers, absolute in a plan."""

    file: str
    a: str
    b: str
    scale: float
    transpose: bool


class AdapterPatch(BaseModel):
    """An adapter's effect on its base, by base tensor name: terms to add, tensors it replaces outright, and what
    does not fit the base."""

    terms: dict[str, LoraTerm]
    replaced: dict[str, tuple[str, str]]
    """Base tensor -> (dtype, name in the adapter's file): ``modules_to_save`` and saved base layers."""
    problems: list[str]


class AdapterHeaders(BaseModel):
    """A PEFT LoRA adapter without its weights: adapter_config.json, its card's base_model and its tensor headers;
    ``path`` is None while it is only on the Hub."""

    key: str
    config: dict[str, Any]
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    """Tensor name -> (dtype, shape)."""
    card_base_model: list[str] = []
    path: Path | None = None

    @property
    def declared_base(self) -> str | None:
        """The base the adapter was trained on: ``base_model_name_or_path``, else its card's ``base_model``."""
        return self.config.get("base_model_name_or_path") or next(iter(self.card_base_model), None)

    @property
    def modules(self) -> dict[str, int]:
        """Adapted module -> its rank (rows of its ``lora_A``)."""
        ranks = {}
        for name, (_, shape) in self.tensors.items():
            local = name.removeprefix(PREFIX)
            for suffix in (".lora_A.weight", ".lora_embedding_A"):
                if local.endswith(suffix):
                    ranks[local.removesuffix(suffix)] = shape[0]
        return ranks

    def describe(self) -> str:
        """Rank, alpha, scale and targets, for the compatibility report."""
        ranks, alpha, rslora = self.modules, float(self.config.get("lora_alpha", 8)), bool(self.config.get("use_rslora"))
        scales = sorted({module_scale(self.config, module, rank) for module, rank in ranks.items()})
        kinds = sorted({module.rsplit(".", 1)[-1] for module in ranks})
        text = (f"r={'/'.join(map(str, sorted(set(ranks.values())))) or '-'}, lora_alpha={alpha:g}{', rsLoRA' if rslora else ''}, "
                f"scale {'/'.join(f'{s:g}' for s in scales) or '-'}, {len(ranks)} modules ({', '.join(kinds)})")
        saved = self.config.get("modules_to_save") or []
        return text + (f", modules_to_save: {', '.join(saved)}" if saved else "")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def module_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """The adapter's scale for ``module`` of rank ``rank``: ``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``), alpha from ``alpha_pattern``."""
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def read_adapter_config(key: str, folder: Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT LoRA adapter folder, checked (``check_adapter_config``).

    Raises:
        ModelNotFoundError: not an adapter folder, not LoRA, or an option in ``UNSUPPORTED`` (named).
        CorruptModelError: the config is not a JSON object, or a link to a file outside the folder.
    """
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise ModelNotFoundError(key, f"{folder} is not a PEFT adapter folder ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} are needed)")
    config = read_json_object(folder_file(folder, ADAPTER_CONFIG), f"fix or re-download the adapter's {ADAPTER_CONFIG}")
    check_adapter_config(key, config)
    return config


def check_adapter_config(key: str, config: dict[str, Any]) -> None:
    """Refuse adapter types and options that change the arithmetic beyond ``W + scale * B @ A``.

    Raises:
        ModelNotFoundError: not LoRA, or DoRA and the other options of ``UNSUPPORTED`` (named).
    """
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelNotFoundError(key, f"{config['peft_type']} adapters are not supported; mergeflow applies LoRA adapters only")
    used = [name for option, name in UNSUPPORTED.items() if config.get(option)]
    if used:
        raise ModelNotFoundError(key, f"the adapter uses {', '.join(used)}, which mergeflow does not apply; merge it with PEFT's merge_and_unload first")


def is_adapter_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a PEFT adapter (its config) rather than a model."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def read_adapter_headers(key: str, folder: Path, card_base_model: list[str] | None = None) -> AdapterHeaders:
    """adapter_config.json and tensor headers of a local PEFT adapter folder (no weights read).

    Raises:
        ModelNotFoundError: not an adapter folder, or an adapter type or option mergeflow does not apply (named).
        CorruptModelError: a corrupt config or safetensors header, or a link to a file outside the folder.
    """
    folder = Path(folder).resolve()
    config = read_adapter_config(key, folder)
    tensors = read_safetensors_header(folder_file(folder, ADAPTER_WEIGHTS))
    return AdapterHeaders(key=key, config=config, tensors=tensors, card_base_model=card_base_model or [], path=folder)


def adapter_patch(adapter: AdapterHeaders, base_tensors: dict[str, tuple[int, ...]]) -> AdapterPatch:
    """The patch ``adapter`` makes to a base whose tensors have the shapes ``base_tensors``, from headers only;
    modules the base lacks or whose shape does not fit are listed in ``problems``."""
    shapes = {name: shape for name, (_, shape) in adapter.tensors.items()}
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    terms: dict[str, LoraTerm] = {}
    replaced: dict[str, tuple[str, str]] = {}
    problems = []
    for name, shape in shapes.items():
        local = name.removeprefix(PREFIX)
        for a_suffix, b_suffix, embedding in ((".lora_A.weight", ".lora_B.weight", False), (".lora_embedding_A", ".lora_embedding_B", True)):
            if local.endswith(a_suffix):
                module = local.removesuffix(a_suffix)
                target, b = f"{module}.weight", name.removesuffix(a_suffix.removeprefix(".")) + b_suffix.removeprefix(".")
                transpose = embedding or fan_in_fan_out
                delta = (shapes[b][0], shape[1]) if b in shapes else None
                expected = base_tensors.get(target)
                if delta is None or expected is None or (delta[::-1] if transpose else delta) != expected:
                    problems.append(f"{module}: no {b} beside its lora_A" if delta is None else f"{module}: the base has no {target}" if expected is None
                                    else f"{module}: the adapter's update {delta} does not fit the base's {target} {expected}")
                    break
                terms[target] = LoraTerm(file=ADAPTER_WEIGHTS, a=name, b=b, scale=module_scale(adapter.config, module, shape[0]), transpose=transpose)
                break
        else:
            if ".lora_" in local:
                continue  # the B half of a pair, read with its A
            target = local.replace(".base_layer.", ".")
            if base_tensors.get(target) != shape:
                problems.append(f"{local}: replaces {target}, but the base has {base_tensors.get(target)}, not {shape}")
                continue
            replaced[target] = (adapter.tensors[name][0], name)
    return AdapterPatch(terms=terms, replaced=replaced, problems=problems)


def load_factors(term: LoraTerm) -> tuple[torch.Tensor, torch.Tensor]:
    """The term's A and B as stored (``term.file`` absolute, as in a plan)."""
    return load_tensor(Path(term.file), term.a), load_tensor(Path(term.file), term.b)


def apply_lora(
    weight: torch.Tensor, term: LoraTerm, factors: tuple[torch.Tensor, torch.Tensor], rows: tuple[int, int] | None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``weight`` (all rows, or rows ``[start, end)`` of the base tensor) plus the adapter's term, in float32, rounded to
    ``weight``'s dtype; returned in ``dtype`` (default: ``weight``'s), so a caller that computes in float32 gets the
    rounded values without a second conversion pass.

    ``factors`` are the term's A and B as stored (whole tensors: the caller keeps them loaded across a tensor's row
    blocks). The update is computed ``CHUNK_ELEMENTS`` at a time, so a whole large tensor needs no float32 copy.
    """
    a, b = (f.float() for f in factors)
    first = rows[0] if rows else 0
    out = torch.empty(weight.shape, dtype=dtype or weight.dtype)
    width = math.prod(weight.shape[1:])
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    size = min(step, weight.shape[0]) * width
    update, upcast = torch.empty(size), torch.empty(size)  # reused: a fresh allocation per chunk costs page faults
    rounded = torch.empty(size, dtype=weight.dtype) if weight.dtype not in (out.dtype, torch.float32) else None  # round to the stored dtype first
    for start in range(0, weight.shape[0], step):
        end = min(start + step, weight.shape[0])
        lo, hi, used = first + start, first + end, (end - start) * width
        if term.transpose:
            delta = torch.mm(b, a[:, lo:hi], out=update[:used].view(width, end - start)).T
        else:
            delta = torch.mm(b[lo:hi], a, out=update[:used].view(end - start, width))
        stored = upcast[:used].view_as(delta).copy_(weight[start:end])  # same-dtype add_ is faster than a mixed one
        result = delta.mul_(term.scale).add_(stored)
        out[start:end] = result if rounded is None else rounded[:used].view_as(result).copy_(result)
    return out
