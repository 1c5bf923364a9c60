"""LoRA extraction: a PEFT LoRA adapter that turns BASE into (nearly) MODEL, from a truncated SVD of each task vector.

MODEL and BASE are local Hugging Face folders of the same architecture (same tensor names and shapes, checked from
the headers). Tensors are read one at a time from the mapped files. For every linear weight inside the layers (a 2-D
``*.weight``), ``D = W_model - W_base`` in float32 gets a truncated SVD, ``D ~ B @ A``, of a fixed rank or of the
smallest rank that keeps ``||D - B @ A|| / ||D||`` within a budget (see ``merge_ops.low_rank``). The adapter's scale
is 1 (``lora_alpha`` = the module's rank), so PEFT's ``merge_and_unload`` adds exactly ``B @ A``.

Outside the layers: ``--embeddings`` extracts the 2-D weights there too (embeddings as PEFT embedding adapters,
``lm_head`` as a linear one). Every other tensor that changed (norms, biases, and the embeddings/lm_head without
``--embeddings``) is reported as not captured with its relative change ``||D|| / ||W_base||``, or, with
``modules_to_save``, its module is stored whole in the adapter (PEFT ``modules_to_save``) when PEFT allows it (not a
LoRA target itself, no submodules). Tensors whose task vector is zero are skipped and listed. Nothing that differs is
dropped without a line in the report.

Projections stored as ``Conv1D`` ([in, out], GPT-2) are written for PEFT's ``fan_in_fan_out``. Factors are written in
the dtype of the model's tensor (or ``dtype``); the adapter folder is built in a staging folder and renamed at the end.
"""
from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, computed_field
from safetensors import safe_open
from safetensors.torch import save_file

from merge_ops.architecture import in_numbered_block, is_pre_layer
from merge_ops.compatibility import pair_findings
from merge_ops.engine import check_device
from merge_ops.errors import ExtractionError, IncompatibleModelsError, OutputExistsError
from merge_ops.headers import ModelHeaders, read_local_headers
from merge_ops.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX
from merge_ops.low_rank import low_rank_factors
from merge_ops.output_folder import staged_output
from merge_ops.safetensors_io import StreamingSafetensorsWriter, load_tensor

CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt"})
"""model_types whose transformers classes store the layers' projections as Conv1D ([in, out])."""
OUT_DTYPES = ("float32", "bfloat16", "float16")
FLOATS = {"F32", "BF16", "F16"}

OUTSIDE, NOT_LINEAR, IN_EXTRACTED, HAS_SUBMODULES = "outside the layers", "not a linear weight", "in an extracted module", "module has submodules"
REMEDIES = {
    OUTSIDE: "--embeddings extracts the embeddings and lm_head; --modules-to-save stores their modules whole",
    NOT_LINEAR: "--modules-to-save stores their modules whole, as PEFT modules_to_save",
    IN_EXTRACTED: "PEFT cannot also store whole a module it adapts (e.g. the bias of an extracted linear layer)",
    HAS_SUBMODULES: "PEFT would store the module's submodules whole too",
}
"""Why a changed tensor is not captured -> what would capture it, or why nothing can."""

Kind = Literal["linear", "conv1d", "embedding"]
Progress = Callable[[int, int], None]
"""Called with (tensors done, tensors in all) after each tensor."""


class ModuleFactors(BaseModel):
    """One module's LoRA: its rank and how well ``B @ A`` (as stored) reproduces its task vector."""

    module: str
    kind: Kind
    shape: tuple[int, int]
    rank: int
    norm: float
    """``||D||_F`` of the task vector."""
    error: float
    """``||D - B @ A||_F / ||D||_F``, with the factors in their stored dtype."""


class NotCaptured(BaseModel):
    """A tensor that differs from the base but is not in the adapter."""

    tensor: str
    shape: tuple[int, ...]
    norm: float
    relative_change: float
    """``||D|| / ||W_base||`` (inf when the base tensor is zero)."""
    reason: str
    """A key of ``REMEDIES``."""


class ExtractionReport(BaseModel):
    """What ``extract_lora`` wrote and what it left out."""

    out: Path
    base: str
    modules: list[ModuleFactors]
    saved: dict[str, float]
    """modules_to_save -> ``||D||`` of its tensors (stored exactly)."""
    not_captured: list[NotCaptured]
    unchanged: list[str]
    """Tensors equal in MODEL and BASE (skipped)."""
    adapter_bytes: int
    sha256: str

    @computed_field  # type: ignore[prop-decorator]
    @property
    def overall_error(self) -> float:
        """Relative error over the extracted modules: ``sqrt(sum ||D - BA||^2 / sum ||D||^2)``."""
        return _ratio(sum((m.error * m.norm) ** 2 for m in self.modules), sum(m.norm**2 for m in self.modules))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_error(self) -> float:
        """Relative error of the whole task vector: not captured tensors count in full, saved modules as exact."""
        lost = sum((m.error * m.norm) ** 2 for m in self.modules) + sum(t.norm**2 for t in self.not_captured)
        return _ratio(lost, sum(m.norm**2 for m in self.modules) + sum(n**2 for n in self.saved.values()) + sum(t.norm**2 for t in self.not_captured))


