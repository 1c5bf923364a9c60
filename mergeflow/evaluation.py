"""lm-eval on a local model folder, cached by the folder's content and the evaluation settings.

``evaluate_model`` runs ``lm_eval.simple_evaluate`` with the ``hf`` model on the folder and keeps the raw
results JSON. The cache key hashes the model's files (weights, config, tokenizer; not the README card), the
settings, the lm-eval version and the local task files, so the sources and the base of a merge evaluate once,
whatever path they were downloaded to, and the merged model again only when it changed.

A PEFT adapter folder (``adapter_config.json``) is evaluated on an explicit ``base`` folder (lm-eval's
``pretrained=BASE,peft=ADAPTER``); its key also hashes the base's files.

Tasks are lm-eval task or group names: real benchmarks (``hellaswag``, ``mmlu``, ...) with
``include_path=None`` (online, lm-eval's built-in tasks), local tasks such as the demo skills in ``evals/``
(``include_path=evals``), or both in one list: the local folder is indexed alone first (fast), and lm-eval's
built-in tasks only when a name is not found there (~24 s to index them).

Each score keeps lm-eval's standard error (``<metric>_stderr``): closed form for mean-aggregated metrics
(accuracy, exact match: the sample standard deviation over sqrt(n)), a bootstrap with ``bootstrap_iters``
resamples for the metrics lm-eval bootstraps (f1, bleu, median, ...); ``bootstrap_iters=0`` computes none.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from mergeflow import settings
from mergeflow.errors import EvaluationError
from mergeflow.files import file_sha256, model_content_hash, write_atomic
from mergeflow.params import ParamsSection


class EvalSettings(ParamsSection):
    """How models are evaluated: the ``eval:`` section of params.yaml.

    ``limit`` is a number of documents per task (or a fraction when < 1); ``num_fewshot`` None keeps each
    task's own; ``dtype`` None lets transformers choose (``auto`` in lm-eval terms is the checkpoint's dtype);
    ``bootstrap_iters`` > 0 keeps the standard errors (resamples for the bootstrapped metrics; closed-form ones
    cost nothing), 0 computes none.
    """

    section: ClassVar[str] = "eval"
    tasks: list[str] = Field(min_length=1)
    include_path: Path | None = None
    device: str = "cpu"
    batch_size: int | str = 8
    limit: int | float | None = None
    num_fewshot: int | None = None
    dtype: str | None = None
    bootstrap_iters: int = Field(default=1000, ge=0)

    @classmethod
    def from_params(cls, path: Path) -> EvalSettings:
        """The ``eval:`` section of a params file; a relative ``include_path`` is relative to that file.

        Raises:
            ParamsError: the file or section is missing, or a value is invalid (every problem listed).
        """
        loaded = super().from_params(path)
        if loaded.include_path is not None and not loaded.include_path.is_absolute():
            loaded = loaded.model_copy(update={"include_path": (Path(path).parent / loaded.include_path).resolve()})
        return loaded


class EvalResult(BaseModel):
    """One model's lm-eval results.

    ``metrics`` maps each task and group to its metrics: lm-eval's ``"<metric>,<filter>"`` keys become
    ``metric`` for the ``none`` filter and ``metric/filter`` otherwise; non-numeric values are left out.
    ``primary`` names the metric that is the task's score (its first configured metric); its standard error,
    when lm-eval computed one, is the metric ``<metric>_stderr`` (``<metric>_stderr/<filter>``).
    """

    model_dir: Path
    content_hash: str
    cache_key: str
    tasks: list[str]
    metrics: dict[str, dict[str, float]]
    primary: dict[str, str]
    groups: list[str]
    raw_path: Path
    lm_eval_version: str
    seconds: float
    cached: bool = False

    @property
    def scores(self) -> dict[str, float]:
        """Task (or group) -> the value of its primary metric."""
        return {t: self.metrics[t][m] for t, m in self.primary.items() if m in self.metrics.get(t, {})}

    @property
    def task_scores(self) -> dict[str, float]:
        """Like ``scores``, without the groups (each group is an aggregate of tasks already listed)."""
        return {t: v for t, v in self.scores.items() if t not in self.groups}

    @property
    def stderrs(self) -> dict[str, float]:
        """Task (or group) -> the standard error of its primary score; tasks without one are left out."""
        return {t: self.metrics[t][s] for t, m in self.primary.items() if (s := stderr_name(m)) in self.metrics.get(t, {})}

    @property
    def task_stderrs(self) -> dict[str, float]:
        """Like ``stderrs``, without the groups."""
        return {t: v for t, v in self.stderrs.items() if t not in self.groups}


def stderr_name(metric: str) -> str:
    """The name of a metric's standard error: ``exact_match`` -> ``exact_match_stderr``, ``acc/f`` -> ``acc_stderr/f``."""
    name, slash, filter_name = metric.partition("/")
    return f"{name}_stderr{slash}{filter_name}"


