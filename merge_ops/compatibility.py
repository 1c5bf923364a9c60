"""Can these models be merged? A structured report from configs and safetensors headers only.

Checked against the reference model (the recipe's base, else its first model): architecture and
model_type, the config keys that fix tensor shapes, vocabularies (sizes, which tensors they explain, and with local
tokenizers which tokens differ; a problem unless the recipe sets a tokenizer policy or ``unsafe_truncate_embeddings``),
tensor names and shapes (per layer for slice recipes, so passthrough frankenmerges of different depths
pass), dtypes, the base model each fine-tune declares in its card, and for LoRA adapters the base they were trained
on, their modules against the base's tensors, rank and alpha. ``merge_ops.weight_space`` adds the
weight-space check once the weights are local. Problems stop the flow; warnings and notes are reported.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from merge_ops.architecture import encoder_parts, split_layer_name, tied_stand_in
from merge_ops.errors import IncompatibleModelsError
from merge_ops.headers import ModelHeaders, TensorHeader
from merge_ops.recipe import ModelRef, Recipe, Slice, SliceSource, adapter_base
from merge_ops.vocabulary import VocabularyDifference, vocabulary_difference, vocabulary_files

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "n_embd", "n_head", "n_inner")
"""Config keys that fix tensor shapes; any difference is reported on its own, before the tensors it explains."""
CRIMES = ("architectures", "model_type")
"""Config keys whose difference ``allow_crimes`` (mergekit's ``--allow-crimes``) turns from a problem into a warning."""
SUB_CONFIGS = ("text_config", "vision_config")
"""Parts of a multimodal config.json whose shape keys are compared as well (``text_config.hidden_size``)."""
EXAMPLES = 5
"""Tensor names shown per finding; the count says how many there are in all."""

Severity = Literal["problem", "warning", "note"]


class Finding(BaseModel):
    severity: Severity
    model: str | None
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.model}: {self.message}" if self.model else self.message


class ModelSummary(BaseModel):
    key: str
    architecture: str | None
    model_type: str | None
    layers: int
    vocab_size: int | None
    tensors: int
    dtypes: dict[str, int]
    declared_base: list[str]
    adapter: str | None = None
    """The LoRA adapter applied to the model: its reference, rank, alpha, scale and modules."""


class BaseDistance(BaseModel):
    """How far a model's weights are from the base: medians over a sample of same-named tensors."""

    model: str
    tensors: int
    cosine: float
    relative_distance: float
    fine_tuned: bool


class CompatibilityReport(BaseModel):
    method: str
    reference: str
    models: list[ModelSummary]
    findings: list[Finding]
    weight_space: list[BaseDistance] = []

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "problem"]

    @property
    def compatible(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        """IncompatibleModelsError listing every problem, if there is one."""
        if self.problems:
            raise IncompatibleModelsError([str(p) for p in self.problems])

    def markdown(self) -> str:
        """The report for people (a Prefect artifact, ``mergeflow check``)."""
        verdict = "compatible" if self.compatible else f"**not compatible: {len(self.problems)} problem(s)**"
        lines = [f"# Compatibility: {verdict}", "", f"Method `{self.method}`, reference model `{self.reference}`.", ""]
        lines += ["| model | architecture | model_type | layers | vocab | tensors | dtypes | declared base |", "|---|---|---|---|---|---|---|---|"]
        for m in self.models:
            dtypes = ", ".join(f"{d} x{n}" for d, n in m.dtypes.items())
            lines.append(f"| `{m.key}` | {m.architecture} | {m.model_type} | {m.layers} | {m.vocab_size} | {m.tensors} | {dtypes} | {', '.join(m.declared_base) or '-'} |")
        adapted = [m for m in self.models if m.adapter]
        if adapted:
            lines += ["", "## LoRA adapters", "", "| model | adapter |", "|---|---|"] + [f"| `{m.key}` | {m.adapter} |" for m in adapted]
        if self.weight_space:
            lines += ["", "## Weight space (sampled tensors vs the base)", "",
                      "| model | tensors | cosine | relative distance | fine-tuned from the base |", "|---|---|---|---|---|"]
            for d in self.weight_space:
                lines.append(f"| `{d.model}` | {d.tensors} | {d.cosine:.4f} | {d.relative_distance:.4f} | {'yes' if d.fine_tuned else '**no**'} |")
        for severity in ("problem", "warning", "note"):
            found = [f for f in self.findings if f.severity == severity]
            if found:
                lines += ["", f"## {severity.capitalize()}s", ""] + [f"- {f}" for f in found]
        return "\n".join(lines) + "\n"


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:EXAMPLES])
    return f"{shown}, and {len(names) - EXAMPLES} more" if len(names) > EXAMPLES else shown


