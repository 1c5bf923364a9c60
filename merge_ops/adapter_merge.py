"""Adapter-space merges (``output: adapter``): LoRA adapters of one base combined into one PEFT adapter folder.

The result equals PEFT's ``LoraModel.add_weighted_adapter`` (``merge_ops.adapter_combination`` has the math) and
loads with ``PeftModel.from_pretrained``. Only the adapters are read, module by module (their configs and
safetensors headers to plan; one module's factors at a time to merge); the base model is never read.

The output, as PEFT makes it: ``adapter_config.json`` is the first adapter's with ``r = lora_alpha =`` the output
rank (so its scale is 1), ``target_modules`` the union of the adapters' (a sorted list, or the ``(a)|(b)`` regex of
string ones) and ``base_model_name_or_path`` the recipe's base. Ranks: ``cat`` the sum of the adapters' ranks (modules
some adapters lack are zero-padded), svd types ``svd_rank`` (default the largest), the factor-space types the
adapters' common rank. A single adapter is always combined with ``linear`` (PEFT does the same).
Where PEFT writes a folder that does not load or means something else, mergeflow differs and says so here:
``use_rslora`` is false in the output (PEFT copies it, which would rescale the merged update by ``sqrt(r)``); a module
whose rank differs from ``r`` (adapters with ``rank_pattern``) gets ``rank_pattern``/``alpha_pattern`` entries; DARE
masks come from the recipe's seed (``adapter_combination.combine_module``), not from torch's global generator, which
PEFT draws from after the new adapter's random initialisation; saved copies of base layers (PEFT's
``save_embedding_layers``) are not carried over.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel
from safetensors import safe_open

from merge_ops.adapter_combination import COMBINATIONS, CombinationOptions, combine_module
from merge_ops.card import card_data, reference_hub_id, render_card
from merge_ops.errors import IncompatibleModelsError, ModelNotFoundError, RecipeError
from merge_ops.finite import check_finite
from merge_ops.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, module_scale, read_adapter_headers
from merge_ops.output_folder import staged_output
from merge_ops.recipe import ModelRef, Recipe
from merge_ops.safetensors_io import DTYPE_NAMES, DTYPES, StreamingSafetensorsWriter, tensor_nbytes

FACTOR_NAMES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
"""(A suffix, B suffix) of the tensors of a LoRA module in PEFT's files: linear layers, embeddings."""
SAME_TARGETING = ("layers_to_transform", "layers_pattern", "exclude_modules", "fan_in_fan_out")
"""Config keys the adapters must agree on: the output keeps the first adapter's, which must select the union of
the adapters' modules."""
REFUSED = {"modules_to_save": "modules_to_save (whole trained modules, which add_weighted_adapter does not combine)",
           "trainable_token_indices": "trainable_token_indices"}


class AdapterInput(BaseModel):
    """One adapter to combine: a local PEFT LoRA adapter folder and its weight."""

    key: str
    """The adapter as the recipe names it (for messages and the model card)."""
    folder: Path
    weight: float


class FactorSource(BaseModel):
    """One adapter's factors of one module: tensor names in its file, rank and scale (``lora_alpha / r``)."""

    adapter: int
    a: str
    b: str
    rank: int
    scale: float


class ModuleJob(BaseModel):
    """One output module: its factors' names and shapes (``A``: rank x in, ``B``: out x rank) and the inputs."""

    name: str
    a: str
    b: str
    rank: int
    in_features: int
    out_features: int
    inputs: list[FactorSource]


class AdapterMergePlan(BaseModel):
    """Everything needed to write the merged adapter, without reading the recipe or the adapters' configs again."""

    combination: str
    """The combination type applied (``linear`` for a single adapter, as PEFT does)."""
    options: CombinationOptions
    seed: int
    adapters: list[AdapterInput]
    base_model: str
    dtype: str
    """Safetensors dtype of the output factors (computed in float32)."""
    config: dict[str, Any]
    """The output's ``adapter_config.json``."""
    modules: list[ModuleJob]
    input_bytes: int
    """Bytes of the adapters' factors that the merge reads."""
    recipe_text: str | None = None

    def module_size(self, module: ModuleJob) -> int:
        """Bytes of one output module's factors."""
        return tensor_nbytes(self.dtype, (module.rank, module.in_features)) + tensor_nbytes(self.dtype, (module.out_features, module.rank))

    @property
    def total_size(self) -> int:
        """Bytes of the output's tensors."""
        return sum(self.module_size(m) for m in self.modules)


class _Factors(NamedTuple):
    """One module's factors in one adapter file, from its headers."""

    a: str
    b: str
    rank: int
    in_features: int
    out_features: int
    embedding: bool
    nbytes: int