def _tasks_hash(include_path: Path | None) -> str | None:
    if include_path is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(include_path).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(f"{path.relative_to(include_path).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _metric_name(key: str) -> str:
    metric, _, filter_name = key.partition(",")
    return metric if filter_name in ("", "none") else f"{metric}/{filter_name}"


def _primary(task: str, metrics: dict[str, float], configs: dict[str, Any]) -> str | None:
    configured = [m.get("metric") for m in configs.get(task, {}).get("metric_list") or [] if isinstance(m.get("metric"), str)]
    for wanted in configured:
        for name in (wanted, *sorted(n for n in metrics if n.startswith(f"{wanted}/"))):
            if name in metrics:
                return str(name)
    return next((n for n in metrics if "_stderr" not in n), None)


def summarize_results(raw: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, str], list[str]]:
    """(metrics, primary metric, groups) from lm-eval's results dict."""
    metrics: dict[str, dict[str, float]] = {}
    for task_name, values in raw.get("results", {}).items():
        metrics[task_name] = {
            _metric_name(k): float(v)
            for k, v in values.items()
            if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    primary = {t: p for t in metrics if (p := _primary(t, metrics[t], raw.get("configs", {}))) is not None}
    return metrics, primary, sorted(raw.get("groups", {}))


def _unknown(tasks: list[str], task_manager: Any) -> list[str]:
    known = set(task_manager.all_tasks)
    return [t for t in tasks if t not in known and not any(c in t for c in "*?[") and not Path(t).exists()]


def _task_manager(tasks: list[str], include_path: Path | None) -> Any:
    """lm-eval's TaskManager for ``tasks``: the local folder alone when it holds them all, else with the built-in tasks.

    Raises:
        EvaluationError: a task is neither in ``include_path`` nor among lm-eval's tasks.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if not _unknown(tasks, local):
            return local
    task_manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=True)
    if unknown := _unknown(tasks, task_manager):
        where = f"in {include_path} or " if include_path else ""
        raise EvaluationError(
            f"unknown lm-eval task(s) {', '.join(unknown)} {where}among lm-eval's tasks: check the names (`lm_eval --tasks list`), "
            "or set eval.include_path to the folder of your task YAMLs"
        )
    return task_manager


def mean_score(scores: dict[str, float]) -> float:
    """The mean of the task scores; NaN when there are none."""
    return sum(scores.values()) / len(scores) if scores else float("nan")


def mean_score_stderr(stderrs: Mapping[str, float], tasks: Collection[str]) -> float | None:
    """The standard error of the mean over ``tasks`` (tasks evaluated independently: sqrt(sum se^2) / n).

    None when a task has no standard error (``bootstrap_iters: 0``, or a metric lm-eval computes none for).
    """
    if not tasks or any(t not in stderrs for t in tasks):
        return None
    return math.sqrt(sum(stderrs[t] ** 2 for t in tasks)) / len(tasks)


def plus_minus(value: float, stderr: float | None, digits: int = 4) -> str:
    """``0.4850 ± 0.0354``, or the value alone without a standard error."""
    return f"{value:.{digits}f}" if stderr is None else f"{value:.{digits}f} ± {stderr:.{digits}f}"


def score_cell(result: EvalResult, task_name: str) -> str:
    """A task's score ± its standard error for a table; ``-`` when the model was not evaluated on it."""
    value = result.scores.get(task_name)
    return "-" if value is None else plus_minus(value, result.stderrs.get(task_name))


def evaluate_model(
    model_dir: Path,
    *,
    tasks: list[str],
    base: Path | None = None,
    include_path: Path | None = None,
    device: str = "cpu",
    batch_size: int | str = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    dtype: str | None = None,
    bootstrap_iters: int = 1000,
    cache_dir: Path | None = None,
) -> EvalResult:
    """Evaluate the model in ``model_dir`` with lm-eval, or return the cached result of the same model and settings.

    Args:
        model_dir: a local Hugging Face model folder, or a PEFT adapter folder (with ``base``).
        tasks: lm-eval task or group names.
        base: the model folder an adapter in ``model_dir`` applies to; only for adapters.
        include_path: folder of local task YAMLs; lm-eval's built-in tasks are indexed too only when ``tasks``
            names one that is not in it.
        device: ``cpu``, ``cuda``, ``cuda:N``; batch_size: an int or ``"auto"``.
        limit: documents per task (a fraction when < 1); None evaluates everything.
        num_fewshot: few-shot examples; None keeps each task's default.
        dtype: model dtype passed to transformers (``float32``, ``bfloat16``, ``auto``); None: the default.
        bootstrap_iters: resamples for the bootstrapped standard errors (closed-form ones need none); 0: no
            standard errors at all.
        cache_dir: where results are cached; ``settings.EVAL_CACHE_DIR`` when None.

    Raises:
        EvaluationError: unknown task names, no model files in ``model_dir``, an adapter without ``base``,
            or ``base`` with a full model.

    Example:
        >>> evaluate_model(Path("merged/ties"), tasks=["skill_add"], include_path=Path("evals"), limit=40).scores
        {'skill_add': 0.55}
        >>> evaluate_model(Path("demo-family/adapters/add"), base=Path("demo-family/base"), tasks=["skill_add"], include_path=Path("evals")).scores
        {'skill_add': 0.975}
    """
    from importlib.metadata import version

    model_dir = Path(model_dir).resolve()
    base = _adapter_base(model_dir, base)
    cache_dir = Path(cache_dir or settings.EVAL_CACHE_DIR).resolve()
    include_path = Path(include_path).resolve() if include_path is not None else None
    lm_eval_version = version("lm_eval")
    content_hash = model_content_hash(model_dir)
    key_fields = {
        "model": content_hash,
        "tasks": list(tasks),
        "tasks_files": _tasks_hash(include_path),
        "device": device.split(":")[0],
        "batch_size": batch_size,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "dtype": dtype,
        "lm_eval": lm_eval_version,
    }
    if base is not None:  # only adapters get the field: the keys of full models stay as they were
        key_fields["base"] = model_content_hash(base)
    if bootstrap_iters:  # results without standard errors keep the keys they had before these were kept
        key_fields["bootstrap_iters"] = bootstrap_iters
    cache_key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
    record, raw_path = cache_dir / f"{cache_key}.json", cache_dir / f"{cache_key}.results.json"
    if record.is_file() and raw_path.is_file():
        cached = EvalResult.model_validate_json(record.read_text())
        return cached.model_copy(update={"model_dir": model_dir, "cached": True})

    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    task_manager = _task_manager(list(tasks), include_path)
    model_args = (f"pretrained={base},peft={model_dir}" if base else f"pretrained={model_dir}") + (f",dtype={dtype}" if dtype else "")
    started = time.perf_counter()
    raw = simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(tasks),
        task_manager=task_manager,
        device=device,
        batch_size=batch_size,
        limit=limit,
        num_fewshot=num_fewshot,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
        verbosity="ERROR",
    )
    seconds = time.perf_counter() - started
    gc.collect()  # the model is gone with simple_evaluate's frame; give its memory back before the next one
    if raw is None:  # simple_evaluate returns None on non-zero ranks of a distributed run
        raise EvaluationError(f"lm-eval returned no results for {model_dir}")
    metrics, primary, groups = summarize_results(raw)
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(raw_path, json.dumps(raw, indent=2, default=handle_non_serializable, sort_keys=True))
    result = EvalResult(
        model_dir=model_dir, content_hash=content_hash, cache_key=cache_key, tasks=list(tasks), metrics=metrics,
        primary=primary, groups=groups, raw_path=raw_path, lm_eval_version=lm_eval_version, seconds=round(seconds, 3),
    )
    write_atomic(record, result.model_dump_json(indent=2))
    return result