def _layers(h: ModelHeaders) -> dict[int, dict[str, TensorHeader]]:
    return {i: {rest: h.tensors[name] for rest, name in layer.items()} for i, layer in h.layers.items()}


def summarize(h: ModelHeaders) -> ModelSummary:
    return ModelSummary(
        key=h.key,
        architecture=",".join(h.config.get("architectures") or []) or None,
        model_type=h.config.get("model_type"),
        layers=len(h.layers),
        vocab_size=h.config.get("vocab_size"),
        tensors=len(h.tensors),
        dtypes=dict(Counter(t.dtype for t in h.tensors.values())),
        declared_base=declared_bases(h),
        adapter=f"{h.adapter.key}: {h.adapter.describe()}" if h.adapter else None,
    )


def _config_value(config: dict[str, Any], key: str) -> Any:
    """``config[key]``, or for ``text_config.hidden_size`` the nested value; None where absent."""
    section, _, name = key.rpartition(".")
    part = config.get(section) if section else config
    return part.get(name) if isinstance(part, dict) else None


def _config_findings(ref: ModelHeaders, other: ModelHeaders, *, allow_crimes: bool | None = None) -> list[Finding]:
    """Architecture, model_type and the shape-fixing keys of ``other`` against ``ref``: problems, except another architecture or
    model_type with ``allow_crimes`` (a warning: the merged model takes the reference's config); None: problems that do not
    mention the flag (the caller has none)."""
    found = []
    for key in ("architectures", "model_type", *SHAPE_KEYS, *(f"{sub}.{k}" for sub in SUB_CONFIGS for k in SHAPE_KEYS)):
        want, got = _config_value(ref.config, key), _config_value(other.config, key)
        if want == got:
            continue
        message = f"{key} is {got!r}, the reference {ref.key} has {want!r}"
        severity: Severity = "problem"
        if key in CRIMES and allow_crimes is not None:
            severity = "warning" if allow_crimes else "problem"
            message += ("; merged anyway (--allow-crimes), the output takes the reference's config" if allow_crimes else
                        "; merge models of one architecture, or pass --allow-crimes to merge them anyway (the output takes the reference's config)")
        found.append(Finding(severity=severity, model=other.key, check="config", message=message))
    return found


Policy = Literal["refuse", "tokenizer", "truncate"]
"""What a recipe does about different vocabularies: nothing (they are a problem), a tokenizer policy, or truncation."""


def _policy(recipe: Recipe) -> Policy:
    if recipe.tokenizer is not None or recipe.tokenizer_source is not None:
        return "tokenizer"
    return "truncate" if recipe.unsafe_truncate_embeddings else "refuse"


def _tokens(tokens: list[str]) -> str:
    return _names([repr(t) for t in tokens])


def _token_detail(ref: ModelHeaders, difference: VocabularyDifference | None) -> str:
    if difference is None:
        return ""
    parts = [f"{len(difference.extra)} token(s) {ref.key} lacks: {_tokens(difference.extra)}"] if difference.extra else []
    parts += [f"lacks {len(difference.missing)} of its tokens: {_tokens(difference.missing)}"] if difference.missing else []
    parts += [f"{len(difference.moved)} token(s) at other ids: {_tokens(difference.moved)}"] if difference.moved else []
    return f"; it has {', '.join(parts)}" if parts else "; the tokenizers hold the same tokens (the rows past them are padding)"


