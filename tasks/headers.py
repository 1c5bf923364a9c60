"""What the compatibility check reads: config.json, the model card's base_model and safetensors headers.

Hub models are read remotely (two small files and ranged reads of the safetensors headers through
``HfApi.get_safetensors_metadata``), so incompatible inputs are caught before any weight is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_local_safetensors_metadata, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, NotASafetensorsRepoError
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import SafetensorsRepoMetadata
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from merge_ops import settings
from merge_ops.errors import ModelNotFoundError
from tasks.retries import RETRY_DELAYS, only_transient
from tasks.sources import ResolvedSource, hub_error


class TensorHeader(BaseModel):
    dtype: str
    shape: tuple[int, ...]


class ModelHeaders(BaseModel):
    """One model as the compatibility check sees it: no weights, only what describes them."""

    key: str
    config: dict[str, Any]
    tensors: dict[str, TensorHeader]
    card_base_model: list[str] = []


def _card_base_model(readme: Path | None) -> list[str]:
    meta = metadata_load(readme) if readme is not None and readme.is_file() else None
    value = (meta or {}).get("base_model") or []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _tensors(meta: SafetensorsRepoMetadata) -> dict[str, TensorHeader]:
    return {
        name: TensorHeader(dtype=t.dtype, shape=tuple(t.shape))
        for file in meta.files_metadata.values()
        for name, t in file.tensors.items()
    }


def read_headers(source: ResolvedSource, *, endpoint: str | None = None, cache_dir: Path | None = None) -> ModelHeaders:
    """config.json, card base_model and tensor headers of a local folder or a pinned Hub commit.

    Raises:
        ModelNotFoundError: no config.json or no safetensors weights.
        HubAccessError: the Hub refused the token.
    """
    if source.path is not None:
        folder = source.path
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(source.key, f"{folder} has no config.json; point the recipe at a Hugging Face model folder")
        try:
            meta = get_local_safetensors_metadata(folder)
        except NotASafetensorsRepoError:
            raise ModelNotFoundError(source.key, f"{folder} has no .safetensors weights (convert .bin checkpoints first)") from None
        config = json.loads((folder / "config.json").read_text())
        return ModelHeaders(key=source.key, config=config, tensors=_tensors(meta), card_base_model=_card_base_model(folder / "README.md"))

    assert source.repo_id is not None and source.commit_sha is not None
    hub = dict(revision=source.commit_sha, endpoint=endpoint or settings.HF_ENDPOINT, token=settings.hf_token())
    cache = cache_dir or settings.HF_CACHE_DIR
    try:
        config_file = hf_hub_download(source.repo_id, "config.json", cache_dir=cache, **hub)
        try:
            readme: Path | None = Path(hf_hub_download(source.repo_id, "README.md", cache_dir=cache, **hub))
        except EntryNotFoundError:
            readme = None
        api = HfApi(endpoint=hub["endpoint"], token=hub["token"])
        meta = api.get_safetensors_metadata(source.repo_id, revision=source.commit_sha)
    except EntryNotFoundError:
        raise ModelNotFoundError(source.key, "the repo has no config.json; is it a transformers model?") from None
    except NotASafetensorsRepoError:
        raise ModelNotFoundError(source.key, "the repo has no .safetensors weights; mergeflow merges safetensors only") from None
    except HfHubHTTPError as err:
        raise hub_error(source.repo_id, source.commit_sha, err) from err
    config = json.loads(Path(config_file).read_text())
    return ModelHeaders(key=source.key, config=config, tensors=_tensors(meta), card_base_model=_card_base_model(readme))


@task(name="read_model_headers", task_run_name="read-headers-{source.key}", retries=3, retry_delay_seconds=RETRY_DELAYS,
      retry_jitter_factor=0.5, retry_condition_fn=only_transient, cache_policy=NO_CACHE, persist_result=False)
def read_model_headers(source: ResolvedSource, endpoint: str | None = None, cache_dir: Path | None = None) -> ModelHeaders:
    """config.json, card and safetensors headers of one model, without its weights."""
    return read_headers(source, endpoint=endpoint, cache_dir=cache_dir)
