#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, then build the offline skills family, start a local Hub
# server, push the family to it, and run download -> check -> merge -> evaluate -> track -> gate -> publish.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false
exec .venv/bin/mergeflow demo "${1:-outputs}"
