"""Session fixtures for the demo skills family, shared by test_demo_family.py and test_evals.py.

The family is built once per session; its LoRA adapters (about as long again) only for the tests that ask for
``demo_adapters``. Both train in ``run_pinned``'s child (portable kernels): 10 CPU-minutes together, 38 minutes
on the 2-core machine under a load of 7-9 (measured). The determinism test needs a second, independent build
(family and adapters); it starts at once in a subprocess (``python -m mergeflow.demo_family --force``) so the
two builds run side by side on the two cores instead of one after the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mergeflow.demo_family.adapters import build_adapters
from mergeflow.demo_family.build import FamilySummary, build_family

REPO = Path(__file__).resolve().parents[1]
EVALS = REPO / "evals"


@pytest.fixture(scope="session")
def demo_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Offline Hugging Face with a per-session HF_HOME (the datasets cache lives there); one thread."""
    torch.set_num_threads(1)
    values = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path_factory.mktemp("hf_home")),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        yield dict(os.environ)


@pytest.fixture(scope="session")
def demo_family_rebuild(
    tmp_path_factory: pytest.TempPathFactory, demo_env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A second build of the family, in its own process (started now, awaited by the test using it)."""
    out = tmp_path_factory.mktemp("demo_rebuild") / "family"
    log = out.parent / "build.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "mergeflow.demo_family", str(out), "--force"],
            cwd=REPO,
            env=demo_env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    yield process, out
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def demo_family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, demo_env: dict[str, str]
) -> FamilySummary:
    """The demo family (base, add, reverse, cipher), built in this process."""
    if any("demo_family_rebuild" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("demo_family_rebuild")  # start the second build first: both run at once
    return build_family(tmp_path_factory.mktemp("demo") / "family")


@pytest.fixture(scope="session")
def demo_adapters(demo_family: FamilySummary) -> FamilySummary:
    """The LoRA adapters of the demo family's base (one per skill), built in this process into its folder."""
    return build_adapters(demo_family)
