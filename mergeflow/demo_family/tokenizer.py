"""A character-level tokenizer built with the `tokenizers` library, saved as Hugging Face files.

One token per character of ``skills.alphabet()`` plus three specials: ``<pad>`` (0), ``</s>`` (1, end of
sequence) and ``<unk>`` (2). No BOS token and no post-processor, so encoding a prompt gives exactly its
characters (lm-eval's hf model encodes contexts without special tokens). The decoder fuses tokens back
into a string without separators.

Example:
    >>> tok = build_tokenizer()
    >>> tok(["7+8="])["input_ids"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mergeflow.demo_family.skills import alphabet

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIALS = (PAD, EOS, UNK)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The family's tokenizer; the same vocabulary every time."""
    vocab = {token: index for index, token in enumerate((*SPECIALS, *alphabet()))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=64,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json into ``out_dir``.

    The config names the class ``PreTrainedTokenizerFast``, which transformers 4 and 5 both load
    (5 would otherwise write its own ``TokenizersBackend``, unknown to 4).
    """
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
