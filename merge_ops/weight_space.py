"""Were the models fine-tuned from the recipe's base? A weight-space check on a sample of tensors.

For each model, up to ``SAMPLE_TENSORS`` matrices it shares (name and shape) with the base, spread
evenly over the model, each read as at most ``SAMPLE_ELEMENTS`` leading elements (whole rows):

- cosine similarity ``<x, base> / (|x| |base|)`` decides. A fine-tune keeps much of its base's direction,
  while independently initialised or trained models are orthogonal. Measured here: the bench's synthetic
  fine-tunes (delta 10% of the weights) 0.995; the tests' tiny fine-tunes, whose delta is larger than the
  weights themselves, 0.56-0.58; an independently initialised model of the same shape -0.03. A median below
  ``FINE_TUNED_MIN_COSINE`` = 0.3 (an orthogonal delta over 3x the base's norm) reports "not fine-tuned
  from this base".
- relative distance ``|x - base| / |base|`` is reported alongside (0.10 for the bench fine-tunes), but it
  cannot tell a large delta from an unrelated model: the tiny fine-tunes (1.40) and the unrelated model
  (1.44) look alike by it.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import torch

from merge_ops.compatibility import BaseDistance, CompatibilityReport, Finding
from merge_ops.headers import ModelHeaders
from merge_ops.lora import apply_lora, load_factors
from merge_ops.recipe import Recipe
from merge_ops.safetensors_io import load_tensor

SAMPLE_TENSORS = 8
SAMPLE_ELEMENTS = 1 << 20
FINE_TUNED_MIN_COSINE = 0.3
FLOAT_DTYPES = ("F64", "F32", "BF16", "F16")


def base_distance(model_headers: ModelHeaders, base_headers: ModelHeaders) -> BaseDistance | None:
    """Median cosine and relative distance of sampled tensors of a local model (with its adapter applied) from the
    local base; None if none compare."""
    model, base = model_headers.tensors, base_headers.tensors
    names = sorted(
        n for n, t in model.items()
        if len(t.shape) >= 2 and t.dtype in FLOAT_DTYPES and n in base and base[n].shape == t.shape and base[n].dtype in FLOAT_DTYPES
    )
    if not names:
        return None
    picked = [names[round(i * (len(names) - 1) / max(1, SAMPLE_TENSORS - 1))] for i in range(min(SAMPLE_TENSORS, len(names)))]
    cosines, distances = [], []
    for name in dict.fromkeys(picked):
        shape = model[name].shape
        rows = (0, min(shape[0], max(1, SAMPLE_ELEMENTS // math.prod(shape[1:]))))
        x = load_tensor(model_headers.file(name), model[name].stored_as or name, rows)
        term = model_headers.lora_term(name)
        x = (apply_lora(x.float(), term, load_factors(term), rows) if term else x).double().flatten()
        b = load_tensor(base_headers.file(name), name, rows).double().flatten()
        if b.norm() == 0 or x.norm() == 0:
            continue
        cosines.append(float(torch.dot(x, b) / (x.norm() * b.norm())))
        distances.append(float((x - b).norm() / b.norm()))
    if not cosines:
        return None
    cosine = statistics.median(cosines)
    return BaseDistance(model=model_headers.key, tensors=len(cosines), cosine=cosine, relative_distance=statistics.median(distances), fine_tuned=cosine >= FINE_TUNED_MIN_COSINE)


def weight_space_report(recipe: Recipe, report: CompatibilityReport, headers: Mapping[str, ModelHeaders]) -> CompatibilityReport:
    """``report`` with the weight-space distances of every model from the base, and a warning per unrelated model.

    Args:
        recipe: the recipe (no base model: nothing to compare, the report comes back unchanged).
        report: from ``compatibility_report``.
        headers: ref key -> the model's headers, with its weights local (``ModelHeaders.at``).
    """
    if recipe.base_model is None:
        return report
    base_key = recipe.base_model.key
    distances = [d for key, h in headers.items() if key != base_key and (d := base_distance(h, headers[base_key]))]
    warnings = [
        Finding(severity="warning", model=d.model, check="weight_space",
                message=f"not fine-tuned from this base: median cosine similarity {d.cosine:.3f} with {base_key} over {d.tensors} sampled "
                f"tensors (fine-tunes stay above {FINE_TUNED_MIN_COSINE}); merging deltas from an unrelated base gives noise")
        for d in distances if not d.fine_tuned
    ]
    return report.model_copy(update={"weight_space": distances, "findings": report.findings + warnings})