def _vocabulary_findings(ref: ModelHeaders, other: ModelHeaders, policy: Policy) -> list[Finding]:
    """Vocabularies of other sizes (by config vocab_size), and, when both tokenizers are local, the tokens that differ."""
    sizes = _vocab_difference(ref, other)
    if sizes is None and vocabulary_files(ref) == vocabulary_files(other):
        return []
    difference = vocabulary_difference(ref, other)

    def finding(severity: Severity, message: str) -> list[Finding]:
        return [Finding(severity=severity, model=other.key, check="vocabulary", message=message)]

    if sizes is None:  # same size: only worth a word if the same ids hold other tokens
        changed = (difference.moved + difference.extra) if difference else []
        if not changed:
            return []
        moved = f"its tokenizer has other tokens at {len(changed)} id(s) than {ref.key}'s ({_tokens(changed)})"
        if policy == "tokenizer":
            return finding("note", f"{moved}: rows are lined up by token")
        return finding("warning", f"{moved}, so those rows of the embeddings would be merged across different tokens; set `tokenizer_source: union` "
                                  "(or `base`) to line them up by token")
    want, got = sizes
    sized = f"vocab_size is {got}, the reference {ref.key} has {want} ({got - want:+d} rows){_token_detail(ref, difference)}"
    if policy == "tokenizer":
        return finding("note", f"{sized}: the recipe's tokenizer policy lines the rows up by token")
    if policy == "truncate":
        return finding("warning", f"{sized}: unsafe_truncate_embeddings merges only the first {min(want, got)} rows of the token-indexed tensors, which "
                                  "must mean the same tokens in every model; the rest are dropped")
    vocab_tensors = [n for n, t in other.tensors.items() if t.shape[:1] == (got,) and n in ref.tensors and ref.tensors[n].shape[:1] == (want,)]
    fixes = ["`tokenizer_source: union` (every model's tokens)", f"`tokenizer_source: base` ({ref.key}'s {want} tokens)"]
    fixes += [f"`tokenizer_source: {other.key}` (its vocabulary holds all of {ref.key}'s)"] if difference and difference.superset else []
    return finding("problem", f"{sized}, so {_names(vocab_tensors) or 'the embedding tensors'} have {got} rows, not {want}: set {' or '.join(fixes)} "
                              f"to line the rows up by token, or `unsafe_truncate_embeddings: true` to merge only the first {min(want, got)} rows "
                              "(mergekit's --unsafe-truncate-embeddings)")


def _shape_findings(model: str, ref_key: str, pairs: list[tuple[str, TensorHeader, TensorHeader]], vocab: tuple[int, int] | None) -> list[Finding]:
    differ = [(n, a, b) for n, a, b in pairs if a.shape != b.shape]
    if vocab:  # rows that only differ by the vocabulary were explained by the vocabulary finding
        differ = [(n, a, b) for n, a, b in differ if not (a.shape[1:] == b.shape[1:] and (a.shape[0], b.shape[0]) == vocab)]
    if not differ:
        return []
    shown = [f"{n} {list(b.shape)} vs {list(a.shape)}" for n, a, b in differ]
    return [Finding(severity="problem", model=model, check="tensor_shapes", message=f"{len(differ)} tensor(s) have other shapes than in {ref_key}: {_names(shown)}")]


def _vocab_difference(ref: ModelHeaders, other: ModelHeaders) -> tuple[int, int] | None:
    """(reference, other) vocabulary sizes when config.json says they differ."""
    want, got = ref.config.get("vocab_size"), other.config.get("vocab_size")
    return (int(want), int(got)) if isinstance(want, int) and isinstance(got, int) and want != got else None


def _tied_findings(ref: ModelHeaders, other: ModelHeaders, names: list[str], own: bool) -> tuple[list[str], list[Finding]]:
    """Of ``names`` that one model lacks (``own``: ``other`` lacks them, else ``ref``), those explained by tied embeddings
    are notes; the rest are returned."""
    lacking, having = (other, ref) if own else (ref, other)
    tied = {n: tied_stand_in(n, lacking.tensors) for n in names}
    notes = [Finding(severity="note", model=other.key, check="tied_embeddings",
                     message=(f"stores no {n}: it ties it to {stand_in}, which stands in for it (as mergekit does)" if own else
                              f"has {n}, which the reference {ref.key} ties to {stand_in}: the merged model gets a {n} merged from the models' "
                              f"{n} and, where they tie it, their {stand_in} (as mergekit does)"))
             for n, stand_in in tied.items() if stand_in is not None and n in having.tensors]
    return [n for n in names if tied[n] is None], notes


def _tensor_findings(ref: ModelHeaders, other: ModelHeaders, *, tied: bool = False) -> list[Finding]:
    missing = [n for n in ref.tensors if n not in other.tensors]
    extra = [n for n in other.tensors if n not in ref.tensors]
    found = []
    if tied:
        missing, notes = _tied_findings(ref, other, missing, own=True)
        extra, more = _tied_findings(ref, other, extra, own=False)
        found += notes + more
    if missing:
        found.append(Finding(severity="problem", model=other.key, check="tensor_names", message=f"lacks {len(missing)} tensor(s) of {ref.key}: {_names(missing)}"))
    if extra:
        found.append(Finding(severity="problem", model=other.key, check="tensor_names", message=f"has {len(extra)} tensor(s) {ref.key} lacks: {_names(extra)}"))
    pairs = [(n, ref.tensors[n], other.tensors[n]) for n in ref.tensors if n in other.tensors]
    return found + _shape_findings(other.key, ref.key, pairs, _vocab_difference(ref, other))


