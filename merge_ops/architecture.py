"""What the engine needs to know about a transformer checkpoint's layout, read from names and config."""
from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks)\.)(?P<index>\d+)\.(?P<rest>.+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
PRE_LAYER_MARKERS = ("embed", "wte", "wpe")
VOCABULARY_TENSORS = (
    "embed_tokens.weight", "lm_head.weight", "lm_head.bias", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
    "embed_in.weight", "embed_out.weight", "output_layer.weight",
)
"""Endings of the names of token-indexed tensors (one row per token): input embeddings and output heads."""
OUTPUT_HEADS = ("lm_head.weight", "embed_out.weight")


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """``model.layers.3.mlp.up_proj.weight`` -> ("model.layers.", 3, "mlp.up_proj.weight"); None outside layers."""
    match = LAYER_NAME.match(name)
    return (match["prefix"], int(match["index"]), match["rest"]) if match else None


def layer_tensor_name(prefix: str, index: int, rest: str) -> str:
    return f"{prefix}{index}.{rest}"


def is_pre_layer(name: str) -> bool:
    """Embeddings come before the layers; everything else outside layers (final norm, lm_head) after."""
    return any(marker in name for marker in PRE_LAYER_MARKERS)


def is_vocabulary_tensor(name: str) -> bool:
    """A tensor outside the layers with one row per token: ``model.embed_tokens.weight``, ``lm_head.weight``, ..."""
    return split_layer_name(name) is None and (name.endswith(VOCABULARY_TENSORS) or name == "output.weight")


def tied_stand_in(name: str, names: Collection[str]) -> str | None:
    """The input embedding that stands in for an output head a model does not store (it ties the two, as
    ``tie_word_embeddings`` models do); None when the model has ``name`` or it is no output head."""
    if name in names or not (name.endswith(OUTPUT_HEADS) or name == "output.weight"):
        return None
    return next((n for n in names if is_vocabulary_tensor(n) and is_pre_layer(n)), None)


def layer_count_key(config: dict[str, Any]) -> str:
    """The config key holding the number of layers."""
    for key in LAYER_COUNT_KEYS:
        if key in config:
            return key
    nested = config.get("text_config") or {}
    raise KeyError(
        f"config.json has none of {', '.join(LAYER_COUNT_KEYS)}"
        + (" (multimodal configs with text_config are not supported yet)" if nested else "")
    )
