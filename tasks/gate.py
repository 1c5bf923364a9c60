"""The gate task: may the merged model be published? The decision becomes a Prefect artifact."""
from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from mergeflow.evaluation import EvalResult
from mergeflow.gate import GateDecision, GatePolicy, apply_gate
from tasks.retries import LOCAL


@task(name="apply_gate", **LOCAL)
def apply_gate_task(policy: GatePolicy, merged: EvalResult, sources: dict[str, EvalResult]) -> GateDecision:
    """Decide whether the merged model may be published; the decision becomes an artifact."""
    decision = apply_gate(
        policy, merged.scores, {n: r.scores for n, r in sources.items()}, groups=merged.groups,
        merged_stderrs=merged.stderrs, source_stderrs={n: r.stderrs for n, r in sources.items()},
    )
    create_markdown_artifact(decision.markdown(), key="gate-decision", description=f"gate for {merged.model_dir.name}")
    logger = get_run_logger()
    if decision.passed:
        logger.info("gate passed (%d checks)", len(decision.checks))
    else:
        logger.warning("gate failed: %s", "; ".join(decision.reasons))
    return decision
