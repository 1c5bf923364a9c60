"""A model without its weights: config.json, the base model its card declares, and every tensor's header.

One ``ModelHeaders`` per model serves the compatibility check, the weight-space check and the plan. It is
read once: from a local folder (``read_local_headers``), or from the Hub before anything is downloaded
(``mergeflow.sources.read_source_headers``); once the weights are local, ``at(folder)`` says where they are.
Tensors are ordered by file (the index's order) and by name within a file, wherever they were read from.
A model with a PEFT LoRA adapter (``BASE+ADAPTER``, or an adapter listed alone on the recipe's base) is its base's
headers with the adapter's patch (``with_adapter``): the terms to add, the tensors the adapter replaces.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from merge_ops.architecture import layer_count, split_layer_name
from merge_ops.errors import CorruptModelError, ModelNotFoundError
from merge_ops.lora import ADAPTER_WEIGHTS, AdapterHeaders, LoraTerm, adapter_patch, read_adapter_headers
from merge_ops.model_files import TensorEntries, check_model_files, folder_file, read_json_object, read_safetensors_header, weight_files, weight_map
from merge_ops.safetensors_io import INDEX_FILE, tensor_nbytes


class TensorHeader(BaseModel):
    """One tensor's safetensors header entry, and the file that holds it (relative to the model folder; for a tensor
    an adapter replaces, relative to the adapter folder, stored there under ``stored_as``)."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    stored_as: str | None = None

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


class ModelHeaders(BaseModel):
    """One model as the checks and the plan see it; ``path`` is None while it is only on the Hub."""

    key: str
    config: dict[str, Any]
    tensors: dict[str, TensorHeader]
    card_base_model: list[str] = []
    path: Path | None = None
    adapter: AdapterHeaders | None = None
    """The LoRA adapter applied to this base, if any."""
    lora: dict[str, LoraTerm] = {}
    """Tensor -> the LoRA term the adapter adds to it."""
    adapter_problems: list[str] = []
    """Adapter modules that do not fit the base (the compatibility report lists them)."""

    @cached_property
    def layers(self) -> dict[int, dict[str, str]]:
        """Layer index -> {name within the layer: tensor name}, in tensor order."""
        layers: dict[int, dict[str, str]] = {}
        for name in self.tensors:
            parts = split_layer_name(name)
            if parts:
                layers.setdefault(parts[1], {})[parts[2]] = name
        return layers

    @property
    def num_layers(self) -> int:
        """The decoder's layer count in config.json (or its text_config)."""
        return layer_count(self.config)

    def file(self, tensor: str) -> Path:
        """The local file holding ``tensor``.

        Raises:
            ModelNotFoundError: the model is not local yet.
        """
        header = self.tensors[tensor]
        root = self.adapter.path if header.stored_as and self.adapter else self.path
        if root is None:
            raise ModelNotFoundError(self.key, "its weights are not local yet; download it first (`mergeflow run` does)")
        return root / header.file

    def lora_term(self, tensor: str) -> LoraTerm | None:
        """The LoRA term added to ``tensor``, its file absolute (the adapter must be local)."""
        term = self.lora.get(tensor)
        if term is None or self.adapter is None:
            return None
        if self.adapter.path is None:
            raise ModelNotFoundError(self.key, "its adapter is not local yet; download it first (`mergeflow run` does)")
        return term.model_copy(update={"file": str(self.adapter.path / term.file)})

    def at(self, folder: Path, adapter: Path | None = None) -> ModelHeaders:
        """The same headers, with the weights now in ``folder`` and the adapter's in ``adapter`` (downloads of the same commits)."""
        update: dict[str, Any] = {"path": Path(folder).resolve()}
        if self.adapter is not None and adapter is not None:
            update["adapter"] = self.adapter.model_copy(update={"path": Path(adapter).resolve()})
        return self.model_copy(update=update)


def ordered_tensors(files: Iterable[tuple[str, Mapping[str, tuple[str, tuple[int, ...]]]]]) -> dict[str, TensorHeader]:
    """``(file, {name: (dtype, shape)})`` in file order -> name -> header, names sorted within each file."""
    return {
        name: TensorHeader(file=file, dtype=entries[name][0], shape=tuple(entries[name][1]))
        for file, entries in files
        for name in sorted(entries)
    }


def card_base_model(readme: Path | None) -> list[str]:
    """The ``base_model`` a model card's metadata declares (none without a card)."""
    from huggingface_hub.repocard import metadata_load

    meta = metadata_load(readme) if readme is not None and readme.is_file() else None
    value = (meta or {}).get("base_model") or []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def with_adapter(headers: ModelHeaders, adapter: AdapterHeaders, key: str) -> ModelHeaders:
    """``headers`` of a base with ``adapter`` applied, as the model ``key``: its terms, its replaced tensors, and the
    modules that do not fit (``adapter_problems``)."""
    patch = adapter_patch(adapter, {name: t.shape for name, t in headers.tensors.items()})
    replaced = {name: TensorHeader(file=ADAPTER_WEIGHTS, dtype=dtype, shape=headers.tensors[name].shape, stored_as=stored)
                for name, (dtype, stored) in patch.replaced.items()}
    return headers.model_copy(update={
        "key": key, "tensors": {**headers.tensors, **replaced}, "adapter": adapter, "lora": patch.terms, "adapter_problems": patch.problems,
    })


def check_single_copies(folder: Path, files: list[tuple[str, TensorEntries]], index: Mapping[str, str] | None) -> None:
    """Every tensor in one file only, the one the index names (when there is an index).

    Raises:
        CorruptModelError: a tensor in two files, or in another file than the index says.
    """
    held: dict[str, str] = {}
    for file, entries in files:
        for name in entries:
            if name in held:
                raise CorruptModelError(str(folder), f"tensor {name!r} is stored twice, in {held[name]} and in {file}", "delete one copy (save the model again)")
            held[name] = file
            if index is not None and index.get(name, file) != file:
                raise CorruptModelError(str(folder / INDEX_FILE), f"puts tensor {name!r} in {index[name]}, but {file} holds it", "re-download the model or rewrite its index")


def read_local_headers(key: str, folder: Path, adapter: Path | None = None) -> ModelHeaders:
    """config.json, card base_model and tensor headers of a local model folder (no weights read), with the PEFT LoRA
    ``adapter`` folder applied when given (``with_adapter``).

    Raises:
        ModelNotFoundError: no config.json or no safetensors weights; not an adapter folder, or one mergeflow does not apply.
        CorruptModelError: a file outside the folder, corrupt JSON or safetensors headers, a tensor in two files or
            in another file than the index says.
    """
    folder = Path(folder).resolve()
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(key, f"{folder} has no config.json; point the recipe at a Hugging Face model folder")
    check_model_files(folder)
    files = [(path.relative_to(folder).as_posix(), read_safetensors_header(path)) for path in weight_files(folder)]
    if not files:
        raise ModelNotFoundError(key, f"{folder} has no .safetensors weights (convert .bin checkpoints to safetensors first)")
    check_single_copies(folder, files, weight_map(folder))
    config = read_json_object(folder_file(folder, "config.json"), "fix or re-download the model's config.json")
    headers = ModelHeaders(
        key=key, config=config, tensors=ordered_tensors(files), card_base_model=card_base_model(folder / "README.md"), path=folder,
    )
    if adapter is None:
        return headers
    return with_adapter(headers, read_adapter_headers(key, adapter, card_base_model(Path(adapter) / "README.md")), key)
