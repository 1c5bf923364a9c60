"""LocalHub against the real huggingface_hub client; network only to 127.0.0.1.

The endpoint is passed explicitly everywhere: `HfApi(endpoint=...)` (covers create_repo, upload_folder,
model_info, list_repo_*, get_safetensors_metadata, file_exists) and `endpoint=` on `snapshot_download` /
`hf_hub_download`. huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE, the token path and
HF_HUB_DISABLE_XET once at import, so the `hf_env` fixture patches `huggingface_hub.constants` as well as the
environment.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils._runtime import is_xet_available  # private, but it is what upload_folder checks
from safetensors.torch import save_file

from mergeflow.local_hub import LocalHub

REPO = "mergeflow/tiny"


@pytest.fixture(autouse=True)
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A per-test HF_HOME/HF_HUB_CACHE, no token, online mode (even if HF_HUB_OFFLINE=1 was set at import)."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return home


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LocalHub]:
    with LocalHub(tmp_path / "hub_root") as server:
        yield server


@pytest.fixture
def api(hub: LocalHub) -> HfApi:
    return HfApi(endpoint=hub.endpoint)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    tensors = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.zeros(4, dtype=torch.bfloat16)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    return folder


def upload(api: HfApi, folder: Path, message: str = "upload") -> str:
    api.create_repo(REPO, exist_ok=True)
    return api.upload_folder(repo_id=REPO, folder_path=folder, commit_message=message).oid


def test_create_repo_exist_ok(api: HfApi, hub: LocalHub) -> None:
    url = api.create_repo(REPO)
    assert url == f"{hub.endpoint}/{REPO}" and url.repo_id == REPO
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO)
    assert conflict.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True) == url


@pytest.mark.parametrize("xet", [True, False], ids=["xet-installed", "xet-disabled"])
def test_upload_info_and_snapshot(
    api: HfApi, hub: LocalHub, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xet: bool
) -> None:
    # With hf_xet usable, upload_folder takes the pipelined path; files stay "regular", so no Xet call is made.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    assert is_xet_available() is xet
    sha = upload(api, model_dir)

    info = api.model_info(REPO)
    assert info.sha == sha
    assert {s.rfilename: s.size for s in info.siblings} == {
        p.name: p.stat().st_size for p in model_dir.iterdir()
    }
    cache = tmp_path / "cache"
    snapshot = Path(
        snapshot_download(REPO, allow_patterns=["*.json", "*.safetensors"], cache_dir=cache, endpoint=hub.endpoint)
    )
    assert snapshot.name == sha
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert (snapshot / name).read_bytes() == (model_dir / name).read_bytes()


def test_download_older_revision(api: HfApi, hub: LocalHub, model_dir: Path, tmp_path: Path) -> None:
    first = upload(api, model_dir, "v1")
    old_config = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    second = upload(api, model_dir, "v2")
    assert second != first

    def config_at(revision: str) -> str:
        path = hf_hub_download(REPO, "config.json", revision=revision, cache_dir=tmp_path / "c", endpoint=hub.endpoint)
        return Path(path).read_text()

    assert config_at(first) == old_config
    assert config_at("main") == (model_dir / "config.json").read_text()
    assert api.model_info(REPO, revision=first).sha == first
    assert [c.title for c in api.list_repo_commits(REPO)] == ["v2", "v1", "initial commit"]
    assert [(b.name, b.target_commit) for b in api.list_repo_refs(REPO).branches] == [("main", second)]
    files = api.list_repo_tree(REPO, revision=first, recursive=True)
    assert sorted(f.path for f in files) == ["README.md", "config.json", "model.safetensors"]


def test_get_safetensors_metadata_and_ranges(api: HfApi, hub: LocalHub, model_dir: Path) -> None:
    upload(api, model_dir)
    meta = api.get_safetensors_metadata(REPO)
    tensors = meta.files_metadata["model.safetensors"].tensors
    assert {name: (t.dtype, t.shape) for name, t in tensors.items()} == {"w": ("F32", [3, 4]), "b": ("BF16", [4])}

    data = (model_dir / "model.safetensors").read_bytes()
    request = urllib.request.Request(f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors")
    request.add_header("Range", "bytes=2-9")
    with urllib.request.urlopen(request) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 2-9/{len(data)}"
        assert response.read() == data[2:10]
    request.add_header("Range", f"bytes={len(data)}-")
    with pytest.raises(urllib.error.HTTPError) as unsatisfiable:
        urllib.request.urlopen(request)
    assert unsatisfiable.value.code == 416


def test_not_found_errors(api: HfApi, hub: LocalHub, model_dir: Path, tmp_path: Path) -> None:
    upload(api, model_dir)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.bin", cache_dir=tmp_path / "c", endpoint=hub.endpoint)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/nothing", "config.json", cache_dir=tmp_path / "c", endpoint=hub.endpoint)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("nobody/nothing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="0" * 40)
    assert not api.file_exists(REPO, "missing.bin")


def test_identical_upload_makes_no_commit(api: HfApi, model_dir: Path) -> None:
    sha = upload(api, model_dir, "first")
    assert upload(api, model_dir, "again") == sha  # client side: preupload's oid matches, nothing is sent
    # Server side: a commit whose resulting files equal its parent's keeps the head.
    config = model_dir / "config.json"
    ops = [CommitOperationDelete("config.json"), CommitOperationAdd("config.json", config)]
    assert api.create_commit(REPO, operations=ops, commit_message="delete and re-add").oid == sha
    assert len(api.list_repo_commits(REPO)) == 2
    assert api.model_info(REPO).sha == sha


def test_restart_on_same_root_keeps_repos(tmp_path: Path, model_dir: Path) -> None:
    root = tmp_path / "persistent"
    with LocalHub(root) as first:
        sha = upload(HfApi(endpoint=first.endpoint), model_dir)
    with LocalHub(root) as second:
        api = HfApi(endpoint=second.endpoint)
        assert api.model_info(REPO).sha == sha
        path = hf_hub_download(REPO, "model.safetensors", cache_dir=tmp_path / "c", endpoint=second.endpoint)
        assert Path(path).read_bytes() == (model_dir / "model.safetensors").read_bytes()


def test_token_is_checked(tmp_path: Path) -> None:
    with LocalHub(tmp_path / "hub_root", token="secret") as hub:
        HfApi(endpoint=hub.endpoint, token="secret").create_repo(REPO)
        with pytest.raises(HfHubHTTPError) as wrong:
            HfApi(endpoint=hub.endpoint, token="wrong").model_info(REPO)
        assert wrong.value.response.status_code == 401
        assert not isinstance(wrong.value, RepositoryNotFoundError)
