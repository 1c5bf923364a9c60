"""What the engine needs to know about a transformer checkpoint's layout, read from names and config.

The decoder layers are the numbered blocks (``model.layers.N``, ``gpt_neox.layers.N``, ``transformer.h.N``,
``language_model.model.layers.N``) outside the parts that feed a vision-language model's decoder (vision tower,
projector); those parts have numbered blocks of their own (``vision_tower.encoder.layers.N``, ``visual.blocks.N``),
which are not decoder layers: slices never stack them. The decoder's layer count is in config.json, or in its
``text_config`` for vision-language models.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any

from merge_ops.parameters import layer_position

LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks)\.)(?P<index>\d+)\.(?P<rest>.+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
PRE_LAYER_MARKERS = ("embed", "wte", "wpe")
POST_LAYER_MARKERS = ("embed_out",)
"""Names with a pre-layer marker that come after the layers all the same (GPT-NeoX's output embedding)."""
ENCODER_MARKERS = ("vision", "visual", "audio", "multi_modal_projector", "image_newline")
"""Parts of a multimodal model's name that mark tensors outside its text decoder."""
VOCABULARY_TENSORS = (
    "embed_tokens.weight", "lm_head.weight", "lm_head.bias", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
    "embed_in.weight", "embed_out.weight", "output_layer.weight",
)
"""Endings of the names of token-indexed tensors (one row per token): input embeddings and output heads."""
OUTPUT_HEADS = ("lm_head.weight", "embed_out.weight")


def is_encoder_part(name: str) -> bool:
    """``vision_tower.encoder.layers.0.mlp.fc1.weight``, ``visual.merger.mlp.0.bias``: outside a multimodal model's text decoder."""
    return any(marker in part for part in name.split(".") for marker in ENCODER_MARKERS)


def encoder_parts(names: Iterable[str]) -> list[str]:
    """The parts of a multimodal model outside its text decoder, by name prefix: ``["multi_modal_projector", "vision_tower"]``."""
    parts = set()
    for components in (name.split(".") for name in names if is_encoder_part(name)):
        first = next(i for i, c in enumerate(components) if any(m in c for m in ENCODER_MARKERS))
        parts.add(".".join(components[: first + 1]))
    return sorted(parts)


def in_numbered_block(name: str) -> bool:
    """In a decoder layer or a numbered block of a multimodal model's encoder."""
    return LAYER_NAME.match(name) is not None


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """``model.layers.3.mlp.up_proj.weight`` -> ("model.layers.", 3, "mlp.up_proj.weight"); None outside the decoder layers."""
    match = LAYER_NAME.match(name)
    if match is None or is_encoder_part(match["prefix"]):
        return None
    return match["prefix"], int(match["index"]), match["rest"]


def layer_tensor_name(prefix: str, index: int, rest: str) -> str:
    return f"{prefix}{index}.{rest}"


def is_pre_layer(name: str) -> bool:
    """Embeddings come before the layers; everything else outside layers (final norm, lm_head, embed_out) after."""
    return any(marker in name for marker in PRE_LAYER_MARKERS) and not any(marker in name for marker in POST_LAYER_MARKERS)


def encoder_layer_positions(names: Iterable[str]) -> dict[str, float]:
    """``t`` of each tensor in a numbered block of a multimodal model's encoder (its vision tower's layers), by its
    position in that stack, as for decoder layers in a slice; other tensors are not listed (their ``t`` is 0)."""
    blocks = [(name, match) for name in names if (match := LAYER_NAME.match(name)) and is_encoder_part(match["prefix"])]
    counts: dict[str, set[int]] = {}
    for _, match in blocks:
        counts.setdefault(match["prefix"], set()).add(int(match["index"]))
    return {name: layer_position(int(match["index"]), len(counts[match["prefix"]])) for name, match in blocks}


def is_vocabulary_tensor(name: str) -> bool:
    """A tensor outside the layers with one row per token: ``model.embed_tokens.weight``, ``lm_head.weight``, ..."""
    return split_layer_name(name) is None and not is_encoder_part(name) and (name.endswith(VOCABULARY_TENSORS) or name == "output.weight")


def tied_stand_in(name: str, names: Collection[str]) -> str | None:
    """The input embedding that stands in for an output head a model does not store (it ties the two, as
    ``tie_word_embeddings`` models do); None when the model has ``name`` or it is no output head."""
    if name in names or not (name.endswith(OUTPUT_HEADS) or name == "output.weight"):
        return None
    return next((n for n in names if is_vocabulary_tensor(n) and is_pre_layer(n)), None)


def decoder_sections(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The parts of config.json that describe the decoder's layers: the config itself and/or its ``text_config``
    (vision-language models), each holding a layer count key. The same dict objects, so a caller may update them."""
    nested = config.get("text_config")
    sections = [config, *([nested] if isinstance(nested, dict) else [])]
    return [s for s in sections if any(key in s for key in LAYER_COUNT_KEYS)]


def layer_count_key(config: dict[str, Any]) -> str:
    """The key holding the number of layers in ``config`` (one of ``decoder_sections``)."""
    for key in LAYER_COUNT_KEYS:
        if key in config:
            return key
    raise KeyError(f"config.json has none of {', '.join(LAYER_COUNT_KEYS)}")


def layer_count(config: dict[str, Any]) -> int:
    """The decoder's number of layers: config.json's, else its ``text_config``'s.

    Raises:
        KeyError: neither holds one of ``LAYER_COUNT_KEYS``.
    """
    for section in decoder_sections(config):
        return int(section[layer_count_key(section)])
    raise KeyError(f"config.json has none of {', '.join(LAYER_COUNT_KEYS)}, neither at the top level nor in text_config")


def per_layer_keys(section: dict[str, Any]) -> list[str]:
    """Keys of a decoder section whose value lists one entry per layer (``layer_types``)."""
    count = section[layer_count_key(section)]
    return [k for k, v in section.items() if k.startswith("layer") and isinstance(v, list) and len(v) == count]
