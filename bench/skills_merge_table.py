"""Measure the demo skills family with lm-eval and print the README's tables (markdown).

1. Every model of the family (base and one fine-tune per skill) on every skill task: each fine-tune
   should be high on its own skill and low on the others, the base low on all.
2. Merges of the add and reverse fine-tunes on the two-skill evaluation (group ``skills_add_reverse``,
   the mean of ``skill_add`` and ``skill_reverse``), next to both sources. The merges are computed
   here with plain torch (reference math of /work/shared/merge-methods.md, mergekit semantics), so the
   table does not depend on merge_ops; ``--engine`` adds the same recipes merged by ``mergeflow merge``.

Usage (from the repository root, offline, ~2-4 minutes on 2 cores plus the family build when not cached):

    python bench/skills_merge_table.py [--family bench/.cache/demo-family] [--engine]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import yaml
from safetensors.torch import load_file, save_file

from mergeflow.demo_family.build import build_family

REPO = Path(__file__).resolve().parents[1]
EVALS = REPO / "evals"
CACHE_EVALS = REPO / "bench" / ".cache" / "eval"
RECIPES = REPO / "recipes"
SKILL_TASKS = ("skill_add", "skill_reverse", "skill_cipher")
PAIR_GROUP = "skills_add_reverse"
PAIR = ("add", "reverse")
StateDict = dict[str, torch.Tensor]


# --- evaluation ---------------------------------------------------------------------------------


def evaluate(model_dir: Path, tasks: list[str]) -> dict[str, float]:
    """lm-eval exact match of ``model_dir`` on ``tasks`` (tasks and groups), offline, via the pipeline's evaluator."""
    from mergeflow.evaluation import evaluate_model

    result = evaluate_model(model_dir, tasks=tasks, include_path=EVALS, batch_size=32, dtype="float32", cache_dir=CACHE_EVALS)
    return result.scores


# --- reference merge math (per tensor, float32) --------------------------------------------------


def task_arithmetic(base: torch.Tensor, xs: list[torch.Tensor], *, weights: list[float], lam: float) -> torch.Tensor:
    return base + lam * sum(w * (x - base) for w, x in zip(weights, xs, strict=True))


