"""The publication gate: is the merged model good enough, compared with the models it was merged from?

Three rules, each optional, all from the ``gate:`` section of params.yaml (recipes stay plain mergekit YAML):

- ``min_score``: a minimum score of the merged model per task (or group), on the point estimate;
- ``max_regression`` (no regression): on each task, the merged model may be at most this much below the best
  source, unless the shortfall is within noise: it fails only when
  ``best - merged > max_regression + k * se_diff``;
- ``min_average_gain`` (better than the best source): the merged model's average over the tasks must exceed
  the best source's average by more than this, beyond noise: it passes only when
  ``mean_merged - mean_best > min_average_gain + k * se_diff``.

``k`` is ``stderr_margin`` and ``se_diff = sqrt(se_merged^2 + se_source^2)`` the standard error of the
difference, from lm-eval's standard errors of the two scores (of a mean over tasks: ``sqrt(sum se_t^2) / n``),
the two models' scores taken as independent. So a regression blocks only when it is real, and a gain counts
only when it is real; with ``k = 0``, or scores without standard errors (``eval.bootstrap_iters: 0``; such a
score counts as exact), the rules compare the point estimates.

Scores are each task's primary lm-eval metric (higher is better). The "tasks" of the last two rules are the
policy's ``tasks``, or every task the merged model was evaluated on, groups left out.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import ClassVar, Literal

from pydantic import BaseModel, Field

from mergeflow.evaluation import mean_score_stderr, plus_minus
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
    stderr_margin: float = Field(default=2.0, ge=0)
    """k: the regression and average rules compare with the sources k standard errors of the difference wide
    (a regression must exceed its tolerance by more, a gain must exceed ``min_average_gain`` by more); 0: the
    point estimates alone."""


class GateCheck(BaseModel):
    """One rule on one task (or on the average)."""

    rule: Rule
    task: str
    value: float | None
    """The merged model's score (its average for min_average_gain); None when it was not evaluated."""
    stderr: float | None = None
    """The standard error of ``value``; None when lm-eval computed none."""
    threshold: float
    """What ``value`` must reach (min_score, max_regression) or exceed (min_average_gain), the margin included."""
    margin: float = 0.0
    """k standard errors of the difference from the best source, included in ``threshold``; 0 for min_score."""
    passed: bool
    message: str


class GateDecision(BaseModel):
    passed: bool
    reasons: list[str]
    """Why the gate failed, one line per failed check; empty when it passed."""
    checks: list[GateCheck]

    def markdown(self) -> str:
        verdict = "passed" if self.passed else "**failed**"
        lines = [f"# Gate {verdict}", "", "| rule | task | merged | threshold | of which margin | |", "|---|---|---|---|---|---|"]
        for c in self.checks:
            value = "-" if c.value is None else plus_minus(c.value, c.stderr)
            lines.append(f"| {c.rule} | {c.task} | {value} | {c.threshold:.4f} | {c.margin:.4f} | {'ok' if c.passed else 'FAIL'} |")
        if not self.checks:
            lines.append("| (no rules) | | | | | ok |")
        return "\n".join(lines + ["", *(f"- {r}" for r in self.reasons)]) + "\n"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _margin(k: float, *stderrs: float | None) -> float:
    """k standard errors of the difference of scores with these standard errors (a missing one counts as 0)."""
    return k * math.sqrt(sum((se or 0.0) ** 2 for se in stderrs))


def _beyond(margin: float, k: float) -> str:
    return f" plus {k:g} standard errors of the difference ({margin:.4f})" if margin else ""


