"""Files of the workflow: writing text atomically, and hashing model folders by content."""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from mergeflow.errors import EvaluationError

_HASH_CHUNK = 1 << 22
_file_hashes: dict[tuple[str, int, int], str] = {}


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (real path, size, mtime) for the life of the process."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    if key not in _file_hashes:
        digest = hashlib.sha256()
        with open(real, "rb") as stream:
            while chunk := stream.read(_HASH_CHUNK):
                digest.update(chunk)
        _file_hashes[key] = digest.hexdigest()
    return _file_hashes[key]


def model_files(folder: Path) -> list[Path]:
    """The files that make the model: everything in the folder but README.md and hidden files/folders."""
    folder = Path(folder)
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or rel.as_posix() == "README.md":
            continue
        if path.is_file():
            found.append(path)
    return found


def model_content_hash(folder: Path) -> str:
    """sha256 over the relative names and sha256 of ``model_files(folder)``: the same model, the same hash.

    The model card is left out, so writing the Hub card into the folder does not change it.

    Raises:
        EvaluationError: the folder holds no model files.
    """
    files = model_files(folder)
    if not files:
        raise EvaluationError(f"{folder} holds no model files; point at a Hugging Face model folder (config.json, *.safetensors)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()