def pair_findings(ref: ModelHeaders, other: ModelHeaders) -> list[Finding]:
    """What keeps ``other`` from lining up with ``ref`` tensor for tensor: architecture, shape-fixing config keys,
    vocabulary size, tensor names and shapes (all problems)."""
    vocabulary = [f for f in _vocabulary_findings(ref, other, "refuse") if f.severity == "problem"]
    return _config_findings(ref, other) + vocabulary + _tensor_findings(ref, other)


def _slice_reference(sl: Slice, reference: str) -> SliceSource:
    """The source a slice's others are compared with: the recipe's reference model when it is in the slice."""
    keys = [s.model.key for s in sl.sources]
    return sl.sources[keys.index(reference)] if reference in keys else sl.sources[0]


def _slice_findings(recipe: Recipe, headers: dict[str, ModelHeaders], reference: str) -> list[Finding]:
    """Slice recipes: each source's layers must match the slice reference's layer for layer; the sources of the
    first and last slices (where the embeddings, final norm and lm_head come from) must have its other tensors."""
    found: list[Finding] = []
    layers = {key: _layers(h) for key, h in headers.items()}
    slices = recipe.slices or []
    for number in sorted({0, len(slices) - 1}):
        ref_source = _slice_reference(slices[number], reference)
        wanted = [n for n in headers[ref_source.model.key].tensors if split_layer_name(n) is None]
        for source in slices[number].sources:
            missing = [n for n in wanted if n not in headers[source.model.key].tensors and tied_stand_in(n, headers[source.model.key].tensors) is None]
            if missing:
                found.append(Finding(severity="problem", model=source.model.key, check="tensor_names",
                                     message=f"slices[{number}]: lacks {len(missing)} tensor(s) of {ref_source.model.key}: {_names(missing)}"))
    for number, sl in enumerate(slices):
        ref_source = _slice_reference(sl, reference)
        for source in sl.sources:
            start, end = source.layer_range
            count = len(layers[source.model.key])
            if end > count:
                found.append(Finding(severity="problem", model=source.model.key, check="layers", message=f"slices[{number}] asks for layers [{start}, {end}) but the model has {count}"))
        if any(f.check == "layers" for f in found):
            continue
        for source in sl.sources:
            if source is ref_source:
                continue
            pairs, missing = [], []
            for j in range(source.layer_range[1] - source.layer_range[0]):
                want = layers[ref_source.model.key][ref_source.layer_range[0] + j]
                got = layers[source.model.key][source.layer_range[0] + j]
                missing += [f"layer {source.layer_range[0] + j}: {rest}" for rest in want if rest not in got]
                pairs += [(f"layers.{source.layer_range[0] + j}.{rest}", want[rest], got[rest]) for rest in want if rest in got]
            if missing:
                found.append(Finding(severity="problem", model=source.model.key, check="tensor_names", message=f"slices[{number}]: lacks {len(missing)} tensor(s) of {ref_source.model.key}: {_names(missing)}"))
            found += _shape_findings(source.model.key, ref_source.model.key, pairs, None)
    ref = headers[reference]
    for key, h in headers.items():  # embeddings, final norm, lm_head: shapes must agree where present
        pairs = [(n, t, h.tensors[n]) for n, t in ref.tensors.items() if split_layer_name(n) is None and n in h.tensors]
        found += _shape_findings(key, reference, pairs, _vocab_difference(ref, h)) if key != reference else []
    return found


def _stacked_shape_findings(recipe: Recipe, headers: dict[str, ModelHeaders], reference: str) -> list[Finding]:
    """Slice recipes stack layers of several models into one: each slice's layers must have the shapes of the reference's
    layers (where those agree with each other), or the merged model does not load with the reference's config."""
    shapes: dict[str, set[tuple[int, ...]]] = {}
    for layer in _layers(headers[reference]).values():
        for rest, tensor in layer.items():
            shapes.setdefault(rest, set()).add(tensor.shape)
    expected = {rest: found.pop() for rest, found in shapes.items() if len(found) == 1}
    findings = []
    for number, sl in enumerate(recipe.slices or []):
        source = _slice_reference(sl, reference)
        layers = _layers(headers[source.model.key])
        differ = [f"layers.{j}.{rest} {list(t.shape)} vs {list(expected[rest])}" for j in range(*source.layer_range)
                  for rest, t in layers.get(j, {}).items() if rest in expected and t.shape != expected[rest]]
        if differ:
            findings.append(Finding(severity="problem", model=source.model.key, check="tensor_shapes", message=(
                f"slices[{number}]: {len(differ)} layer tensor(s) have other shapes than the layers of {reference}, whose config the merged "
                f"model takes, so it would not load: {_names(differ)}; stack layers of models of one shape")))
    return findings


