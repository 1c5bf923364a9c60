"""The files a model folder names, checked before anything uses them: inside the folder, JSON that parses, and
safetensors headers that describe their file (read from the header alone, never the tensor data).

A file is inside its folder when its real path (symlinks followed) is; a Hugging Face cache snapshot
(``models--org--name/snapshots/<commit>``) links its files into the repo's ``blobs`` folder, which counts as inside.
"""
from __future__ import annotations

import json
import math
from pathlib import Path, PurePath
from typing import Any

from merge_ops.errors import CorruptModelError
from merge_ops.safetensors_io import DTYPES, INDEX_FILE

MAX_HEADER_BYTES = 100_000_000
"""The largest safetensors header read (the safetensors library's own limit): checked before it is allocated."""
RESAVE = "re-download the model or save it again (safetensors.torch.save_file writes valid files)"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
"""The tokenizer files a merged model copies from its tokenizer source."""
MODEL_FILES = ("config.json", "generation_config.json", "README.md", INDEX_FILE, *TOKENIZER_FILES)
"""The files of a model folder read by name (besides its weights)."""

TensorEntries = dict[str, tuple[str, tuple[int, ...]]]
"""Tensor name -> (safetensors dtype, shape)."""


def folder_file(folder: Path, name: str, *, named_by: str | None = None) -> Path:
    """``folder / name``, refused unless its real path is inside ``folder`` (resolved).

    Args:
        folder: the model folder.
        name: a path relative to it, as a file of the folder (``named_by``) or a convention names it.
        named_by: the file that names ``name`` (the index), for the message.

    Raises:
        CorruptModelError: ``name`` is absolute, climbs out of the folder, or is a symlink to a file outside it.

    Example:
        >>> folder_file(Path("/models/m"), "../other/model.safetensors", named_by="model.safetensors.index.json")
        Traceback (most recent call last):
        merge_ops.errors.CorruptModelError: /models/m/model.safetensors.index.json: names '../other/model.safetensors', ...
    """
    folder = folder.resolve()
    path = folder / name
    target = path.resolve()
    roots = [folder, folder.parent.parent / "blobs"] if folder.parent.name == "snapshots" else [folder]
    if not PurePath(name).is_absolute() and any(target.is_relative_to(root) for root in roots):
        return path
    if named_by is not None:
        raise CorruptModelError(str(folder / named_by), f"names {name!r}, which is outside the model folder {folder}",
                                "every file a model names must be inside its folder: fix the entry or copy the file in")
    raise CorruptModelError(str(path), f"is a link to {target}, outside the model folder {folder}", "replace the link by a copy of the file")


def check_model_files(folder: Path) -> None:
    """Each of ``MODEL_FILES`` that ``folder`` holds is inside it (no link out), and a JSON object if it is JSON
    (the index is checked where it is read, ``weight_map``): a merge copies them as they are.

    Raises:
        CorruptModelError: the first link to a file outside the folder, or JSON file that is not a JSON object.
    """
    for name in MODEL_FILES:
        path = folder_file(folder, name)
        if name.endswith(".json") and name != INDEX_FILE and path.is_file():
            read_json_object(path, f"fix or re-download the model's {name}")


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        CorruptModelError: not UTF-8, not JSON, or not an object (``fix`` says what to do).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptModelError(str(path), f"is not valid JSON ({err})", fix) from None
    if not isinstance(data, dict):
        raise CorruptModelError(str(path), f"holds a JSON {type(data).__name__}, not an object", fix)
    return data