def _ratio(squared_error: float, squared_norm: float) -> float:
    return math.sqrt(squared_error / squared_norm) if squared_norm > 0 else 0.0


def _module(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0]


def _kinds(headers: ModelHeaders, embeddings: bool) -> dict[str, Kind]:
    """Tensor -> how it is extracted, for the 2-D float ``*.weight`` tensors that are extracted."""
    conv1d = headers.config.get("model_type") in CONV1D_MODEL_TYPES
    kinds: dict[str, Kind] = {}
    for name, header in headers.tensors.items():
        if len(header.shape) != 2 or header.dtype not in FLOATS or not name.endswith(".weight"):
            continue
        if in_numbered_block(name):
            kinds[name] = "conv1d" if conv1d else "linear"
        elif embeddings:
            kinds[name] = "embedding" if is_pre_layer(name) else "linear"
    return kinds


def _why_not(name: str, headers: ModelHeaders, extracted: set[str], parents: set[str], modules_to_save: bool) -> str | None:
    """Why a changed tensor that is not extracted is not stored whole either (a key of ``REMEDIES``; None: it is stored,
    its module in modules_to_save). ``extracted``: modules whose weight is extracted; ``parents``: modules with submodules."""
    module = _module(name)
    if module in extracted:
        return IN_EXTRACTED
    if module in parents:
        return HAS_SUBMODULES
    if modules_to_save:
        return None
    header = headers.tensors[name]
    return OUTSIDE if len(header.shape) == 2 and header.dtype in FLOATS and not in_numbered_block(name) else NOT_LINEAR


def _check_options(rank: int | None, max_error: float | None, max_rank: int | None, dtype: str | None) -> None:
    problems = []
    if (rank is None) == (max_error is None):
        problems.append("give exactly one of rank (a fixed rank) and max_error (a relative error budget)")
    if rank is not None and rank < 1:
        problems.append(f"rank must be >= 1, got {rank}")
    if max_error is not None and not 0 <= max_error < 1:
        problems.append(f"max_error must be in [0, 1), got {max_error}")
    if max_rank is not None and (max_error is None or max_rank < 1):
        problems.append(f"max_rank caps the ranks max_error picks: use it with max_error and >= 1, got {max_rank}")
    if dtype is not None and dtype not in OUT_DTYPES:
        problems.append(f"dtype must be one of {', '.join(OUT_DTYPES)}, got {dtype!r}")
    if problems:
        raise ExtractionError("; ".join(problems))


def _peft_names(module: str, kind: Kind) -> tuple[str, str]:
    if kind == "embedding":
        return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def _adapter_config(base: str, modules: list[ModuleFactors], saved: list[str]) -> dict[str, object]:
    """PEFT's adapter_config.json: ``r`` the most common rank, the others in rank_pattern; lora_alpha = rank (scale 1)."""
    counts = Counter(m.rank for m in modules)
    r = max(counts, key=lambda rank: (counts[rank], rank))
    pattern = {m.module: m.rank for m in modules if m.rank != r}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False,
        "target_modules": [m.module for m in modules], "modules_to_save": saved or None,
        "fan_in_fan_out": any(m.kind == "conv1d" for m in modules), "lora_dropout": 0.0, "bias": "none",
        "use_dora": False, "inference_mode": True,
    }


