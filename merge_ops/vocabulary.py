"""The merged model's vocabulary, built from the models' tokenizers as mergekit 0.1.5 builds it, and where each row
of the token-indexed tensors (embeddings, lm_head) comes from.

Tokenizers are read with transformers' ``AutoTokenizer``, imported only when the vocabularies differ. A model's own
rows are its tokenizer's ids below its config's ``vocab_size``.

The output vocabulary (``tokenizer_source``, or ``tokenizer.source``, whose default is ``union``):
  - ``base``: the base model's tokenizer (else the first model's), without tokens whose ids reach its ``vocab_size``;
  - ``union``: that tokenizer, then the regular tokens it lacks (model by model, by id), then every model's added
    tokens (the first model that adds a token decides its settings);
  - a model: that model's tokenizer as it is.
Tokens named in ``tokenizer.tokens`` are added when missing; ``pad_to_multiple_of`` rounds the rows up.

The rows, per token-indexed tensor over the models that feed it (``merge_ops.vocabulary_rows``): a model that has the
token keeps its own row unless the token is ``force``d; the others get the token's fill: the recipe's source for it;
else the only model that has it; zeros when none has it; the base's row when the base has it; else the mean of the
rows of the models that have it. Padding rows are each model's mean row. The method then merges the lined-up tensors.

Where mergekit's order comes from hashing (the order of the regular tokens a union adds; the first model when there is
no base model, both taken from sets), mergeflow uses token ids and the recipe's order.
"""
from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from merge_ops.architecture import is_vocabulary_tensor
from merge_ops.errors import RecipeError
from merge_ops.headers import ModelHeaders
from merge_ops.recipe import ModelRef, ModelTokenSource, Recipe, TokenEmbedding, TokenizerConfig, ZeroSource
from merge_ops.vocabulary_rows import VocabularyRows

log = logging.getLogger(__name__)

VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class TokenizerUnavailable(RecipeError):
    """A tokenizer the vocabulary needs does not load."""


class OutputTokenizer(BaseModel):
    """How to build the merged model's tokenizer from the models' tokenizers (at planning, and again when the folder is written)."""

    source: str
    """``base``, ``union`` or a model's key."""
    models: list[str]
    """Every model, the base (else the first model) first."""
    vocab_sizes: dict[str, int | None]
    """Each model's config ``vocab_size``: its tokens with larger ids have no rows."""
    added: list[str] = []
    """Tokens of ``tokenizer.tokens``, added when the vocabulary lacks them."""


def vocabulary_files(model: ModelHeaders) -> bytes:
    """The bytes of the files that define a model's vocabulary (tokenizer.json, tokenizer.model, vocab.json)."""
    folder = model.path
    return b"".join((folder / f).read_bytes() for f in VOCABULARY_FILES if (folder / f).exists()) if folder is not None else b""


def config_vocab_size(config: Mapping[str, Any]) -> int | None:
    """``vocab_size`` of a config.json (or of its ``text_config``)."""
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def embedding_rows(model: ModelHeaders) -> int | None:
    """Rows of the model's first token-indexed tensor (its input embedding)."""
    return next((t.shape[0] for name, t in model.tensors.items() if is_vocabulary_tensor(name) and t.shape), None)


def load_tokenizer(key: str, folder: Path | None) -> Any:
    """The fast tokenizer of a local model folder (``AutoTokenizer``).

    Raises:
        TokenizerUnavailable: no folder, or transformers cannot load a tokenizer from it.
    """
    from transformers import AutoTokenizer

    if folder is None:
        raise TokenizerUnavailable([f"{key}: its tokenizer is not local yet; download the model first (`mergeflow run` does)"])
    try:
        return AutoTokenizer.from_pretrained(str(folder), revision=None, trust_remote_code=False, use_fast=True)
    except Exception as err:  # transformers raises many types (OSError, ValueError, KeyError, ...)
        raise TokenizerUnavailable([f"{key}: no tokenizer loads from {folder} ({type(err).__name__}: {err})"]) from err


