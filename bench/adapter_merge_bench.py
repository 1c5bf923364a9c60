"""Adapter-space merge benchmark: five rank-16 bf16 LoRA adapters of a 7B-shaped Llama, combined into one.

Synthesises (once, cached under bench/.cache/adapters) five adapters in PEFT's format targeting every projection
of 32 Llama-2-7B-shaped layers with grouped-query attention (q/o 4096x4096, k/v 4096->1024, gate/up 4096->11008,
down 11008->4096), then times planning and ``merge_adapters`` for each combination type given, on one torch
thread. The types that take an SVD of pruned full updates (ties_svd, dare_*_svd, magnitude_prune_svd, or any
svd type with svd_clamp) need one dense SVD per module, as PEFT does, and are not timed by default.

    .venv/bin/python bench/adapter_merge_bench.py --types linear,cat,ties,dare_ties,magnitude_prune,svd
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from merge_ops.adapter_combination import COMBINATIONS, CombinationOptions
from merge_ops.adapter_merge import AdapterInput, merge_adapters, plan_adapters

CACHE = Path(__file__).resolve().parent / ".cache" / "adapters"
SHAPES = {  # module: (in, out)
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 1024), "self_attn.v_proj": (4096, 1024), "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (4096, 11008), "mlp.up_proj": (4096, 11008), "mlp.down_proj": (11008, 4096),
}


def make_adapter(folder: Path, seed: int, *, layers: int = 32, rank: int = 16) -> Path:
    """A random bf16 LoRA adapter in PEFT's file format (written once)."""
    if (folder / "adapter_model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(layers):
        for module, (fan_in, fan_out) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            state[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=generator) * 0.01).bfloat16()
            state[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=generator) * 0.01).bfloat16()
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    targets = sorted(m.split(".")[1] for m in SHAPES)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="linear,cat,ties,dare_ties,magnitude_prune,svd", help="comma-separated combination types")
    parser.add_argument("--adapters", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    inputs = [AdapterInput(key=f"adapter{k}", folder=make_adapter(CACHE / f"adapter{k}", k), weight=1.0 - 0.1 * k) for k in range(args.adapters)]
    for combination in args.types.split(","):
        options = CombinationOptions(density=0.5) if COMBINATIONS[combination].sparsify else CombinationOptions()
        started = time.perf_counter()
        plan = plan_adapters(inputs, combination=combination, options=options, base_model="org/base")
        planned = time.perf_counter()
        merge_adapters(plan, CACHE / f"out-{combination}", force=True)
        print(f"{combination:>16}: plan {planned - started:.2f} s, merge {time.perf_counter() - planned:.1f} s, "
              f"read {plan.input_bytes / 1e6:.0f} MB, write {plan.total_size / 1e6:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
