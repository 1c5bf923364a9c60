#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, then `dvc repro` the pipeline of dvc.yaml - build the
# offline skills family, start a local Hub server, download -> check -> merge -> evaluate -> track -> gate ->
# publish - and print the scores and where to look.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false
exec .venv/bin/mergeflow demo
