"""LoRA sources benchmark: ``BASE+ADAPTER`` merges against the same merges of full fine-tunes, and PEFT's own path.

On merge_bench.py's 1.1B bf16 family (base, ft_1, ft_2; synthesised once under --cache/models), writes five
rank-16 PEFT LoRA adapters of the base with random non-zero float32 factors on every linear module (q, k, v, o,
gate, up, down of each layer; PEFT's tensor names and adapter_config.json, written directly rather than through a
1.1B PEFT model; the names are first checked against those PEFT itself saves for a tiny Llama). Then, interleaved
and --runs times, each in a fresh process after a sync, with wall time and peak RSS:

- ``mergeflow merge`` of each merge_bench recipe (default linear and ties) over ``ft_1, ft_2`` and over
  ``base+adapter_1, base+adapter_2``, and of ``linear`` over one source alone (``apply``: ft_1 alone vs
  base+adapter_1, the adapter merged into its base); and over ``applied``: full models holding exactly
  base+adapter_i's weights (written once by mergeflow), the same merge on full fine-tunes with the same deltas
  (the bench's own fine-tunes have other deltas, and TIES's exact top-k costs differ with the data);
- PEFT's own path for ``apply``: ``PeftModel.from_pretrained`` + ``merge_and_unload`` + ``save_pretrained``
  (its output is compared with mergeflow's tensor by tensor), and for the five adapters
  ``add_weighted_adapter`` (``cat``, ``linear``, ``ties``) + saving the combined adapter;
- the adapter-space merge of the five adapters (``output: adapter``, ``adapter_space_recipes``).

The machine's load average is printed with every run (other jobs share the cores). ``--update-std`` sets the
scale of the adapters' updates (TIES's top-k search costs more or less depending on it, see UPDATE_STD).

    .venv/bin/python bench/lora_bench.py --runs 3
    .venv/bin/python bench/lora_bench.py --runs 3 --methods ties --peft '' --update-std 0.0019
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import peft
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from merge_bench import CONFIG, recipes, synthesise, tensor_shapes, timed  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, ADAPTERS = 16, 32, 5
UPDATE_STD = 0.002
"""Standard deviation of the adapters' update entries (scale * B @ A): 0.002, as merge_bench's fine-tunes differ from
their base. TIES's exact top-k costs more when its threshold falls between two of the values bf16 deltas repeat than
on one of them, which depends on this scale (--update-std shows it)."""
PEFT_COMBINATIONS = ("cat", "linear", "ties")


# --------------------------------------------------------------------------- adapters


def lora_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """PEFT's saved tensor name -> shape for a rank-RANK adapter on every TARGETS module of a Llama ``cfg``."""
    shapes = {}
    for name, (out_features, in_features) in ((n, s) for n, s in tensor_shapes(cfg) if n.split(".")[-2] in TARGETS):
        module = "base_model.model." + name.removesuffix(".weight")
        shapes[f"{module}.lora_A.weight"] = (RANK, in_features)
        shapes[f"{module}.lora_B.weight"] = (out_features, RANK)
    return shapes


def lora_config(base: Path) -> peft.LoraConfig:
    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), task_type="CAUSAL_LM", base_model_name_or_path=str(base.resolve()))


def check_names_against_peft() -> None:
    """The names ``lora_shapes`` writes are the ones PEFT saves, for a tiny Llama of the same layout."""
    tiny = dict(CONFIG, vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    with tempfile.TemporaryDirectory() as tmp:
        model = peft.get_peft_model(LlamaForCausalLM(LlamaConfig(**tiny)), lora_config(Path(tmp)))
        model.save_pretrained(tmp)
        saved = {n: tuple(t.shape) for n, t in load_file(Path(tmp) / "adapter_model.safetensors").items()}
    if saved != lora_shapes(tiny):
        raise SystemExit(f"adapter names differ from PEFT's: {sorted(set(saved) ^ set(lora_shapes(tiny)))[:6]}")


def write_adapter(folder: Path, base: Path, index: int, update_std: float) -> Path:
    """Adapter ``index``: every factor random (seeded by tensor name and index), float32 as PEFT saves them, scaled so
    that the update's entries have standard deviation ``update_std``."""
    if (folder / "adapter_model.safetensors").exists():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    factor_std = (update_std / (math.sqrt(RANK) * ALPHA / RANK)) ** 0.5  # std of a sum of RANK products, times the scale
    tensors = {}
    for name, shape in lora_shapes(CONFIG).items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1000 * index)
        tensors[name] = torch.randn(shape, generator=g) * factor_std
    lora_config(base).save_pretrained(tmp)
    save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    tmp.rename(folder)
    print(f"wrote {folder}", file=sys.stderr)
    return folder


# --------------------------------------------------------------------------- recipes


def adapted_models(base: Path, adapters: list[Path]) -> dict[str, Path]:
    """merge_bench's family names for ``base+adapter_1`` and ``base+adapter_2``."""
    return {"base": base, "ft_1": Path(f"{base}+{adapters[0]}"), "ft_2": Path(f"{base}+{adapters[1]}")}


