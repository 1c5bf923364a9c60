"""Tiny Llama-architecture families for tests: a base and fine-tunes = base + deterministic deltas."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def write_model(folder: Path, state: dict[str, torch.Tensor], *, config: dict | None = None, shards: int = 1) -> Path:
    """Save ``state`` as a Hugging Face folder (config, generation config, sharded safetensors, tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**(config or CONFIG), architectures=["LlamaForCausalLM"])
    cfg.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    names = list(state)
    if shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        groups = [names[i::shards] for i in range(shards)]
        weight_map = {}
        for i, group in enumerate(groups):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: state[n] for n in group}, folder / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in group})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return folder


def base_state(seed: int = 0, dtype: torch.dtype = torch.float32, config: dict | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**(config or CONFIG)))
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


def fine_tune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.02, sign: float = 1.0) -> dict[str, torch.Tensor]:
    """base + a deterministic delta (a fixed pattern times ``sign`` plus seeded noise)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        delta = sign * scale * torch.ones(tensor.shape) + scale * torch.randn(tensor.shape, generator=g)
        out[name] = (tensor.float() + delta).to(tensor.dtype)
    return out


def build_family(root: Path, *, dtype: torch.dtype = torch.float32, shards: int = 1) -> dict[str, Path]:
    """base, ft_a (+), ft_b (+, other noise), ft_neg (opposite-sign pattern)."""
    base = base_state(dtype=dtype)
    return {
        "base": write_model(root / "base", base, shards=shards),
        "ft_a": write_model(root / "ft_a", fine_tune(base, 1), shards=shards),
        "ft_b": write_model(root / "ft_b", fine_tune(base, 2), shards=shards),
        "ft_neg": write_model(root / "ft_neg", fine_tune(base, 3, sign=-1.0), shards=shards),
    }


def make_adapter(base: Path, out: Path, seed: int, **options: object) -> Path:
    """A PEFT LoRA adapter of ``base`` (r=4, alpha=8 unless ``options`` say otherwise) with every LoRA factor random:
    PEFT starts B at zero, which adds nothing."""
    import peft

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base)
    tuned = peft.get_peft_model(model, peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **options}))
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.05)
    tuned.save_pretrained(out)
    return out
