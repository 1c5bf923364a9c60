"""No silent no-ops: every recipe key and every method parameter mergeflow accepts changes the merge, or is refused
with an error, or is on a short documented list of keys that leave the output alone (each with its reason).

The schema is walked from ``Recipe`` through every nested model, and the registry through every declared parameter:
a key or parameter added without a case here fails ``test_every_schema_key_is_classified`` or the registry walk.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from method_cases import call_kwargs, model_count
from pydantic import BaseModel
from tiny_family import make_adapter
from vocab_family import CHATML, build_vocab_family

from merge_ops.engine import merge_model
from merge_ops.errors import IncompatibleModelsError, RecipeError
from merge_ops.methods.registry import METHODS
from merge_ops.plan import plan_merge
from merge_ops.recipe import Recipe
from merge_ops.recipe_file import parse_recipe

# -- method parameters -------------------------------------------------------------------------------------------

NEUTRAL_PARAMETERS = {
    "int8_mask": "mergekit's memory option: its sign masks held as int8 instead of the working dtype, the same values "
                 "either way; mergeflow's masks only live per block, so there is nothing to save",
}
"""Method parameters accepted for mergekit's recipes that leave the output as it is, with why."""

CONTEXT = {
    ("nuslerp", "nuslerp_row_wise"): {"nuslerp_flatten": False},
    ("karcher", "max_iter"): {"tol": 0.0},
    ("ramplus_tl", "r"): {"epsilon": 1.0},
    ("ramplus_tl", "alpha"): {"epsilon": 1.0},
}
"""Parameters that only act beside another setting: nuslerp's row/column choice applies when it does not flatten;
karcher's iteration cap when its tolerance does not stop it first; RAM+'s boost where some entries are changed by one
model only (here: changes above ``epsilon``)."""

ALTERNATIVES = (0.2, 0.7, 2, 5)
"""Another value for a parameter that is not a bool: the first that differs from the baseline and that its
declaration allows."""


