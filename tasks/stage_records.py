"""Tasks of the DVC stages' records: the plain functions of ``mergeflow.stage_records``, run as Prefect tasks."""
from __future__ import annotations

from prefect import task

from mergeflow import stage_records
from tasks.retries import LOCAL

write_recipe_variant = task(name="write_recipe_variant", **LOCAL)(stage_records.write_recipe_variant)
write_sources_record = task(name="write_sources_record", **LOCAL)(stage_records.write_sources_record)
read_sources_record = task(name="read_sources_record", **LOCAL)(stage_records.read_sources_record)
write_merge_log = task(name="write_merge_log", **LOCAL)(stage_records.write_merge_log)
read_merge_stats = task(name="read_merge_stats", **LOCAL)(stage_records.read_merge_stats)
write_scores = task(name="write_scores", **LOCAL)(stage_records.write_scores)
make_release = task(name="make_release", **LOCAL)(stage_records.make_release)
write_outcome = task(name="write_outcome", **LOCAL)(stage_records.write_outcome)
