"""Model folders that are corrupt or name files outside themselves: one-line errors from `merge` and `check`, nothing written.

Each case copies a tiny model (one file, or two shards with an index), breaks it one way, and merges it with the
tiny family's base and ft_a.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi
from pipeline_helpers import hub_online, push
from safetensors.torch import load_file, save_file
from tiny_family import base_state, fine_tune, make_adapter, write_model
from typer.testing import CliRunner

import flows.merge_pipeline  # noqa: F401  (Prefect sets up its log handlers on import: with the real stderr, not CliRunner's)
import merge_ops.model_files
from merge_ops.errors import CorruptModelError
from merge_ops.headers import read_local_headers
from merge_ops.recipe import ModelRef
from mergeflow.cli import app
from mergeflow.cli.console_errors import console
from mergeflow.local_hub import LocalHub
from mergeflow.sources import download_source, local_headers, read_source_headers, resolve_source

runner = CliRunner()
SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ft_b of the tiny family in two shards with an index."""
    return write_model(tmp_path_factory.mktemp("sharded") / "ft_b", fine_tune(base_state(), 2), shards=2)


def rewrite_header(file: Path, edit: Callable[[dict], object] | None = None, *, raw: bytes | None = None, length: int | None = None) -> None:
    """Replace the safetensors header of ``file`` (edited as a dict, or ``raw`` bytes), keeping its data; ``length`` lies about its size."""
    data = file.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    new = raw if raw is not None else json.dumps(edit(header) if edit else header).encode()
    file.write_bytes((len(new) if length is None else length).to_bytes(8, "little") + new + data[8 + size :])


def entry(header: dict, rank: int = 1) -> dict:
    """The header entry of the ``rank``-th tensor in file order."""
    return sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"])[rank]


def set_entry(header: dict, **changes: object) -> dict:
    entry(header).update(changes)
    return header


def overlap(header: dict) -> dict:
    first, second = entry(header, 0), entry(header, 1)
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]
    return header


def duplicate(file: Path) -> None:
    data = file.read_bytes()
    text = data[8 : 8 + int.from_bytes(data[:8], "little")].decode().rstrip()
    name, value = next((k, v) for k, v in json.loads(text).items() if k != "__metadata__")
    rewrite_header(file, raw=(text[:-1] + f",{json.dumps(name)}:{json.dumps(value)}}}").encode())


def link(target: Path, link_path: Path) -> None:
    link_path.unlink()
    link_path.symlink_to(target)