def applied_models(base: Path, adapters: list[Path], cache: Path, mergeflow: str) -> dict[str, Path]:
    """Full fine-tunes holding exactly the adapted weights (``base+adapter_i`` merged alone, weight 1, written once):
    a merge over them sees the same deltas as over the adapters, so the two differ only in where the weights come from."""
    applied = {"base": base}
    for name, source in adapted_models(base, adapters).items():
        folder = cache / f"applied-{Path(str(source)).name.split('+')[-1]}-{adapters[0].parent.name}"
        if name != "base" and not (folder / "config.json").exists():
            recipe = cache / f"{folder.name}.yaml"
            recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(source), "parameters": {"weight": 1.0}}], "dtype": "bfloat16"}))
            subprocess.run([mergeflow, "merge", str(recipe), str(folder)], check=True, capture_output=True)
        if name != "base":
            applied[name] = folder
    return applied


def lora_recipes(variants: dict[str, dict[str, Path]], methods: list[str]) -> dict[str, dict[str, dict]]:
    """variant -> method -> recipe: merge_bench's recipes over each variant's family (``full``: the bench's fine-tunes;
    ``lora``: base+adapter; ``applied``: full models holding base+adapter's weights), plus ``apply``: one source alone."""
    out: dict[str, dict[str, dict]] = {}
    for variant, family in variants.items():
        alone = {"merge_method": "linear", "models": [{"model": str(family["ft_1"]), "parameters": {"weight": 1.0}}], "dtype": "bfloat16"}
        out[variant] = {"apply": alone, **{m: recipes(family)[m] for m in methods}}
    return out


def adapter_space_recipes(base: Path, adapters: list[Path]) -> dict[str, dict]:
    """Five adapters merged into one adapter (``output: adapter``): PEFT's linear and ties combination types."""
    models = [{"model": f"{base}+{a}", "parameters": {"weight": 1 / len(adapters)}} for a in adapters]
    return {
        "linear": {"merge_method": "linear", "models": models, "dtype": "bfloat16", "output": "adapter"},
        "ties": {"merge_method": "ties", "base_model": str(base), "models": [dict(m, parameters={"weight": 1.0}) for m in models],
                 "parameters": {"density": 0.5}, "dtype": "bfloat16", "output": "adapter"},
    }


# --------------------------------------------------------------------------- PEFT's own path (run in a fresh process)


def peft_apply(base: Path, adapter: Path, out: Path) -> None:
    """PEFT merges one adapter into its base and saves the model."""
    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter)
    model.merge_and_unload().save_pretrained(out)


def peft_combine(base: Path, adapters: list[Path], combination: str, out: Path) -> None:
    """PEFT's add_weighted_adapter over the adapters, equal weights (ties: weight 1, density 0.5), combined adapter saved."""
    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapters[0], adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], 1):
        model.load_adapter(adapter, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    ties = combination == "ties"
    weights = [1.0 if ties else 1 / len(adapters)] * len(adapters)
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination, **({"density": 0.5} if ties else {}))
    model.save_pretrained(out, selected_adapters=["merged"])


# --------------------------------------------------------------------------- measuring


