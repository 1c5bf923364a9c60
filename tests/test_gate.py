"""The publication gate: each rule on hand-made scores, groups, and the policy read from params.yaml."""
from __future__ import annotations

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
    evaluation = EvalSettings.from_params(REPO / "params.yaml")
    assert evaluation.include_path == REPO / "evals" and evaluation.tasks == ["skill_add", "skill_reverse"]


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