def edit_index(folder: Path, edit: Callable[[dict[str, str]], object]) -> None:
    index = json.loads((folder / INDEX).read_text())
    edit(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


def tensor_in_both_shards(folder: Path) -> None:
    first = load_file(folder / SHARD_1)
    name = sorted(first)[0]
    save_file({**load_file(folder / SHARD_2), name: first[name]}, folder / SHARD_2, metadata={"format": "pt"})


def wrong_shard(folder: Path) -> None:
    edit_index(folder, lambda m: m.update({next(n for n, file in m.items() if file == SHARD_1): SHARD_2}))


Case = tuple[str, bool, Callable[[Path, Path], None], list[str]]
"""id, sharded, break(folder, outside file), fragments of the message."""
CASES: list[Case] = [
    ("index-climbs-out", True, lambda f, o: edit_index(f, lambda m: m.update({n: "../elsewhere/model.safetensors" for n in m})),
     [INDEX, "names '../elsewhere/model.safetensors'", "outside the model folder", "fix the entry or copy the file in"]),
    ("index-etc-passwd", True, lambda f, o: edit_index(f, lambda m: m.update({next(iter(m)): "../../../../../../../../etc/passwd"})),
     [INDEX, "etc/passwd'", "outside the model folder"]),
    ("index-absolute", True, lambda f, o: edit_index(f, lambda m: m.update({next(iter(m)): str(o)})), [INDEX, "names '{o}'", "outside the model folder"]),
    ("index-missing-shard", True, lambda f, o: (f / SHARD_2).unlink(), [INDEX, f"names '{SHARD_2}', which is not in", "download the missing shard"]),
    ("index-not-json", True, lambda f, o: (f / INDEX).write_text("{oops"), [INDEX, "is not valid JSON", "rewrite its index"]),
    ("index-no-weight-map", True, lambda f, o: (f / INDEX).write_text('{"weight_map": ["a"]}'), [INDEX, "has no weight_map of tensor names to file names"]),
    ("tensor-in-two-shards", True, lambda f, o: tensor_in_both_shards(f), [f"is stored twice, in {SHARD_1} and in {SHARD_2}", "delete one copy"]),
    ("index-names-other-shard", True, lambda f, o: wrong_shard(f), [INDEX, "puts tensor", "holds it"]),
    ("weights-link-out", False, lambda f, o: link(o, f / "model.safetensors"), ["model.safetensors: is a link to", "outside the model folder", "replace the link by a copy"]),
    ("tokenizer-link-out", False, lambda f, o: link(o, f / "tokenizer_config.json"), ["tokenizer_config.json: is a link to", "outside the model folder"]),
    ("config-link-out", False, lambda f, o: link(o, f / "config.json"), ["config.json: is a link to", "outside the model folder"]),
    ("config-not-json", False, lambda f, o: (f / "config.json").write_text("{oops"), ["config.json: is not valid JSON", "fix or re-download the model's config.json"]),
    ("tokenizer-config-not-json", False, lambda f, o: (f / "tokenizer_config.json").write_text("{oops"),
     ["tokenizer_config.json: is not valid JSON", "fix or re-download the model's tokenizer_config.json"]),
    ("generation-config-not-object", False, lambda f, o: (f / "generation_config.json").write_text('"x"'), ["generation_config.json: holds a JSON str, not an object"]),
    ("config-not-object", False, lambda f, o: (f / "config.json").write_text("[1]"), ["config.json: holds a JSON list, not an object"]),
    ("file-too-short", False, lambda f, o: (f / "model.safetensors").write_bytes(b"abc"), ["model.safetensors: has 3 bytes, too few for a safetensors file"]),
    ("header-length-lies", False, lambda f, o: rewrite_header(f / "model.safetensors", length=10**15),
     ["model.safetensors: declares a 1000000000000000-byte header, but the file holds", "re-download the model"]),
    ("header-not-json", False, lambda f, o: rewrite_header(f / "model.safetensors", raw=b"{not json"), ["model.safetensors: its header is not JSON"]),
    ("header-not-object", False, lambda f, o: rewrite_header(f / "model.safetensors", raw=b"[1, 2]"), ["model.safetensors: header: not a JSON object"]),
    ("header-duplicate-name", False, lambda f, o: duplicate(f / "model.safetensors"), ["model.safetensors: its header lists", "twice"]),
    ("unknown-dtype", False, lambda f, o: rewrite_header(f / "model.safetensors", lambda h: set_entry(h, dtype="Q4")), ["has the unknown dtype 'Q4' (mergeflow reads F64"]),
    ("negative-shape", False, lambda f, o: rewrite_header(f / "model.safetensors", lambda h: set_entry(h, shape=[-16])), ["has the shape [-16], not a list of non-negative integers"]),
    ("overflowing-shape", False, lambda f, o: rewrite_header(f / "model.safetensors", lambda h: set_entry(h, shape=[2**40] * 3)), ["whose size overflows"]),
    ("size-not-shape", False, lambda f, o: rewrite_header(f / "model.safetensors", lambda h: set_entry(h, shape=[1])), ["bytes, but F32 [1] needs 4"]),
    ("overlapping-offsets", False, lambda f, o: rewrite_header(f / "model.safetensors", overlap), ["overlaps tensor"]),
    ("truncated", False, lambda f, o: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-4]),
     ["(truncated file or offsets out of range)"]),
]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else os.readlink(p).encode() for p in sorted(folder.rglob("*"))}


