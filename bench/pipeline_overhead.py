"""Prefect's overhead: `mergeflow run` (the pipeline) vs `mergeflow merge` (the engine alone) on the bench's 1B linear merge.

Reuses bench/merge_bench.py's synthesised TinyLlama-shaped models (cached under bench/.cache) and its linear
recipe. Each configuration runs --runs times in a fresh process, interleaved (A B C A B C ...) so that drift in
the machine's load hits them alike; the table shows medians and the overhead against the engine with the same
shard layout. Before each run the previous output is deleted and `sync` flushes it, so that no run pays for
the previous one's writeback. The pipeline runs against a `prefect server start` that this script starts on 127.0.0.1 with a
temporary PREFECT_HOME (how a deployment runs), and once more with no server configured, when Prefect starts a
temporary one inside each run.

    .venv/bin/python bench/pipeline_overhead.py --runs 3
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from merge_bench import recipes, synthesise  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    prefect = str(Path(sys.executable).with_name("prefect"))
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("prefect server did not start")


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return elapsed


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--recipe", type=Path, help="time this recipe instead (e.g. a tiny one: the fixed cost alone)")
    args = parser.parse_args()

    if args.recipe:
        recipe = args.recipe.absolute()
    else:
        recipe = args.cache / "linear.yaml"
        recipe.write_text(yaml.safe_dump(recipes(synthesise(args.cache / "models"))["linear"]))
    mergeflow = str(Path(sys.executable).with_name("mergeflow"))
    home = Path(tempfile.mkdtemp(prefix="mergeflow-overhead-"))
    base_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    base_env.update(PREFECT_HOME=str(home / "client"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    server, url = start_server(home / "server")
    served = dict(base_env, PREFECT_API_URL=url)
    out = args.cache / "out-overhead"

    configs = {  # name -> (command after OUT, environment, engine it compares with)
        "engine 5GB shards": (["merge"], base_env, None),
        "pipeline 5GB shards, server": (["run", "--workers", "1"], served, "engine 5GB shards"),
        "pipeline 5GB shards, temporary server": (["run", "--workers", "1"], base_env, "engine 5GB shards"),
        "engine 1GB shards": (["merge", "--shard-size", "1GB"], base_env, None),
        "pipeline 1GB shards, 1 worker, server": (["run", "--shard-size", "1GB", "--workers", "1"], served, "engine 1GB shards"),
        "pipeline 1GB shards, 2 workers, server": (["run", "--shard-size", "1GB", "--workers", "2"], served, "engine 1GB shards"),
    }
    walls: dict[str, list[float]] = {name: [] for name in configs}
    digests: dict[str, str] = {}
    load_before = os.getloadavg()
    try:
        for _ in range(args.runs):
            for name, (command, env, _) in configs.items():
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # the last run's output is written back now, not during the next run
                time.sleep(2)
                walls[name].append(timed([mergeflow, command[0], str(recipe), str(out), *command[1:]], env))
                digests.setdefault(name, digest(out))
                print(f"{name}: {walls[name][-1]:.1f} s (load {os.getloadavg()[0]:.2f})", file=sys.stderr)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)
    load_after = os.getloadavg()

    rows = []
    for name, (_, _, engine) in configs.items():
        wall = statistics.median(walls[name])
        ref = statistics.median(walls[engine]) if engine else None
        rows.append({"config": name, "wall_s": wall, "walls": walls[name], "overhead_s": wall - ref if ref else None,
                     "overhead_pct": 100 * (wall - ref) / ref if ref else None, "same_bytes_as_engine": digests[name] == digests[engine or name]})
    print(f"\nmedian of {args.runs} runs, {os.cpu_count()} cores; load average before {load_before[0]:.2f} {load_before[1]:.2f} "
          f"{load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}\n")
    print("| configuration | wall s (median) | runs | overhead vs engine | same bytes |")
    print("|---|---|---|---|---|")
    for r in rows:
        overhead = f"{r['overhead_s']:+.1f} s ({r['overhead_pct']:+.1f}%)" if r["overhead_s"] is not None else "-"
        print(f"| {r['config']} | {r['wall_s']:.1f} | {', '.join(f'{w:.1f}' for w in r['walls'])} | {overhead} | {'yes' if r['same_bytes_as_engine'] else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps({"load_before": load_before, "load_after": load_after, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