def weight_map(folder: Path) -> dict[str, str] | None:
    """Tensor -> file, from the folder's ``model.safetensors.index.json`` (None without one), checked.

    Raises:
        CorruptModelError: the index is not JSON, has no ``weight_map`` of names to files, or names a file outside the folder.
    """
    index = folder / INDEX_FILE
    if not index.exists():
        return None
    fix = "re-download the model or rewrite its index"
    mapping = read_json_object(folder_file(folder, INDEX_FILE), fix).get("weight_map")
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise CorruptModelError(str(index), "has no weight_map of tensor names to file names", fix)
    for file in dict.fromkeys(mapping.values()):
        folder_file(folder, file, named_by=INDEX_FILE)
    return mapping


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (resolved), from its index when it is sharded, each checked to be inside it.

    Raises:
        CorruptModelError: a corrupt index, a file it names missing or outside the folder, a weight file linked from outside.
    """
    mapping = weight_map(folder)
    if mapping is None:
        return [folder_file(folder, path.name) for path in sorted(folder.glob("*.safetensors"))]
    files = [folder_file(folder, name, named_by=INDEX_FILE) for name in dict.fromkeys(mapping.values())]
    for file in files:
        if not file.is_file():
            raise CorruptModelError(str(folder / INDEX_FILE), f"names {file.relative_to(folder).as_posix()!r}, which is not in {folder}",
                                    "download the missing shard or rewrite the index")
    return files


class _DuplicateName(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateName(key)
        seen[key] = value
    return seen


def _tensor_entry(name: str, entry: object) -> tuple[str, tuple[int, ...], int, int, int]:
    """(dtype, shape, start, end, bytes the shape needs) of one header entry, or the problem with it (a ValueError)."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"tensor {name!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise ValueError(f"tensor {name!r} has the unknown dtype {dtype!r} (mergeflow reads {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r} has the shape {shape!r}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]:
        raise ValueError(f"tensor {name!r} has the data_offsets {offsets!r}, not [start, end] with 0 <= start <= end")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if nbytes >= 2**64:
        raise ValueError(f"tensor {name!r} has the shape {shape}, whose size overflows")
    return dtype, tuple(shape), offsets[0], offsets[1], nbytes


def _check_layout(entries: dict[str, tuple[str, tuple[int, ...], int, int, int]], data_bytes: int) -> None:
    """Tensors stored back to back from byte 0 to the file's end, each as long as its dtype and shape need."""
    position, previous = 0, None
    for name, (dtype, shape, start, end, nbytes) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if end > data_bytes:
            raise ValueError(f"tensor {name!r} ends at byte {end} of the data, which holds {data_bytes} bytes (truncated file or offsets out of range)")
        if start < position:
            raise ValueError(f"tensor {name!r} (bytes {start}-{end}) overlaps tensor {previous!r}, which ends at {position}")
        if start > position:
            raise ValueError(f"tensor {name!r} starts at byte {start}, leaving bytes {position}-{start} unused (tensors are stored back to back)")
        if end - start != nbytes:
            raise ValueError(f"tensor {name!r} has {end - start} bytes, but {dtype} {list(shape)} needs {nbytes}")
        position, previous = end, name
    if position != data_bytes:
        raise ValueError(f"its tensors end at byte {position} of the data, but the file holds {data_bytes} bytes after the header")


def read_safetensors_header(path: Path) -> TensorEntries:
    """Name -> (dtype, shape) of every tensor of a safetensors file, names sorted, from its header alone, validated.

    Checked: the header length (against the file and ``MAX_HEADER_BYTES``, before reading it), JSON without duplicate
    names, known dtypes, non-negative shapes, offsets that tile the data exactly as the dtypes and shapes need.

    Raises:
        CorruptModelError: the file and the problem.

    Example:
        >>> read_safetensors_header(Path("model.safetensors"))["lm_head.weight"]
        ('F32', (64, 16))
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8:
            raise CorruptModelError(str(path), f"has {size} bytes, too few for a safetensors file", RESAVE)
        if length > min(MAX_HEADER_BYTES, size - 8):
            limit = "the file holds" if length > size - 8 else "the limit is"
            raise CorruptModelError(str(path), f"declares a {length}-byte header, but {limit} {min(MAX_HEADER_BYTES, size - 8)} (truncated or not safetensors)", RESAVE)
        raw = handle.read(length)
    try:
        if not raw.startswith(b"{"):
            raise ValueError("not a JSON object")
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ is not a map of strings")
        entries = {name: _tensor_entry(name, entry) for name, entry in header.items()}
        _check_layout(entries, size - 8 - length)
    except _DuplicateName as err:
        raise CorruptModelError(str(path), f"its header lists {err.args[0]!r} twice", RESAVE) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptModelError(str(path), f"its header is not JSON ({err})", RESAVE) from None
    except ValueError as err:
        raise CorruptModelError(str(path), f"header: {err}", RESAVE) from None
    return {name: (entries[name][0], entries[name][1]) for name in sorted(entries)}
