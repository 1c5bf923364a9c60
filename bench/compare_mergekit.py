"""Compare mergeflow's outputs with mergekit's for the same recipes, tensor by tensor.

Both tools are only *run* here, as subprocesses: mergekit lives in its own virtual environment
(it is not a dependency of mergeflow) and is found through ``--mergekit-bin``. Run this script
with the project's python, e.g.::

    python3 -m venv /work/mk-venv
    /work/mk-venv/bin/pip install torch==2.13.0 mergekit==0.1.5
    .venv/bin/python bench/compare_mergekit.py --mergekit-bin /work/mk-venv/bin/mergekit-yaml

It builds the tiny Llama family of ``tests/tiny_family.py`` (base, ft_a, ft_b, ft_neg) in float32
and in bfloat16, writes one recipe per method and case, runs both tools and prints a markdown
table. Deterministic methods are compared element by element (exact-equal count, max / mean
absolute difference, max distance in units in the last place). Random methods (DARE, DELLA) use
different random streams in the two tools, so their outputs are compared by statistics of the
delta to the base instead (fraction of changed entries, mean / std / mean-abs of the delta).

Different vocabularies: ``tests/vocab_family.py`` builds the same family with tokenizers, where ft_a adds ChatML's two
tokens (66 rows) and ft_neg adds them with its embedding padded to 72 rows; the ``METHOD/POLICY`` recipes merge it with
``tokenizer_source`` or ``tokenizer:`` (tokens, force, padding), ``:tied`` on a copy with tied embeddings (``:mixed-tied``:
one fine-tune of that copy, without lm_head, among untied models; ``:tied-base``: its base under untied fine-tunes;
``:shuffled``: ft_b under a tokenizer whose characters come in reverse order, its rows moved with them). Their tokenizer
files (tokenizer.json, tokenizer_config.json) and ``vocab_size`` are compared too.

LoRA sources: a PEFT adapter of the base (rank 4, random non-zero factors on every linear module, built with
PEFT by ``tests/tiny_family.make_adapter``) is referenced as ``BASE+ADAPTER`` alone (linear) and beside full
fine-tunes (task_arithmetic, ties); mergekit applies it with PEFT's merge_and_unload into ``--lora-merge-cache``.

Cases:
  f32           float32 family, ``dtype: float32``  (mergeflow default compute dtype)
  bf16/mf-f32   bfloat16 family, ``dtype: bfloat16``, mergeflow ``--compute-dtype float32``
  bf16/mf-bf16  bfloat16 family, ``dtype: bfloat16``, mergeflow ``--compute-dtype bfloat16``
  bf16/mf-mk    bfloat16 family, ``dtype: bfloat16``, mergeflow ``--compute-dtype mergekit``
  bf16->f32     bfloat16 family, ``dtype: float32`` (inputs upcast, float32 output)

Other architectures: ``METHOD@KIND`` rows (``ARCH_ROWS``, e.g. ``ties@qwen2``) run METHOD's recipe on a float32 family of
``tests/arch_family.py`` (tiny Qwen2 with tied embeddings, GPT-NeoX, Phi, written by ``save_pretrained``), case f32 only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from arch_family import build_arch_family  # noqa: E402
from tiny_family import base_state, build_family, fine_tune, make_adapter  # noqa: E402
from vocab_family import CHATML, build_vocab_family, write_shuffled  # noqa: E402

RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARCH_ROWS = ("ties@qwen2", "task_arithmetic@gpt_neox", "passthrough@gpt_neox", "task_arithmetic@phi", "passthrough@phi")
"""METHOD@KIND: METHOD's recipe on the tiny KIND family of tests/arch_family.py (other layer, norm and embedding names)."""


# --------------------------------------------------------------------------- recipes