def _top_k(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[delta.flatten().abs().argsort(descending=True, stable=True)[:k]] = True
    return delta * keep.view_as(delta)


def _dare(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    kept = delta * torch.bernoulli(torch.full(delta.shape, density), generator=generator)
    before, after = delta.abs().sum(), kept.abs().sum()
    return kept * (before / after) if before > 1e-7 and after > 1e-7 else kept


def _sign_consensus(deltas: list[torch.Tensor], weights: list[float], *, normalize: bool) -> torch.Tensor:
    weighted = [w * d for w, d in zip(weights, deltas, strict=True)]
    majority = torch.where(sum(weighted) >= 0, 1.0, -1.0)
    masks = [(torch.sign(wd) == majority).float() for wd in weighted]
    mixed = sum(wd * m for wd, m in zip(weighted, masks, strict=True))
    if normalize:
        divisor = sum(w * m for w, m in zip(weights, masks, strict=True))
        mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    return mixed


def ties(
    base: torch.Tensor, xs: list[torch.Tensor], *, weights: list[float], density: float, lam: float
) -> torch.Tensor:
    deltas = [_top_k(x - base, density) for x in xs]
    return base + lam * _sign_consensus(deltas, weights, normalize=True)


def dare_ties(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    *,
    weights: list[float],
    density: float,
    lam: float,
    generator: torch.Generator,
) -> torch.Tensor:
    deltas = [_dare(x - base, density, generator) for x in xs]
    return base + lam * _sign_consensus(deltas, weights, normalize=False)


def linear(base: torch.Tensor, xs: list[torch.Tensor], *, weights: list[float]) -> torch.Tensor:
    return sum(w * x for w, x in zip(weights, xs, strict=True)) / sum(weights)


def merge_state(base: StateDict, models: list[StateDict], method: Callable[..., torch.Tensor], **params) -> StateDict:
    return {name: method(tensor, [m[name] for m in models], **params).contiguous() for name, tensor in base.items()}


def save_merged(state: StateDict, base_dir: Path, out_dir: Path) -> Path:
    """A model folder: the base's config and tokenizer files with the merged weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in base_dir.iterdir():
        if file.name not in ("model.safetensors", "README.md"):
            shutil.copy(file, out_dir / file.name)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


# --- the merges of the table ---------------------------------------------------------------------


def merge_grid() -> list[tuple[str, Callable[..., torch.Tensor], dict]]:
    """(label, method, parameters): the settings the README reports, weights 1.0 each unless noted."""
    grid: list[tuple[str, Callable[..., torch.Tensor], dict]] = [
        ("linear, weights 0.5/0.5", linear, {"weights": [0.5, 0.5]})
    ]
    for lam in (0.8, 0.9, 1.0, 1.1):
        grid.append((f"task_arithmetic, lambda {lam}", task_arithmetic, {"weights": [1.0, 1.0], "lam": lam}))
    for density, lam in ((0.5, 1.0), (0.5, 1.2), (0.7, 1.2)):
        label = f"ties, density {density}, lambda {lam}"
        grid.append((label, ties, {"weights": [1.0, 1.0], "density": density, "lam": lam}))
    for seed in (0, 1, 2):
        label = f"dare_ties, density 0.7, lambda 0.9, seed {seed}"
        params = {"weights": [1.0, 1.0], "density": 0.7, "lam": 0.9, "generator": torch.Generator().manual_seed(seed)}
        grid.append((label, dare_ties, params))
    return grid


def engine_merges(family: Path, work: Path) -> list[tuple[str, Path]]:
    """Merge every recipe of the add and reverse fine-tunes with ``mergeflow merge`` (model paths rewritten to ``family``)."""
    merged = []
    for recipe_path in sorted(RECIPES.glob("skills-*.yaml")):
        if "five-adapters" in recipe_path.name:  # bench/skills_adapter_table.py measures those
            continue
        text = recipe_path.read_text().replace("demo-family/", f"{family.resolve()}/")
        recipe = work / recipe_path.name
        recipe.write_text(text)
        out = work / f"engine-{recipe_path.stem}"
        command = [str(Path(sys.executable).parent / "mergeflow"), "merge", str(recipe), str(out)]
        run = subprocess.run(command, cwd=work, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
        method = yaml.safe_load(text)["merge_method"]
        merged.append((f"mergeflow merge {recipe_path.name} ({method})", out))
    return merged


# --- tables --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", type=Path, default=REPO / "bench" / ".cache" / "demo-family")
    parser.add_argument("--engine", action="store_true", help="also merge the add + reverse recipes/skills-*.yaml with mergeflow merge")
    args = parser.parse_args()
    torch.set_num_threads(1)

    summary = build_family(args.family)
    print(f"family: {summary.root} ({'cached' if summary.cached else f'built in {summary.seconds:.0f} s'})\n")

    print("| model | " + " | ".join(SKILL_TASKS) + " |")
    print("|---|" + "---:|" * len(SKILL_TASKS))
    for name, folder in summary.models.items():
        scores = evaluate(folder, list(SKILL_TASKS))
        print(f"| {name} | " + " | ".join(f"{scores[t]:.3f}" for t in SKILL_TASKS) + " |", flush=True)

    print(f"\n| model ({PAIR[0]} + {PAIR[1]}) | skill_add | skill_reverse | {PAIR_GROUP} (mean) |")
    print("|---|---:|---:|---:|")

    def row(label: str, folder: Path) -> None:
        s = evaluate(folder, [PAIR_GROUP])
        print(f"| {label} | {s['skill_add']:.3f} | {s['skill_reverse']:.3f} | {s[PAIR_GROUP]:.3f} |", flush=True)

    for name in ("base", *PAIR):
        row(name if name == "base" else f"{name} (source)", summary.models[name])
    base = load_file(summary.models["base"] / "model.safetensors")
    sources = [load_file(summary.models[name] / "model.safetensors") for name in PAIR]
    with tempfile.TemporaryDirectory(prefix="skills-merges-") as tmp:
        work = Path(tmp)
        for index, (label, method, params) in enumerate(merge_grid()):
            folder = save_merged(
                merge_state(base, sources, method, **params), summary.models["base"], work / f"m{index}"
            )
            row(label, folder)
        if args.engine:
            for label, folder in engine_merges(summary.root, work):
                row(label, folder)


if __name__ == "__main__":
    sys.exit(main())