def strip_tokenizer(tokenizer: Any, size: int | None, key: str) -> Any:
    """``tokenizer`` without its tokens whose ids are ``size`` or more (only a fast BPE tokenizer can lose tokens), and
    without them among its special tokens.

    Raises:
        RecipeError: tokens to remove from a tokenizer that is not a fast BPE tokenizer.
    """
    from tokenizers import Tokenizer

    size = size or len(tokenizer.get_vocab())
    unused = {token for token, i in tokenizer.get_vocab().items() if i >= size}
    if not unused:
        return tokenizer
    data: dict[str, Any] = json.loads(tokenizer.backend_tokenizer.to_str()) if tokenizer.is_fast else {"model": {"type": type(tokenizer).__name__}}
    if data["model"]["type"] != "BPE":
        raise RecipeError([f"{key}: its tokenizer has {len(unused)} token(s) past vocab_size {size}, which only a fast BPE tokenizer can drop "
                           f"(this one is {data['model']['type']}); use another model's tokenizer as the base"])
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < size]
    data["model"]["vocab"] = {token: i for token, i in data["model"]["vocab"].items() if token not in unused}
    data["model"]["merges"] = [m for m in data["model"]["merges"] if not unused & set(m.split(" ") if isinstance(m, str) else m)]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))  # the wrapper keeps its settings; only the vocabulary changes
    # special tokens that were dropped would come back on loading (transformers adds them): mergekit keeps them, we do not
    tokenizer.extra_special_tokens = [t for t in tokenizer.extra_special_tokens if str(t) not in unused]
    for name, token in tokenizer.special_tokens_map.items():
        if str(token) in unused:
            log.warning("%s: its %s %r has an id past vocab_size %d and is dropped with it", key, name, str(token), size)
            setattr(tokenizer, name, None)
    return tokenizer


def _union(base: Any, tokenizers: Mapping[str, Any], sizes: Mapping[str, int | None]) -> Any:
    """``base`` (a fresh copy) with every other regular token, then every added token, of ``tokenizers`` (base first)."""
    from transformers import AutoTokenizer

    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for key, tokenizer in tokenizers.items():
        size = sizes[key] or tokenizer.vocab_size
        regular.update((token, None) for token, i in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]) if i < size)
        for i, info in tokenizer.added_tokens_decoder.items():
            if i < size and added.setdefault(info.content, info) != info:
                log.warning("token %r is added with other settings by %s; the first model's settings are kept", info.content, key)
    with tempfile.TemporaryDirectory() as folder:  # a copy, so the base's own tokenizer is not changed
        base.save_pretrained(folder, legacy_format=False, safe_serialization=True)
        union = AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=False)
    known = base.get_vocab()
    for token in regular:
        if token not in added and token not in known:
            union.add_tokens(token)
    for info in added.values():
        union.add_tokens(info)
    return union


