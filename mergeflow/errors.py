"""The workflow's errors (Hub, params, evaluation, gate, publishing, tracking), under the one root error.

Each is also the matching built-in and says what is wrong and what to do; the CLI prints it as one line.
The merge's own errors (recipe, models, output) are in ``merge_ops.errors``.
"""
from __future__ import annotations

from merge_ops.errors import MergeflowError


class HubAccessError(MergeflowError, PermissionError):
    """The Hub refused a request (401/403): the token is missing, wrong, or lacks access to the repo."""

    def __init__(self, repo_id: str, status: int | None = None) -> None:
        self.repo_id = repo_id
        self.status = status
        code = f" ({status})" if status else ""
        super().__init__(
            f"the Hub refused access to {repo_id!r}{code}: log in with `hf auth login` or set HF_TOKEN to a token that can read it"
        )


class HubError(MergeflowError, ConnectionError):
    """The Hub (HF_ENDPOINT) could not be used: no answer in time, no connection, a server error (5xx, 429), or an
    answer that is not the Hub's (not JSON, cut off). ``transient`` failures are worth retrying; the others are not."""

    def __init__(self, what: str, why: str, fix: str, *, transient: bool) -> None:
        self.what = what
        self.transient = transient
        super().__init__(f"{what}: {why}; {fix}")


class ParamsError(MergeflowError, ValueError):
    """The params file (``eval:`` / ``gate:`` sections) is invalid; the message lists every problem with its key path."""

    def __init__(self, problems: list[str], *, source: str = "params.yaml") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {problems[0]}" if len(problems) == 1 else f"{source} has {len(problems)} problem(s):\n{lines}")


class EvaluationError(MergeflowError, ValueError):
    """lm-eval cannot run as asked (unknown task names, a model folder it cannot load)."""


class GateFailedError(MergeflowError, RuntimeError):
    """The merged model did not pass the gate, so nothing was published."""

    def __init__(self, model: str, reasons: list[str], *, run_id: str | None = None) -> None:
        self.model = model
        self.reasons = reasons
        self.run_id = run_id
        where = f" (MLflow run {run_id})" if run_id else ""
        super().__init__(
            f"{model} did not pass the gate{where}, nothing was published: {'; '.join(reasons)}. "
            "Change the recipe, or the gate: section of params.yaml if the policy is too strict"
        )


class PublishError(MergeflowError, RuntimeError):
    """The Hub refused the upload for a reason retrying will not fix (unknown namespace, bad repo id)."""

    def __init__(self, repo_id: str, status: int | None, detail: str) -> None:
        self.repo_id = repo_id
        self.status = status
        code = f" ({status})" if status else ""
        super().__init__(
            f"cannot publish to {repo_id!r}{code}: {detail}; check the repo id (namespace/name) and that your token "
            "(HF_TOKEN or `hf auth login`) can write to that namespace"
        )


class TrackingError(MergeflowError, RuntimeError):
    """MLflow refused a request (not found, unauthorised, invalid): retrying will not fix it."""

    def __init__(self, uri: str, detail: str) -> None:
        self.uri = uri
        super().__init__(
            f"MLflow at {uri} refused the request: {detail}; check MLFLOW_TRACKING_URI (unset it to use the local ./mlruns store) "
            "and the tracking server's credentials (MLFLOW_TRACKING_TOKEN / MLFLOW_TRACKING_USERNAME)"
        )


class DemoBuildError(MergeflowError, RuntimeError):
    """The demo family's training failed in its child process (its traceback is on stderr above the message)."""

    def __init__(self, step: str, returncode: int) -> None:
        self.step = step
        self.returncode = returncode
        super().__init__(
            f"building the demo family failed in {step} (child process exit {returncode}); read the traceback above, "
            "fix its cause and run `mergeflow demo-models OUT --force` again"
        )