def extract_lora(
    model: Path,
    base: Path,
    out: Path,
    *,
    rank: int | None = None,
    max_error: float | None = None,
    max_rank: int | None = None,
    embeddings: bool = False,
    modules_to_save: bool = False,
    dtype: str | None = None,
    device: str = "cpu",
    force: bool = False,
    progress: Progress | None = None,
) -> ExtractionReport:
    """Write a PEFT LoRA adapter folder ``out`` that approximates ``model - base`` and report what it captured.

    Args:
        model: the fine-tuned model folder.
        base: the base model folder (written as ``base_model_name_or_path``, as given).
        out: the adapter folder (adapter_config.json, adapter_model.safetensors); appears only when complete.
        rank: the rank of every module (capped by its smaller dimension).
        max_error: instead of ``rank``, the relative Frobenius error each module may keep (the smallest rank that fits).
        max_rank: the largest rank ``max_error`` may pick.
        embeddings: also extract the 2-D weights outside the layers (embeddings, lm_head).
        modules_to_save: store modules with other changed tensors (norms, biases, ...) whole.
        dtype: dtype of the factors (default: the model tensor's).
        device: where the SVDs run (cpu, cuda, cuda:N).
        force: replace ``out`` if it exists (never when it is or contains ``model`` or ``base``).
        progress: called with (tensors done, tensors in all).

    Raises:
        ExtractionError: options out of range or combined wrongly; no module differs.
        IncompatibleModelsError: the models differ in architecture, tensor names or shapes.
        OutputExistsError: ``out`` exists and ``force`` is not set.
        OutputIsInputError: ``force`` is set and ``out`` is or contains ``model`` or ``base``.
        OutputLockedError: another run is writing ``out``.
        ModelNotFoundError: a folder is not a safetensors model.

    Example:
        >>> report = extract_lora(Path("finetune"), Path("base"), Path("adapter"), rank=16)
        >>> print(f"{report.overall_error:.3f}")
    """
    _check_options(rank, max_error, max_rank, dtype)
    dev = check_device(device)
    fine, start = read_local_headers(str(model), model), read_local_headers(str(base), base)
    problems = pair_findings(start, fine)
    if problems:
        raise IncompatibleModelsError([str(p) for p in problems], summary=f"{model} does not line up with its base {base} tensor for tensor")
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(str(out))
    kinds = _kinds(fine, embeddings)
    extracted = {_module(name) for name in kinds}
    parents = {name.rsplit(".", depth)[0] for name in fine.tensors for depth in range(2, name.count(".") + 1)}
    with staged_output(out, force=force, inputs=[model, base]) as staging:
        (staging / "factors").mkdir()
        modules: list[ModuleFactors] = []
        saved: dict[str, float] = {}
        not_captured: list[NotCaptured] = []
        unchanged: list[str] = []
        for done, name in enumerate(fine.tensors, 1):
            tuned, original = load_tensor(fine.file(name), name), load_tensor(start.file(name), name)
            delta = tuned.to(dev, torch.float32) - original.to(dev, torch.float32)
            if not delta.any():
                unchanged.append(name)
            elif name in kinds:
                out_dtype = getattr(torch, dtype) if dtype else tuned.dtype
                spool = staging / "factors" / f"{len(modules):06d}.safetensors"
                modules.append(_extract(name, kinds[name], delta, out_dtype, spool, rank=rank, max_error=max_error, max_rank=max_rank))
            elif (reason := _why_not(name, fine, extracted, parents, modules_to_save)) is None:
                saved[_module(name)] = math.hypot(saved.get(_module(name), 0.0), float(delta.norm()))
            else:
                base_norm = float(original.float().norm())
                change = float(delta.norm()) / base_norm if base_norm > 0 else math.inf
                not_captured.append(NotCaptured(tensor=name, shape=tuple(delta.shape), norm=float(delta.norm()), relative_change=change, reason=reason))
            del tuned, original, delta
            if progress:
                progress(done, len(fine.tensors))
        if not modules:
            raise ExtractionError(f"{model} and {base} have the same weights in every module the adapter could extract: nothing to extract")
        sha256 = _write_adapter(staging, fine, modules, list(saved))
        config = _adapter_config(str(base), modules, list(saved))
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        adapter_bytes = (staging / ADAPTER_WEIGHTS).stat().st_size
        shutil.rmtree(staging / "factors")
    return ExtractionReport(out=out, base=str(base), modules=modules, saved=saved, not_captured=not_captured, unchanged=unchanged,
                            adapter_bytes=adapter_bytes, sha256=sha256)


def _extract(
    name: str, kind: Kind, delta: torch.Tensor, out_dtype: torch.dtype, spool: Path, *, rank: int | None, max_error: float | None, max_rank: int | None
) -> ModuleFactors:
    """Factor one task vector, keep the factors (in ``out_dtype``) in ``spool`` and measure their error."""
    target = delta if kind == "linear" else delta.T  # embeddings and Conv1D: PEFT adds (B @ A)^T
    b, a, _ = low_rank_factors(target, rank=rank, max_error=max_error, max_rank=max_rank)
    b, a = b.to(out_dtype), a.to(out_dtype)
    norm = float(target.norm())
    error = float((target - b.float() @ a.float()).norm()) / norm
    save_file({"A": a.cpu().contiguous(), "B": b.cpu().contiguous()}, spool)
    return ModuleFactors(module=_module(name), kind=kind, shape=(delta.shape[0], delta.shape[1]), rank=a.shape[0], norm=norm, error=error)


def _write_adapter(staging: Path, fine: ModelHeaders, modules: list[ModuleFactors], saved: list[str]) -> str:
    """adapter_model.safetensors from the spooled factors and the saved modules' tensors; returns its sha256."""
    spools = [staging / "factors" / f"{i:06d}.safetensors" for i in range(len(modules))]
    entries: list[tuple[str, Path, str]] = []  # (name in the adapter, file, name in that file)
    for m, spool in zip(modules, spools, strict=True):
        a_name, b_name = _peft_names(m.module, m.kind)
        entries += [(a_name, spool, "A"), (b_name, spool, "B")]
    entries += [(PREFIX + name, fine.file(name), name) for name in fine.tensors if _module(name) in saved]
    specs = []
    for adapter_name, file, name in entries:
        with safe_open(file, framework="pt") as handle:
            part = handle.get_slice(name)
            specs.append((adapter_name, part.get_dtype(), tuple(part.get_shape())))
    with StreamingSafetensorsWriter(staging / ADAPTER_WEIGHTS, specs) as writer:
        for adapter_name, file, name in entries:
            writer.write(adapter_name, load_tensor(file, name))
    return writer.sha256
