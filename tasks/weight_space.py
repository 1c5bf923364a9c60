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
from pathlib import Path

import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from merge_ops.recipe import Recipe
from merge_ops.safetensors_io import load_tensor, read_tensor_index
from tasks.compatibility import BaseDistance, CompatibilityReport, Finding
from tasks.sources import ResolvedSource

SAMPLE_TENSORS = 8
SAMPLE_ELEMENTS = 1 << 20
FINE_TUNED_MIN_COSINE = 0.3
FLOAT_DTYPES = ("F64", "F32", "BF16", "F16")


def base_distance(model_dir: Path, base_dir: Path, *, key: str) -> BaseDistance | None:
    """Median cosine and relative distance of sampled tensors of ``model_dir`` from ``base_dir``; None if none compare."""
    model, base = read_tensor_index(model_dir), read_tensor_index(base_dir)
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
        x = load_tensor(model[name].file, name, rows).double().flatten()
        b = load_tensor(base[name].file, name, rows).double().flatten()
        if b.norm() == 0 or x.norm() == 0:
            continue
        cosines.append(float(torch.dot(x, b) / (x.norm() * b.norm())))
        distances.append(float((x - b).norm() / b.norm()))
    if not cosines:
        return None
    cosine = statistics.median(cosines)
    return BaseDistance(model=key, tensors=len(cosines), cosine=cosine, relative_distance=statistics.median(distances), fine_tuned=cosine >= FINE_TUNED_MIN_COSINE)


def weight_space_report(recipe: Recipe, report: CompatibilityReport, sources: dict[str, Path]) -> CompatibilityReport:
    """``report`` with the weight-space distances of every model from the base, and a warning per unrelated model.

    Args:
        recipe: the recipe (no base model: nothing to compare, the report comes back unchanged).
        report: from ``compatibility_report``.
        sources: ref key -> local model folder.
    """
    if recipe.base_model is None:
        return report
    base_key = recipe.base_model.key
    distances = [d for key, folder in sources.items() if key != base_key and (d := base_distance(folder, sources[base_key], key=key))]
    warnings = [
        Finding(severity="warning", model=d.model, check="weight_space",
                message=f"not fine-tuned from this base: median cosine similarity {d.cosine:.3f} with {base_key} over {d.tensors} sampled "
                f"tensors (fine-tunes stay above {FINE_TUNED_MIN_COSINE}); merging deltas from an unrelated base gives noise")
        for d in distances if not d.fine_tuned
    ]
    return report.model_copy(update={"weight_space": distances, "findings": report.findings + warnings})


@task(name="check_weight_space", cache_policy=NO_CACHE, persist_result=False)
def check_weight_space(recipe: Recipe, report: CompatibilityReport, sources: list[ResolvedSource]) -> CompatibilityReport:
    """Measure how far each model is from the base; updates the compatibility artifact."""
    updated = weight_space_report(recipe, report, {s.key: s.path for s in sources if s.path is not None})
    for d in updated.weight_space:
        get_run_logger().log(20 if d.fine_tuned else 30, "%s: cosine %.4f, relative distance %.4f from the base%s",
                             d.model, d.cosine, d.relative_distance, "" if d.fine_tuned else " -> not fine-tuned from this base")
    if updated.weight_space:
        create_markdown_artifact(updated.markdown(), key="compatibility-report", description="Can these models be merged? (with weight space)")
    return updated
