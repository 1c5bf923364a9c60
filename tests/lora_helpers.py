"""PEFT's own merge of a LoRA adapter into its base, the reference the LoRA tests compare with (test adapters are
made by ``tiny_family.make_adapter``)."""
from __future__ import annotations

from pathlib import Path

import peft
from transformers import LlamaForCausalLM


def merged_by_peft(base: Path, adapter: Path, out: Path) -> Path:
    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    model.save_pretrained(out)
    return out
