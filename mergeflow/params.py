"""Sections of params.yaml: how each is read, and the ``merge:``, ``hub:`` and ``publish:`` sections of the DVC stages.

The ``eval:`` and ``gate:`` sections are ``mergeflow.evaluation.EvalSettings`` and ``mergeflow.gate.GatePolicy``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from merge_ops.sizes import parse_size
from mergeflow.errors import ParamsError

LOCAL_HUB = "local"
P = TypeVar("P", bound="ParamsSection")


def read_params_section(path: Path, section: str) -> dict[str, Any]:
    """One top-level section of a YAML params file.

    Raises:
        ParamsError: the file is missing, not YAML, or has no such mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ParamsError([f"{path} does not exist: create it with a `{section}:` section, or pass the settings explicitly"], source=str(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError([f"not valid YAML: {err}"], source=str(path)) from None
    value = data.get(section) if isinstance(data, dict) else None
    if not isinstance(value, dict):
        raise ParamsError([f"{section}: missing or not a mapping (got {value!r})"], source=str(path))
    return value


class ParamsSection(BaseModel):
    """A section of params.yaml, named by ``section``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    section: ClassVar[str] = ""

    @classmethod
    def from_params(cls: type[P], path: Path) -> P:
        """This section of a params file; ParamsError lists every bad key with its value."""
        name = cls.section
        try:
            return cls.model_validate(read_params_section(path, name))
        except ValidationError as err:
            problems = [f"{'.'.join(str(p) for p in (name, *e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in err.errors()]
            raise ParamsError(problems, source=str(path)) from None


class MergeParams(ParamsSection):
    """Which recipe to merge, with the method and parameters optionally overridden (``dvc exp run -S``)."""

    section: ClassVar[str] = "merge"
    recipe: Path
    """A mergekit recipe, relative to the working directory (the repository root under DVC)."""
    method: str | None = None
    """Replaces the recipe's ``merge_method``; the parameters the new method does not declare are dropped."""
    parameters: dict[str, Any] = {}
    """Set globally, replacing the recipe's values of the same names, e.g. ``{density: 0.5}``."""
    shard_size: int = 5 * 10**9
    """Bytes per output shard; ``5GB``, ``500MB`` or ``2GiB`` are read as such."""
    compute_dtype: str = "float32"

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, value: str | int) -> int:
        return parse_size(value)


class HubParams(ParamsSection):
    """Where Hub models come from and go to."""

    section: ClassVar[str] = "hub"
    endpoint: str | None = LOCAL_HUB
    """``local``: the embedded Hub server over ``outputs/hub``, with the demo family pushed to it and the
    recipe's ``demo-family/NAME`` models read as ``demo/NAME``; a URL: that Hub; None: HF_ENDPOINT."""

    @property
    def is_local(self) -> bool:
        return self.endpoint == LOCAL_HUB


class PublishParams(ParamsSection):
    """Where a merge that passes the gate is published."""

    section: ClassVar[str] = "publish"
    repo: str | None = None
    """``namespace/name`` on the Hub; None evaluates, tracks and gates without publishing."""
    private: bool = False
