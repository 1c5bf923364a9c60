import merge_ops  # noqa: F401  (sets the OpenMP wait policy before torch loads: see merge_ops/__init__.py)
