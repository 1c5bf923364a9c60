"""Tasks of the embedded demo: build the offline skills family and put it on a (local) Hub."""
from __future__ import annotations

from pathlib import Path

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from mergeflow.demo_family.build import build_family
from tasks.publish import Published, publish_model

DEMO_NAMESPACE = "demo"


@task(name="build_demo_family", cache_policy=NO_CACHE, persist_result=False)
def build_demo_family(folder: Path) -> dict[str, Path]:
    """The demo family's model folders by name (built once, then reused from its content-keyed cache)."""
    return dict(build_family(folder).models)


@task(name="push_demo_model", task_run_name="push-{name}", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=2)
def push_demo_model(name: str, folder: Path, endpoint: str) -> Published:
    """Upload one family model to ``demo/NAME`` (no new commit when it is already there)."""
    return publish_model(folder, repo_id=f"{DEMO_NAMESPACE}/{name}", endpoint=endpoint)


@task(name="write_demo_recipe", cache_policy=NO_CACHE, persist_result=False)
def write_demo_recipe(template: Path, out: Path, family_folder_name: str) -> Path:
    """The template recipe with its local family paths (``demo-family/NAME``) turned into Hub ids (``demo/NAME``)."""
    text = template.read_text().replace(f"{family_folder_name}/", f"{DEMO_NAMESPACE}/")
    yaml.safe_load(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