def recipes(fam: dict[str, str], dtype: str) -> dict[str, dict]:
    """One mergekit-schema recipe per method, all paths absolute; ``<method>+<variant>`` recipes are variants: ``+lora``
    reads ``BASE+ADAPTER``, ``+base`` adds a base_model (``+base-listed``: also listed first among the models)."""
    base, a, b, neg = fam["base"], fam["ft_a"], fam["ft_b"], fam["ft_neg"]
    adapted = f"{base}+{fam['adapter']}"

    def with_base(method: str, params: dict, model_params: list[dict], global_params: dict | None = None, first: str = a) -> dict:
        models = [{"model": m, "parameters": p} for m, p in zip((first, b, neg), model_params, strict=False)]
        r = {"merge_method": method, "base_model": base, "models": models, "dtype": dtype}
        if global_params:
            r["parameters"] = global_params
        for m in r["models"]:
            m["parameters"].update(params)
        return r

    def weighted(*weights: float) -> list[dict]:
        return [{"model": m, "parameters": {"weight": w}} for m, w in zip((a, b, neg), weights, strict=False)]

    def nuslerp(base_model: str | None, weights: tuple[float, float], **global_params: bool) -> dict:
        r = {"merge_method": "nuslerp", "models": weighted(*weights), "parameters": global_params, "dtype": dtype}
        return {**r, "base_model": base_model} if base_model else r

    three = lambda **extra: [{"weight": 1.0, **extra}, {"weight": 0.5, **extra}, {"weight": 0.7, **extra}]  # noqa: E731
    out = {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": a, "parameters": {"weight": 1.0}},
                {"model": b, "parameters": {"weight": 0.5}},
                {"model": neg, "parameters": {"weight": 0.25}},
            ],
            "dtype": dtype,
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": a}],
            "parameters": {"t": [0, 0.5, 1]},
            "dtype": dtype,
        },
        "task_arithmetic": with_base("task_arithmetic", {}, three(), {"lambda": 0.9}),
        "ties": with_base("ties", {"density": 0.5}, three()),
        "dare_ties": with_base("dare_ties", {"density": 0.5}, three()),
        "dare_linear": with_base("dare_linear", {"density": 0.5}, three()),
        "breadcrumbs": with_base("breadcrumbs", {"density": 0.5, "gamma": 0.05}, three()),
        "breadcrumbs_ties": with_base("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}, three()),
        "della": with_base("della", {"density": 0.5, "epsilon": 0.1}, three()),
        "della_linear": with_base("della_linear", {"density": 0.5, "epsilon": 0.1}, three()),
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": a}, {"model": b}, {"model": neg}],
            "dtype": dtype,
        },
        "nuslerp": nuslerp(None, (1.0, 0.5)),
        "nuslerp+base": nuslerp(base, (0.3, 0.7)),
        "nuslerp+rows": nuslerp(None, (1.0, 0.5), nuslerp_flatten=False),
        "nuslerp+base+columns": nuslerp(base, (0.3, 0.7), nuslerp_flatten=False, nuslerp_row_wise=True),
        "multislerp": {"merge_method": "multislerp", "models": weighted(1.0, 0.5, 0.7), "dtype": dtype},
        "multislerp+base": {
            "merge_method": "multislerp", "base_model": base, "models": weighted(1.0, 0.5, 0.7), "parameters": {"normalize_weights": False}, "dtype": dtype,
        },
        "karcher": {"merge_method": "karcher", "models": [{"model": a}, {"model": b}, {"model": neg}], "dtype": dtype},
        "karcher+base": {"merge_method": "karcher", "base_model": base, "models": [{"model": a}, {"model": b}], "parameters": {"max_iter": 3}, "dtype": dtype},
        "karcher+base-listed": {"merge_method": "karcher", "base_model": base, "models": [{"model": base}, {"model": a}, {"model": b}], "dtype": dtype},
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "models": [{"model": base}, {"model": a}],
            "parameters": {"t": 0.01},
            "dtype": dtype,
        },
        "sce": with_base("sce", {}, [{}, {}, {}], {"select_topk": 0.5}),
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": base,
            "models": [{"model": base}, {"model": a}],
            "dtype": dtype,
        },
        # epsilon 0.03: about a third of each delta counts as changed; 3993 / 5510 / 2522 / 407 entries changed by 0 / 1 / 2 / 3 models
        "ram": with_base("ram", {}, [{}, {}, {}], {"epsilon": 0.03}),
        "ramplus_tl": with_base("ramplus_tl", {}, [{}, {}, {}], {"epsilon": 0.03, "r": 0.5, "alpha": 2.0}),
        "passthrough": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, 3]}]},
                {"sources": [{"model": b, "layer_range": [1, 4]}]},
            ],
            "dtype": dtype,
        },
        "linear+lora": {"merge_method": "linear", "models": [{"model": adapted, "parameters": {"weight": 1.0}}], "dtype": dtype},
        "task_arithmetic+lora": with_base("task_arithmetic", {}, three(), {"lambda": 0.9}, first=adapted),
        "ties+lora": with_base("ties", {"density": 0.5}, three(), first=adapted),
    }
    return out