@dataclass
class _Adapter:
    """An adapter as planning sees it: its config and its modules' factors."""

    key: str
    config: dict[str, Any]
    modules: dict[str, _Factors]

    @property
    def rank(self) -> int:
        """The rank PEFT sizes merges by: ``r``, or the largest ``rank_pattern`` value (or module rank) if larger."""
        return int(max([self.config.get("r", 8), *(self.config.get("rank_pattern") or {}).values(), *(f.rank for f in self.modules.values())]))


def _read(adapter: AdapterInput) -> _Adapter:
    """Config and factor headers of one adapter folder; every unsupported option or tensor refused by name."""
    folder = Path(adapter.folder).resolve()
    headers = read_adapter_headers(adapter.key, folder)
    config = headers.config
    used = [name for option, name in REFUSED.items() if config.get(option)]
    if used:
        raise ModelNotFoundError(adapter.key, f"the adapter uses {', '.join(used)}; adapter-space merges combine LoRA factors only, "
                                 "merge into a model (`output: model`) instead")
    shapes = {name: shape for name, (_, shape) in headers.tensors.items()}
    dtypes = {name: dtype for name, (dtype, _) in headers.tensors.items()}
    modules, others = {}, []
    for name, shape in shapes.items():
        pair = next(((a, b) for a, b in FACTOR_NAMES if name.endswith(a)), None)
        if pair is None:
            if not any(name.endswith(b) for _, b in FACTOR_NAMES) and ".base_layer." not in name:
                others.append(name)
            continue
        b_name = name.removesuffix(pair[0]) + pair[1]
        b_shape = shapes.get(b_name, ())
        if len(shape) != 2 or len(b_shape) != 2 or b_shape[1] != shape[0]:
            others.append(name)
            continue
        nbytes = tensor_nbytes(dtypes[name], shape) + tensor_nbytes(dtypes[b_name], b_shape)
        module = name.removeprefix(PREFIX).removesuffix(pair[0])
        modules[module] = _Factors(name, b_name, shape[0], shape[1], b_shape[0], pair == FACTOR_NAMES[1], nbytes)
    if others:
        raise ModelNotFoundError(adapter.key, f"{folder / ADAPTER_WEIGHTS} holds tensors that are not 2-D LoRA factor pairs "
                                 f"(e.g. {others[0]}): modules_to_save, convolution adapters or another format, which adapter-space merges do not combine")
    return _Adapter(adapter.key, config, modules)


def _target_modules(adapters: list[_Adapter]) -> list[str] | str:
    """The union of the adapters' ``target_modules`` (PEFT's: a set union, or the alternation of regexes)."""
    targets = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if all(isinstance(t, list) for t in targets):
        return sorted({name for t in targets for name in t})  # type: ignore[union-attr]
    kinds = ", ".join(f"{a.key}: {type(t).__name__}" for a, t in zip(adapters, targets, strict=True))
    raise IncompatibleModelsError([f"target_modules must be lists in every adapter or regex strings in every adapter, as PEFT requires; got {kinds}"])


def _modules(adapters: list[_Adapter]) -> tuple[dict[str, list[tuple[int, _Factors]]], list[str]]:
    """Each module's factors in the adapters that have it (by adapter position), and the modules whose sizes differ."""
    modules: dict[str, list[tuple[int, _Factors]]] = {}
    for i, adapter in enumerate(adapters):
        for name, factors in adapter.modules.items():
            modules.setdefault(name, []).append((i, factors))
    problems = []
    for name, present in modules.items():
        if len({(f.in_features, f.out_features, f.embedding) for _, f in present}) > 1:
            listed = ", ".join(f"{adapters[i].key}: {'embedding' if f.embedding else 'linear'}, in {f.in_features}, out {f.out_features}" for i, f in present)
            problems.append(f"{name}: the adapters are not of one base, the module's sizes differ ({listed})")
    return modules, problems


def _output_rank(combination: str, adapters: list[_Adapter], modules: dict[str, list[tuple[int, _Factors]]],
                 options: CombinationOptions) -> tuple[int, list[str]]:
    """The output's ``r`` and the problems PEFT would refuse or fail on."""
    ranks = [a.rank for a in adapters]
    space = COMBINATIONS[combination].space
    if space == "cat":
        return sum(ranks), []
    if space == "svd":
        rank = options.svd_rank or max(ranks)
        sides = {name: min(present[0][1].in_features, present[0][1].out_features) for name, present in modules.items()}
        return rank, [f"{name}: svd_rank {rank} is larger than the module's smaller side {side}; lower svd_rank" for name, side in sides.items() if rank > side]
    if len(set(ranks)) > 1:
        listed = ", ".join(f"{a.key}: {a.rank}" for a in adapters)
        return 0, [f"{combination} combines the factors themselves, so every adapter needs the same rank (PEFT refuses too); got {listed}; "
                   "use cat or an svd type"]
    problems = [f"{name}: {combination} needs one rank per module, got {', '.join(f'{adapters[i].key}: {f.rank}' for i, f in present)}"
                for name, present in modules.items() if len({f.rank for _, f in present}) > 1]
    return ranks[0], problems


