"""Bytes independent of the machine: the demo family and a merge of every method give the same files whatever
the CPU's vector ISA, and the committed dvc.lock's ``family`` stage is what a fresh build gives.

Each ISA runs in its own process (``ATEN_CPU_CAPABILITY`` is read once, when torch first computes): the ones
this CPU has of default, avx2 and avx512. The second process also lowers MKL's and oneDNN's instruction sets,
which must not matter either. The demo family trains in ``run_pinned``'s child, whose environment is the same
in every case; the merges run in the probe process itself, under its ISA.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from method_cases import NAMES, recipe_for

from mergeflow.demo_family.build import FamilySummary
from mergeflow.demo_family.pinned import PINNED

pytest_plugins = ["demo_family_fixtures"]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
_CAPABILITIES = torch.cpu.get_capabilities()
ISAS = ["default"] + ["avx2"] * bool(_CAPABILITIES["avx2"]) + ["avx512"] * all(_CAPABILITIES[f"avx512_{x}"] for x in ("f", "bw", "vl", "dq"))
"""The values of ATEN_CPU_CAPABILITY this CPU can run (torch trusts the variable: an ISA the CPU lacks would crash)."""
LOWERED = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def _probe(isa: str, out: Path, recipes: Path, *, extra: dict[str, str]) -> subprocess.Popen[str]:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), str(TESTS), os.environ.get("PYTHONPATH"))))
    return subprocess.Popen([sys.executable, str(TESTS / "isa_probe.py"), str(out), str(recipes)], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def by_isa(tmp_path_factory: pytest.TempPathFactory, family: dict[str, Path], sharded_bf16_family: dict[str, Path]) -> dict[str, dict]:
    """isa_probe.py's output under each ISA (two processes at a time: two cores)."""
    if len(ISAS) < 2:
        pytest.skip("this CPU runs only ATen's default kernels: nothing to compare")
    root = tmp_path_factory.mktemp("isa")
    recipes = {f"f32-{name}": recipe_for(name, family, seed=3) for name in NAMES}
    recipes |= {f"bf16-{name}": recipe_for(name, sharded_bf16_family, dtype="bfloat16", seed=3) for name in NAMES}
    (root / "recipes.json").write_text(json.dumps(recipes))
    results = {}
    for pair in (ISAS[i : i + 2] for i in range(0, len(ISAS), 2)):
        running = {isa: _probe(isa, root / isa, root / "recipes.json", extra=LOWERED if isa != "default" else {}) for isa in pair}
        for isa, process in running.items():
            stdout, _ = process.communicate(timeout=600)
            assert process.returncode == 0, f"isa_probe.py under {isa} failed (its stderr is above)"
            results[isa] = json.loads(stdout.splitlines()[-1])
    return results


@pytest.mark.slow
def test_each_probe_ran_its_isa_and_the_isa_changes_unpinned_training(by_isa: dict[str, dict]) -> None:
    assert {isa: r["capability"] for isa, r in by_isa.items()} == {isa: isa.upper() for isa in ISAS}
    unpinned = {r["unpinned"] for r in by_isa.values()}
    assert len(unpinned) == len(ISAS), "the control: without pinning, each ISA trains other bytes (else this test shows nothing)"


@pytest.mark.slow
def test_demo_family_bytes_do_not_depend_on_the_isa(by_isa: dict[str, dict]) -> None:
    first, *others = by_isa.values()
    assert any(name.endswith(".safetensors") for name in first["family"]) and any(name.startswith("adapters/") for name in first["family"])
    for other in others:
        assert other["family"] == first["family"]


ISA_DEPENDENT = {"arcee_fusion": "its importance (softmax, log and a row sum in float32) differs in the last bits between ISAs, which flips mask entries"}
"""Methods whose merges still differ between ISAs (measured: default vs avx2), with why."""


@pytest.mark.slow
@pytest.mark.parametrize("method", [pytest.param(n, marks=pytest.mark.xfail(reason=ISA_DEPENDENT[n])) if n in ISA_DEPENDENT else n for n in NAMES])
def test_merges_of_every_method_do_not_depend_on_the_isa(by_isa: dict[str, dict], method: str) -> None:
    first, *others = by_isa.values()
    for kind in ("f32", "bf16"):
        assert any(name.endswith(".safetensors") for name in first["merges"][f"{kind}-{method}"])
        for other in others:
            assert other["merges"][f"{kind}-{method}"] == first["merges"][f"{kind}-{method}"], f"{kind} merge of {method}"


@pytest.mark.slow
def test_the_pinned_environment_selects_portable_kernels_and_mkls_compatible_branch() -> None:
    probe = (
        "import ctypes, pathlib, torch\n"
        "lib = ctypes.CDLL(str(pathlib.Path(torch.__file__).parent / 'lib' / 'libtorch_cpu.so'))\n"
        "print(torch.backends.cpu.get_cpu_capability(), lib.mkl_serv_cbwr_get(1))\n"  # 1: MKL_CBWR_BRANCH
    )
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL")
    for isa in ISAS:
        done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "ATEN_CPU_CAPABILITY": isa, **PINNED}, capture_output=True, text=True, check=True)
        assert done.stdout.split() == ["DEFAULT", "3"]  # 3: MKL_CBWR_COMPATIBLE


def dvc_dir_md5(root: Path) -> str:
    """The md5 DVC records for a directory output: md5 of the JSON list of its files' md5 and relative paths."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    listing = [{"md5": hashlib.md5((root / name).read_bytes()).hexdigest(), "relpath": name} for name in files]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def test_dvc_dir_md5_is_dvcs(tmp_path: Path) -> None:
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.json").write_text('{"a": 1}\n')
    (tmp_path / "a.bin").write_bytes(bytes(range(256)))
    tree = Tree()
    for name in ("b/x.json", "a.bin"):
        tree.add(tuple(name.split("/")), Meta(), HashInfo("md5", hashlib.md5((tmp_path / name).read_bytes()).hexdigest()))
    tree.digest()
    assert dvc_dir_md5(tmp_path) == tree.hash_info.value


@pytest.mark.slow
def test_committed_lock_holds_the_family_a_fresh_build_gives(demo_family: FamilySummary, demo_adapters: FamilySummary) -> None:
    """The ``family`` stage's output in dvc.lock (read now: the lock is regenerated when the family changes)."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    (recorded,) = lock["stages"]["family"]["outs"]
    assert dvc_dir_md5(demo_family.root) == recorded["md5"], "dvc.lock's family stage is not what this code builds: run `dvc repro family` and commit dvc.lock"
