#!/usr/bin/env bash
# Create or reuse .venv with everything mergeflow needs, at the versions of requirements.lock; reinstalls only when
# pyproject.toml or the lock changes.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.installed-$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "== setting up .venv (first run takes a few minutes)" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
  # torch is pinned to the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" >&2 || true
  .venv/bin/pip install -q -c requirements.lock -e '.[dev]' 2>&1 | grep -v "is ignored" >&2 || true
  .venv/bin/python -c "import torch, mergeflow, merge_ops, prefect, mlflow, lm_eval, dvc" >/dev/null
  rm -f .venv/.installed-*
  touch "$stamp"
fi
