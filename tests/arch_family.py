"""Tiny models of other architectures for tests: a transformers config, random weights written by
``save_pretrained`` (so tensor names and tied embeddings are as on the Hub), the demo family's char-level tokenizer.

A family is a base and fine-tunes as in ``tiny_family.build_family`` (base + a deterministic delta on every parameter;
tied weights are one parameter), so ``bench/compare_mergekit.py`` can run its recipes on it.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel

from mergeflow.demo_family.tokenizer import build_tokenizer, save_tokenizer

VOCAB = 80
"""Above the tokenizer's 78 tokens."""
TOKENS = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=None)
TEXT = dict(TOKENS, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2, max_position_embeddings=64)
MULTIMODAL = ("llava", "qwen2_vl")


def tiny_config(kind: str) -> PretrainedConfig:
    """A 4-layer config of ``kind``: mistral, qwen2 (attention biases, tied embeddings), gemma, gemma2 (tied, extra
    norms), gpt_neox (gpt_neox.layers.N, final_layer_norm, embed_out; Pythia's legacy buffers), phi (final_layernorm, biases), llava, qwen2_vl."""
    heads = dict(num_key_value_heads=2)
    configs = {
        "mistral": lambda: transformers.MistralConfig(**TEXT, **heads, tie_word_embeddings=False),
        "qwen2": lambda: transformers.Qwen2Config(**TEXT, **heads, tie_word_embeddings=True),
        "gemma": lambda: transformers.GemmaConfig(**TEXT, **heads, head_dim=8),
        "gemma2": lambda: transformers.Gemma2Config(**TEXT, **heads, head_dim=8, sliding_window=8),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**TEXT, tie_word_embeddings=False),
        "phi": lambda: transformers.PhiConfig(**TEXT, tie_word_embeddings=False),
        "llava": lambda: transformers.LlavaConfig(
            text_config=transformers.LlamaConfig(**TEXT, **heads, tie_word_embeddings=False),
            vision_config=transformers.CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4),
            image_token_index=VOCAB - 1,
        ),
        "qwen2_vl": lambda: transformers.Qwen2VLConfig(
            text_config=dict(TEXT, **heads, model_type="qwen2_vl_text", rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
            vision_config=dict(depth=2, embed_dim=8, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=2, spatial_merge_size=1, temporal_patch_size=1),
            image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 4, **TOKENS,
        ),
    }
    return configs[kind]()


def auto_class(kind: str) -> type[AutoModelForCausalLM] | type[AutoModelForImageTextToText]:
    """The transformers auto class that loads ``kind``."""
    return AutoModelForImageTextToText if kind in MULTIMODAL else AutoModelForCausalLM


def _save(model: PreTrainedModel, folder: Path) -> Path:
    model.save_pretrained(folder)
    save_tokenizer(build_tokenizer(), folder)
    if model.config.model_type == "gpt_neox":
        _add_legacy_buffers(folder, model.config)
    return folder


def _add_legacy_buffers(folder: Path, config: PretrainedConfig) -> None:
    """The per-layer buffers Pythia checkpoints on the Hub store beside the weights (a boolean causal mask, a scalar,
    the rotary frequencies); transformers 5 ignores them when loading, mergekit's GPT-NeoX description requires them."""
    state = load_file(folder / "model.safetensors")
    positions, rotary = config.max_position_embeddings, int(config.hidden_size // config.num_attention_heads * config.rope_parameters["partial_rotary_factor"])
    for i in range(config.num_hidden_layers):
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions, positions)
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, rotary, 2).float() / rotary)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def build_arch_family(root: Path, kind: str) -> dict[str, Path]:
    """base, ft_a (+ pattern + noise), ft_b (+ pattern + other noise), ft_neg (- pattern) of ``kind`` under ``root``."""
    torch.manual_seed(0)
    base = auto_class(kind).from_config(tiny_config(kind))
    family = {"base": _save(base, root / "base")}
    for name, seed, sign in (("ft_a", 1, 1.0), ("ft_b", 2, 1.0), ("ft_neg", 3, -1.0)):
        tuned = copy.deepcopy(base)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in tuned.parameters():
                parameter.add_(sign * 0.02 + 0.02 * torch.randn(parameter.shape, generator=g))
        family[name] = _save(tuned, root / name)
    return family
