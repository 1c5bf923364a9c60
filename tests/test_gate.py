"""The publication gate: each rule on hand-made scores and standard errors, groups, and the policy read from params.yaml."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from mergeflow.errors import ParamsError
from mergeflow.evaluation import EvalSettings
from mergeflow.gate import GatePolicy, apply_gate

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"add": {"add": 0.9, "rev": 0.0}, "rev": {"add": 0.0, "rev": 1.0}, "base": {"add": 0.0, "rev": 0.0}}


def test_a_merge_that_combines_skills_passes_a_wide_policy() -> None:
    policy = GatePolicy(min_score={"add": 0.5}, max_regression=0.3, min_average_gain=0.05)
    decision = apply_gate(policy, {"add": 0.7, "rev": 0.8}, SOURCES)
    assert decision.passed and decision.reasons == []
    assert [(c.rule, c.task) for c in decision.checks] == [
        ("min_score", "add"), ("max_regression", "add"), ("max_regression", "rev"), ("min_average_gain", "average"),
    ]
    assert decision.checks[1].threshold == pytest.approx(0.6)  # best source 0.9 minus the tolerance
    assert decision.checks[3].value == pytest.approx(0.75) and decision.checks[3].threshold == pytest.approx(0.55)


def test_minimum_score() -> None:
    decision = apply_gate(GatePolicy(min_score={"add": 0.8}, max_regression=None, min_average_gain=None), {"add": 0.7}, SOURCES)
    assert not decision.passed
    assert decision.reasons == ["add: 0.7000 is below the minimum 0.8000"]


def test_regression_beyond_tolerance_names_the_task_and_the_best_source() -> None:
    decision = apply_gate(GatePolicy(max_regression=0.02, min_average_gain=None), {"add": 0.85, "rev": 1.0}, SOURCES)
    assert not decision.passed
    assert decision.reasons == ["add: 0.8500 regresses 0.0500 from the best source add (0.9000), more than the tolerance 0.0200"]
    assert apply_gate(GatePolicy(max_regression=0.05, min_average_gain=None), {"add": 0.85, "rev": 1.0}, SOURCES).passed


def test_average_must_be_above_the_best_source() -> None:
    # The best source average is rev's (0.5); equal is not above.
    policy = GatePolicy(max_regression=None, min_average_gain=0.0)
    assert not apply_gate(policy, {"add": 0.5, "rev": 0.5}, SOURCES).passed
    decision = apply_gate(policy, {"add": 0.5, "rev": 0.5}, SOURCES)
    assert decision.reasons == ["average over add, rev: 0.5000 is not above the best source rev (0.5000) by more than 0.0000"]
    assert apply_gate(policy, {"add": 0.5, "rev": 0.52}, SOURCES).passed


def test_a_task_that_was_not_evaluated_fails_its_rules() -> None:
    decision = apply_gate(GatePolicy(min_score={"cipher": 0.1}, tasks=["add", "cipher"]), {"add": 0.9}, SOURCES)
    assert not decision.passed
    assert any("cipher: not evaluated" in r and "eval.tasks" in r for r in decision.reasons)
    assert any("average over add, cipher: the merged model was not evaluated on cipher" in r for r in decision.reasons)


def test_groups_are_left_out_of_regression_and_average_unless_named() -> None:
    merged = {"add": 0.7, "rev": 0.8, "both": 0.75}
    sources = {k: {**v, "both": sum(v.values()) / 2} for k, v in SOURCES.items()}
    decision = apply_gate(GatePolicy(max_regression=0.3, min_score={"both": 0.7}), merged, sources, groups=["both"])
    assert decision.passed
    assert {c.task for c in decision.checks if c.rule == "max_regression"} == {"add", "rev"}
    only_group = apply_gate(GatePolicy(max_regression=None, tasks=["both"]), merged, sources, groups=["both"])
    assert [c.task for c in only_group.checks] == ["average"] and only_group.checks[0].value == pytest.approx(0.75)


def test_no_rules_pass() -> None:
    decision = apply_gate(GatePolicy(max_regression=None, min_average_gain=None), {"add": 0.0}, SOURCES)
    assert decision.passed and decision.checks == []


def test_repository_params_hold_the_default_policy_and_eval_settings() -> None:
    policy = GatePolicy.from_params(REPO / "params.yaml")
    assert policy.min_score and policy.max_regression is not None and policy.min_average_gain is not None
    assert policy.stderr_margin == 2
    evaluation = EvalSettings.from_params(REPO / "params.yaml")
    assert evaluation.include_path == REPO / "evals" and evaluation.tasks == ["skill_add", "skill_reverse"]
    assert evaluation.bootstrap_iters == 1000


def test_a_regression_blocks_only_beyond_its_tolerance_plus_k_standard_errors() -> None:
    # best source add 0.9 (se 0.04), merged 0.85 (se 0.03): se of the difference 0.05, so k=2 widens the tolerance by 0.1
    stderrs = {"merged_stderrs": {"add": 0.03}, "source_stderrs": {"add": {"add": 0.04}}}
    within = apply_gate(GatePolicy(max_regression=0.02, min_average_gain=None, stderr_margin=2), {"add": 0.85}, SOURCES, **stderrs)
    assert within.passed
    (check,) = within.checks
    assert (check.stderr, check.margin, check.threshold) == (0.03, pytest.approx(0.1), pytest.approx(0.9 - 0.02 - 0.1))
    assert "| max_regression | add | 0.8500 ± 0.0300 | 0.7800 | 0.1000 | ok |" in within.markdown()

    beyond = apply_gate(GatePolicy(max_regression=0.02, min_average_gain=None, stderr_margin=2), {"add": 0.75}, SOURCES, **stderrs)
    assert beyond.reasons == [
        "add: 0.7500 regresses 0.1500 from the best source add (0.9000), more than the tolerance 0.0200 plus 2 standard errors of the difference (0.1000)"
    ]
    # k=0 is the rule on the scores alone
    point = apply_gate(GatePolicy(max_regression=0.02, min_average_gain=None, stderr_margin=0), {"add": 0.85}, SOURCES, **stderrs)
    assert point.reasons == ["add: 0.8500 regresses 0.0500 from the best source add (0.9000), more than the tolerance 0.0200"]


def test_a_gain_counts_only_beyond_k_standard_errors() -> None:
    # merged average 0.54 against the best source average 0.5 (rev); se of the merged mean sqrt(0.03² + 0.04²) / 2 = 0.025
    merged, stderrs = {"add": 0.5, "rev": 0.58}, {"add": 0.03, "rev": 0.04}
    source_stderrs = {"rev": {"add": 0.0, "rev": 0.0}}

    def gate(k: float) -> object:
        return apply_gate(GatePolicy(max_regression=None, min_average_gain=0.0, stderr_margin=k), merged, SOURCES,
                          merged_stderrs=stderrs, source_stderrs=source_stderrs)

    noisy = gate(2)
    (check,) = noisy.checks
    assert not noisy.passed and check.stderr == pytest.approx(0.025) and check.threshold == pytest.approx(0.55)
    assert noisy.reasons == [
        "average over add, rev: 0.5400 is not above the best source rev (0.5000) by more than 0.0000 plus 2 standard errors of the difference (0.0500)"
    ]
    assert gate(1).passed and gate(0).passed and gate(0).checks[0].threshold == pytest.approx(0.5)


def test_a_score_without_a_standard_error_counts_as_exact() -> None:
    policy = GatePolicy(max_regression=0.02, min_average_gain=None, stderr_margin=2)
    only_merged = apply_gate(policy, {"add": 0.85}, SOURCES, merged_stderrs={"add": 0.03})
    assert only_merged.checks[0].margin == pytest.approx(0.06) and only_merged.passed  # 0.05 < 0.02 + 2 * 0.03
    assert apply_gate(policy, {"add": 0.85}, SOURCES).checks[0].margin == 0.0
    # a mean over tasks one of which has no standard error has none
    average = apply_gate(GatePolicy(max_regression=None), {"add": 0.5, "rev": 0.6}, SOURCES, merged_stderrs={"add": 0.03})
    assert average.checks[0].stderr is None and average.checks[0].margin == 0.0 and average.passed


def test_the_demo_merge_passes_the_repository_policy_with_its_standard_errors() -> None:
    # The demo's scores (200 documents per task) and lm-eval's closed-form standard errors, sqrt(p (1 - p) / (n - 1))
    def se(p: float) -> float:
        return math.sqrt(p * (1 - p) / 199)

    merged = {"skill_add": 0.485, "skill_reverse": 0.91}
    sources = {"base": {"skill_add": 0.025, "skill_reverse": 0.0}, "add": {"skill_add": 0.895, "skill_reverse": 0.0},
               "reverse": {"skill_add": 0.005, "skill_reverse": 0.995}}
    policy = GatePolicy.from_params(REPO / "params.yaml")
    decision = apply_gate(policy, merged, sources, merged_stderrs={t: se(v) for t, v in merged.items()},
                          source_stderrs={s: {t: se(v) for t, v in scores.items()} for s, scores in sources.items()})
    assert decision.passed, decision.reasons
    checks = {(c.rule, c.task): c for c in decision.checks}
    add = checks[("max_regression", "skill_add")]
    assert add.margin == pytest.approx(2 * math.hypot(se(0.485), se(0.895))) and add.threshold == pytest.approx(0.895 - 0.6 - add.margin)
    average = checks[("min_average_gain", "average")]
    assert average.value == pytest.approx(0.6975) and average.stderr == pytest.approx(math.hypot(se(0.485), se(0.91)) / 2)
    assert average.threshold == pytest.approx(0.5 + 0.05 + average.margin) and 0.04 < average.margin < 0.045


def test_params_errors_list_every_problem_with_its_location(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("gate:\n  max_regression: -1\n  min_scor: {a: 1}\neval:\n  tasks: []\n  batch_sise: 4\n")
    with pytest.raises(ParamsError) as gate_error:
        GatePolicy.from_params(params)
    message = str(gate_error.value)
    assert "gate.max_regression" in message and "gate.min_scor" in message and "2 problem(s)" in message
    with pytest.raises(ParamsError, match=r"eval\.tasks.*\n.*eval\.batch_sise"):
        EvalSettings.from_params(params)
    with pytest.raises(ParamsError, match="does not exist"):
        GatePolicy.from_params(tmp_path / "missing.yaml")
    params.write_text("eval: {tasks: [x]}\n")
    with pytest.raises(ParamsError, match="gate: missing"):
        GatePolicy.from_params(params)