def plan_adapters(
    adapters: list[AdapterInput],
    *,
    combination: str,
    options: CombinationOptions | None = None,
    base_model: str,
    base_revision: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    recipe_text: str | None = None,
) -> AdapterMergePlan:
    """Plan the combination of LoRA adapter folders of one base into one adapter, from their configs and headers.

    Args:
        adapters: local adapter folders with their weights, in recipe order.
        combination: one of PEFT's combination types (``merge_ops.adapter_combination.COMBINATIONS``).
        options: density, majority_sign_method and the svd settings (checked against the type by the recipe).
        base_model, base_revision: the base, as the output's ``adapter_config.json`` names it.
        seed: seed of the dare types' masks.
        dtype: dtype of the output factors (``float32``, ``bfloat16``, ``float16``); the arithmetic is float32.
        recipe_text: the recipe, for the model card.

    Raises:
        RecipeError: an unknown combination type or dtype.
        ModelNotFoundError: a folder that is not a PEFT LoRA adapter, or one with an option adapter merges refuse (named).
        IncompatibleModelsError: every reason the adapters cannot be combined: different bases (a module's shape
            differs), settings they must share, ranks the type needs equal, an svd_rank larger than a module.

    Example:
        plan = plan_adapters([AdapterInput(key="a", folder=Path("a"), weight=1.0), AdapterInput(key="b", folder=Path("b"), weight=0.5)],
                             combination="cat", base_model="org/base")
    """
    if combination not in COMBINATIONS:
        raise RecipeError([f"merge_method: {combination!r} is not a combination type; use one of {', '.join(COMBINATIONS)}"])
    if dtype not in ("float32", "bfloat16", "float16"):
        raise RecipeError([f"out_dtype: {dtype!r} -> use float32, bfloat16 or float16"])
    if not adapters:
        raise RecipeError(["models: give at least one adapter"])
    options = options or CombinationOptions()
    combination = "linear" if len(adapters) == 1 else combination
    read = [_read(a) for a in adapters]
    problems = [f"{key}: adapters differ in {key} ({', '.join(f'{a.key}: {a.config.get(key)!r}' for a in read)}); "
                "the output keeps one value, so they must agree" for key in SAME_TARGETING if len({json.dumps(a.config.get(key)) for a in read}) > 1]
    modules, size_problems = _modules(read)
    target_modules = _target_modules(read)
    rank, rank_problems = _output_rank(combination, read, modules, options)
    if problems or size_problems or rank_problems:
        raise IncompatibleModelsError(problems + size_problems + rank_problems)
    jobs = []
    for name in sorted(modules):
        present, first = modules[name], modules[name][0][1]
        inputs = [FactorSource(adapter=i, a=f.a, b=f.b, rank=f.rank, scale=module_scale(read[i].config, name, f.rank)) for i, f in present]
        jobs.append(ModuleJob(name=name, a=first.a, b=first.b, rank=first.rank if COMBINATIONS[combination].space == "factors" else rank,
                              in_features=first.in_features, out_features=first.out_features, inputs=inputs))
    patterns = {re.escape(j.name): j.rank for j in jobs if j.rank != rank}
    config = {**read[0].config, "r": rank, "lora_alpha": rank, "target_modules": target_modules, "rank_pattern": patterns, "alpha_pattern": patterns,
              "use_rslora": False, "base_model_name_or_path": base_model, "revision": base_revision, "inference_mode": True}
    return AdapterMergePlan(combination=combination, options=options, seed=seed, adapters=adapters, base_model=base_model,
                            dtype=DTYPE_NAMES[getattr(torch, dtype)], config=config, modules=jobs, recipe_text=recipe_text,
                            input_bytes=sum(f.nbytes for present in modules.values() for _, f in present))


def adapter_folder(ref: ModelRef) -> str:
    """The adapter of a recipe model: ``ADAPTER`` of ``BASE+ADAPTER``, else the model itself (an adapter listed alone)."""
    return ref.adapter_ref.path if ref.adapter_ref is not None else ref.path


