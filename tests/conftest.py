"""Shared test setup: one torch thread (2-core machine), offline Hugging Face, tiny model families."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

from tiny_family import build_family  # noqa: E402


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A float32 tiny Llama family (base, ft_a, ft_b, ft_neg), each a single safetensors file."""
    return build_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="session")
def sharded_bf16_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same family stored as bfloat16 in three shards with an index."""
    return build_family(tmp_path_factory.mktemp("family_bf16"), dtype=torch.bfloat16, shards=3)
