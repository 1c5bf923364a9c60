"""merge_pipeline end to end: Hub sources, compatibility gate, runners (threads, Dask) agree byte for byte, resume."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import LocalCluster
from huggingface_hub import HfApi
from pipeline_helpers import folder_bytes, hub_online, push, ties_recipe, write_recipe
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner
from tiny_family import CONFIG, base_state, fine_tune, write_model

import mergeflow.staging
import tasks.shards
from flows.merge_pipeline import merge_pipeline
from merge_ops.engine import merge_model
from merge_ops.errors import IncompatibleModelsError, OutputExistsError
from merge_ops.plan import plan_merge
from merge_ops.recipe_file import load_recipe
from mergeflow.local_hub import LocalHub
from mergeflow.staging import staging_dir_for

ROOT = Path(__file__).resolve().parents[1]
SHARD = 2500
"""Bytes per output shard: the tiny bf16 models become ~10 shards."""


@pytest.fixture(scope="module")
def dask_cluster(prefect_api: str) -> Iterator[LocalCluster]:
    """Two single-threaded worker processes, started after PREFECT_API_URL points at the session's API."""
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        yield cluster


def engine_merge(recipe_path: Path, out: Path) -> Path:
    """The reference: merge_ops alone, no Prefect."""
    plan = plan_merge(load_recipe(recipe_path), shard_size=SHARD)
    merge_model(plan, out)
    return out


def artifact(key: str) -> str:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=1,
                                      sort="CREATED_DESC")
    return str(found[0].data)


