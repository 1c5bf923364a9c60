"""Every environment variable mergeflow reads, and the defaults they override."""
from __future__ import annotations

import os

DEBUG: bool = os.environ.get("MERGEFLOW_DEBUG", "").lower() in ("1", "true", "yes")
"""MERGEFLOW_DEBUG=1: show full tracebacks instead of one-line errors."""