def build_tokenizers(spec: OutputTokenizer, folders: Mapping[str, Path | None]) -> tuple[Any, dict[str, Any]]:
    """The merged model's tokenizer and each model's own (the base's stripped to its vocab_size); a model whose
    tokenizer does not load is taken to share the base's vocabulary, with a warning (as mergekit does).

    Raises:
        TokenizerUnavailable: the base's tokenizer (or the chosen model's) does not load.
        RecipeError: the base's tokenizer has tokens past its vocab_size and cannot drop them.
    """
    base_key = spec.models[0]
    base = strip_tokenizer(load_tokenizer(base_key, folders[base_key]), spec.vocab_sizes[base_key], base_key)
    tokenizers = {base_key: base}
    for key in spec.models[1:]:
        try:
            tokenizers[key] = load_tokenizer(key, folders[key])
        except TokenizerUnavailable as err:
            log.warning("%s; its vocabulary is taken to be the base's", err.problems[0])
    if spec.source == "base":
        out = base
    elif spec.source == "union":
        out = _union(base, tokenizers, spec.vocab_sizes)
    else:
        out = load_tokenizer(spec.source, folders[spec.source])
    present = set(out.get_vocab())
    for token in spec.added:
        if token not in present:
            out.add_tokens(token)
            present.add(token)
    return out, tokenizers


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(output row, own row)`` pairs, sorted by output row -> ``(output row, own row, count)`` runs."""
    runs: list[tuple[int, int, int]] = []
    for out, own in pairs:
        if runs and runs[-1][0] + runs[-1][2] == out and runs[-1][1] + runs[-1][2] == own:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((out, own, 1))
    return runs


@dataclass
class Vocabularies:
    """The output vocabulary and each model's rows of it, for planning the token-indexed tensors."""

    tokenizer: OutputTokenizer
    out: dict[str, int]
    rows: int
    own: dict[str, dict[str, int]]
    """Model -> token -> its row (ids below its vocab_size)."""
    original: dict[str, dict[str, int]]
    """Model -> its tokenizer's whole vocabulary (for ``{kind: model_token, token: T}`` sources)."""
    tokens: dict[str, TokenEmbedding]
    base: str | None

    def lines_up(self, rows: Mapping[str, int | None]) -> bool:
        """Every model already has every output token at its output id, all with the same rows; nothing forced or padded."""
        return not self.tokens and self.rows == len(self.out) and len(set(rows.values())) == 1 and all(own == self.out for own in self.own.values())

    def _fill(self, token: str, setting: TokenEmbedding, members: list[tuple[str, int, int]], problems: list[str]) -> list[tuple[int, int]]:
        source, model = setting.source, setting.source_model
        where = f"tokenizer.tokens.{token}"
        if isinstance(source, ZeroSource):
            return []
        if model is None:
            problems.append(f"{where}: some models lack this token, so it needs a source: a model, {{kind: model_token, model: M, token: T}} or {{kind: zero}}")
            return []
        member = next(((index, limit) for key, index, limit in members if key == model.key), None)
        if member is None:
            problems.append(f"{where}: its source {model.key} has no input to this tensor; take the row from one of {', '.join(k for k, _, _ in members)}")
            return []
        index, limit = member
        if isinstance(source, ModelTokenSource):
            row = source.token_id if source.token_id is not None else self.original[model.key].get(source.token or "")
            if row is None or row >= limit:
                problems.append(f"{where}: {model.key} has no row for {source.token if source.token is not None else source.token_id!r} ({limit} rows)")
                return []
            return [(index, row)]
        row = self.own[model.key].get(token)
        if row is None or row >= limit:
            problems.append(f"{where}: its source {model.key} lacks the token; name a model that has it, or {{kind: model_token, ...}}")
            return []
        return [(index, row)]

    def rows_for(self, name: str, members: list[tuple[str, int, int]]) -> VocabularyRows:
        """Where each input of the tensor ``name`` puts its rows.

        Args:
            name: the tensor (for messages).
            members: ``(model key, input index, tensor rows)`` of each input, in the recipe's order.

        Raises:
            RecipeError: a ``tokenizer.tokens`` source that does not give a row here.
        """
        own = [{t: r for t, r in self.own[key].items() if r < limit} for key, _, limit in members]
        base = next((i for i, (key, _, _) in enumerate(members) if key == self.base), None)
        copies: list[list[tuple[int, int]]] = [[] for _ in members]
        fills: list[tuple[int, list[tuple[int, int]]]] = []
        problems: list[str] = []
        for token, out_row in sorted(self.out.items(), key=lambda item: item[1]):
            setting = self.tokens.get(token)
            have = [i for i, rows in enumerate(own) if token in rows]
            forced = setting is not None and setting.force
            for i in [] if forced else have:
                copies[members[i][1]].append((out_row, own[i][token]))
            if not forced and len(have) == len(members):
                continue
            if setting is not None:
                parts = self._fill(token, setting, members, problems)
            elif len(have) == 1 or (base in have and len(have) > 1):
                donor = have[0] if len(have) == 1 else base
                assert donor is not None
                parts = [(members[donor][1], own[donor][token])]
            else:
                parts = [(members[i][1], own[i][token]) for i in have]
                if not have:
                    log.warning("%s: token %r is in none of the models; its row is zeros", name, token)
            fills.append((out_row, parts))
        if problems:
            raise RecipeError([f"{name}: {p}" for p in problems])
        return VocabularyRows(rows=self.rows, tokens=len(self.out), copies=[_runs(c) for c in copies], fills=fills)


