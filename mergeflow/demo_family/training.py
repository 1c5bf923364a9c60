"""Tiny LlamaForCausalLM training, deterministic bit for bit on CPU.

Determinism (``deterministic_cpu``): one torch thread, ``torch.manual_seed`` before the weights are
initialised, a ``random.Random(seed)`` for the data, ``torch.use_deterministic_algorithms(True)``, no dropout. The
same settings give the same safetensors bytes run to run on the same torch build, and on every x86-64 CPU when run
through ``pinned.run_pinned`` (as ``build_family`` and ``build_adapters`` do).

Loss is on the answer tokens only (answer, newline, ``</s>``): the prompt is the condition.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mergeflow.demo_family.skills import Item

IGNORE = -100


@dataclass(frozen=True)
class ModelShape:
    """The base's architecture: ~0.55M parameters with a char-level vocabulary."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 64


@dataclass(frozen=True)
class TrainSettings:
    """One training run: steps of AdamW with linear warmup and cosine decay to 10%."""

    steps: int
    learning_rate: float
    batch_size: int = 64
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    freeze_embeddings: bool = False
    """Leave embed_tokens and lm_head as they are (fine-tunes): task vectors then live in the layers."""
    replay: float = 0.0
    """Fraction of each batch drawn from the base's pre-training mixture (fine-tunes)."""


@contextmanager
def deterministic_cpu() -> Iterator[None]:
    """One torch thread, deterministic algorithms and a forked global RNG; the caller's come back after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def new_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, *, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model; the same seed gives the same weights."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def encode_batch(items: list[Item], tokenizer: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (answer tokens only)."""
    rows = []
    for item in items:
        prompt = tokenizer.convert_tokens_to_ids(list(item.prompt))
        answer = tokenizer.convert_tokens_to_ids(list(item.answer + "\n")) + [tokenizer.eos_token_id]
        rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    sample: Callable[[random.Random], Item],
    settings: TrainSettings,
    *,
    replay_sample: Callable[[random.Random], Item] | None = None,
    trainable: Callable[[str], bool] | None = None,
) -> torch.nn.Module:
    """Train ``model`` in place on items from ``sample`` and return it.

    Args:
        model: a causal LM (a LlamaForCausalLM, or a PEFT model wrapping one).
        sample: draws one training item from the given rng.
        settings: steps, learning rate, freezing and replay.
        replay_sample: draws one pre-training item; used for ``settings.replay`` of each batch.
        trainable: picks the parameters to train by name (e.g. only LoRA factors); by default every parameter
            but the embeddings when ``settings.freeze_embeddings``.

    Run it inside ``deterministic_cpu()`` for the same bytes every time.
    """
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    frozen = ("model.embed_tokens.weight", "lm_head.weight") if settings.freeze_embeddings else ()
    for name, param in model.named_parameters():
        param.requires_grad_(trainable(name) if trainable else name not in frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=settings.learning_rate, betas=(0.9, 0.95), weight_decay=settings.weight_decay
    )
    n_replay = round(settings.replay * settings.batch_size) if replay_sample else 0

    def lr_factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    for _ in range(settings.steps):
        items = [sample(rng) for _ in range(settings.batch_size - n_replay)]
        items += [replay_sample(rng) for _ in range(n_replay)] if replay_sample else []
        loss = model(**encode_batch(items, tokenizer)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    return model


@torch.no_grad()
def greedy_answers(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: list[str], *, max_new: int = 8
) -> list[str]:
    """Greedy completions up to the first newline; a quick exact-match check without lm-eval."""
    answers = []
    for start in range(0, len(prompts), 256):
        chunk = prompts[start : start + 256]
        batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        answers += [text.split("\n", 1)[0] for text in texts]
    return answers


def accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, items: list[Item]) -> float:
    """Exact-match accuracy of greedy answers on ``items``."""
    answers = greedy_answers(model, tokenizer, [item.prompt for item in items])
    return sum(a == item.answer for a, item in zip(answers, items, strict=True)) / len(items)