def apply_gate(
    policy: GatePolicy,
    merged_scores: dict[str, float],
    source_scores: dict[str, dict[str, float]],
    *,
    groups: Collection[str] = (),
    merged_stderrs: Mapping[str, float] | None = None,
    source_stderrs: Mapping[str, Mapping[str, float]] | None = None,
) -> GateDecision:
    """Check the merged model's scores against the policy and the scores of its sources.

    Args:
        policy: the rules.
        merged_scores: task -> score of the merged model.
        source_scores: source name -> (task -> score), the base included.
        groups: names in the scores that are lm-eval groups (aggregates of other tasks there): left out of the
            regression and average rules unless ``policy.tasks`` names them.
        merged_stderrs: task -> standard error of the merged model's score; a task left out counts as exact.
        source_stderrs: source name -> (task -> standard error), likewise.

    Example:
        >>> apply_gate(GatePolicy(max_regression=0.1), {"a": 0.8, "b": 0.8}, {"x": {"a": 0.9, "b": 0.1}}).passed
        True
        >>> apply_gate(GatePolicy(max_regression=0.1, min_average_gain=None, stderr_margin=2), {"a": 0.75}, {"x": {"a": 0.9}},
        ...            merged_stderrs={"a": 0.03}, source_stderrs={"x": {"a": 0.04}}).passed  # 0.15 < 0.1 + 2 * 0.05
        True
    """
    merged_se = merged_stderrs or {}
    source_se = source_stderrs or {}
    k = policy.stderr_margin
    checks: list[GateCheck] = []
    for name, minimum in policy.min_score.items():
        value = merged_scores.get(name)
        ok = value is not None and value >= minimum
        message = (
            f"{name}: {value:.4f} is below the minimum {minimum:.4f}" if value is not None
            else f"{name}: not evaluated, so its minimum {minimum:.4f} cannot be checked; add it to eval.tasks"
        )
        checks.append(GateCheck(rule="min_score", task=name, value=value, stderr=merged_se.get(name), threshold=minimum, passed=ok, message=message))

    tasks = policy.tasks if policy.tasks is not None else [t for t in merged_scores if t not in groups]
    if policy.max_regression is not None:
        for name in tasks:
            value = merged_scores.get(name)
            best_source, best = max(((s, v[name]) for s, v in source_scores.items() if name in v), key=lambda p: p[1], default=(None, None))
            if best is None or best_source is None:
                continue  # no source has a score on it: nothing to regress from
            margin = _margin(k, merged_se.get(name), source_se.get(best_source, {}).get(name))
            threshold = best - policy.max_regression - margin
            ok = value is not None and value >= threshold
            message = (
                f"{name}: {value:.4f} regresses {best - value:.4f} from the best source {best_source} ({best:.4f}), "
                f"more than the tolerance {policy.max_regression:.4f}{_beyond(margin, k)}" if value is not None
                else f"{name}: the merged model was not evaluated on it"
            )
            checks.append(GateCheck(rule="max_regression", task=name, value=value, stderr=merged_se.get(name), threshold=threshold,
                                    margin=margin, passed=ok, message=message))

    if policy.min_average_gain is not None and tasks:
        missing = [t for t in tasks if t not in merged_scores]
        averages = {s: _mean([v[t] for t in tasks]) for s, v in source_scores.items() if all(t in v for t in tasks)}
        value = None if missing else _mean([merged_scores[t] for t in tasks])
        best_source, best = max(averages.items(), key=lambda p: p[1], default=(None, None))
        if best is not None or missing:
            stderr = None if missing else mean_score_stderr(merged_se, tasks)
            margin = 0.0 if best_source is None else _margin(k, stderr, mean_score_stderr(source_se.get(best_source, {}), tasks))
            threshold = (best or 0.0) + policy.min_average_gain + margin
            ok = value is not None and value > threshold
            message = (
                f"average over {', '.join(tasks)}: the merged model was not evaluated on {', '.join(missing)}" if value is None
                else f"average over {', '.join(tasks)}: {value:.4f} is not above the best source {best_source} "
                f"({best:.4f}) by more than {policy.min_average_gain:.4f}{_beyond(margin, k)}"
            )
            checks.append(GateCheck(rule="min_average_gain", task="average", value=value, stderr=stderr, threshold=threshold,
                                    margin=margin, passed=ok, message=message))

    reasons = [c.message for c in checks if not c.passed]
    return GateDecision(passed=not reasons, reasons=reasons, checks=checks)


def outcome(decision: GateDecision, *, published: bool) -> Outcome:
    """The outcome of a run whose gate decided ``decision`` and whose upload happened (``published``) or not."""
    return "published" if published else "not_published" if decision.passed else "gate_failed"
