"""The non-weight files of a merged model folder: index, config, tokenizer and model card."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from merge_ops.architecture import decoder_sections, layer_count_key, per_layer_keys
from merge_ops.card import card_data, hub_id, render_card, sources_section
from merge_ops.model_files import TOKENIZER_FILES, folder_file
from merge_ops.plan import MergePlan
from merge_ops.safetensors_io import INDEX_FILE
from merge_ops.vocabulary import build_tokenizers


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_index(plan: MergePlan, out_dir: Path) -> None:
    """model.safetensors.index.json, for sharded outputs."""
    if len(plan.shards) < 2:
        return
    weight_map = {t.name: s.file for s in plan.shards for t in s.tensors}
    _write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": plan.total_size}, "weight_map": weight_map})


def write_config(plan: MergePlan, out_dir: Path) -> None:
    """config.json from the base (or first) model with the layer count and dtype of the merge.

    The layer count is set where the source has one (config.json, its ``text_config``, or both); per-layer lists
    there (``layer_types``) take each output layer's entry from the model and layer it came from.
    """
    source = Path(plan.sources[plan.config_from])
    config = json.loads((source / "config.json").read_text())
    origins = {m: json.loads((Path(plan.sources[m]) / "config.json").read_text()) for m in dict(plan.layer_origins)}
    for position, section in enumerate(decoder_sections(config)):
        for key in per_layer_keys(section) if plan.layer_origins else []:
            section[key] = [decoder_sections(origins[m])[position][key][i] for m, i in plan.layer_origins]
        section[layer_count_key(section)] = plan.num_layers
    if plan.vocab_size is not None:
        holder = config["text_config"] if "vocab_size" not in config and isinstance(config.get("text_config"), dict) else config
        holder["vocab_size"] = plan.vocab_size
    dtype = plan.out_dtype or _stored_dtype(plan)
    config["torch_dtype"] = dtype
    if "dtype" in config:
        config["dtype"] = dtype
    _write_json(out_dir / "config.json", config)
    generation = folder_file(source, "generation_config.json")
    if generation.exists():
        shutil.copyfile(generation, out_dir / "generation_config.json")


def _stored_dtype(plan: MergePlan) -> str:
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    return names.get(plan.shards[0].tensors[0].dtype, "float32")


def write_tokenizer(plan: MergePlan, out_dir: Path) -> None:
    """The merged vocabulary's tokenizer (built from the models' tokenizers), else a copy of the tokenizer source's files;
    then the plan's chat template, if any."""
    if plan.tokenizer_build is not None:
        tokenizer, _ = build_tokenizers(plan.tokenizer_build, {key: Path(path) for key, path in plan.sources.items()})
        tokenizer.save_pretrained(str(out_dir), safe_serialization=True)
    elif plan.tokenizer_from is None:
        return
    else:
        source = Path(plan.sources[plan.tokenizer_from])
        for name in TOKENIZER_FILES:
            if (source / name).exists():
                shutil.copyfile(folder_file(source, name), out_dir / name)
    if plan.chat_template is not None:  # transformers reads it before a chat_template in tokenizer_config.json
        (out_dir / "chat_template.jinja").write_text(plan.chat_template, encoding="utf-8")


def model_card(plan: MergePlan) -> str:
    """README.md: Hub metadata (``base_model`` the Hub sources, ``base_model_relation: merge``, tags, library_name),
    every source named in the body (local folders marked as such), and the recipe verbatim."""
    hub = {key: hub_id(key, folder) for key, folder in plan.sources.items()}
    base = f"`{plan.base_model}` as the base" if plan.base_model else "no base model"
    body = (
        f"\n# Merged model\n\nMade with [mergeflow](https://pypi.org/project/mergeflow/) using the **{plan.method}** method with {base}.\n\n"
        f"{sources_section('Models merged', hub)}\n## Recipe\n\n```yaml\n{plan.recipe_text.strip()}\n```\n"
    )
    return render_card(card_data(method=plan.method, hub_ids=[repo for repo in hub.values() if repo]), body)


def write_model_files(plan: MergePlan, out_dir: Path) -> None:
    """All non-weight files of the merged model."""
    write_index(plan, out_dir)
    write_config(plan, out_dir)
    write_tokenizer(plan, out_dir)
    (out_dir / "README.md").write_text(model_card(plan))