def _layer_findings(h: ModelHeaders) -> list[Finding]:
    """The decoder layers found in the tensor names must be the ones config.json counts, or slices and ``t`` would be wrong."""
    try:
        count = h.num_layers
    except KeyError as err:
        return [Finding(severity="problem", model=h.key, check="layers", message=f"{err.args[0]}: mergeflow cannot tell how many decoder layers "
                        f"this {h.config.get('model_type') or 'model'} has; merging it is not supported")]
    found = sorted(h.layers)
    if found == list(range(count)):
        return []
    prefixes = sorted({parts[0] for name in h.tensors if (parts := split_layer_name(name))})
    where = f"under {', '.join(prefixes)}" if prefixes else "none named <prefix>.layers.N, .h.N or .blocks.N"
    shown = f"{len(found)} layers ({found[0]}..{found[-1]})" if found else "no layers"
    return [Finding(severity="problem", model=h.key, check="layers", message=f"config.json counts {count} decoder layers, the tensor names hold "
                    f"{shown}, {where}: this {h.config.get('model_type') or 'model'} layout is not supported")]


def _multimodal_slice_findings(headers: dict[str, ModelHeaders]) -> list[Finding]:
    """Slices stack decoder layers; a vision tower or projector has no place in them."""
    found = []
    for key, h in headers.items():
        parts = encoder_parts(h.tensors)
        if parts:
            found.append(Finding(severity="problem", model=key, check="multimodal", message=(
                f"a {h.config.get('model_type') or 'multimodal'} model with {', '.join(parts)} beside its text decoder: slice recipes stack "
                "text-decoder layers only and do not place those parts; merge it with `models:` (the whole model, the text decoder layer by layer)"
            )))
    return found


def _dtype_findings(recipe: Recipe, summaries: list[ModelSummary]) -> list[Finding]:
    kinds = {m.key: "/".join(sorted(m.dtypes)) for m in summaries}
    if len(set(kinds.values())) < 2:
        return []
    listing = ", ".join(f"{k} {v}" for k, v in kinds.items())
    written = f"written as {recipe.out_dtype or recipe.dtype}" if (recipe.out_dtype or recipe.dtype) else "each tensor written in its first input's dtype (set `dtype:` in the recipe to choose)"
    return [Finding(severity="warning", model=None, check="dtypes", message=f"the models store different dtypes ({listing}): arithmetic runs in the compute dtype, {written}")]


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def declared_bases(h: ModelHeaders) -> list[str]:
    """The base a model says it came from: its card's ``base_model``, else its config's ``_name_or_path``; for a
    base with an adapter, the base the adapter was trained on."""
    if h.adapter is not None:
        return [h.adapter.declared_base] if h.adapter.declared_base else []
    if h.card_base_model:
        return h.card_base_model
    origin = str(h.config.get("_name_or_path") or "")
    return [origin] if _is_hub_id(origin) and origin != h.key.split("@")[0] else []


def _declared_base_findings(recipe: Recipe, headers: dict[str, ModelHeaders]) -> list[Finding]:
    if recipe.base_model is None:
        return []
    base = recipe.base_model.path
    found = []
    for key, h in headers.items():
        declared = declared_bases(h)
        if key == recipe.base_model.key or h.adapter is not None:  # adapters: _adapter_findings
            continue
        if not declared:
            found.append(Finding(severity="note", model=key, check="declared_base", message="declares no base model (card base_model, config _name_or_path)"))
        elif not _is_hub_id(base):
            found.append(Finding(severity="note", model=key, check="declared_base", message=f"declares base model {', '.join(declared)} (the recipe's base is a local folder, not compared)"))
        elif base.lower() not in [b.lower() for b in declared]:
            found.append(Finding(severity="warning", model=key, check="declared_base", message=f"declares base model {', '.join(declared)}, not the recipe's base {base}"))
        else:
            found.append(Finding(severity="note", model=key, check="declared_base", message=f"declares base model {base}, as the recipe says"))
    return found


