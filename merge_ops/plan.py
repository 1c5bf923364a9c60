"""The merge plan: every output tensor, its inputs and resolved parameters, grouped into shards.

``plan_merge`` does all checking up front and returns a serialisable ``MergePlan``; shards are
then independent units of work (``merge_shard`` in merge_ops.engine) that can run in any order
and in any process.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from merge_ops.architecture import encoder_layer_positions, is_pre_layer, is_vocabulary_tensor, layer_tensor_name, split_layer_name, tied_stand_in
from merge_ops.chat_templates import resolve_chat_template
from merge_ops.compatibility import CompatibilityReport, compatibility_report
from merge_ops.errors import ModelNotFoundError, RecipeError
from merge_ops.headers import ModelHeaders, read_local_headers
from merge_ops.lora import LoraTerm, is_adapter_folder
from merge_ops.methods.declaration import REQUIRED, MergeMethod
from merge_ops.methods.registry import get_method
from merge_ops.parameters import NOT_SET, layer_position, lookup
from merge_ops.recipe import LOCAL_REVISION, ModelRef, Parameters, Recipe, adapter_base
from merge_ops.safetensors_io import DTYPE_NAMES, DTYPES, tensor_nbytes
from merge_ops.vocabulary import OutputTokenizer, Vocabularies, plan_vocabulary, truncated_rows
from merge_ops.vocabulary_rows import VocabularyRows

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 5 * 10**9
COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "mergekit")
ZERO_SUM = 1e-6
"""Weights sum to zero when the sum is at most this fraction of their magnitudes' sum: dividing by it gives NaN or garbage."""
MERGEKIT_FLOAT32_METHODS = ("linear", "slerp")
"""mergekit 0.1.5 computes these in float32 and every other method in the recipe's ``dtype``."""


def resolve_compute_dtype(choice: str, recipe: Recipe) -> str:
    """``mergekit`` -> the dtype mergekit computes this recipe's method in; other choices as given."""
    if choice != "mergekit":
        return choice
    return "float32" if recipe.merge_method in MERGEKIT_FLOAT32_METHODS else recipe.dtype or "float32"


class TensorSource(BaseModel):
    model: str
    file: str
    name: str
    dtype: str
    lora: LoraTerm | None = None
    """The LoRA term to add when the model is ``BASE+ADAPTER``."""


class TensorJob(BaseModel):
    """One output tensor: its inputs, resolved parameters and random seed."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    inputs: list[TensorSource]
    base: TensorSource | None
    params: dict[str, Any]
    seed: int
    vocabulary: VocabularyRows | None = Field(default=None, exclude_if=lambda value: value is None)
    """For a token-indexed tensor whose inputs' vocabularies differ: how each input's rows line up with the output's."""

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    @property
    def input_nbytes(self) -> int:
        sources = self.inputs + ([self.base] if self.base else [])
        return sum(tensor_nbytes(s.dtype, self.shape) for s in sources)


class ShardJob(BaseModel):
    file: str
    tensors: list[TensorJob]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class MergePlan(BaseModel):
    """Everything needed to write the merged model, without reading another recipe or model."""

    method: str
    recipe_text: str
    recipe_sha256: str
    compute_dtype: str
    sources: dict[str, str]
    base_model: str | None
    config_from: str
    tokenizer_from: str | None
    chat_template: str | None
    """The chat template text to write (the recipe's built-in format, Jinja or ``auto`` choice); None keeps the tokenizer's."""
    num_layers: int
    layer_origins: list[tuple[str, int]]
    out_dtype: str | None
    shards: list[ShardJob]
    vocab_size: int | None = Field(default=None, exclude_if=lambda value: value is None)
    """The config's vocab_size when the merge changes it (the merged vocabulary's rows)."""
    tokenizer_build: OutputTokenizer | None = Field(default=None, exclude_if=lambda value: value is None)
    """The merged vocabulary's tokenizer, built from the models' tokenizers instead of copied from ``tokenizer_from``."""

    @property
    def tensor_count(self) -> int:
        return sum(len(s.tensors) for s in self.shards)

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def input_bytes(self) -> int:
        return sum(t.input_nbytes for s in self.shards for t in s.tensors)


@dataclass
class _Slice:
    sources: list[tuple[ModelRef, tuple[int, int], Parameters]]
    parameters: Parameters


def sums_to_zero(weights: list[float]) -> bool:
    """Whether dividing by ``sum(weights)`` would divide by (about) zero: ``[0.5, -0.5]``, ``[0, 0]``, ``[0.1, 0.2, -0.3]``."""
    return abs(sum(weights)) <= ZERO_SUM * sum(abs(w) for w in weights)


