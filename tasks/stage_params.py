"""The ``merge:``, ``hub:`` and ``publish:`` sections of params.yaml, read by the DVC stages (dvc.yaml).

The ``eval:`` and ``gate:`` sections are ``tasks.evaluation.EvalSettings`` and ``tasks.gate.GatePolicy``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from merge_ops.errors import ParamsError
from merge_ops.sizes import parse_size
from tasks.evaluation import read_params_section

LOCAL_HUB = "local"
P = TypeVar("P", bound="_Section")


class _Section(BaseModel):
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


class MergeParams(_Section):
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


class HubParams(_Section):
    """Where Hub models come from and go to."""

    section: ClassVar[str] = "hub"
    endpoint: str | None = LOCAL_HUB
    """``local``: the embedded Hub server over ``outputs/hub``, with the demo family pushed to it and the
    recipe's ``demo-family/NAME`` models read as ``demo/NAME``; a URL: that Hub; None: HF_ENDPOINT."""

    @property
    def is_local(self) -> bool:
        return self.endpoint == LOCAL_HUB


class PublishParams(_Section):
    """Where a merge that passes the gate is published."""

    section: ClassVar[str] = "publish"
    repo: str | None = None
    """``namespace/name`` on the Hub; None evaluates, tracks and gates without publishing."""
    private: bool = False
