"""The pipeline's adapter-space merge (``output: adapter``): the downloaded adapters combined into one PEFT adapter
folder (``merge_ops.adapter_merge``), summarized like a merged model so the rest of the pipeline reads it the same way."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from merge_ops.adapter_merge import merge_adapters, plan_adapter_merge
from merge_ops.compatibility import CompatibilityReport
from merge_ops.lora import ADAPTER_WEIGHTS
from merge_ops.output_folder import recipe_inputs
from merge_ops.recipe import Recipe
from mergeflow.run_summary import RunSummary
from mergeflow.sources import Source
from mergeflow.staging import ShardResult


def merge_adapter_output(
    recipe: Recipe, sources: list[Source], report: CompatibilityReport, out: Path, *, device: str = "cpu", force: bool = False, started_at: float,
    allow_nonfinite: bool = False,
) -> RunSummary:
    """Combine the adapters of ``sources`` (downloaded) as ``recipe`` says into the folder ``out``, written atomically.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is not set.
        OutputIsInputError, OutputLockedError, NonFiniteError: from ``merge_adapters``.
        RecipeError, ModelNotFoundError, IncompatibleModelsError: from ``plan_adapter_merge``.
    """
    plan = plan_adapter_merge(recipe, {s.key: s.adapter.path for s in sources if s.adapter and s.adapter.path})
    started = time.time()
    inputs = recipe_inputs(recipe) + [s.path for s in sources if s.path is not None]
    digest = merge_adapters(plan, out, device=device, force=force, inputs=inputs, allow_nonfinite=allow_nonfinite)
    seconds = time.time() - started
    written = ShardResult(index=0, file=ADAPTER_WEIGHTS, sha256=digest, nbytes=(Path(out) / ADAPTER_WEIGHTS).stat().st_size, started=started, seconds=seconds)
    return RunSummary(
        out=Path(out), recipe=recipe, plan_sha256=hashlib.sha256(plan.model_dump_json().encode()).hexdigest(), sources=sources, shards=[written],
        resumed=[], total_size=plan.total_size, input_bytes=plan.input_bytes, tensor_count=2 * len(plan.modules), merge_seconds=seconds,
        pipeline_seconds=time.time() - started_at, warnings=[str(f) for f in report.findings if f.severity == "warning"], compatibility=report,
    )
