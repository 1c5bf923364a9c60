"""PEFT LoRA adapters for tests: random non-zero factors (PEFT starts B at zero, which adds nothing)."""
from __future__ import annotations

from pathlib import Path

import peft
import torch
from transformers import LlamaForCausalLM


def make_adapter(base: Path, out: Path, seed: int, **options: object) -> Path:
    """A PEFT LoRA adapter of ``base`` with every LoRA factor random (PEFT starts B at zero, which adds nothing)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base)
    tuned = peft.get_peft_model(model, peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **options}))
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.05)
    tuned.save_pretrained(out)
    return out


def merged_by_peft(base: Path, adapter: Path, out: Path) -> Path:
    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    model.save_pretrained(out)
    return out
