"""Measure the demo family's LoRA adapters and their five-adapter merges with lm-eval; print the README's table.

Rows: the base; each adapter on the base (lm-eval's ``pretrained=BASE,peft=ADAPTER``); the two recipes that
combine all five adapters:

- ``recipes/skills-five-adapters-model.yaml``: five ``BASE+ADAPTER`` sources merged into one full model;
- ``recipes/skills-five-adapters-adapter.yaml``: the five adapters merged into one adapter (``output: adapter``).

Columns: exact match on the five skill tasks and their mean (group ``skills_five``). Each single adapter can
reach at most 0.2 on the mean (one skill of five). ``--sweep`` adds the model recipe over a grid of λ (task
arithmetic) and density × λ (TIES), to show the best setting found, and task arithmetic (λ 1.0) of two adapters
only (add and reverse).

Recipes are merged with ``mergeflow merge`` (``demo-family/`` paths rewritten to ``--family``); a recipe the
engine cannot merge yet gets a row that says why. Usage (from the repository root, offline; ~1 minute per
row on 2 cores, plus the family and adapter builds when not cached):

    python bench/skills_adapter_table.py [--family bench/.cache/demo-family] [--sweep]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import yaml

from merge_ops.recipe_variants import vary_recipe
from mergeflow.demo_family.adapters import build_adapters
from mergeflow.demo_family.build import BASE, build_family
from mergeflow.demo_family.skills import SKILLS

REPO = Path(__file__).resolve().parents[1]
EVALS = REPO / "evals"
CACHE_EVALS = REPO / "bench" / ".cache" / "eval"
RECIPES = REPO / "recipes"
MODEL_RECIPE = RECIPES / "skills-five-adapters-model.yaml"
ADAPTER_RECIPE = RECIPES / "skills-five-adapters-adapter.yaml"
GROUP = "skills_five"
TASKS = tuple(f"skill_{skill}" for skill in SKILLS)
SWEEP = [("task_arithmetic", {"lambda": lam}) for lam in (0.4, 0.6, 0.8, 1.0, 1.2)] + [
    ("ties", {"density": density, "lambda": lam}) for density in (0.3, 0.5, 0.7) for lam in (1.0, 1.5)
]
"""The (method, parameters) variants of the model recipe that ``--sweep`` merges."""
PAIR = ("add", "reverse")


def evaluate(folder: Path, base: Path) -> dict[str, float]:
    """lm-eval exact match on the five skills and their mean; ``folder`` is a full model or an adapter of ``base``."""
    from mergeflow.evaluation import evaluate_model

    adapter = (folder / "adapter_config.json").is_file()
    result = evaluate_model(
        folder, base=base if adapter else None, tasks=[GROUP], include_path=EVALS, batch_size=32, dtype="float32", cache_dir=CACHE_EVALS
    )
    return result.scores


def merge_recipe(data: dict, family: Path, out: Path) -> Path:
    """Merge recipe ``data`` with ``mergeflow merge`` into ``out``, its ``demo-family/`` paths read as ``family``.

    Raises:
        RuntimeError: the merge failed (with its output on one line, which says why).
    """
    text = yaml.safe_dump(data, sort_keys=False).replace("demo-family/", f"{family.resolve()}/")
    recipe = out.with_suffix(".yaml")
    recipe.write_text(text)
    command = [str(Path(sys.executable).parent / "mergeflow"), "merge", str(recipe), str(out)]
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(" ".join((run.stdout + run.stderr).split())[-400:])
    return out


# --- the two five-adapter recipes (adapter-space merges: `output: adapter`, see ADAPTER_RECIPE) -----------------


def five_adapters_into_one_model(
    recipe_path: Path, family: Path, work: Path, *, method: str | None = None, parameters: dict | None = None, only: tuple[str, ...] = ()
) -> Path:
    """The full model ``recipe_path`` merges from five ``BASE+ADAPTER`` sources.

    ``method`` and ``parameters`` override the recipe's (``vary_recipe``); ``only`` keeps the sources of those skills.
    """
    data = vary_recipe(yaml.safe_load(recipe_path.read_text()), method=method, parameters=parameters, source=str(recipe_path)).data
    if only:
        data["models"] = [m for m in data["models"] if m["model"].rsplit("/", 1)[-1] in only]
    label = "-".join([method or "", *only, *(f"{k}{v}" for k, v in (parameters or {}).items())])
    return merge_recipe(data, family, work / f"{recipe_path.stem}{label}")


def five_adapters_into_one_adapter(recipe_path: Path, family: Path, work: Path) -> Path:
    """The adapter folder ``recipe_path`` (``output: adapter``) merges from the five adapters; evaluated on the base."""
    return merge_recipe(yaml.safe_load(recipe_path.read_text()), family, work / recipe_path.stem)


# --- the table -----------------------------------------------------------------------------------------------------


def _row(label: str, scores: dict[str, float]) -> None:
    cells = " | ".join(f"{scores[task]:.3f}" for task in (*TASKS, GROUP))
    print(f"| {label} | {cells} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", type=Path, default=REPO / "bench" / ".cache" / "demo-family")
    parser.add_argument("--sweep", action="store_true", help="also the model recipe over a grid of lambda (and density)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    family = build_family(args.family)
    adapters = build_adapters(family)
    for summary in (family, adapters):
        print(f"{summary.root}: {'cached' if summary.cached else f'built in {summary.seconds:.0f} s'}")
    base = family.models[BASE]

    print("\n| model | " + " | ".join(TASKS) + f" | {GROUP} (mean) |")
    print("|---|" + "---:|" * (len(TASKS) + 1))
    _row("base", evaluate(base, base))
    for skill, folder in adapters.models.items():
        _row(f"base + adapter `{skill}`", evaluate(folder, base))
    with tempfile.TemporaryDirectory(prefix="skills-adapters-") as tmp:
        work = Path(tmp)
        method = yaml.safe_load(MODEL_RECIPE.read_text())["merge_method"]
        merges = [(f"`{MODEL_RECIPE.name}` ({method}), one model", lambda: five_adapters_into_one_model(MODEL_RECIPE, family.root, work))]
        merges.append((f"`{ADAPTER_RECIPE.name}`, one adapter", lambda: five_adapters_into_one_adapter(ADAPTER_RECIPE, family.root, work)))
        if args.sweep:
            for variant, params in SWEEP:
                label = f"{variant}, " + ", ".join(f"{k} {v}" for k, v in params.items())
                merges.append((label, lambda m=variant, p=params: five_adapters_into_one_model(MODEL_RECIPE, family.root, work, method=m, parameters=p)))
            label = f"task_arithmetic, lambda 1.0, of the {' and '.join(PAIR)} adapters only"
            pair = {"method": "task_arithmetic", "parameters": {"lambda": 1.0}, "only": PAIR}
            merges.append((label, lambda: five_adapters_into_one_model(MODEL_RECIPE, family.root, work, **pair)))
        for label, merge in merges:
            try:
                _row(label, evaluate(merge(), base))
            except RuntimeError as error:
                print(f"| {label} | not merged: {error} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