def plan_vocabulary(recipe: Recipe, models: Mapping[str, ModelHeaders]) -> Vocabularies | None:
    """The output vocabulary of a recipe with a tokenizer policy; None when there is none, or when the models' rows line
    up as they are (same vocabulary and rows, no ``tokens``, no padding): the tokenizer is then copied, as before.

    Args:
        recipe: the validated recipe.
        models: ref key -> local headers of every model of the recipe.

    Raises:
        RecipeError: the vocabularies differ and a tokenizer they need does not load, or the output vocabulary's ids
            are not contiguous, or a ``tokenizer.tokens`` entry cannot be honoured.
    """
    choice = recipe.tokenizer.source if recipe.tokenizer else recipe.tokenizer_source
    if choice is None:
        return None
    settings = recipe.tokenizer or TokenizerConfig(source=choice)
    reshaped = bool(settings.tokens) or settings.pad_to_multiple_of is not None
    rows = {key: embedding_rows(h) for key, h in models.items()}
    if not reshaped and len(set(rows.values())) == 1 and len({vocabulary_files(h) for h in models.values()}) == 1:
        return None
    first = recipe.base_model.key if recipe.base_model else next(iter(models))
    order = [first, *(key for key in models if key != first)]
    source = choice if choice in ("base", "union") else ModelRef.model_validate(choice).key
    if source not in ("base", "union", *models):
        raise RecipeError([f"tokenizer_source: {source!r} is not one of the recipe's models ({', '.join(models)})"])
    spec = OutputTokenizer(source=source, models=order, vocab_sizes={k: config_vocab_size(models[k].config) for k in order}, added=list(settings.tokens or {}))
    try:
        out, tokenizers = build_tokenizers(spec, {k: models[k].path for k in order})
    except TokenizerUnavailable as err:
        if reshaped or len(set(rows.values())) > 1:
            raise
        log.warning("%s; the vocabularies are taken to be the same and the tokenizer is copied", err.problems[0])
        return None
    vocab = out.get_vocab()
    if set(vocab.values()) != set(range(len(vocab))):
        raise RecipeError([f"tokenizer_source: the merged vocabulary's {len(vocab)} token ids are not 0..{len(vocab) - 1}; choose another tokenizer source"])
    pad = settings.pad_to_multiple_of
    own, original = {}, {}
    for key in order:
        tokenizer = tokenizers.get(key, tokenizers[first])
        original[key] = tokenizer.get_vocab()
        limit = spec.vocab_sizes[key] if spec.vocab_sizes[key] is not None else len(original[key])
        own[key] = {token: i for token, i in original[key].items() if i < limit}
    vocabularies = Vocabularies(
        tokenizer=spec, out=vocab, rows=-(-len(vocab) // pad) * pad if pad else len(vocab), own=own, original=original,
        tokens=settings.tokens or {}, base=recipe.base_model.key if recipe.base_model else None,
    )
    return None if vocabularies.lines_up(rows) else vocabularies


def truncated_rows(rows: list[int]) -> VocabularyRows | None:
    """The first rows every input has, for inputs of different row counts (mergekit's ``--unsafe-truncate-embeddings``)."""
    common = min(rows)
    if all(r == common for r in rows):
        return None
    return VocabularyRows(rows=common, tokens=common, copies=[[(0, 0, common)] for _ in rows], fills=[])


@dataclass(frozen=True)
class VocabularyDifference:
    """How one model's vocabulary differs from a reference's, token by token (each within its vocab_size)."""

    extra: list[str]
    """Tokens only the model has, by id."""
    missing: list[str]
    """Tokens only the reference has, by id."""
    moved: list[str]
    """Tokens both have, at other ids."""
    superset: bool
    """The model has every token of the reference, at the same ids."""


@lru_cache(maxsize=32)
def _own_vocabulary(key: str, folder: Path, size: int | None) -> dict[str, int] | None:
    try:
        vocab = load_tokenizer(key, folder).get_vocab()
    except TokenizerUnavailable:
        return None
    return {token: i for token, i in vocab.items() if size is None or i < size}


def vocabulary_difference(ref: ModelHeaders, other: ModelHeaders) -> VocabularyDifference | None:
    """Which tokens ``other`` has that ``ref`` lacks and the reverse; None when either tokenizer is not local or does not load."""
    if ref.path is None or other.path is None or not vocabulary_files(ref) or not vocabulary_files(other):
        return None
    mine = _own_vocabulary(ref.key, ref.path, config_vocab_size(ref.config))
    theirs = _own_vocabulary(other.key, other.path, config_vocab_size(other.config))
    if mine is None or theirs is None:
        return None
    moved = sorted((t for t in mine if t in theirs and mine[t] != theirs[t]), key=mine.__getitem__)
    return VocabularyDifference(
        extra=sorted(theirs.keys() - mine.keys(), key=theirs.__getitem__), missing=sorted(mine.keys() - theirs.keys(), key=mine.__getitem__),
        moved=moved, superset=not moved and mine.keys() <= theirs.keys(),
    )
