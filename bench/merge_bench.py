"""Merge benchmark: three ~1.1B-parameter bf16 models, timed against the disk I/O floor.

Synthesises (once, cached under bench/.cache) a base and two fine-tunes shaped like TinyLlama-1.1B
(vocab 32000, hidden 2048, 22 layers, 1 GB shards with an index), measures the I/O floor (read
every input byte a method needs + write the output's size, with fsync; once through the page cache, once
with O_DIRECT as the merge writes), and times
``mergeflow merge`` for each method in a fresh process: wall time, peak RSS, ratio to the floor,
median of --runs runs, each after a sync. Pass --mergekit PATH/TO/mergekit-yaml to time mergekit on the same inputs.

    .venv/bin/python bench/merge_bench.py --runs 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
SHARD_BYTES = 10**9
MODELS = ("base", "ft_1", "ft_2")


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def synth_tensor(name: str, shape: tuple[int, ...], model_index: int) -> torch.Tensor:
    """Deterministic weights: a shared base plus, for fine-tunes, a small model-specific delta."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    base = torch.randn(shape, generator=g) * 0.02
    if model_index:
        g.manual_seed(zlib.crc32(name.encode()) + model_index)
        base += torch.randn(shape, generator=g) * 0.002
    return base.to(torch.bfloat16)


def synthesise(root: Path) -> dict[str, Path]:
    """Build (or reuse) the three model folders, sharded like Hub checkpoints."""
    from merge_ops.safetensors_io import StreamingSafetensorsWriter

    folders = {}
    for index, name in enumerate(MODELS):
        folder = root / name
        folders[name] = folder
        if (folder / "config.json").exists():
            continue
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for tname, shape in tensor_shapes(CONFIG):
            nbytes = 2 * int(torch.Size(shape).numel())
            if groups[-1] and size + nbytes > SHARD_BYTES:
                groups.append([])
                size = 0
            groups[-1].append((tname, shape))
            size += nbytes
        weight_map = {}
        for k, group in enumerate(groups):
            file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            with StreamingSafetensorsWriter(tmp / file, [(n, "BF16", s) for n, s in group]) as writer:
                for n, s in group:
                    writer.write(n, synth_tensor(n, s, index))
                    weight_map[n] = file
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
        tmp.rename(folder)
        print(f"synthesised {folder}", file=sys.stderr)
    return folders


def recipes(folders: dict[str, Path]) -> dict[str, dict]:
    base, a, b = (str(folders[n]) for n in MODELS)
    two = [{"model": a, "parameters": {"weight": 0.5, "density": 0.5}}, {"model": b, "parameters": {"weight": 0.5, "density": 0.5}}]
    return {
        "linear": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (base, a, b)], "dtype": "bfloat16"},
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": a}], "parameters": {"t": 0.5}, "dtype": "bfloat16"},
        "ties": {"merge_method": "ties", "base_model": base, "models": two, "dtype": "bfloat16"},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": two, "dtype": "bfloat16"},
    }


def input_files(recipe: dict, folders: dict[str, Path]) -> list[Path]:
    used = {recipe.get("base_model")} | {m["model"] for m in recipe["models"]}
    return [f for name in MODELS if str(folders[name]) in used for f in sorted(folders[name].glob("*.safetensors"))]


def io_floor(files: list[Path], out_bytes: int, scratch: Path, *, direct: bool = False) -> float:
    """Seconds to read ``files`` and write ``out_bytes`` (fsynced), with 16 MB buffers.

    ``direct``: write the way the merge does (O_DIRECT through merge_ops.direct_io), not through the page cache.
    """
    from merge_ops.direct_io import SequentialWriter

    started = time.perf_counter()
    buffer = bytearray(16 * 2**20)
    view = memoryview(buffer)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    if direct:
        writer = SequentialWriter(scratch)
        for start in range(0, out_bytes, len(buffer)):
            writer.write(view[: min(len(buffer), out_bytes - start)])
        writer.close()
    else:
        with open(scratch, "wb", buffering=0) as f:
            left = out_bytes
            while left:
                left -= f.write(view[: min(left, len(buffer))])
            os.fsync(f.fileno())
    elapsed = time.perf_counter() - started
    scratch.unlink()
    return elapsed


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (bytes) of one command, via /usr/bin/time."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"{command[0]} failed:\n{result.stderr[-2000:]}")
    return elapsed, int(result.stderr.strip().splitlines()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", default="linear,slerp,ties,dare_ties")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--mergekit", help="path to mergekit-yaml, to time mergekit on the same inputs")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    folders = synthesise(args.cache / "models")
    mergeflow = str(Path(sys.executable).with_name("mergeflow"))
    rows = []
    for method in args.methods.split(","):
        recipe = recipes(folders)[method]
        recipe_path = args.cache / f"{method}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe))
        files = input_files(recipe, folders)
        out_bytes = sum(2 * torch.Size(s).numel() for _, s in tensor_shapes(CONFIG))
        tools = {"mergeflow": lambda out, recipe_path=recipe_path: [mergeflow, "merge", str(recipe_path), str(out), "--force"]}
        if args.mergekit:
            tools["mergekit"] = lambda out, recipe_path=recipe_path: [args.mergekit, str(recipe_path), str(out), "--copy-tokenizer", "--lazy-unpickle"]
        for tool, command in tools.items():
            floors, direct_floors, walls, rss = [], [], [], []
            for _ in range(args.runs):
                out = args.cache / f"out-{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # neither measurement pays for the previous one's writeback
                floors.append(io_floor(files, out_bytes, args.cache / "floor.bin"))
                os.sync()
                direct_floors.append(io_floor(files, out_bytes, args.cache / "floor.bin", direct=True))
                os.sync()
                wall, peak = timed(command(out))
                walls.append(wall)
                rss.append(peak)
                shutil.rmtree(out, ignore_errors=True)
            floor, direct_floor, wall = statistics.median(floors), statistics.median(direct_floors), statistics.median(walls)
            rows.append({
                "tool": tool, "method": method, "read_gb": sum(f.stat().st_size for f in files) / 1e9, "write_gb": out_bytes / 1e9,
                "floor_s": floor, "direct_floor_s": direct_floor, "wall_s": wall, "ratio": wall / floor,
                "direct_ratio": wall / direct_floor, "peak_rss_gb": statistics.median(rss) / 1e9,
                "walls": walls, "floors": floors, "direct_floors": direct_floors,
            })
            print(f"{tool} {method}: wall {wall:.1f}s floor {floor:.1f}s ({wall / floor:.2f}x) O_DIRECT floor {direct_floor:.1f}s "
                  f"({wall / direct_floor:.2f}x) rss {statistics.median(rss) / 1e9:.2f} GB", file=sys.stderr)
    print(f"\nmedian of {args.runs} runs, {os.cpu_count()} cores, warm page cache\n")
    print("| tool | method | read GB | write GB | I/O floor s | O_DIRECT floor s | wall s | x floor | x O_DIRECT floor | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['method']} | {r['read_gb']:.2f} | {r['write_gb']:.2f} | {r['floor_s']:.1f} | {r['direct_floor_s']:.1f} "
              f"| {r['wall_s']:.1f} | {r['ratio']:.2f} | {r['direct_ratio']:.2f} | {r['peak_rss_gb']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
