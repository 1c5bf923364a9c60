"""``python tests/isa_probe.py OUT RECIPES.json``: what this process's CPU ISA (``ATEN_CPU_CAPABILITY``) makes of
a reduced demo family build, of merges and of a plain training; prints one JSON object of sha256 by file.

Run by test_reproducible_bytes.py once per ISA. The reduced family goes through ``build_family`` and
``build_adapters`` (the code path of ``mergeflow demo-models``) with small settings; the merges are the recipes of
RECIPES.json (name -> recipe); ``unpinned`` trains a tiny model in this process, without ``run_pinned``: the
control that shows the ISA setting does change torch's arithmetic here.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from merge_ops.engine import merge_model
from merge_ops.plan import plan_merge
from merge_ops.recipe_file import parse_recipe
from mergeflow.demo_family.adapters import AdapterSettings, build_adapters
from mergeflow.demo_family.build import FamilySettings, build_family
from mergeflow.demo_family.skills import pretraining_item
from mergeflow.demo_family.tokenizer import build_tokenizer
from mergeflow.demo_family.training import ModelShape, TrainSettings, deterministic_cpu, new_model, train

SHAPE = ModelShape(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
STEPS = TrainSettings(steps=3, learning_rate=3e-3, batch_size=16)
FAMILY = FamilySettings(
    shape=SHAPE,
    base=STEPS,
    finetunes={"add": TrainSettings(steps=2, learning_rate=1e-3, batch_size=16, freeze_embeddings=True, replay=0.1, seed=1)},
)
ADAPTERS = AdapterSettings(skills={"reverse": TrainSettings(steps=2, learning_rate=2e-3, batch_size=16, replay=0.1, seed=1)})


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def unpinned_training() -> str:
    tokenizer = build_tokenizer()
    with deterministic_cpu():
        model = train(new_model(SHAPE, tokenizer, seed=0), tokenizer, pretraining_item, STEPS)
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


def main(out: Path, recipes: dict[str, dict]) -> dict[str, object]:
    family = build_family(out / "family", settings=FAMILY)
    build_adapters(family, settings=ADAPTERS)
    merges = {}
    for name, recipe in recipes.items():
        merge_model(plan_merge(parse_recipe(recipe)), out / "merges" / name)
        merges[name] = file_hashes(out / "merges" / name)
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "family": file_hashes(family.root),
        "merges": merges,
        "unpinned": unpinned_training(),
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))))
