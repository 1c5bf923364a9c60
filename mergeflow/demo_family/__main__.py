"""``python -m mergeflow.demo_family OUT``: build the demo skills family and its LoRA adapters into OUT (cached)."""

import argparse
from pathlib import Path

from mergeflow.demo_family.adapters import build_adapters
from mergeflow.demo_family.build import build_family

parser = argparse.ArgumentParser(prog="python -m mergeflow.demo_family", description=__doc__)
parser.add_argument("out", type=Path, help="the family's folder")
parser.add_argument("--force", action="store_true", help="rebuild even when the cached family is current")
args = parser.parse_args()
for summary in (family := build_family(args.out, force=args.force)), build_adapters(family, force=args.force):
    state = "cached" if summary.cached else "built"
    print(f"{summary.root}: {state} in {summary.seconds:.1f}s, key {summary.key[:12]}")
    for name, folder in summary.models.items():
        print(f"{name}: {folder}")