def vocab_recipes(fam: dict[str, str], tied: dict[str, str], dtype: str) -> dict[str, dict]:
    """Recipes over the added-token family, each with a tokenizer policy (every one names a base model: without one
    mergekit takes the tokenizer of whichever model its set of models yields first)."""
    base, a, b, neg = fam["base"], fam["ft_a"], fam["ft_b"], fam["ft_neg"]
    weighted = lambda models, **params: [{"model": m, "parameters": {"weight": w, **params}} for m, w in models]  # noqa: E731
    tokens = {
        CHATML[0]: {"source": a, "force": True},
        CHATML[1]: {"source": {"kind": "model_token", "model": base, "token": "</s>"}},
        "<tool>": {"source": {"kind": "zero"}},
    }
    return {
        "linear/union": {"merge_method": "linear", "base_model": base, "models": weighted([(a, 1.0), (b, 0.5), (base, 0.25)]),
                         "dtype": dtype, "tokenizer_source": "union"},
        "task_arithmetic/union": {"merge_method": "task_arithmetic", "base_model": base, "models": weighted([(a, 1.0), (b, 0.5), (neg, 0.7)]),
                                  "parameters": {"lambda": 0.9}, "dtype": dtype, "tokenizer_source": "union"},
        "ties/union": {"merge_method": "ties", "base_model": base, "models": weighted([(a, 1.0), (b, 0.5), (neg, 0.7)], density=0.5),
                       "dtype": dtype, "tokenizer_source": "union"},
        "ties/base": {"merge_method": "ties", "base_model": base, "models": weighted([(a, 1.0), (b, 0.5), (neg, 0.7)], density=0.5),
                      "dtype": dtype, "tokenizer_source": "base"},
        "slerp/model": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": neg}], "parameters": {"t": [0, 0.5, 1]},
                        "dtype": dtype, "tokenizer_source": neg},
        "linear/tokens+pad": {"merge_method": "linear", "base_model": base, "models": weighted([(a, 1.0), (b, 0.5), (base, 0.25)]), "dtype": dtype,
                              "tokenizer": {"source": "union", "tokens": tokens, "pad_to_multiple_of": 32}},
        "task_arithmetic/union:tied": {"merge_method": "task_arithmetic", "base_model": tied["base"], "dtype": dtype, "tokenizer_source": "union",
                                       "models": weighted([(tied["ft_a"], 1.0), (tied["ft_b"], 0.5), (tied["ft_neg"], 0.7)])},
        "task_arithmetic/union:mixed-tied": {"merge_method": "task_arithmetic", "base_model": base, "dtype": dtype, "tokenizer_source": "union",
                                             "models": weighted([(a, 1.0), (tied["ft_b"], 0.5), (neg, 0.7)])},
        "ties/union:shuffled": {"merge_method": "ties", "base_model": base, "dtype": dtype, "tokenizer_source": "union",
                                "models": weighted([(a, 1.0), (fam["ft_shuffled"], 0.5), (neg, 0.7)], density=0.5)},
        "task_arithmetic/union:tied-base": {"merge_method": "task_arithmetic", "base_model": tied["base"], "dtype": dtype, "tokenizer_source": "union",
                                            "models": weighted([(a, 1.0), (b, 0.5), (neg, 0.7)])},
    }