def broken_model(case: Case, family: dict[str, Path], sharded: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the case's model broken its way, and the fragments its message must hold."""
    _, is_sharded, breaks, fragments = case
    folder = tmp_path / "models" / "broken"
    shutil.copytree(sharded if is_sharded else family["ft_b"], folder)
    outside = tmp_path / "outside.json"
    shutil.copyfile(family["ft_b"] / "model.safetensors", outside)
    breaks(folder, outside)
    return folder, [fragment.replace("{o}", str(outside)) for fragment in fragments]


def write_recipe(tmp_path: Path, family: dict[str, Path], model: Path) -> Path:
    recipe = {"merge_method": "ties", "base_model": str(family["base"]), "dtype": "float32",
              "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in (family["ft_a"], model)]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def assert_refused(command: list[str], folder: Path, fragments: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``command`` exits 1 with one error line holding every fragment, changes no input and writes no output."""
    before = folder_bytes(folder)
    monkeypatch.setattr(console, "width", 100_000)
    result = runner.invoke(app, command)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert all(fragment in errors[0] for fragment in fragments), errors[0]
    assert folder_bytes(folder) == before
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_merge_refuses(case: Case, family: dict[str, Path], sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, fragments = broken_model(case, family, sharded, tmp_path)
    assert_refused(["merge", str(write_recipe(tmp_path, family, folder)), str(tmp_path / "out")], folder, fragments, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_check_refuses(case: Case, prefect_api: str, family: dict[str, Path], sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, fragments = broken_model(case, family, sharded, tmp_path)
    assert_refused(["check", str(write_recipe(tmp_path, family, folder))], folder, fragments, tmp_path, monkeypatch)


ADAPTER_CASES: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("adapter-config-not-json", lambda a: (a / "adapter_config.json").write_text("{oops"), ["adapter_config.json: is not valid JSON", "re-download the adapter's"]),
    ("adapter-weights-truncated", lambda a: (a / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes()[:-8]),
     ["adapter_model.safetensors: header: tensor", "(truncated file or offsets out of range)"]),
    ("adapter-weights-link-out", lambda a: link(a.parent / "outside.json", a / "adapter_model.safetensors"), ["adapter_model.safetensors: is a link to", "outside the model folder"]),
]


@pytest.fixture(scope="module")
def adapter(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(family["base"], tmp_path_factory.mktemp("adapter") / "lora", seed=3)


def broken_adapter(case: tuple[str, Callable[[Path], None], list[str]], family: dict[str, Path], adapter: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The recipe merging the base with a copy of ``adapter`` broken the case's way, and that copy."""
    folder = shutil.copytree(adapter, tmp_path / "adapters" / "broken")
    shutil.copyfile(family["ft_b"] / "model.safetensors", folder.parent / "outside.json")
    case[1](folder)
    recipe = {"merge_method": "linear", "dtype": "float32", "models": [{"model": f"{family['base']}+{folder}", "parameters": {"weight": 1.0}}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "recipe.yaml", folder


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_merge_refuses_adapter(case: tuple[str, Callable[[Path], None], list[str]], family: dict[str, Path], adapter: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, folder = broken_adapter(case, family, adapter, tmp_path)
    assert_refused(["merge", str(recipe), str(tmp_path / "out")], folder, case[2], tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("case", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_check_refuses_adapter(case: tuple[str, Callable[[Path], None], list[str]], prefect_api: str, family: dict[str, Path], adapter: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, folder = broken_adapter(case, family, adapter, tmp_path)
    assert_refused(["check", str(recipe)], folder, case[2], tmp_path, monkeypatch)


def test_header_over_the_size_limit_is_refused_before_reading_it(family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(merge_ops.model_files, "MAX_HEADER_BYTES", 64)
    folder = shutil.copytree(family["ft_b"], tmp_path / "m")
    assert_refused(["merge", str(write_recipe(tmp_path, family, folder)), str(tmp_path / "out")], folder, ["-byte header, but the limit is 64"], tmp_path, monkeypatch)


def test_links_inside_the_folder_and_into_a_hub_cache_are_read(family: dict[str, Path], sharded: Path, tmp_path: Path) -> None:
    """A link to a file of the same folder, and a Hub cache snapshot's links into its blobs, are inside."""
    snapshot = tmp_path / "models--org--m" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    blobs = shutil.copytree(sharded, tmp_path / "models--org--m" / "blobs")
    for file in blobs.iterdir():
        (snapshot / file.name).symlink_to(Path("../../blobs") / file.name)
    (blobs / "real.json").write_text("{}")
    (blobs / "tokenizer_config.json").unlink()
    (blobs / "tokenizer_config.json").symlink_to("real.json")
    assert read_local_headers("m", snapshot).tensors == read_local_headers("m", sharded).tensors
    assert read_local_headers("m", blobs).tensors == read_local_headers("m", sharded).tensors


def test_the_error_is_a_value_error_naming_the_file(family: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(family["ft_b"], tmp_path / "m")
    rewrite_header(folder / "model.safetensors", lambda h: set_entry(h, dtype="Q4"))
    with pytest.raises(CorruptModelError) as caught:
        read_local_headers("m", folder)
    assert isinstance(caught.value, ValueError) and caught.value.file == str(folder.resolve() / "model.safetensors")
    assert "\n" not in str(caught.value)


def test_a_hub_config_that_is_not_json_is_named(family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_online(tmp_path, monkeypatch)
    folder = shutil.copytree(family["ft_b"], tmp_path / "m")
    (folder / "config.json").write_text("{oops")
    with LocalHub(tmp_path / "hub") as hub:
        push(HfApi(endpoint=hub.endpoint), "org/broken", folder)
        source = resolve_source(ModelRef.model_validate("org/broken"), base_dir=tmp_path, endpoint=hub.endpoint)
        with pytest.raises(CorruptModelError, match=r"config.json: is not valid JSON .*; fix config.json in org/broken$"):
            read_source_headers(source, endpoint=hub.endpoint)


def test_a_download_that_differs_from_its_hub_header_is_refused(family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_online(tmp_path, monkeypatch)
    with LocalHub(tmp_path / "hub") as hub:
        push(HfApi(endpoint=hub.endpoint), "org/m", family["ft_b"])
        source = resolve_source(ModelRef.model_validate("org/m"), base_dir=tmp_path, endpoint=hub.endpoint)
        headers = read_source_headers(source, endpoint=hub.endpoint)
        downloaded = download_source(source, endpoint=hub.endpoint)
    assert local_headers([headers], [downloaded])["org/m"].path == downloaded.path
    rewrite_header(downloaded.path / "model.safetensors", lambda h: set_entry(h, dtype="I32"))
    with pytest.raises(CorruptModelError, match=r"model.safetensors: does not hold '.*' as the Hub's header listed it; delete it from the Hub cache"):
        local_headers([headers], [downloaded])
