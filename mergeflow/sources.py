"""Model sources: a recipe reference (local folder or ``org/repo@revision``) resolved to a commit, then local files.

``resolve_source`` pins a Hub reference to its commit sha without downloading anything; ``read_source_headers``
reads its config, card and safetensors headers (ranged reads on the Hub); ``download_source`` fetches that exact
commit's weights, configs and tokenizer files with ``snapshot_download``. Local folders pass through unchanged.
One ``Source`` record follows a model from the recipe to the lineage of what was merged from it. A PEFT LoRA adapter
applied to a base (``BASE+ADAPTER``, or an adapter listed alone on the recipe's ``base_model``) is the base's record
with the adapter's own pinned record in ``adapter``. The token comes from ``settings.hf_token()`` inside these
functions, so it is never an argument, a log line or a Prefect record.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, NotASafetensorsRepoError, RemoteEntryNotFoundError, SafetensorsParsingError
from pydantic import BaseModel, Field

from merge_ops.errors import CorruptModelError, ModelNotFoundError, RecipeError
from merge_ops.headers import ModelHeaders, card_base_model, ordered_tensors, read_local_headers, with_adapter
from merge_ops.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterHeaders, check_adapter_config, is_adapter_folder, read_adapter_headers
from merge_ops.model_files import folder_file, read_json_object, read_safetensors_header
from merge_ops.recipe import LOCAL_REVISION, ModelRef, adapter_base
from merge_ops.safetensors_io import INDEX_FILE
from mergeflow import settings
from mergeflow.errors import HubError
from mergeflow.hub_client import hub_errors, repo_id_problem

log = logging.getLogger(__name__)

ALLOW_PATTERNS = (
    "*.safetensors",
    "*.json",  # config, generation config, safetensors index, tokenizer.json/_config, vocab.json, ...
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
    "README.md",  # the model card: its base_model is part of the compatibility check
)
"""What is downloaded by default. Pickle-based and other formats (.bin, .pt, .pth, .ckpt, .gguf) never are,
unless named in ``extra_patterns``."""


class Source(BaseModel):
    """A recipe's model pinned to what is merged: a Hub repo at a commit, or a local folder.

    ``repo_id``/``commit_sha`` are None for local folders; ``path`` is None for a Hub model not yet downloaded.
    """

    key: str
    """The reference as written in the recipe (``org/repo``, ``org/repo@rev``, or a path)."""
    repo_id: str | None = None
    revision: str | None = None
    """The revision the recipe asked for (None: the default branch)."""
    commit_sha: str | None = None
    """The commit that is merged (Hub sources)."""
    path: Path | None = None
    is_base: bool = False
    adapter: Source | None = Field(default=None, exclude_if=lambda value: value is None)
    """The LoRA adapter applied to this model, pinned the same way (its ``key`` is the adapter as written); left out
    of serialized records when there is none, so records of models without adapters read as before."""

    @property
    def label(self) -> str:
        if self.repo_id:
            own = f"{self.repo_id}@{self.commit_sha[:12]}" if self.commit_sha else self.repo_id
        else:
            own = self.key.split("+")[0] if self.adapter else self.key
        return f"{own}+{self.adapter.label}" if self.adapter else own

    @property
    def pinned(self) -> str:
        """What exactly was merged: ``repo @ commit`` or the local folder, and the same of its adapter."""
        own = f"{self.repo_id} @ {self.commit_sha}" if self.repo_id else f"{self.key.split('+')[0] if self.adapter else self.key} (local: {self.path})"
        return f"{own} + adapter {self.adapter.pinned}" if self.adapter else own


def _local_folder(ref: ModelRef, base_dir: Path) -> Path | None:
    return next((c.resolve() for c in (Path(ref.path), base_dir / ref.path) if c.is_dir()), None)


def _check_repo_id(ref: ModelRef) -> None:
    """``ref`` (not a local folder) is a Hub repo id ``namespace/name``; checked before any request.

    Raises:
        ModelNotFoundError: not of that form (``a/b/c``, ``../x``, ``org/na me``, an empty name).
    """
    problem = repo_id_problem(ref.path)
    if problem:
        raise ModelNotFoundError(ref.key, f"not a local folder, nor a Hub repo id of the form org/name ({problem}); fix the path or the repo id")


def _unreadable_header(source: Source, err: SafetensorsParsingError) -> CorruptModelError:
    why = str(err).splitlines()[0].split("): ", 1)[-1].split(". ")[0][:200]  # "Failed to parse ... (repo ..., revision ...): WHY. Please ..."
    return CorruptModelError(f"{source.repo_id}@{source.commit_sha}", f"the Hub's safetensors header is unreadable ({why})", "check the repo's weights, and HF_ENDPOINT")


def _pin(ref: ModelRef, base_dir: Path, endpoint: str | None) -> tuple[Source, bool]:
    """``ref`` pinned to a folder or a commit, and whether it is a PEFT adapter rather than a model."""
    folder = _local_folder(ref, base_dir)
    if folder is not None:
        if ref.revision:
            log.warning(LOCAL_REVISION, ref.path, ref.revision)
        return Source(key=ref.key, path=folder), is_adapter_folder(folder)
    _check_repo_id(ref)
    api = HfApi(endpoint=endpoint or settings.HF_ENDPOINT, token=settings.hf_token())
    with hub_errors(ref.path, ref.revision):
        info = api.model_info(ref.path, revision=ref.revision, timeout=settings.HUB_TIMEOUT)
    if not isinstance(info.sha, str) or not info.sha:
        raise HubError(f"the Hub's answer about {ref.key}", "names no commit (sha)", "check HF_ENDPOINT: is it a Hub-compatible server?", transient=False)
    files = {sibling.rfilename for sibling in info.siblings or []}
    source = Source(key=ref.key, repo_id=ref.path, revision=ref.revision, commit_sha=info.sha)
    return source, ADAPTER_CONFIG in files and "config.json" not in files


def resolve_source(ref: ModelRef, *, base_dir: Path, endpoint: str | None = None, base: ModelRef | None = None) -> Source:
    """Pin ``ref`` to a commit (Hub) or a folder (local), downloading nothing; an adapter is pinned with its base.

    Args:
        ref: the recipe's reference, ``path``, ``org/repo@revision``, or ``BASE+ADAPTER``.
        base_dir: folder that relative local paths are tried against (the recipe's folder), after cwd.
        endpoint: Hub URL; ``settings.HF_ENDPOINT`` when None.
        base: the recipe's base model, which an adapter listed on its own is applied to.

    Raises:
        ModelNotFoundError: neither a local folder nor a Hub repo/revision; ADAPTER of ``BASE+ADAPTER`` is no adapter.
        RecipeError: an adapter listed on its own without a recipe base model.
        HubAccessError: the Hub refused the token.
        HubError: the Hub failed (no answer within ``settings.HUB_TIMEOUT``, 5xx: ``transient``) or answered what a Hub
            does not (not JSON, no commit).

    Example:
        >>> resolve_source(ModelRef.model_validate("org/model@main"), base_dir=Path("."))
        Source(key='org/model@main', repo_id='org/model', revision='main', commit_sha='3f1c...', path=None)
    """
    if ref.adapter_ref is not None:
        model, _ = _pin(ModelRef(path=ref.path, revision=ref.revision), base_dir, endpoint)
        adapter, is_adapter = _pin(ref.adapter_ref, base_dir, endpoint)
        if not is_adapter:
            raise ModelNotFoundError(ref.adapter_ref.key, f"is not a PEFT LoRA adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, no config.json)")
        return model.model_copy(update={"key": ref.key, "adapter": adapter})
    source, is_adapter = _pin(ref, base_dir, endpoint)
    if not is_adapter:
        return source
    model, _ = _pin(adapter_base(base, ref), base_dir, endpoint)
    return model.model_copy(update={"key": ref.key, "adapter": source})


def matching_pins(refs: list[ModelRef], pinned: list[Source]) -> list[Source]:
    """``pinned`` in the order of ``refs``, one per reference (matched by key).

    Raises:
        RecipeError: a reference has no pin, or a pin no reference (the pins are of another recipe: pin again).
    """
    by_key = {s.key: s for s in pinned}
    missing = [r.key for r in refs if r.key not in by_key]
    extra = sorted(set(by_key) - {r.key for r in refs})
    if missing or extra:
        raise RecipeError([f"the pinned sources do not match the recipe's models (not pinned: {missing}, not in the recipe: {extra}); "
                           "pin them again (`dvc repro` runs the resolve stage first)"], source="pinned sources")
    return [by_key[r.key] for r in refs]


def download_source(
    source: Source,
    *,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
    extra_patterns: list[str] | None = None,
    adapter_only: bool = False,
) -> Source:
    """Download the pinned commit of a Hub source (weights, configs, tokenizer, card) and of its adapter; local
    folders pass through.

    Args:
        source: from ``resolve_source``.
        endpoint: Hub URL; ``settings.HF_ENDPOINT`` when None.
        cache_dir: download cache; ``settings.HF_CACHE_DIR``, else huggingface_hub's own, when None.
        extra_patterns: more glob patterns to fetch, e.g. ``["*.bin"]`` (never fetched otherwise).
        adapter_only: fetch only the adapter (adapter-space merges never read the base's weights).

    Raises:
        ModelNotFoundError, HubAccessError: permanent.
        HubError: a failed request, worth retrying when ``transient``.
    """
    adapter = download_source(source.adapter, endpoint=endpoint, cache_dir=cache_dir) if source.adapter else None
    if source.repo_id is None or adapter_only:
        return source.model_copy(update={"adapter": adapter})
    with hub_errors(source.repo_id, source.commit_sha):
        folder = snapshot_download(
            source.repo_id,
            revision=source.commit_sha,
            allow_patterns=[*ALLOW_PATTERNS, *(extra_patterns or [])],
            cache_dir=cache_dir or settings.HF_CACHE_DIR,
            endpoint=endpoint or settings.HF_ENDPOINT,
            token=settings.hf_token(),
            etag_timeout=settings.HUB_TIMEOUT,
        )
    return source.model_copy(update={"path": Path(folder), "adapter": adapter})


def _hub_file(source: Source, filename: str, endpoint: str, cache_dir: Path | None) -> Path | None:
    """One file of a pinned Hub source, from the cache or downloaded; None when the commit lacks it."""
    assert source.repo_id is not None and source.commit_sha is not None
    try:
        return Path(hf_hub_download(source.repo_id, filename, revision=source.commit_sha, endpoint=endpoint, token=settings.hf_token(), cache_dir=cache_dir,
                                    etag_timeout=settings.HUB_TIMEOUT))
    except RemoteEntryNotFoundError:
        return None


def _model_headers(source: Source, endpoint: str, cache_dir: Path | None) -> ModelHeaders:
    """config.json, card base_model and tensor headers of a model (not its adapter), local or a pinned Hub commit."""
    if source.path is not None:
        return read_local_headers(source.key, source.path)
    assert source.repo_id is not None and source.commit_sha is not None
    try:
        with hub_errors(source.repo_id, source.commit_sha):
            config_file = _hub_file(source, "config.json", endpoint, cache_dir)
            if config_file is None:
                raise ModelNotFoundError(source.key, "the repo has no config.json; is it a transformers model?")
            readme = _hub_file(source, "README.md", endpoint, cache_dir)
            meta = HfApi(endpoint=endpoint, token=settings.hf_token()).get_safetensors_metadata(source.repo_id, revision=source.commit_sha)
    except NotASafetensorsRepoError:
        raise ModelNotFoundError(source.key, "the repo has no .safetensors weights; mergeflow merges safetensors only") from None
    except SafetensorsParsingError as err:
        raise _unreadable_header(source, err) from None
    files = [(f, {n: (t.dtype, tuple(t.shape)) for n, t in meta.files_metadata[f].tensors.items()}) for f in dict.fromkeys(meta.weight_map.values())]
    return ModelHeaders(
        key=source.key, config=read_json_object(config_file, f"fix config.json in {source.repo_id}"), tensors=ordered_tensors(files),
        card_base_model=card_base_model(readme),
    )


def _adapter_headers(adapter: Source, endpoint: str, cache_dir: Path | None) -> AdapterHeaders:
    """adapter_config.json, card base_model and tensor headers of a PEFT adapter, local or a pinned Hub commit."""
    if adapter.path is not None:
        return read_adapter_headers(adapter.key, adapter.path, card_base_model(adapter.path / "README.md"))
    assert adapter.repo_id is not None and adapter.commit_sha is not None
    try:
        with hub_errors(adapter.repo_id, adapter.commit_sha):
            config_file = _hub_file(adapter, ADAPTER_CONFIG, endpoint, cache_dir)
            if config_file is None:
                raise ModelNotFoundError(adapter.key, f"the repo has no {ADAPTER_CONFIG}; is it a PEFT adapter?")
            config = read_json_object(config_file, f"fix {ADAPTER_CONFIG} in {adapter.repo_id}")
            check_adapter_config(adapter.key, config)
            readme = _hub_file(adapter, "README.md", endpoint, cache_dir)
            meta = HfApi(endpoint=endpoint, token=settings.hf_token()).parse_safetensors_file_metadata(
                adapter.repo_id, ADAPTER_WEIGHTS, revision=adapter.commit_sha, timeout=settings.HUB_TIMEOUT)
    except (EntryNotFoundError, NotASafetensorsRepoError):
        raise ModelNotFoundError(adapter.key, f"the repo has no {ADAPTER_WEIGHTS}; mergeflow applies safetensors adapters only") from None
    except SafetensorsParsingError as err:
        raise _unreadable_header(adapter, err) from None
    tensors = {n: (t.dtype, tuple(t.shape)) for n, t in meta.tensors.items()}
    return AdapterHeaders(key=adapter.key, config=config, tensors=tensors, card_base_model=card_base_model(readme))


def read_source_headers(source: Source, *, endpoint: str | None = None, cache_dir: Path | None = None) -> ModelHeaders:
    """config.json, card base_model and tensor headers of a local folder or a pinned Hub commit (no weights), with
    its adapter applied (``merge_ops.headers.with_adapter``).

    Raises:
        ModelNotFoundError: no config.json or no safetensors weights; an adapter without its files or of a type mergeflow does not apply.
        CorruptModelError: a config that is not a JSON object, a Hub safetensors header that does not parse; for a local
            folder, what ``read_local_headers`` refuses.
        HubAccessError: the Hub refused the token.
        HubError: a failed request, worth retrying when ``transient``.
    """
    url, cache = endpoint or settings.HF_ENDPOINT, cache_dir or settings.HF_CACHE_DIR
    headers = _model_headers(source, url, cache)
    if source.adapter is None:
        return headers
    return with_adapter(headers, _adapter_headers(source.adapter, url, cache), source.key)


def check_download(headers: ModelHeaders) -> None:
    """The downloaded weight files of a Hub model hold the tensors its Hub headers listed (their headers read again).

    Raises:
        CorruptModelError: a file outside the download, corrupt, or holding other tensors than the Hub said.
    """
    assert headers.path is not None
    by_file: dict[Path, list[str]] = {}
    for name, tensor in headers.tensors.items():
        if tensor.stored_as is None:
            by_file.setdefault(folder_file(headers.path, tensor.file, named_by=INDEX_FILE), []).append(name)
    for file, names in by_file.items():
        entries = read_safetensors_header(file)
        changed = next((n for n in names if entries.get(n) != (headers.tensors[n].dtype, headers.tensors[n].shape)), None)
        if changed is not None:
            raise CorruptModelError(str(file), f"does not hold {changed!r} as the Hub's header listed it", "delete it from the Hub cache and download again")


def local_headers(headers: Sequence[ModelHeaders], sources: Sequence[Source]) -> dict[str, ModelHeaders]:
    """Ref key -> the headers of each model, pointing at its downloaded folder (and its adapter's); the weight files of
    a Hub model are checked against its Hub headers (``check_download``).

    Raises:
        CorruptModelError: what ``check_download`` refuses.
    """
    by_key: Mapping[str, Source] = {s.key: s for s in sources}
    located = {}
    for h in headers:
        source = by_key.get(h.key)
        located[h.key] = h.at(source.path, source.adapter.path if source.adapter else None) if source and source.path else h
        if source and source.path and source.repo_id:
            check_download(located[h.key])
    return located
