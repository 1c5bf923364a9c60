#!/usr/bin/env bash
# Pin the whole environment: write the exact versions .venv holds to requirements.lock (scripts/venv.sh installs from it).
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# The whole environment, pinned: scripts/venv.sh installs mergeflow with these exact versions (pip constraints)."
  echo "# Regenerate after changing dependencies: bash scripts/lock.sh"
  .venv/bin/pip freeze --exclude-editable
} > requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) packages pinned"