@pytest.mark.slow
def test_pipeline_from_hub(prefect_api: str, sharded_bf16_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_online(tmp_path, monkeypatch)
    fam = sharded_bf16_family
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        shas = {name: push(api, f"mergeflow/{name}", fam[name]) for name in ("base", "ft_a", "ft_b")}
        recipe = write_recipe(tmp_path / "hub.yaml", ties_recipe(f"mergeflow/base@{shas['base']}", "mergeflow/ft_a", "mergeflow/ft_b@main"))
        summary = merge_pipeline(recipe=recipe, out=tmp_path / "merged", shard_size=SHARD, endpoint=hub.endpoint)

    local = write_recipe(tmp_path / "local.yaml", ties_recipe(str(fam["base"]), str(fam["ft_a"]), str(fam["ft_b"])))
    reference = engine_merge(local, tmp_path / "reference")
    assert folder_bytes(summary.out, suffix=".safetensors") == folder_bytes(reference, suffix=".safetensors")
    assert len(summary.shards) >= 8 and summary.resumed == []
    assert {s.repo_id: s.commit_sha for s in summary.sources} == {f"mergeflow/{n}": sha for n, sha in shas.items()}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == []  # staging renamed away
    assert summary.compatibility is not None and len(summary.compatibility.weight_space) == 2

    report = artifact("merge-summary")
    for name, sha in shas.items():
        assert f"| `mergeflow/{name}" in report and sha in report
    assert "## Shards" in report and "MB/s" in report
    compat = artifact("compatibility-report")
    assert "Compatibility: compatible" in compat and "Weight space" in compat


@pytest.mark.slow
def test_runners_give_identical_bytes(
    prefect_api: str, dask_cluster: LocalCluster, sharded_bf16_family: dict[str, Path], tmp_path: Path
) -> None:
    fam = sharded_bf16_family
    data = ties_recipe(str(fam["base"]), str(fam["ft_a"]), str(fam["ft_b"]))
    recipe = write_recipe(tmp_path / "dare.yaml", dict(data, merge_method="dare_ties", seed=11))
    runners = {
        "threads-1": ThreadPoolTaskRunner(max_workers=1),
        "threads-3": ThreadPoolTaskRunner(max_workers=3),
        "dask-2-processes": DaskTaskRunner(address=dask_cluster.scheduler_address),
    }
    outputs = {}
    for name, runner in runners.items():
        summary = merge_pipeline.with_options(task_runner=runner)(recipe=recipe, out=tmp_path / name, shard_size=SHARD)
        outputs[name] = folder_bytes(summary.out)
    assert "merge_shard" in dask_cluster.scheduler.task_prefixes, "the shard tasks ran on the Dask cluster"
    reference = folder_bytes(engine_merge(recipe, tmp_path / "engine"))
    assert len(reference) > 10
    for name, files in outputs.items():
        assert files == reference, name


@pytest.mark.slow
def test_incompatible_models_stop_before_any_download(
    prefect_api: str, family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = hub_online(tmp_path, monkeypatch)
    wide = dict(CONFIG, hidden_size=32)
    odd = write_model(tmp_path / "wide", fine_tune(base_state(config=wide), 5), config=wide)
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        for name, folder in (("base", family["base"]), ("ft_a", family["ft_a"]), ("wide", odd)):
            push(api, f"mergeflow/{name}", folder)
        recipe = write_recipe(tmp_path / "r.yaml", ties_recipe("mergeflow/base", "mergeflow/ft_a", "mergeflow/wide"))
        with pytest.raises(IncompatibleModelsError) as err:
            merge_pipeline(recipe=recipe, out=tmp_path / "merged", endpoint=hub.endpoint)
    assert "mergeflow/wide: hidden_size is 32" in str(err.value) and "tensor(s) have other shapes" in str(err.value)
    assert not list(home.rglob("*.safetensors")), "no weights may be downloaded for incompatible models"
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.staging-*"))
    assert "not compatible" in artifact("compatibility-report")


@pytest.mark.slow
def test_existing_output_is_kept_unless_forced(prefect_api: str, family: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "models": [{"model": str(family[n]), "parameters": {"weight": 1.0}} for n in ("ft_a", "ft_b")]})
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        merge_pipeline(recipe=recipe, out=out)
    assert (out / "keep.txt").exists()
    summary = merge_pipeline(recipe=recipe, out=out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file() and summary.out == out


@pytest.mark.slow
def test_resume_after_sigkill_recomputes_only_missing_shards(
    prefect_api: str, sharded_bf16_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fam = sharded_bf16_family
    recipe = write_recipe(tmp_path / "r.yaml", ties_recipe(str(fam["base"]), str(fam["ft_a"]), str(fam["ft_b"])))
    out = tmp_path / "merged"
    command = [sys.executable, str(ROOT / "tests" / "pipeline_runner.py"), str(recipe), str(out), "--shard-size", str(SHARD), "--delay", "0.4"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            staged = list(tmp_path.glob(".merged.staging-*/model-*.safetensors"))
            if len(staged) >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
        process.kill()  # SIGKILL: no cleanup of any kind
    finally:
        process.kill()
        process.wait()
    assert not out.exists(), "a killed run must not leave an output folder"
    (staging,) = tmp_path.glob(".merged.staging-*")
    before = {p.name: p.stat().st_ino for p in staging.glob("model-*.safetensors")}

    computed: list[int] = []
    merge_file = tasks.shards.merge_shard_file

    def counting(plan_path: Path, index: int, staging_dir: Path, **kwargs: object) -> tasks.shards.ShardResult:
        computed.append(index)
        return merge_file(plan_path, index, staging_dir, **kwargs)

    monkeypatch.setattr(tasks.shards, "merge_shard_file", counting)
    summary = merge_pipeline(recipe=recipe, out=out, shard_size=SHARD)
    shards = len(summary.shards)
    assert len(summary.resumed) >= 2 and len(summary.resumed) < shards
    assert sorted(computed) == sorted(set(range(shards)) - set(summary.resumed)), "only missing shards are recomputed"
    for index in summary.resumed:  # the very files the killed run wrote, moved into place
        name = summary.shards[index].file
        assert (out / name).stat().st_ino == before[name]
    assert staging == staging_dir_for(out, summary.plan_sha256) and not staging.exists()

    clean = merge_pipeline(recipe=recipe, out=tmp_path / "clean", shard_size=SHARD)
    assert folder_bytes(out) == folder_bytes(clean.out)
    assert [s.sha256 for s in summary.shards] == [s.sha256 for s in clean.shards]


def test_staging_folder_is_deterministic_and_trusts_only_complete_shards(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", ties_recipe(str(family["base"]), str(family["ft_a"]), str(family["ft_b"])))
    plan = plan_merge(load_recipe(recipe), shard_size=5000)
    out = tmp_path / "merged"
    first = mergeflow.staging.prepare_staging(plan, out)
    assert first.dir == staging_dir_for(out, first.plan_sha256) == tmp_path / f".merged.staging-{first.plan_sha256[:12]}"
    assert first.done_before == [] and len(first.shard_files) >= 3
    records = first.results_dir
    for i in (0, 1):  # shard 0 finished (file + record); shard 1 killed between rename and record; shard 2 record only
        (first.dir / first.shard_files[i]).write_bytes(b"shard")
    (records / mergeflow.staging.shard_cache_key(first.plan_sha256, 0)).write_bytes(b"record")
    (records / mergeflow.staging.shard_cache_key(first.plan_sha256, 2)).write_bytes(b"record")
    (first.dir / (first.shard_files[3] + ".partial")).write_bytes(b"half")
    (tmp_path / ".merged.staging-0123456789ab").mkdir()

    again = mergeflow.staging.prepare_staging(plan, out)
    assert again.dir == first.dir and again.done_before == [0]
    assert sorted(p.name for p in first.dir.glob("model-*")) == [first.shard_files[0]]
    assert sorted(p.name for p in records.iterdir()) == [mergeflow.staging.shard_cache_key(first.plan_sha256, 0)]
    assert again.removed_staging == [tmp_path / ".merged.staging-0123456789ab"] and not again.removed_staging[0].exists()
    out.mkdir()
    with pytest.raises(OutputExistsError):
        mergeflow.staging.prepare_staging(plan, out)
