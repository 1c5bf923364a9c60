"""Recipes in mergekit's YAML schema, validated with pydantic.

The schema only; ``merge_ops.recipe_file.load_recipe`` reads a file, validates it against this schema and
its method, and raises one RecipeError listing every problem with its key path, the bad value and what is allowed.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError, field_validator, model_serializer, model_validator

from merge_ops.chat_templates import check_chat_template
from merge_ops.errors import RecipeError

DType = Literal["float32", "bfloat16", "float16"]
Scalar = bool | int | float | str


class FilterEntry(BaseModel):
    """One entry of a conditional parameter: ``{filter: self_attn, value: 0.5}``."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[Scalar]


ParamValue = Scalar | list[FilterEntry] | list[Scalar]
Parameters = dict[str, ParamValue]


def _split_reference(text: str) -> dict[str, Any]:
    """``org/base@rev+org/adapter@rev`` -> path, revision and adapter."""
    base, _, adapter = text.partition("+")
    path, _, revision = base.partition("@")
    return {"path": path, "revision": revision or None, "adapter": adapter or None}


LOCAL_REVISION = "%s is a local folder, which has no revisions: @%s is ignored, as mergekit ignores it; remove it, or name a Hub repo to pin a revision"
"""The warning (a logging format: folder, revision) when a reference to a local folder names a revision."""


class ModelRef(BaseModel):
    """A model: a local directory or a Hub id, with an optional revision (``org/repo@rev``), optionally with a
    PEFT LoRA adapter applied to it (mergekit's ``BASE+ADAPTER``, or ``{model: BASE, lora: ADAPTER}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    revision: str | None = None
    adapter: str | None = None
    """The adapter as written (``path`` or ``path@revision``), when the model is ``BASE+ADAPTER``."""

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _split_reference(value)
        if isinstance(value, dict) and "model" in value:  # mergekit's {model: BASE, lora: ADAPTER}, each text or {path, revision}
            unknown = sorted(set(value) - {"model", "lora"})
            if unknown:
                raise ValueError(f"{', '.join(unknown)}: not supported in a model reference; allowed keys: model, lora")
            base, lora = value["model"], value.get("lora")
            if isinstance(lora, dict):
                lora = f"{lora['path']}@{lora['revision']}" if lora.get("revision") else lora.get("path")
            parsed = _split_reference(base) if isinstance(base, str) else dict(base)
            return {**parsed, **({"adapter": lora} if lora else {})}
        return value

    @field_validator("path")
    @classmethod
    def _named(cls, path: str) -> str:
        if not path.strip():
            raise ValueError("an empty model reference; write a local model folder or a Hub repo id org/name")
        return path

    @model_serializer
    def _as_text(self) -> str:
        return self.key

    @property
    def key(self) -> str:
        """The reference as written in recipes: ``path``, ``path@revision``, with ``+adapter`` when adapted."""
        base = f"{self.path}@{self.revision}" if self.revision else self.path
        return f"{base}+{self.adapter}" if self.adapter else base

    @property
    def adapter_ref(self) -> ModelRef | None:
        """The adapter as a reference of its own (``path@revision``), when there is one."""
        return ModelRef.model_validate(self.adapter) if self.adapter else None

    def __str__(self) -> str:
        return self.key


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelRef
    parameters: Parameters = Field(default_factory=dict)


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: Parameters = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if not 0 <= start < end:
            raise ValueError(f"layer_range {list(value)} must be [start, end) with 0 <= start < end")
        return value


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    parameters: Parameters = Field(default_factory=dict)

    @model_validator(mode="after")
    def _same_length(self) -> Slice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
        return self


class ModelTokenSource(BaseModel):
    """``{kind: model_token, model: M, token: T}`` (or ``token_id: N``): the row of token T (id N) in model M's own tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["model_token"]
    model: ModelRef
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of `token` or `token_id`")
        return self


class ZeroSource(BaseModel):
    """``{kind: zero}``: a row of zeros."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["zero"]


def _source_kind(value: Any) -> str:
    """``kind`` of a token source (``model_token``, ``zero``); anything else is a model reference."""
    if isinstance(value, dict):
        return str(value.get("kind", "model"))
    return str(getattr(value, "kind", "model"))


TokenSource = Annotated[
    Annotated[ModelTokenSource, Tag("model_token")] | Annotated[ZeroSource, Tag("zero")] | Annotated[ModelRef, Tag("model")],
    Discriminator(_source_kind),
]


class TokenEmbedding(BaseModel):
    """Where a token's embedding and lm_head rows come from, for models that lack the token (or, with ``force``, for all)."""

    model_config = ConfigDict(extra="forbid")
    source: TokenSource | None = None
    """A model (its row of this token), one row of a model, or zeros; None: the models' own rows only."""
    force: bool = False

    @model_validator(mode="after")
    def _force_needs_source(self) -> TokenEmbedding:
        if self.force and self.source is None:
            raise ValueError("force needs a source: a model, {kind: model_token, model: M, token: T} or {kind: zero}")
        return self

    @property
    def source_model(self) -> ModelRef | None:
        """The model the source reads, if any."""
        return self.source.model if isinstance(self.source, ModelTokenSource) else self.source if isinstance(self.source, ModelRef) else None