def tensor_seed(seed: int, name: str) -> int:
    """The per-tensor random seed: a function of (recipe seed, tensor name) only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def read_models(recipe: Recipe) -> dict[str, ModelHeaders]:
    """The headers of every model of the recipe, each a local folder (relative paths: cwd, then the recipe's folder).
    An adapter folder listed on its own is applied to the recipe's base model.

    Raises:
        ModelNotFoundError: a reference is not a local model or adapter folder.
        RecipeError: an adapter listed on its own in a recipe without ``base_model``.
    """
    def local(ref: ModelRef) -> Path:
        folder = next((c for c in (Path(ref.path), recipe.base_dir / ref.path) if c.is_dir()), None)
        if folder is None:
            raise ModelNotFoundError(ref.path, "not a local model folder; download Hub models first (`mergeflow run` does) or fix the path")
        if ref.revision:
            log.warning(LOCAL_REVISION, ref.path, ref.revision)
        return folder

    def read(ref: ModelRef) -> ModelHeaders:
        if ref.adapter_ref is not None:
            return read_local_headers(ref.key, local(ref), local(ref.adapter_ref))
        folder = local(ref)
        if not is_adapter_folder(folder):
            return read_local_headers(ref.key, folder)
        return read_local_headers(ref.key, local(adapter_base(recipe.base_model, ref)), folder)

    return {ref.key: read(ref) for ref in recipe.referenced_models}


def _slices(recipe: Recipe, method: MergeMethod, models: dict[str, ModelHeaders]) -> list[_Slice]:
    if recipe.slices is not None:
        return [_Slice([(s.model, s.layer_range, s.parameters) for s in sl.sources], sl.parameters) for sl in recipe.slices]
    members = [(m.model, m.parameters) for m in recipe.models or []]
    base = recipe.base_model
    if base and base not in [m for m, _ in members]:  # as mergekit: one more input, even for methods without a base
        members.append((base, {}))
    reference = models[(base or members[0][0]).key]
    return [_Slice([(m, (0, reference.num_layers), p) for m, p in members], {})]


class _Planner:
    def __init__(self, recipe: Recipe, method: MergeMethod, models: dict[str, ModelHeaders], vocabularies: Vocabularies | None) -> None:
        self.recipe, self.method, self.models, self.vocabularies = recipe, method, models, vocabularies
        self.problems: list[str] = []
        self.zero_sums: dict[tuple[float, ...], list[str]] = {}
        """Weights that sum to zero under a normalizing method -> the tensors they apply to."""
        out = recipe.out_dtype or recipe.dtype
        self.out_dtype = DTYPE_NAMES[getattr(torch, out)] if out else None

    def job(self, name: str, members: list[tuple[ModelRef, str, Parameters]], slice_params: Parameters, t: float) -> TensorJob | None:
        base_key = self.recipe.base_model.key if self.recipe.base_model and self.method.gets_base else None
        found: list[tuple[ModelRef, TensorSource, Parameters]] = []
        members = [(ref, tied_stand_in(n, self.models[ref.key].tensors) or n, p) for ref, n, p in members]  # a tied output head: its embedding
        for ref, source_name, params in members:  # names and shapes agree: compatibility_report checked them
            model, header = self.models[ref.key], self.models[ref.key].tensors[source_name]
            source = TensorSource(model=ref.key, file=str(model.file(source_name)), name=header.stored_as or source_name, dtype=header.dtype,
                                  lora=model.lora_term(source_name))
            found.append((ref, source, params))
        base = next((src for ref, src, _ in found if ref.key == base_key), None)
        if self.method.base == "required" and base is None:
            self.problems.append(f"{name}: {self.method.name} needs the base model {base_key} among the inputs of every slice")
            return None
        others = [(src, params) for ref, src, params in found if ref.key != base_key]
        shapes = [self.models[ref.key].tensors[n].shape for ref, n, _ in members]
        vocabulary = self.vocabulary_rows(name, members, base_key, [s[0] for s in shapes]) if is_vocabulary_tensor(name) else None
        shape = shapes[0] if vocabulary is None else (vocabulary.rows, *shapes[0][1:])
        if vocabulary is None and len(set(shapes)) > 1:
            self.problems.append(f"{name}: its inputs have different shapes and mergeflow does not know it as a token-indexed tensor")
        resolved: dict[str, Any] = {}
        for pname, param in self.method.params.items():
            if param.per_model:
                values = [lookup(pname, [p, slice_params, self.recipe.parameters], name, t) for _, p in others]
            else:
                values = [lookup(pname, [slice_params, self.recipe.parameters], name, t)]
            values = [param.default if v is NOT_SET else v for v in values]
            if any(v is REQUIRED for v in values):
                self.problems.append(f"{name}: no value of {pname} applies to this tensor ({param.describe()}); add a fallback entry without filter")
                continue
            try:
                values = [param.check(v) for v in values]
            except ValueError as err:
                self.problems.append(f"{name}: {err}")
                continue
            resolved[pname] = values if param.per_model else values[0]
        flag = self.method.normalized_by
        if flag and resolved.get(flag) and "weight" in resolved and sums_to_zero(resolved["weight"]):
            self.zero_sums.setdefault(tuple(resolved["weight"]), []).append(name)
        return TensorJob(
            name=name,
            dtype=self.out_dtype or found[0][1].dtype,
            shape=shape,
            inputs=[src for src, _ in others],
            base=base,
            params=resolved,
            seed=tensor_seed(self.recipe.seed, name),
            vocabulary=vocabulary,
        )

    def vocabulary_rows(self, name: str, members: list[tuple[ModelRef, str, Parameters]], base_key: str | None, rows: list[int]) -> VocabularyRows | None:
        """How the inputs of a token-indexed tensor (of ``rows`` rows each) line up: by the merged vocabulary, or
        (``unsafe_truncate_embeddings``) over their common first rows; None when they already do."""
        others = [ref.key for ref, _, _ in members if ref.key != base_key]
        index = {key: i for i, key in enumerate(others)} | ({base_key: len(others)} if base_key else {})
        listed = [(ref.key, index[ref.key], count) for (ref, _, _), count in zip(members, rows, strict=True)]
        try:
            lined: VocabularyRows | None
            if self.vocabularies is not None:
                lined = self.vocabularies.rows_for(name, listed)
            else:
                lined = truncated_rows([rows for _, _, rows in listed]) if self.recipe.unsafe_truncate_embeddings else None
            return lined.model_copy(update={"dtype": self.recipe.dtype}) if lined and self.recipe.dtype else lined
        except RecipeError as err:
            self.problems += err.problems
            return None

    def zero_sum_problem(self, weights: tuple[float, ...], names: list[str]) -> str:
        flag = self.method.normalized_by
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return (f"weight: {', '.join(f'{w:g}' for w in weights)} sum to zero for {len(names)} tensor(s) ({shown}), and {self.method.name} divides by "
                f"their sum while `{flag}` is true; change the weights, or set `{flag}: false`")

    def jobs(self, slices: list[_Slice]) -> tuple[list[TensorJob], list[tuple[str, int]]]:
        def reference(sl: _Slice) -> ModelHeaders:
            base = self.recipe.base_model
            keys = [ref.key for ref, _, _ in sl.sources]
            return self.models[base.key if base and base.key in keys else keys[0]]

        def outside_layers(sl: _Slice, pre: bool) -> list[TensorJob | None]:
            own = reference(sl).tensors
            heads = [n for ref, _, _ in sl.sources for n in self.models[ref.key].tensors if tied_stand_in(n, own)]  # the reference ties its head
            names = [n for n in dict.fromkeys([*own, *heads]) if split_layer_name(n) is None and is_pre_layer(n) == pre]
            positions = encoder_layer_positions(own)
            return [self.job(n, [(ref, n, p) for ref, _, p in sl.sources], sl.parameters, positions.get(n, 0.0)) for n in names]

        jobs = outside_layers(slices[0], pre=True)
        origins: list[tuple[str, int]] = []
        for sl in slices:
            ref_model = reference(sl)
            ref_start = next(r for m, r, _ in sl.sources if m.key == ref_model.key)[0]
            length = sl.sources[0][1][1] - sl.sources[0][1][0]
            for ref, (start, end), _ in sl.sources:
                if end > self.models[ref.key].num_layers:
                    self.problems.append(f"layer_range [{start}, {end}) of {ref.key}: the model has only {self.models[ref.key].num_layers} layers")
            if self.problems:
                continue
            for j in range(length):
                out_layer = len(origins)
                origins.append((ref_model.key, ref_start + j))
                for rest, ref_name in ref_model.layers.get(ref_start + j, {}).items():
                    prefix = split_layer_name(ref_name)[0]  # type: ignore[index]
                    members = [(ref, layer_tensor_name(prefix, start + j, rest), p) for ref, (start, _), p in sl.sources]
                    jobs.append(self.job(layer_tensor_name(prefix, out_layer, rest), members, sl.parameters, layer_position(j, length)))
        jobs += outside_layers(slices[-1], pre=False)
        self.problems += [self.zero_sum_problem(weights, names) for weights, names in self.zero_sums.items()]
        if self.problems:
            raise RecipeError(self.problems)
        return [j for j in jobs if j is not None], origins


def assign_shards(jobs: list[TensorJob], shard_size: int) -> list[ShardJob]:
    """Greedy, in order: a new shard starts when the next tensor would pass ``shard_size`` bytes."""
    groups: list[list[TensorJob]] = [[]]
    size = 0
    for job in jobs:
        if groups[-1] and size + job.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.nbytes
    if len(groups) == 1:
        return [ShardJob(file="model.safetensors", tensors=groups[0])]
    n = len(groups)
    return [ShardJob(file=f"model-{i + 1:05d}-of-{n:05d}.safetensors", tensors=g) for i, g in enumerate(groups)]


def _tokenizer_source(recipe: Recipe, first: str) -> str:
    choice = recipe.tokenizer.source if recipe.tokenizer else recipe.tokenizer_source
    base = recipe.base_model.key if recipe.base_model else first
    if choice in (None, "base", "union"):
        return base
    return ModelRef.model_validate(choice).key


def plan_merge(
    recipe: Recipe,
    models: Mapping[str, ModelHeaders] | None = None,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    compute_dtype: str = "float32",
    checked: CompatibilityReport | None = None,
    allow_crimes: bool = False,
) -> MergePlan:
    """Plan a merge from the models' headers: resolve every tensor's inputs and parameters.

    Args:
        recipe: a validated recipe (its text is kept for the model card).
        models: ref key (e.g. ``org/repo@rev``) -> headers of every model of the recipe, with local weights
            (``ModelHeaders.at``); None reads them from the local folders the recipe names (``read_models``).
        shard_size: maximum bytes per output shard.
        compute_dtype: dtype of the arithmetic: float32 (default), bfloat16, float16, or
            ``mergekit`` for the dtype mergekit uses for this method (bit-compatible outputs).
        checked: the ``compatibility_report`` of these models, when the caller made it (the pipeline does, before
            downloading); None makes it here. The plan trusts it: names and shapes are not checked twice.
        allow_crimes: when making the report here, models of another architecture or model_type than the reference are
            merged (``compatibility_report``).

    Raises:
        RecipeError, ModelNotFoundError, IncompatibleModelsError (every problem of the compatibility report).
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise RecipeError([f"compute dtype {compute_dtype!r} -> use one of {', '.join(COMPUTE_DTYPES)}"])
    if recipe.output == "adapter":
        raise RecipeError(["output: an `output: adapter` recipe is planned by merge_ops.adapter_merge.plan_adapter_merge, not plan_merge"])
    method = get_method(recipe.merge_method)
    given = read_models(recipe) if models is None else models
    models = {ref.key: given[ref.key] for ref in recipe.referenced_models}
    (checked or compatibility_report(recipe, models, allow_crimes=allow_crimes)).raise_for_problems()
    slices = _slices(recipe, method, models)
    config_from = recipe.base_model.key if recipe.base_model else slices[0].sources[0][0].key
    tokenizer_from = _tokenizer_source(recipe, config_from)
    if tokenizer_from not in models:
        raise RecipeError([f"tokenizer_source: {tokenizer_from!r} is not one of the recipe's models ({', '.join(models)})"])
    vocabularies = plan_vocabulary(recipe, models)
    jobs, origins = _Planner(recipe, method, models, vocabularies).jobs(slices)
    lined_up = next((j.vocabulary.rows for j in jobs if j.vocabulary), None)
    return MergePlan(
        method=method.name,
        recipe_text=recipe.text,
        recipe_sha256=recipe.sha256,
        compute_dtype=resolve_compute_dtype(compute_dtype, recipe),
        sources={k: str(m.path) for k, m in models.items()},
        base_model=recipe.base_model.key if recipe.base_model else None,
        config_from=config_from,
        tokenizer_from=tokenizer_from,
        chat_template=resolve_chat_template(recipe.chat_template, [m.path for m in models.values() if m.path is not None]),
        num_layers=len(origins),
        layer_origins=origins,
        out_dtype=recipe.out_dtype or recipe.dtype,
        shards=assign_shards(jobs, shard_size),
        vocab_size=vocabularies.rows if vocabularies else lined_up,
        tokenizer_build=vocabularies.tokenizer if vocabularies else None,
    )


def torch_dtype(name: str) -> torch.dtype:
    """``"BF16"`` or ``"bfloat16"`` -> torch.bfloat16."""
    return DTYPES.get(name) or getattr(torch, name)