def plan_adapter_merge(recipe: Recipe, folders: Mapping[str, Path] | None = None) -> AdapterMergePlan:
    """Plan an ``output: adapter`` recipe (validated by ``load_recipe``/``parse_recipe``).

    Args:
        recipe: the recipe; each model's ``weight``, the top-level ``parameters``, ``seed``, ``out_dtype``/``dtype``.
        folders: model key (as ``ModelRef.key``) -> local adapter folder, for adapters fetched elsewhere; None
            resolves each adapter path locally (the working directory, then the recipe's folder).

    Raises:
        RecipeError, ModelNotFoundError, IncompatibleModelsError: see ``plan_adapters``.

    Example:
        plan = plan_adapter_merge(load_recipe(Path("adapters.yaml")))
        merge_adapters(plan, Path("out/merged-adapter"))
    """
    if recipe.output != "adapter" or recipe.models is None:
        raise RecipeError(["output: plan_adapter_merge merges `output: adapter` recipes with `models`; plan others with merge_ops.plan.plan_merge"])

    def local(ref: ModelRef) -> Path:
        if folders is not None:
            if ref.key not in folders:
                raise ModelNotFoundError(ref.key, "no local folder was given for this adapter")
            return Path(folders[ref.key])
        path = adapter_folder(ref)
        found = next((c for c in (Path(path), recipe.base_dir / path) if c.is_dir()), None)
        if found is None:
            raise ModelNotFoundError(ref.key, f"adapter folder {path} not found (tried the working directory and the recipe's folder)")
        return found.resolve()

    base = recipe.base_model or ModelRef(path=recipe.models[0].model.path, revision=recipe.models[0].model.revision)
    adapters = [AdapterInput(key=m.model.key, folder=local(m.model), weight=float(m.parameters["weight"])) for m in recipe.models]  # type: ignore[arg-type]
    return plan_adapters(
        adapters, combination=recipe.merge_method, options=CombinationOptions.model_validate(recipe.parameters), base_model=base.path,
        base_revision=base.revision, seed=recipe.seed, dtype=recipe.out_dtype or recipe.dtype or "float32", recipe_text=recipe.text,
    )


def _model_card(plan: AdapterMergePlan) -> str:
    repo = reference_hub_id(plan.base_model)
    listed = "\n".join(f"- `{a.key}` (weight {a.weight:g})" for a in plan.adapters)
    recipe = f"\n## Recipe\n\n```yaml\n{plan.recipe_text.strip()}\n```\n" if plan.recipe_text else ""
    base = f"`{plan.base_model}`" + ("" if repo else " (local folder)")
    body = (f"\n# Merged LoRA adapter\n\nMade with mergeflow: PEFT's **{plan.combination}** combination of LoRA adapters of {base}.\n\n"
            f"## Adapters merged\n\n{listed}\n{recipe}")
    return render_card(card_data(method=plan.combination, hub_ids=[repo] if repo else [], adapter=True), body)


def merge_adapters(
    plan: AdapterMergePlan, out_dir: Path, *, device: str = "cpu", force: bool = False, inputs: Iterable[Path] = (), allow_nonfinite: bool = False,
) -> str:
    """Write the merged adapter folder (``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``),
    module by module, and move it to ``out_dir`` when complete; returns the safetensors file's sha256.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``force`` is not set.
        OutputIsInputError: ``force`` is set and ``out_dir`` is or contains an adapter or one of ``inputs``.
        OutputLockedError: another merge is writing ``out_dir``.
        NonFiniteError: an adapter's factor, or a merged one, holds NaN or infinite values (unless ``allow_nonfinite``).

    Example:
        digest = merge_adapters(plan_adapter_merge(recipe), Path("out/merged-adapter"))
    """
    combination, dev = COMBINATIONS[plan.combination], torch.device(device)
    specs: list[tuple[str, str, tuple[int, ...]]] = [
        (n, plan.dtype, s) for m in plan.modules for n, s in ((m.a, (m.rank, m.in_features)), (m.b, (m.out_features, m.rank)))
    ]
    sources = [a.folder for a in plan.adapters] + list(inputs)

    def read(adapter: int, name: str) -> torch.Tensor:
        factor = handles[adapter].get_tensor(name)
        return factor if allow_nonfinite else check_finite(factor, name, model=plan.adapters[adapter].key)

    def written(name: str, factor: torch.Tensor) -> torch.Tensor:
        factor = factor.to(DTYPES[plan.dtype]).cpu().contiguous()
        return factor if allow_nonfinite else check_finite(factor, name)

    with staged_output(out_dir, force=force, inputs=sources) as staging, ExitStack() as files:
        handles = [files.enter_context(safe_open(a.folder / ADAPTER_WEIGHTS, framework="pt")) for a in plan.adapters]
        with StreamingSafetensorsWriter(staging / ADAPTER_WEIGHTS, specs) as writer:
            for module in plan.modules:
                factors = [(read(s.adapter, s.a).to(dev, torch.float32), read(s.adapter, s.b).to(dev, torch.float32), s.scale, plan.adapters[s.adapter].weight)
                           for s in module.inputs]
                a, b = combine_module(module.name, factors, combination, plan.options, rank=module.rank, seed=plan.seed)
                writer.write(module.a, written(module.a, a))
                writer.write(module.b, written(module.b, b))
        (staging / ADAPTER_CONFIG).write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        (staging / "README.md").write_text(_model_card(plan))
    return writer.sha256