def _adapter_base(model_dir: Path, base: Path | None) -> Path | None:
    """The resolved ``base`` when ``model_dir`` is a PEFT adapter folder; None for a full model."""
    from merge_ops.lora import ADAPTER_CONFIG  # here: merge_ops.lora imports torch

    config = model_dir / ADAPTER_CONFIG
    if not config.is_file():
        if base is not None:
            raise EvaluationError(f"{model_dir} is not a PEFT adapter folder ({ADAPTER_CONFIG} missing): evaluate it without a base")
        return None
    if base is None:
        named = json.loads(config.read_text()).get("base_model_name_or_path")
        raise EvaluationError(f"{model_dir} is a PEFT adapter (its config names the base {named!r}): pass the folder of its base model as base")
    return Path(base).resolve()


def evaluation_report(merged: EvalResult, sources: dict[str, EvalResult], names: dict[str, str]) -> str:
    """Markdown: each task's primary score ± its standard error, the merged model beside each source (``names``: key -> label)."""
    columns = list(sources)
    lines = ["# Evaluation", "", "| task | merged | " + " | ".join(f"`{names.get(c, c)}`" for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for task_name, value in merged.scores.items():
        cells = " | ".join(score_cell(sources[c], task_name) for c in columns)
        lines.append(f"| {task_name} ({merged.primary[task_name]}) | **{plus_minus(value, merged.stderrs.get(task_name))}** | {cells} |")
    cached = [names.get(k, k) for k, r in sources.items() if r.cached] + (["merged"] if merged.cached else [])
    return "\n".join(lines + ["", f"From the evaluation cache: {', '.join(cached) or 'none'}."]) + "\n"