def compare_outputs(ours: Path, theirs: Path) -> str:
    """Elements equal bit for bit and the largest difference, over every tensor of two model folders."""
    equal = total = 0
    worst = 0.0
    for file in sorted(ours.glob("*.safetensors")):
        mine = load_file(file)
        other = {k: v for f in sorted(theirs.glob("*.safetensors")) for k, v in load_file(f).items() if k in mine}
        if mine.keys() != other.keys():
            return f"names differ: {sorted(set(mine) ^ set(other))[:4]}"
        for name, t in mine.items():
            equal += int((t == other[name]).sum())
            total += t.numel()
            worst = max(worst, float((t.float() - other[name].float()).abs().max()))
    return f"{equal}/{total} elements equal, max abs diff {worst:.3g}"


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", default="linear,ties", help="merge_bench recipes to time with LoRA and full sources")
    parser.add_argument("--peft", default="apply," + ",".join(PEFT_COMBINATIONS), help="PEFT paths to time (apply, cat, linear, ties, svd...); empty for none")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--update-std", type=float, default=UPDATE_STD, help="standard deviation of the adapters' update entries")
    parser.add_argument("--json", type=Path, help="write the results here too")
    sub = parser.add_subparsers(dest="internal")
    one = sub.add_parser("peft-apply", help=argparse.SUPPRESS)
    one.add_argument("base", type=Path), one.add_argument("adapter", type=Path), one.add_argument("out", type=Path)
    many = sub.add_parser("peft-combine", help=argparse.SUPPRESS)
    many.add_argument("combination"), many.add_argument("base", type=Path), many.add_argument("out", type=Path), many.add_argument("adapters", type=Path, nargs="+")
    args = parser.parse_args()
    if args.internal == "peft-apply":
        peft_apply(args.base, args.adapter, args.out)
        return
    if args.internal == "peft-combine":
        peft_combine(args.base, args.adapters, args.combination, args.out)
        return

    folders = synthesise(args.cache / "models")
    check_names_against_peft()
    adapter_dir = args.cache / f"adapters-r{RANK}-std{args.update_std:g}"
    adapters = [write_adapter(adapter_dir / f"adapter_{i + 1}", folders["base"], i + 1, args.update_std) for i in range(ADAPTERS)]
    mergeflow = str(Path(sys.executable).with_name("mergeflow"))
    out = args.cache / "out-lora-bench"
    commands: dict[str, list[str]] = {}
    variants = {"full": folders, "lora": adapted_models(folders["base"], adapters)}
    if args.methods:
        variants["applied"] = applied_models(folders["base"], adapters, args.cache, mergeflow)
    for variant, by_method in (lora_recipes(variants, args.methods.split(",")) if args.methods else {}).items():
        for method, recipe in by_method.items():
            path = args.cache / f"lora-bench-{variant}-{method}.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            commands[f"mergeflow {method} {variant}"] = [mergeflow, "merge", str(path), str(out), "--force"]
    this = [sys.executable, str(Path(__file__).resolve())]
    for peft_path in filter(None, args.peft.split(",")):
        if peft_path == "apply":
            commands["peft apply"] = [*this, "peft-apply", str(folders["base"]), str(adapters[0]), str(out)]
        else:
            commands[f"peft {peft_path} x{ADAPTERS}"] = [*this, "peft-combine", peft_path, str(folders["base"]), str(out), *map(str, adapters)]
    for method, recipe in adapter_space_recipes(folders["base"], adapters).items():
        path = args.cache / f"lora-bench-adapter-space-{method}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        commands[f"mergeflow {method} x{ADAPTERS} output: adapter"] = [mergeflow, "merge", str(path), str(out), "--force"]

    walls: dict[str, list[float]] = {k: [] for k in commands}
    rss: dict[str, list[float]] = {k: [] for k in commands}
    failed: dict[str, str] = {}  # PEFT paths that fail
    loads: list[float] = []
    check = ""
    for run in range(args.runs):
        for label, command in commands.items():  # interleaved: every variant once per round
            if label in failed:
                continue
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            before = load()
            loads.append(os.getloadavg()[0])
            try:
                wall, peak = timed(command)
            except RuntimeError as err:
                if label.startswith("mergeflow"):
                    raise
                lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.strip().isdigit() and "exited with" not in line]
                first = next((i for i, line in enumerate(lines) if "output" in line), max(0, len(lines) - 3))  # not /usr/bin/time's lines
                failed[label] = " ".join(lines[first:])[:200]
                print(f"{label}: FAILED ({failed[label]})", file=sys.stderr)
                continue
            walls[label].append(wall)
            rss[label].append(peak / 1e9)
            print(f"run {run + 1} {label}: {wall:.1f} s, peak RSS {peak / 1e9:.2f} GB, load {before} -> {load()}", file=sys.stderr, flush=True)
            if label == "mergeflow apply lora":
                shutil.rmtree(args.cache / "apply-mergeflow", ignore_errors=True)
                out.rename(args.cache / "apply-mergeflow")
            if label == "peft apply" and not check:
                check = compare_outputs(args.cache / "apply-mergeflow", out)
                print(f"mergeflow vs PEFT merge_and_unload: {check}", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(args.cache / "apply-mergeflow", ignore_errors=True)

    median = {k: statistics.median(v) for k, v in walls.items() if v}
    peak = {k: statistics.median(v) for k, v in rss.items() if v}
    print(f"\nmedian of {args.runs} runs, {os.cpu_count()} cores, warm page cache, 1-minute load average before the runs "
          f"{min(loads):.2f}-{max(loads):.2f} (median {statistics.median(loads):.2f}), update std {args.update_std:g}\n")
    print("| what | wall s (runs) | median s | peak RSS GB | LoRA / full: time | LoRA / full: RSS | LoRA / applied: time | LoRA / applied: RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for label in commands:
        if label in failed:
            print(f"| {label} | FAILED: {failed[label]} | | | | | | |")
            continue
        ratio = " | ".join(f"{median[label] / median[other]:.2f} | {peak[label] / peak[other]:.2f}" if other in median else " | "
                           for other in (label.replace(" lora", " full"), label.replace(" lora", " applied"))) if label.endswith(" lora") else " |  |  | "
        print(f"| {label} | {', '.join(f'{w:.1f}' for w in walls[label])} | {median[label]:.1f} | {peak[label]:.2f} | {ratio} |")
    if check:
        print(f"\nmergeflow apply lora vs PEFT merge_and_unload: {check}")
    if args.json:
        args.json.write_text(json.dumps({"walls": walls, "rss_gb": rss, "failed": failed, "loads": loads, "peft_check": check}, indent=2))


if __name__ == "__main__":
    main()
