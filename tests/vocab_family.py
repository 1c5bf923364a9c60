"""Tiny Llama families whose models carry real tokenizers, some of them with tokens the base lacks.

The base tokenizer is a character-level BPE (`tokenizers` library) with 64 tokens: ``<unk>``, ``<s>``, ``</s>`` and
61 characters. Fine-tunes that add ChatML's ``<|im_start|>`` and ``<|im_end|>`` (ids 64 and 65, as chat fine-tunes
do) grow their embeddings by two rows, initialised near the mean of the others, and some pad the embedding further
(``vocab_size`` larger than the tokenizer, as Qwen's checkpoints are).
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from tiny_family import CONFIG, base_state, fine_tune, write_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<unk>", "<s>", "</s>")
CHATML = ("<|im_start|>", "<|im_end|>")
CHARACTERS = (string.ascii_lowercase + string.ascii_uppercase + string.digits)[:61]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def base_tokenizer(characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    """64 tokens: the three specials, then one per character (BPE without merges), in the order of ``characters``."""
    vocab = {token: i for i, token in enumerate((*SPECIALS, *characters))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=64,
                                   clean_up_tokenization_spaces=False)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """tokenizer.json and a tokenizer_config.json naming ``PreTrainedTokenizerFast`` (what AutoTokenizer loads)."""
    tokenizer.save_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def grown(state: dict[str, torch.Tensor], rows: int, seed: int) -> dict[str, torch.Tensor]:
    """``state`` with its token-indexed tensors grown to ``rows`` rows: the new ones near the mean row, plus noise."""
    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    for name in VOCAB_TENSORS:
        if name in state:
            old = state[name]
            extra = old.float().mean(0) + 0.02 * torch.randn(rows - old.shape[0], *old.shape[1:], generator=g)
            out[name] = torch.cat([old, extra.to(old.dtype)]).contiguous()
    return out


def write_vocab_model(folder: Path, state: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerFast, *, tied: bool = False, shards: int = 1) -> Path:
    rows = state["model.embed_tokens.weight"].shape[0]
    config = dict(CONFIG, vocab_size=rows, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    if tied:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    write_model(folder, state, config=config, shards=shards)
    save_tokenizer(tokenizer, folder)
    return folder


def build_vocab_family(root: Path, *, dtype: torch.dtype = torch.float32, shards: int = 1, tied: bool = False) -> dict[str, Path]:
    """base (64 tokens); ft_chat (+ the two ChatML tokens, 66 rows); ft_same (the base's vocabulary); ft_padded (the
    ChatML tokenizer, its embedding padded to 72 rows). Same names as ``tiny_family.build_family`` where they fit:
    ``ft_a`` is ft_chat, ``ft_b`` ft_same and ``ft_neg`` ft_padded, so recipes written for that family apply here."""
    base = base_state(dtype=dtype)
    chat = base_tokenizer()
    chat.add_special_tokens({"additional_special_tokens": list(CHATML)})
    write = lambda name, state, tok: write_vocab_model(root / name, state, tok, tied=tied, shards=shards)  # noqa: E731
    return {
        "base": write("base", base, base_tokenizer()),
        "ft_a": write("ft_a", fine_tune(grown(base, 66, 11), 1), chat),
        "ft_b": write("ft_b", fine_tune(base, 2), base_tokenizer()),
        "ft_neg": write("ft_neg", fine_tune(grown(base, 72, 13), 3, sign=-1.0), chat),
    }


def write_shuffled(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """``state`` under a tokenizer with the characters in reverse order, its token-indexed rows moved with them: the same
    model as ``state`` with the base's tokenizer, token for token."""
    order = [0, 1, 2, *range(63, 2, -1)]  # new id -> the base's id of the same token
    moved = {k: v[order].contiguous() if k in VOCAB_TENSORS else v for k, v in state.items()}
    return write_vocab_model(folder, moved, base_tokenizer(CHARACTERS[::-1]))
