"""Every error mergeflow raises on purpose: one root class, each also a matching built-in.

Each message says what is wrong and what to do about it; the CLI prints it as one line.
"""
from __future__ import annotations


class MergeflowError(Exception):
    """Root of all mergeflow errors."""


class RecipeError(MergeflowError, ValueError):
    """The recipe is invalid; the message lists every problem with its key path."""

    def __init__(self, problems: list[str], *, source: str = "recipe") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {problems[0]}" if len(problems) == 1 else f"{source} has {len(problems)} problem(s):\n{lines}")


class ModelNotFoundError(MergeflowError, FileNotFoundError):
    """A model reference does not point at a usable local model folder."""

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        super().__init__(f"model {model!r}: {reason}")


class IncompatibleModelsError(MergeflowError, ValueError):
    """Input models cannot be merged together (shapes, names or architecture differ)."""

    def __init__(self, mismatches: list[str], *, summary: str = "the models cannot be merged") -> None:
        self.mismatches = mismatches
        lines = "\n".join(f"  - {m}" for m in mismatches)
        super().__init__(f"{summary} ({len(mismatches)} mismatch(es)):\n{lines}")


class OutputExistsError(MergeflowError, FileExistsError):
    """The output directory already holds something."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"{path} already exists: choose another output path or pass --force to replace it")


class OutputIsInputError(MergeflowError, ValueError):
    """``--force`` would replace a folder that is, or holds, one of the merge's inputs."""

    def __init__(self, path: str, source: str) -> None:
        self.path, self.source = path, source
        super().__init__(f"{path} cannot be replaced: it is or contains the input {source}; choose an output path outside the inputs")


class OutputLockedError(MergeflowError, BlockingIOError):
    """Another merge is writing the same output folder."""

    def __init__(self, path: str, lock: str) -> None:
        self.path, self.lock = path, lock
        super().__init__(f"{path} is being written by another merge (lock {lock} is held): wait for it to finish or choose another output path")


class ExtractionError(MergeflowError, ValueError):
    """A LoRA extraction cannot run as asked: an option out of range, or nothing to extract."""


class DeviceError(MergeflowError, RuntimeError):
    """The requested compute device is not available."""


class CorruptModelError(MergeflowError, ValueError):
    """A model folder's file is unreadable or unsafe: corrupt safetensors or JSON, a file outside the folder, a
    tensor stored twice."""

    def __init__(self, file: str, problem: str, fix: str) -> None:
        self.file = file
        self.problem = problem
        super().__init__(f"{file}: {problem}; {fix}")


class OutputWriteError(MergeflowError, OSError):
    """The output folder cannot be written: its disk is full or read-only, or it is not writable by this user."""

    def __init__(self, path: str, reason: str, fix: str) -> None:
        self.path = path
        super().__init__(f"cannot write {path}: {reason}; {fix}")


class MethodError(MergeflowError, ValueError):
    """A merge method cannot merge one tensor with the recipe's parameters (e.g. multislerp's directions cancel out)."""


class NonFiniteError(MergeflowError, ValueError):
    """A tensor a merge reads (``model`` set) or would write holds NaN or infinite values."""

    def __init__(self, tensor: str, count: int, *, model: str | None = None, rows: tuple[int, int] | None = None) -> None:
        self.tensor, self.count, self.model = tensor, count, model
        where = f" in rows {rows[0]}-{rows[1] - 1}" if rows else ""
        if model is not None:
            text = (f"{model}: tensor {tensor} holds {count} NaN or infinite value(s){where}, which the merged model would carry; "
                    "fix or replace the model, or pass --allow-nonfinite to merge it anyway")
        else:
            text = (f"merged tensor {tensor} would hold {count} NaN or infinite value(s){where} from finite inputs (the recipe's weights or "
                    "parameters overflowed its dtype); change them, or pass --allow-nonfinite to write it anyway")
        super().__init__(text)