# --------------------------------------------------------------------------- running


@dataclass
class Run:
    ok: bool
    seconds: float
    log: str


def run_tool(cmd: list[str], log_file: Path, env: dict[str, str]) -> Run:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    log = f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}\n--- rc {proc.returncode}\n"
    log_file.write_text(log)
    return Run(proc.returncode == 0, seconds, log)


def add_architectures(folder: Path) -> None:
    """Record the model class in config.json, as ``from_pretrained`` checkpoints do.

    tiny_family writes the config of a bare LlamaConfig, which has no ``architectures``; mergekit
    needs that key to pick its architecture description (mergeflow does not).
    """
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.setdefault("architectures", ["LlamaForCausalLM"])
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")


def load_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        part = load_file(file)
        dup = set(part) & set(tensors)
        if dup:
            raise ValueError(f"{folder}: tensor(s) in more than one shard: {sorted(dup)[:5]}")
        tensors.update(part)
    config = json.loads((folder / "config.json").read_text())
    return tensors, config


# --------------------------------------------------------------------------- comparing


MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def ulp_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x - y| in units in the last place of the larger magnitude, for one float dtype."""
    tiny = torch.finfo(x.dtype).tiny
    magnitude = torch.maximum(x.abs(), y.abs()).double().clamp(min=tiny)
    _, exponent = torch.frexp(magnitude)  # magnitude = m * 2**exponent, m in [0.5, 1)
    ulp = torch.pow(2.0, (exponent - 1 - MANTISSA_BITS[x.dtype]).double())
    return (x.double() - y.double()).abs() / ulp


@dataclass
class Result:
    method: str
    case: str
    error: str = ""
    names: str = ""
    config: str = ""
    exact: int = 0
    total: int = 0
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_ulp: float = 0.0
    dtype_note: str = ""
    stats: dict = field(default_factory=dict)
    worst: list = field(default_factory=list)
    verdict: str = ""


def config_summary(cfg: dict) -> tuple:
    return cfg.get("num_hidden_layers"), cfg.get("torch_dtype", cfg.get("dtype")), cfg.get("vocab_size")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_note(mk_dir: Path, mf_dir: Path) -> str:
    """How the tokenizer files of the two outputs compare ("" when mergekit wrote none)."""
    if not (mk_dir / "tokenizer.json").exists():
        return ""
    same = [f for f in TOKENIZER_FILES if (mf_dir / f).exists() and (mk_dir / f).read_bytes() == (mf_dir / f).read_bytes()]
    return "tokenizer files identical" if len(same) == len(TOKENIZER_FILES) else f"TOKENIZER FILES DIFFER ({', '.join(sorted(set(TOKENIZER_FILES) - set(same)))})"


def delta_stats(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict:
    changed = total = 0
    deltas = []
    for name, t in out.items():
        b = base[name].to(t.dtype)
        changed += int((t != b).sum())
        total += t.numel()
        deltas.append((t.double() - base[name].double()).flatten())
    d = torch.cat(deltas)
    return {
        "changed": changed / total,
        "mean": float(d.mean()),
        "std": float(d.std()),
        "mean_abs": float(d.abs().mean()),
    }


def compare(method: str, case: str, mk_dir: Path, mf_dir: Path, base: dict[str, torch.Tensor] | None) -> Result:
    res = Result(method, case)
    mk, mk_cfg = load_folder(mk_dir)
    mf, mf_cfg = load_folder(mf_dir)
    only_mk, only_mf = sorted(set(mk) - set(mf)), sorted(set(mf) - set(mk))
    res.names = "same" if not (only_mk or only_mf) else f"only mergekit {only_mk[:4]}; only mergeflow {only_mf[:4]}"
    a, b = config_summary(mk_cfg), config_summary(mf_cfg)
    res.config = "same" if a == b else f"mergekit {a} vs mergeflow {b}"
    keys = [next((k for k in ("torch_dtype", "dtype") if k in c), None) for c in (mk_cfg, mf_cfg)]
    if keys[0] != keys[1]:
        res.config += f" (dtype key: mergekit {keys[0]!r}, mergeflow {keys[1]!r})"
    tokenizer = tokenizer_note(mk_dir, mf_dir)
    res.config += f"; {tokenizer}" if tokenizer else ""
    dtypes = set()
    per_tensor = []
    for name in sorted(set(mk) & set(mf)):
        x, y = mk[name], mf[name]
        if x.shape != y.shape:
            per_tensor.append((float("inf"), name, f"shape {tuple(x.shape)} vs {tuple(y.shape)}"))
            res.total += x.numel()
            continue
        if x.dtype != y.dtype:
            dtypes.add(f"{name}: {x.dtype} vs {y.dtype}")
        eq = int((x == y).sum())
        diff = (x.double() - y.double()).abs()
        res.exact += eq
        res.total += x.numel()
        res.max_abs = max(res.max_abs, float(diff.max()) if diff.numel() else 0.0)
        res.mean_abs += float(diff.sum())
        if x.dtype == y.dtype and x.dtype in MANTISSA_BITS and x.numel():
            res.max_ulp = max(res.max_ulp, float(ulp_error(x, y).max()))
        if eq != x.numel():
            per_tensor.append((float(diff.max()), name, f"{x.numel() - eq}/{x.numel()} differ"))
    res.mean_abs /= max(res.total, 1)
    res.dtype_note = "; ".join(sorted(dtypes)[:3])
    res.worst = sorted(per_tensor, reverse=True)[:5]
    if method in RANDOM_METHODS and base is not None:
        res.stats = {"mergekit": delta_stats(mk, base), "mergeflow": delta_stats(mf, base)}
        s, t = res.stats["mergekit"], res.stats["mergeflow"]
        agree = (
            abs(s["changed"] - t["changed"]) <= 0.02
            and abs(s["std"] - t["std"]) <= 0.05 * s["std"]
            and abs(s["mean_abs"] - t["mean_abs"]) <= 0.05 * s["mean_abs"]
            and abs(s["mean"] - t["mean"]) <= 0.1 * s["std"]
        )
        res.verdict = "stats agree" if agree else "STATS DIFFER"
    elif res.exact == res.total and res.total:
        res.verdict = "bit-identical"
    else:
        res.verdict = f"DIFFERS ({res.total - res.exact} elems, max {res.max_ulp:.3g} ulp)"
    if res.names != "same" or not res.config.startswith("same") or res.dtype_note or "DIFFER" in res.config:
        res.verdict += " + METADATA MISMATCH"
    return res


# --------------------------------------------------------------------------- table


def markdown(results: list[Result]) -> str:
    lines = [
        "| method | case | exact / total | max abs diff | mean abs diff | max ulp (of the larger value) | names | config | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.method} | {r.case} | - | - | - | - | - | - | ERROR: {r.error} |")
            continue
        lines.append(
            f"| {r.method} | {r.case} | {r.exact}/{r.total} | {r.max_abs:.3g} | {r.mean_abs:.3g} "
            f"| {'n/a (random)' if r.stats else f'{r.max_ulp:.3g}'} "
            f"| {r.names} | {r.config} | {r.verdict} |"
        )
    stats = [r for r in results if r.stats]
    if stats:
        lines += [
            "",
            "Random methods, statistics of (output - base) over all tensors (mergekit / mergeflow):",
            "",
            "| method | case | changed fraction | delta mean | delta std | delta mean abs | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in stats:
            s, t = r.stats["mergekit"], r.stats["mergeflow"]
            lines.append(
                f"| {r.method} | {r.case} | {s['changed']:.4f} / {t['changed']:.4f} | {s['mean']:.3e} / {t['mean']:.3e} "
                f"| {s['std']:.4e} / {t['std']:.4e} | {s['mean_abs']:.4e} / {t['mean_abs']:.4e} | {r.verdict} |"
            )
    return "\n".join(lines)


def versions(mergekit_bin: str, mergeflow_bin: str) -> str:
    """Installed versions, asked of the python next to each CLI (its virtual environment)."""
    parts = []
    for tool, packages in ((mergekit_bin, ("mergekit", "torch")), (mergeflow_bin, ("mergeflow", "torch"))):
        python = Path(tool).parent / "python"
        code = f"import importlib.metadata as m; print(' '.join(p + ' ' + m.version(p) for p in {packages!r}))"
        try:
            out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        parts.append(f"{tool}: {out or 'version unknown'}")
    return "Versions: " + "; ".join(parts)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mergekit-bin", default="/work/mk-venv/bin/mergekit-yaml", help="mergekit's mergekit-yaml CLI")
    default_mf = Path(sys.executable).parent / "mergeflow"
    p.add_argument("--mergeflow-bin", default=str(default_mf), help="mergeflow CLI (default: next to this python)")
    p.add_argument("--workdir", type=Path, help="where families, recipes and outputs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--methods", nargs="*", help="subset of methods")
    p.add_argument(
        "--cases", nargs="*", default=["f32", "bf16/mf-f32", "bf16/mf-bf16", "bf16/mf-mk", "bf16->f32"], help="subset of cases"
    )
    p.add_argument("--shards", type=int, default=2, help="input shards per model")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--details", action="store_true", help="list the worst tensors of each non-identical case")
    args = p.parse_args(argv)

    for tool in (args.mergekit_bin, args.mergeflow_bin):
        if not Path(tool).exists():
            p.error(f"{tool} not found")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="compare-mergekit-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "out").mkdir(exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.setdefault("HF_HOME", str(work / "hf-home"))

    families = {}
    for label, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        root = work / f"family-{label}"
        if root.exists():
            shutil.rmtree(root)
        families[label] = {k: str(v) for k, v in build_family(root, dtype=dt, shards=args.shards).items()}
        for folder in families[label].values():
            add_architectures(Path(folder))
        families[label]["adapter"] = str(make_adapter(Path(families[label]["base"]), root / "adapter", 7, target_modules=LORA_TARGETS))
        for kind, tied in (("vocab", False), ("vocab-tied", True)):
            shutil.rmtree(work / f"family-{kind}-{label}", ignore_errors=True)
            built = build_vocab_family(work / f"family-{kind}-{label}", dtype=dt, shards=args.shards, tied=tied)
            families[f"{kind}-{label}"] = {k: str(v) for k, v in built.items()}
        shuffled = write_shuffled(work / f"family-vocab-{label}" / "ft_shuffled", fine_tune(base_state(dtype=dt), 2))
        families[f"vocab-{label}"]["ft_shuffled"] = str(shuffled)
    lora_cache = work / "lora-merge-cache"  # mergekit's merged BASE+ADAPTER models, keyed by path: stale after a rebuild
    shutil.rmtree(lora_cache, ignore_errors=True)
    base_tensors = {
        label: {k: v for f in sorted(Path(fam["base"]).glob("*.safetensors")) for k, v in load_file(f).items()}
        for label, fam in families.items()
    }

    # case -> (family, recipe dtype, mergeflow compute dtype)
    case_defs = {
        "f32": ("float32", "float32", "float32"),
        "bf16/mf-f32": ("bfloat16", "bfloat16", "float32"),
        "bf16/mf-bf16": ("bfloat16", "bfloat16", "bfloat16"),
        "bf16/mf-mk": ("bfloat16", "bfloat16", "mergekit"),
        "bf16->f32": ("bfloat16", "float32", "float32"),
    }
    mk_cache: dict[tuple[str, str, str], tuple[Path, Run]] = {}
    results: list[Result] = []
    every_recipe = lambda label, dtype: {  # noqa: E731
        **recipes(families[label], dtype), **vocab_recipes(families[f"vocab-{label}"], families[f"vocab-tied-{label}"], dtype),
    }
    all_methods = [*every_recipe("float32", "float32"), *ARCH_ROWS]
    methods = args.methods or all_methods
    for method in methods:
        if method not in all_methods:
            p.error(f"unknown method {method}; known: {', '.join(all_methods)}")
        recipe_method, _, kind = method.partition("@")
        if kind and kind not in families:  # the same recipes; no LoRA rows on these families
            families[kind] = {k: str(v) for k, v in build_arch_family(work / f"family-{kind}", kind).items()} | {"adapter": "-"}
        for case in args.cases if not kind else [c for c in args.cases if c == "f32"]:
            family, rdtype, compute = case_defs[case]
            family = kind or family
            tag = f"{method}-{family}-{rdtype}".replace("/", "-").replace(":", "-")
            recipe_file = work / "recipes" / f"{tag}.yaml"
            recipe_file.parent.mkdir(exist_ok=True)
            recipe_file.write_text(yaml.safe_dump((recipes(families[family], rdtype) if kind else every_recipe(family, rdtype))[recipe_method], sort_keys=False))
            key = (method, family, rdtype)
            if key not in mk_cache:
                mk_out = work / "out" / f"mergekit-{tag}"
                shutil.rmtree(mk_out, ignore_errors=True)
                mk_run = run_tool(
                    [args.mergekit_bin, str(recipe_file), str(mk_out), "--no-cuda", "--random-seed", "0",
                     "--no-copy-tokenizer", "--quiet", "--no-lazy-unpickle", "--lora-merge-cache", str(lora_cache)],
                    work / "out" / f"mergekit-{tag}.log",
                    env,
                )
                mk_cache[key] = (mk_out, mk_run)
            mk_out, mk_run = mk_cache[key]
            mf_out = work / "out" / f"mergeflow-{tag}-compute-{compute}"
            mf_run = run_tool(
                [args.mergeflow_bin, "merge", str(recipe_file), str(mf_out), "--force", "--compute-dtype", compute],
                work / "out" / f"mergeflow-{tag}-compute-{compute}.log",
                env,
            )
            if not (mk_run.ok and mf_run.ok):
                failed = [n for n, r in (("mergekit", mk_run), ("mergeflow", mf_run)) if not r.ok]
                lines = [ln for ln in (mk_run if not mk_run.ok else mf_run).log.splitlines() if ln.strip()]
                lines = [ln for ln in lines if not ln.startswith("--- ")]
                res = Result(method, case, error=f"{'+'.join(failed)} failed: {lines[-1][:200] if lines else '?'}")
            else:
                res = compare(method, case, mk_out, mf_out, base_tensors.get(family))
            results.append(res)
            print(f"{method:18s} {case:13s} {res.error or res.verdict}", file=sys.stderr, flush=True)

    print(versions(args.mergekit_bin, args.mergeflow_bin) + "\n")
    print(markdown(results))
    if args.details:
        for r in results:
            if r.worst and r.method not in RANDOM_METHODS:
                print(f"\n{r.method} {r.case}: worst tensors")
                for d, name, note in r.worst:
                    print(f"  {name}: max abs {d:.3g} ({note})")
            if r.dtype_note:
                print(f"\n{r.method} {r.case}: dtype mismatch {r.dtype_note}")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1, default=str))
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"\nwork directory: {work}", file=sys.stderr)
    return 0 if all(not r.error for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