def method_inputs(n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``n`` models that share part of their offset (as fine-tunes of one base do), so that sign votes,
    cosines and magnitude ranks all have something to decide."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(24, 40, generator=g)
    shared = torch.randn(24, 40, generator=g)
    return base, [base + shared + torch.randn(24, 40, generator=g) for _ in range(n)]


def walked_parameters() -> Iterator[tuple[str, str]]:
    for name, method in METHODS.items():
        for param in method.params:
            yield name, param


@pytest.mark.parametrize(("method", "param"), list(walked_parameters()))
def test_every_method_parameter_changes_the_output_or_is_documented_neutral(method: str, param: str) -> None:
    m, declared = METHODS[method], METHODS[method].params[param]
    n = model_count(method, 3)
    base, tensors = method_inputs(n)
    baseline = {"weight": [0.3, 0.9, 0.5][:n], "density": 0.5, "t": 0.3, **CONTEXT.get((method, param), {})}  # unequal weights, half kept

    def merged(**changed: Any) -> torch.Tensor:
        kwargs = {**call_kwargs(method, n, **{k: v for k, v in baseline.items() if k in m.params}), **changed}
        return m(tensors, base, **kwargs)

    reference = call_kwargs(method, n, **{k: v for k, v in baseline.items() if k in m.params})[declared.arg]
    first = reference[0] if declared.per_model else reference
    if isinstance(first, bool):
        other: Any = not first
    else:
        other = next((v for v in ALTERNATIVES if v != first and _allowed(declared.check, v)), None)
        if other is None:
            pytest.fail(f"{method}.{param} ({declared.describe()}): add a value it allows to ALTERNATIVES")
    changed = [other, *reference[1:]] if declared.per_model else other
    if param in NEUTRAL_PARAMETERS:
        assert torch.equal(merged(), merged(**{declared.arg: changed})), f"{method}.{param} is listed as output-neutral but changes the output"
    else:
        assert not torch.equal(merged(), merged(**{declared.arg: changed})), (
            f"{method}.{param}: {first!r} and {other!r} give the same output; make it matter, refuse it, or list it in NEUTRAL_PARAMETERS with the reason"
        )


def _allowed(check: Callable[[Any], Any], value: Any) -> bool:
    try:
        check(value)
    except ValueError:
        return False
    return True


# -- recipe keys -------------------------------------------------------------------------------------------------

def schema_models(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """``model`` and every pydantic model its fields hold, by class name."""
    found = {model.__name__: model}

    def visit(hint: Any) -> None:
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            if hint.__name__ not in found:
                found.update(schema_models(hint))
        for arg in typing.get_args(hint):
            visit(arg)
        if isinstance(hint, types.UnionType):
            for arg in hint.__args__:
                visit(arg)

    for field in model.model_fields.values():
        visit(field.annotation)
    return found


def schema_keys() -> set[str]:
    return {f"{name}.{key}" for name, model in schema_models(Recipe).items() for key in model.model_fields}


class Models:
    """The recipe's models: the tiny family, a copy of ft_a with another tokenizer config, a LoRA adapter of base, and
    the family with tokenizers whose ft_a (``chat``) adds ChatML's tokens (``vocab_family``)."""

    def __init__(self, family: dict[str, Path], root: Path) -> None:
        self.base, self.a, self.b, self.neg = (str(family[k]) for k in ("base", "ft_a", "ft_b", "ft_neg"))
        retokenized = root / "ft_a_tokenizer"
        shutil.copytree(family["ft_a"], retokenized)
        (retokenized / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
        self.retokenized = str(retokenized)
        self.adapter = str(make_adapter(family["base"], root / "adapter", 7, target_modules=["q_proj", "v_proj"]))
        vocab = build_vocab_family(root / "vocab")
        self.vbase, self.chat, self.same = (str(vocab[k]) for k in ("base", "ft_a", "ft_b"))


def chat(m: Models, tokens: dict | None = None, **tokenizer: Any) -> dict:
    """Task arithmetic of the ChatML fine-tune and one without those tokens, over a union of their vocabularies."""
    recipe = {"merge_method": "task_arithmetic", "base_model": m.vbase, "models": [{"model": x, "parameters": {"weight": 0.5}} for x in (m.chat, m.same)]}
    return recipe | {"tokenizer": {"source": "union", **({"tokens": tokens} if tokens else {}), **tokenizer}}


def start_token(m: Models, source: Any, force: bool = False) -> dict:
    """``chat`` with a source (forced or not) for ``<|im_start|>``, which ft_b and the base lack."""
    return chat(m, {CHATML[0]: {"source": source, **({"force": True} if force else {})}})


@pytest.fixture(scope="module")
def models(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(family, tmp_path_factory.mktemp("recipe_keys"))


def ta(m: Models, *weights: Any, **extra: Any) -> dict:
    """Task arithmetic of ft_a and ft_b on base."""
    pairs = zip((m.a, m.b), weights or (0.6, 0.4), strict=True)
    return {"merge_method": "task_arithmetic", "base_model": m.base, "models": [{"model": x, "parameters": {"weight": w}} for x, w in pairs], **extra}


def linear(*refs: str, weights: tuple[float, ...] | None = None, **extra: Any) -> dict:
    return {"merge_method": "linear", "models": [{"model": r, "parameters": {"weight": w}} for r, w in zip(refs, weights or (1.0,) * len(refs), strict=True)],
            **extra}


def slices(method: str, *sources: list[dict], **extra: Any) -> dict:
    return {"merge_method": method, "slices": [{"sources": s} for s in sources], **extra}


def source(ref: str, start: int = 0, end: int = 4, **parameters: Any) -> dict:
    return {"model": ref, "layer_range": [start, end], **({"parameters": parameters} if parameters else {})}


Pair = Callable[[Models], tuple[dict, dict]]

EFFECTS: dict[str, Pair] = {
    "Recipe.merge_method": lambda m: (ta(m), {**ta(m), "merge_method": "ties"}),
    "Recipe.base_model": lambda m: (ta(m), {**ta(m), "base_model": m.neg}),
    "Recipe.models": lambda m: (linear(m.a, m.b), linear(m.a, m.neg)),
    "Recipe.slices": lambda m: (slices("passthrough", [source(m.a)]), slices("passthrough", [source(m.a, 0, 2)])),
    "Recipe.parameters": lambda m: (ta(m), ta(m, parameters={"lambda": 0.5})),
    "Recipe.dtype": lambda m: (ta(m), ta(m, dtype="bfloat16")),
    "Recipe.out_dtype": lambda m: (ta(m, dtype="bfloat16"), ta(m, dtype="bfloat16", out_dtype="float32")),
    "Recipe.tokenizer_source": lambda m: (linear(m.b, m.retokenized), linear(m.b, m.retokenized, tokenizer_source=m.retokenized)),
    "Recipe.tokenizer": lambda m: (linear(m.b, m.retokenized), linear(m.b, m.retokenized, tokenizer={"source": m.retokenized})),
    "TokenizerConfig.source": lambda m: (linear(m.b, m.retokenized, tokenizer={"source": "base"}), linear(m.b, m.retokenized, tokenizer={"source": m.retokenized})),
    "Recipe.chat_template": lambda m: (ta(m), ta(m, chat_template="chatml")),
    "Recipe.unsafe_truncate_embeddings": lambda m: ({**chat(m), "tokenizer": None}, {**chat(m), "tokenizer": None, "unsafe_truncate_embeddings": True}),
    "TokenizerConfig.tokens": lambda m: (chat(m), chat(m, {"<tool>": {"source": {"kind": "zero"}}})),
    "TokenizerConfig.pad_to_multiple_of": lambda m: (chat(m), chat(m, pad_to_multiple_of=32)),
    "TokenEmbedding.source": lambda m: (start_token(m, {"kind": "zero"}), start_token(m, m.chat)),
    "TokenEmbedding.force": lambda m: (start_token(m, {"kind": "zero"}), start_token(m, {"kind": "zero"}, force=True)),
    "ModelTokenSource.kind": lambda m: (start_token(m, {"kind": "model_token", "model": m.vbase, "token": "a"}), start_token(m, {"kind": "zero"})),
    "ModelTokenSource.model": lambda m: (start_token(m, {"kind": "model_token", "model": m.vbase, "token": "a"}),
                                         start_token(m, {"kind": "model_token", "model": m.chat, "token": "a"})),
    "ModelTokenSource.token_id": lambda m: (start_token(m, {"kind": "model_token", "model": m.vbase, "token_id": 3}),
                                            start_token(m, {"kind": "model_token", "model": m.vbase, "token_id": 4})),
    "ModelTokenSource.token": lambda m: (start_token(m, {"kind": "model_token", "model": m.vbase, "token": "a"}),
                                         start_token(m, {"kind": "model_token", "model": m.vbase, "token": "b"})),
    "ZeroSource.kind": lambda m: (start_token(m, {"kind": "zero"}), start_token(m, {"kind": "model_token", "model": m.vbase, "token": "a"})),
    "Recipe.seed": lambda m: (ta(m, merge_method="dare_ties", parameters={"density": 0.5}), ta(m, merge_method="dare_ties", parameters={"density": 0.5}, seed=1)),
    "Recipe.output": lambda m: (ta(m), ta(m, output="adapter")),  # combining adapters: tests/test_adapter_merge.py
    "Recipe.allow_adapter_base_mismatch": lambda m: (linear(f"{m.b}+{m.adapter}"), linear(f"{m.b}+{m.adapter}", allow_adapter_base_mismatch=True)),
    "InputModel.model": lambda m: (linear(m.a, m.b), linear(m.a, m.neg)),
    "InputModel.parameters": lambda m: (linear(m.a, m.b), linear(m.a, m.b, weights=(1.0, 0.5))),
    "Slice.sources": lambda m: (slices("passthrough", [source(m.a)]), slices("passthrough", [source(m.b)])),
    "Slice.parameters": lambda m: tuple(  # type: ignore[return-value]
        {**slices("slerp", [source(m.base), source(m.a)], base_model=m.base), "slices": [{"sources": [source(m.base), source(m.a)], "parameters": {"t": t}}]}
        for t in (0.3, 0.7)
    ),
    "SliceSource.model": lambda m: (slices("linear", [source(m.a, weight=1.0), source(m.b, weight=1.0)]), slices("linear", [source(m.a, weight=1.0), source(m.neg, weight=1.0)])),
    "SliceSource.layer_range": lambda m: (slices("passthrough", [source(m.a, 0, 2)]), slices("passthrough", [source(m.a, 2, 4)])),
    "SliceSource.parameters": lambda m: (slices("linear", [source(m.a, weight=1.0), source(m.b, weight=1.0)]), slices("linear", [source(m.a, weight=1.0), source(m.b, weight=0.5)])),
    "ModelRef.path": lambda m: (linear(m.a), linear(m.b)),
    "ModelRef.adapter": lambda m: (linear(m.base), linear(f"{m.base}+{m.adapter}")),
    "FilterEntry.filter": lambda m: (ta(m, [{"filter": "self_attn", "value": 0.2}, {"value": 0.6}], 0.4), ta(m, [{"filter": "mlp", "value": 0.2}, {"value": 0.6}], 0.4)),
    "FilterEntry.value": lambda m: (ta(m, [{"value": 0.2}], 0.4), ta(m, [{"value": 0.6}], 0.4)),
}
"""Key -> two recipes that differ only there; their merges differ (or one is refused and the other merges)."""

NEUTRAL: dict[str, tuple[str, Pair]] = {
    "Recipe.name": ("a label: mergekit reads it only in multi-merge files, where it names a merge", lambda m: (ta(m), ta(m, name="my-merge"))),
    "ModelRef.revision": (
        "a local folder has no revisions: ignored with a warning, as mergekit ignores it (a Hub reference is pinned to it: tests/test_sources.py)",
        lambda m: (linear(m.a), linear(f"{m.a}@v2")),
    ),
}
"""Keys accepted that leave the merged model as it is, with why; their merges are identical."""

UNIMPLEMENTED = {
    "modules": lambda m: {**ta(m), "modules": {"text_decoder": {"models": ta(m)["models"]}}},
    "slices[0].base_model": lambda m: {"merge_method": "task_arithmetic", "slices": [{"base_model": m.base, "sources": [
        {"model": x, "layer_range": [0, 4], "parameters": {"weight": 0.5}} for x in (m.base, m.a)]}]},
    "models[0].model": lambda m: {**ta(m), "models": [
        {"model": {"model": m.a, "override_architecture": "MistralForCausalLM"}, "parameters": {"weight": 0.5}}]},
}
"""Keys of mergekit's schema that mergeflow does not implement (multi-module recipes, a slice's own base, overriding
the architecture): outside the schema, so refused at their place, naming the keys allowed there."""


def test_every_schema_key_is_classified() -> None:
    classified = set(EFFECTS) | set(NEUTRAL)
    assert len(classified) == len(EFFECTS) + len(NEUTRAL)
    assert schema_keys() == classified, "give each new recipe key a case in EFFECTS or NEUTRAL (with its reason)"


Outcome = Callable[[dict], "dict[str, str] | str"]


@pytest.fixture(scope="module")
def outcome(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    """Recipe -> the merged model's files (name -> sha256; not the card, which quotes the recipe), or the refusal's
    message; each recipe merged once per module."""
    root, seen = tmp_path_factory.mktemp("outcomes"), {}

    def merged(recipe: dict) -> dict[str, str] | str:
        key = json.dumps(recipe, sort_keys=True)
        if key not in seen:
            try:
                plan = plan_merge(parse_recipe(recipe))
            except (RecipeError, IncompatibleModelsError) as err:
                seen[key] = f"refused: {err}"
            else:
                out = root / str(len(seen))
                merge_model(plan, out)
                seen[key] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.name != "README.md"}
        return seen[key]

    return merged


@pytest.mark.parametrize("key", list(EFFECTS))
def test_each_key_changes_the_merge(key: str, models: Models, outcome: Outcome) -> None:
    first, second = EFFECTS[key](models)
    assert outcome(first) != outcome(second)


@pytest.mark.parametrize("key", list(NEUTRAL))
def test_each_neutral_key_leaves_the_merge_alone(key: str, models: Models, outcome: Outcome, caplog: pytest.LogCaptureFixture) -> None:
    first, second = NEUTRAL[key][1](models)
    with caplog.at_level(logging.WARNING):
        assert outcome(first) == outcome(second) != {}
    if key == "ModelRef.revision":
        assert f"{models.a} is a local folder, which has no revisions: @v2 is ignored" in caplog.text


@pytest.mark.parametrize("key", list(UNIMPLEMENTED))
def test_each_unimplemented_mergekit_key_is_refused_at_its_place(key: str, models: Models) -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe(UNIMPLEMENTED[key](models))
    assert [p for p in info.value.problems if p.startswith(f"{key}:") and "allowed keys" in p], info.value.problems


# -- parameters the method does not read ---------------------------------------------------------------------------

def test_a_parameter_of_another_method_is_warned_about_and_ignored(models: Models, outcome: Outcome, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert outcome(ta(models, parameters={"density": 0.5})) == outcome(ta(models))
    assert "parameters.density is not used by task_arithmetic and is ignored" in caplog.text


def test_the_base_models_own_parameters_are_warned_about_and_ignored(models: Models, outcome: Outcome, caplog: pytest.LogCaptureFixture) -> None:
    recipe = ta(models)
    with_base = {**recipe, "models": [{"model": models.base, "parameters": {"weight": 0.9}}, *recipe["models"]]}
    with caplog.at_level(logging.WARNING):
        assert outcome(with_base) == outcome(recipe)
    assert "models[0].parameters (weight): the base model's own parameters are not read by task_arithmetic" in caplog.text


def test_a_model_reference_with_a_key_mergeflow_does_not_implement_is_refused(models: Models) -> None:
    with pytest.raises(RecipeError, match="override_architecture: not supported in a model reference; allowed keys: model, lora"):
        parse_recipe(linear(models.a) | {"models": [{"model": {"model": models.a, "override_architecture": "MistralForCausalLM"}, "parameters": {"weight": 1.0}}]})