def applied_base(recipe: Recipe, ref: ModelRef) -> ModelRef:
    """The base model an adapter is applied to: BASE of ``BASE+ADAPTER``, else (an adapter listed alone) the recipe's base."""
    return ModelRef(path=ref.path, revision=ref.revision) if ref.adapter else adapter_base(recipe.base_model, ref)


def _trained_on(h: ModelHeaders, base: ModelRef) -> tuple[bool | None, str]:
    """Whether the adapter of ``h`` was trained on ``base`` (None: cannot tell), and what it declares, in words."""
    assert h.adapter is not None
    declared = h.adapter.declared_base
    if not declared:
        return None, "it declares no base model in adapter_config.json"
    if h.path is None:  # the base is on the Hub
        if _is_hub_id(declared):
            return declared.lower() == base.path.lower(), declared
        return None, f"trained on {declared}, not compared with a Hub base"
    folders = [c for c in (Path(declared), *([h.adapter.path / declared] if h.adapter.path else [])) if c.is_dir()]
    if folders:
        return any(c.resolve() == h.path for c in folders), declared
    if declared == h.config.get("_name_or_path"):
        return True, declared
    return None, f"trained on {declared}, not compared with the local folder"


def _adapter_findings(recipe: Recipe, headers: dict[str, ModelHeaders]) -> list[Finding]:
    """Each adapter: its modules against the base's tensors, the base it was trained on against the one it is applied to."""
    found = []
    for ref in recipe.referenced_models:
        h = headers[ref.key]
        if h.adapter is None:
            continue
        base = applied_base(recipe, ref)
        found += [Finding(severity="problem", model=ref.key, check="adapter", message=f"adapter {h.adapter.key} does not fit {base.key}: {p}")
                  for p in h.adapter_problems]
        matches, declared = _trained_on(h, base)
        if matches is False:
            severity: Severity = "warning" if recipe.allow_adapter_base_mismatch else "problem"
            advice = "allowed by allow_adapter_base_mismatch" if recipe.allow_adapter_base_mismatch else (
                f"apply it to {declared}, or set `allow_adapter_base_mismatch: true` in the recipe if {base.key} has the same weights")
            found.append(Finding(severity=severity, model=ref.key, check="adapter_base",
                                 message=f"adapter {h.adapter.key} was trained on {declared}, but is applied to {base.key}; {advice}"))
        else:
            how = "trained on it" if matches else declared
            found.append(Finding(severity="note", model=ref.key, check="adapter_base",
                                 message=f"LoRA adapter {h.adapter.key} on {base.key} ({how}): {h.adapter.describe()}"))
    return found


def compatibility_report(recipe: Recipe, headers: dict[str, ModelHeaders], *, allow_crimes: bool = False) -> CompatibilityReport:
    """Check that the recipe's models can be merged, from their headers only.

    Args:
        recipe: the validated recipe.
        headers: ref key -> ``ModelHeaders`` for every model the recipe references.
        allow_crimes: another architecture or model_type than the reference's is a warning, not a problem (the run's choice,
            mergekit's ``--allow-crimes``); tensor names and shapes must still agree.

    Example:
        >>> report = compatibility_report(recipe, {ref.key: read_local_headers(ref.key, Path(ref.path)) for ref in recipe.referenced_models})
        >>> report.raise_for_problems()
    """
    reference = recipe.base_model.key if recipe.base_model else recipe.referenced_models[0].key
    ref = headers[reference]
    summaries = [summarize(h) for h in headers.values()]
    findings: list[Finding] = []
    for key, h in headers.items():
        if key != reference:
            findings += _config_findings(ref, h, allow_crimes=allow_crimes) + _vocabulary_findings(ref, h, _policy(recipe))
            findings += _tensor_findings(ref, h, tied=True) if recipe.slices is None else []
    if recipe.slices is not None:
        findings += _multimodal_slice_findings(headers) + _slice_findings(recipe, headers, reference) + _stacked_shape_findings(recipe, headers, reference)
    findings += _dtype_findings(recipe, summaries) + _declared_base_findings(recipe, headers) + _adapter_findings(recipe, headers)
    findings += [f for h in headers.values() for f in _layer_findings(h)]
    return CompatibilityReport(method=recipe.merge_method, reference=reference, models=summaries, findings=findings)
