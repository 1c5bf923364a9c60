"""The publication gate: is the merged model good enough, compared with the models it was merged from?

Three rules, each optional, all from the ``gate:`` section of params.yaml (recipes stay plain mergekit YAML):

- ``min_score``: a minimum score of the merged model per task (or group);
- ``max_regression``: on each task, the merged model may be at most this much below the best source;
- ``min_average_gain``: the merged model's average over the tasks must be above the best source's average
  by more than this (0.0: strictly above).

Scores are each task's primary lm-eval metric (higher is better). The "tasks" of the last two rules are the
policy's ``tasks``, or every task the merged model was evaluated on, groups left out.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar, Literal

from pydantic import BaseModel, Field

from mergeflow.params import ParamsSection

Rule = Literal["min_score", "max_regression", "min_average_gain"]
Outcome = Literal["published", "gate_failed", "not_published", "publish_failed"]
"""What became of a merged model: published, stopped by the gate, passed with no publish target, or the upload failed."""


class GatePolicy(ParamsSection):
    """When a merged model may be published (the ``gate:`` section of params.yaml)."""

    section: ClassVar[str] = "gate"
    min_score: dict[str, float] = Field(default_factory=dict)
    """Task -> the lowest acceptable score of the merged model."""
    max_regression: float | None = Field(default=0.02, ge=0)
    """Per task, how far below the best source the merged model may be; None: no such rule."""
    min_average_gain: float | None = 0.0
    """The merged average must exceed the best source's average by more than this; None: no such rule."""
    tasks: list[str] | None = None
    """Tasks of the regression and average rules; None: every task evaluated, groups left out."""


class GateCheck(BaseModel):
    """One rule on one task (or on the average)."""

    rule: Rule
    task: str
    value: float | None
    """The merged model's score (its average for min_average_gain); None when it was not evaluated."""
    threshold: float
    passed: bool
    message: str


class GateDecision(BaseModel):
    passed: bool
    reasons: list[str]
    """Why the gate failed, one line per failed check; empty when it passed."""
    checks: list[GateCheck]

    def markdown(self) -> str:
        verdict = "passed" if self.passed else "**failed**"
        lines = [f"# Gate {verdict}", "", "| rule | task | merged | threshold | |", "|---|---|---|---|---|"]
        for c in self.checks:
            value = "-" if c.value is None else f"{c.value:.4f}"
            lines.append(f"| {c.rule} | {c.task} | {value} | {c.threshold:.4f} | {'ok' if c.passed else 'FAIL'} |")
        if not self.checks:
            lines.append("| (no rules) | | | | ok |")
        return "\n".join(lines + ["", *(f"- {r}" for r in self.reasons)]) + "\n"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def apply_gate(
    policy: GatePolicy,
    merged_scores: dict[str, float],
    source_scores: dict[str, dict[str, float]],
    *,
    groups: Collection[str] = (),
) -> GateDecision:
    """Check the merged model's scores against the policy and the scores of its sources.

    Args:
        policy: the rules.
        merged_scores: task -> score of the merged model.
        source_scores: source name -> (task -> score), the base included.
        groups: names in the scores that are lm-eval groups (aggregates of other tasks there): left out of the
            regression and average rules unless ``policy.tasks`` names them.

    Example:
        >>> apply_gate(GatePolicy(max_regression=0.1), {"a": 0.8, "b": 0.8}, {"x": {"a": 0.9, "b": 0.1}}).passed
        True
    """
    checks: list[GateCheck] = []
    for name, minimum in policy.min_score.items():
        value = merged_scores.get(name)
        ok = value is not None and value >= minimum
        message = (
            f"{name}: {value:.4f} is below the minimum {minimum:.4f}" if value is not None
            else f"{name}: not evaluated, so its minimum {minimum:.4f} cannot be checked; add it to eval.tasks"
        )
        checks.append(GateCheck(rule="min_score", task=name, value=value, threshold=minimum, passed=ok, message=message))

    tasks = policy.tasks if policy.tasks is not None else [t for t in merged_scores if t not in groups]
    if policy.max_regression is not None:
        for name in tasks:
            value = merged_scores.get(name)
            best_source, best = max(((s, v[name]) for s, v in source_scores.items() if name in v), key=lambda p: p[1], default=(None, None))
            if best is None:
                continue  # no source has a score on it: nothing to regress from
            threshold = best - policy.max_regression
            ok = value is not None and value >= threshold
            message = (
                f"{name}: {value:.4f} regresses {best - value:.4f} from the best source {best_source} ({best:.4f}), "
                f"more than the tolerance {policy.max_regression:.4f}" if value is not None
                else f"{name}: the merged model was not evaluated on it"
            )
            checks.append(GateCheck(rule="max_regression", task=name, value=value, threshold=threshold, passed=ok, message=message))

    if policy.min_average_gain is not None and tasks:
        missing = [t for t in tasks if t not in merged_scores]
        averages = {s: _mean([v[t] for t in tasks]) for s, v in source_scores.items() if all(t in v for t in tasks)}
        value = None if missing else _mean([merged_scores[t] for t in tasks])
        best_source, best = max(averages.items(), key=lambda p: p[1], default=(None, None))
        if best is not None or missing:
            threshold = (best or 0.0) + policy.min_average_gain
            ok = value is not None and value > threshold
            message = (
                f"average over {', '.join(tasks)}: the merged model was not evaluated on {', '.join(missing)}" if value is None
                else f"average over {', '.join(tasks)}: {value:.4f} is not above the best source {best_source} "
                f"({best:.4f}) by more than {policy.min_average_gain:.4f}"
            )
            checks.append(GateCheck(rule="min_average_gain", task="average", value=value, threshold=threshold, passed=ok, message=message))

    reasons = [c.message for c in checks if not c.passed]
    return GateDecision(passed=not reasons, reasons=reasons, checks=checks)


def outcome(decision: GateDecision, *, published: bool) -> Outcome:
    """The outcome of a run whose gate decided ``decision`` and whose upload happened (``published``) or not."""
    return "published" if published else "not_published" if decision.passed else "gate_failed"