class TokenizerConfig(BaseModel):
    """mergekit's ``tokenizer:`` block: the output vocabulary (``source``), tokens to add or re-source, padding."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class Recipe(BaseModel):
    """A merge recipe (mergekit schema, plus mergeflow's optional ``seed`` for random methods, ``output``,
    ``allow_adapter_base_mismatch`` and ``unsafe_truncate_embeddings``).

    Loaded once per run (``merge_ops.recipe_file.load_recipe``), it carries the text it was read from and
    that file's path, for the plan, the model card and the lineage.
    """

    model_config = ConfigDict(extra="forbid")
    _text: str | None = PrivateAttr(default=None)
    _path: Path | None = PrivateAttr(default=None)
    merge_method: str
    base_model: ModelRef | None = None
    models: list[InputModel] | None = None
    slices: list[Slice] | None = None
    parameters: Parameters = Field(default_factory=dict)
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    """``auto``, a built-in prompt format (``merge_ops.chat_templates.BUILT_IN``) or a Jinja template."""
    name: str | None = None
    """A label, as in mergekit (whose multi-merge files name each merge with it); the merge does not read it."""
    seed: int = 0
    output: Literal["model", "adapter"] = "model"
    """``adapter``: combine LoRA adapters of one base into one adapter (``merge_method`` a PEFT combination type)."""
    allow_adapter_base_mismatch: bool = False
    """Apply LoRA adapters to a base other than the one they declare (a warning instead of a problem)."""
    unsafe_truncate_embeddings: bool = False
    """Without a tokenizer policy, merge embeddings of different vocabulary sizes over their common first rows (mergekit's
    ``--unsafe-truncate-embeddings``): a warning instead of a problem. Token ids must mean the same in those rows."""

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        return value if value is None else check_chat_template(value)

    @model_validator(mode="after")
    def _models_or_slices(self) -> Recipe:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of `models` or `slices`")
        if self.tokenizer and self.tokenizer_source:
            raise ValueError("give either `tokenizer_source` or `tokenizer`, not both")
        if self.unsafe_truncate_embeddings and (self.tokenizer or self.tokenizer_source):
            raise ValueError("unsafe_truncate_embeddings: the tokenizer policy already lines the vocabularies up; remove one of them")
        models = self.referenced_models
        for token, embedding in ((self.tokenizer.tokens or {}) if self.tokenizer else {}).items():
            source = embedding.source_model
            if source is not None and source not in models:
                raise ValueError(f"tokenizer.tokens.{token}.source: {source} is not one of the recipe's models ({', '.join(m.key for m in models)})")
        return self

    def with_source(self, text: str, path: Path | None = None) -> Recipe:
        """This recipe, remembering the text it was parsed from and the file that held it."""
        self._text, self._path = text, path
        return self

    @property
    def text(self) -> str:
        """The recipe as written (as YAML from its fields when it was not read from text)."""
        if self._text is None:
            return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
        return self._text

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def path(self) -> Path | None:
        """The recipe file, when it was read from one."""
        return self._path

    @property
    def file_name(self) -> str:
        """The recipe file's name (``recipe.yaml`` when it was not read from a file)."""
        return self._path.name if self._path is not None else "recipe.yaml"

    @property
    def base_dir(self) -> Path:
        """The folder relative local model paths are tried against (after the working directory): the recipe's."""
        return self._path.parent if self._path is not None else Path.cwd()

    @property
    def referenced_models(self) -> list[ModelRef]:
        """Every model the recipe uses, base first, each once, in recipe order."""
        refs = [self.base_model] if self.base_model else []
        if self.models is not None:
            refs += [m.model for m in self.models]
        for s in self.slices or []:
            refs += [src.model for src in s.sources]
        return list(dict.fromkeys(refs))


def adapter_base(base_model: ModelRef | None, ref: ModelRef) -> ModelRef:
    """The base an adapter listed on its own (``ref``, no ``+``) is applied to: the recipe's ``base_model``.

    Raises:
        RecipeError: the recipe has no ``base_model`` (or it is the adapter itself).
    """
    if base_model is None or base_model == ref:
        raise RecipeError([f"{ref.key}: is a LoRA adapter; list it as BASE+{ref.key}, or set the recipe's base_model to the model it adapts"])
    return base_model


def _location(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(("function-", "tagged-union", "union[", "list[", "tuple[", "dict[", "bool", "int", "float", "str", "FilterEntry", "function-before")):
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    containers: dict[str, type[BaseModel]] = {
        "models": InputModel, "slices": Slice, "sources": SliceSource, "tokenizer": TokenizerConfig, "tokens": TokenEmbedding,
    }
    parents = [part for part in loc[:-1] if isinstance(part, str) and part in containers]
    model = containers[parents[-1]] if parents else Recipe
    return list(model.model_fields)


def validation_problems(err: ValidationError) -> list[str]:
    """One readable line per pydantic error: key path, bad value, what is allowed."""
    seen: dict[str, str] = {}
    for e in err.errors():
        where = _location(e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = f"unknown key; allowed keys here: {', '.join(_allowed_keys(e['loc']))}"
        shown = repr(e["input"])
        plain = e["type"] in ("missing", "extra_forbidden") or len(shown) > 60
        text = f"{where}: {message}" if plain else f"{where}: {shown} -> {message}"
        seen.setdefault(where, text)
    return list(seen.values())
