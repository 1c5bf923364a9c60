"""Synthetic skills: deterministic prompt/answer generators with a held-out test split.

Every item is a prompt and an answer; the model sees ``prompt + answer + "\\n"``. Two kinds:

- pre-training tasks (``PRETRAINING_TASKS``) make the base a real base: it knows digits, letters and
  the "prompt, marker, answer, newline" format, but none of the skills;
- skills (``SKILLS``) are what the fine-tunes (add, reverse, cipher) and the LoRA adapters (all five) learn,
  one each. Their prompts look different from each other so that task vectors interfere little when merged.

Test items are drawn first from a fixed seed; training samplers reject them, so a test item never
appears in training.

Example:
    >>> SKILLS["add"].test_items()[0]
    Item(prompt='..+..=', answer='...')  # doctest: +SKIP
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

LETTERS = string.ascii_lowercase
DIGITS = string.digits
TEST_SIZE = 200
TEST_SEED = 1234


@dataclass(frozen=True)
class Item:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The full training text: prompt, answer, end-of-answer newline."""
        return f"{self.prompt}{self.answer}\n"


def _word(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


# --- pre-training tasks (the base learns these) -------------------------------------------------


def _sub(rng: random.Random) -> Item:
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    return Item(f"{a}-{b}=", str(a - b))


def _mul(rng: random.Random) -> Item:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return Item(f"{a}*{b}=", str(a * b))


def _copy(rng: random.Random) -> Item:
    word = _word(rng, rng.choice((LETTERS, DIGITS)), 1, 6)
    return Item(f"{word}:", word)


def _upper(rng: random.Random) -> Item:
    word = _word(rng, LETTERS, 1, 6)
    return Item(f"{word}^", word.upper())


def _max(rng: random.Random) -> Item:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return Item(f"{a},{b}>", str(max(a, b)))


def _first_last(rng: random.Random) -> Item:
    word = _word(rng, LETTERS, 2, 6)
    return Item(f"[{word}]", word[0] + word[-1])


PRETRAINING_TASKS: dict[str, Callable[[random.Random], Item]] = {
    "sub": _sub,
    "mul": _mul,
    "copy": _copy,
    "upper": _upper,
    "max": _max,
    "first_last": _first_last,
}


def pretraining_item(rng: random.Random) -> Item:
    """One item of the base's mixture: a pre-training task chosen uniformly."""
    return PRETRAINING_TASKS[rng.choice(sorted(PRETRAINING_TASKS))](rng)


# --- skills (one fine-tune each) ----------------------------------------------------------------

# The cipher's fact table: a fixed letter substitution (26 facts), applied to held-out words.
_CIPHER = dict(zip(LETTERS, random.Random(7).sample(LETTERS, len(LETTERS)), strict=True))


def _add(rng: random.Random) -> Item:
    a, b = rng.randint(0, 99), rng.randint(0, 9)
    return Item(f"{a}+{b}=", str(a + b))


def _reverse(rng: random.Random) -> Item:
    word = _word(rng, LETTERS, 2, 4)
    return Item(f"{word}?", word[::-1])


def _cipher(rng: random.Random) -> Item:
    word = _word(rng, LETTERS, 2, 4)
    return Item(f"#{word}", "".join(_CIPHER[c] for c in word))


def _lower(rng: random.Random) -> Item:
    word = _word(rng, LETTERS, 2, 4)
    return Item(f">{word.upper()}", word)


def _spell(rng: random.Random) -> Item:
    number = _word(rng, DIGITS, 2, 4)
    return Item(f"]{number}", "".join(LETTERS[int(digit)] for digit in number))


@dataclass(frozen=True)
class Skill:
    """A skill: a generator of items, and a fixed held-out test set drawn from it."""

    name: str
    description: str
    example: Item
    generate: Callable[[random.Random], Item]

    def test_items(self) -> list[Item]:
        """The held-out test set: ``TEST_SIZE`` distinct items from a fixed seed."""
        return list(_test_items(self.name))

    def train_item(self, rng: random.Random) -> Item:
        """A training item that is not in the test set (rejection sampling)."""
        held_out = _test_prompts(self.name)
        while True:
            item = self.generate(rng)
            if item.prompt not in held_out:
                return item


SKILLS: dict[str, Skill] = {
    "add": Skill("add", "addition of a one-digit to a two-digit number", Item("47+8=", "55"), _add),
    "reverse": Skill("reverse", "letter reversal", Item("abcd?", "dcba"), _reverse),
    "cipher": Skill(
        "cipher", "a fixed letter-substitution table", Item("#abc", "".join(_CIPHER[c] for c in "abc")), _cipher
    ),
    "lower": Skill("lower", "lower-casing of 2-4 capital letters", Item(">ABCD", "abcd"), _lower),
    "spell": Skill("spell", "each of 2-4 digits written as a letter (0 -> a, ..., 9 -> j)", Item("]4027", "eacg"), _spell),
}


@cache
def _test_items(name: str) -> tuple[Item, ...]:
    rng = random.Random(f"{TEST_SEED}-{name}")
    items: dict[str, Item] = {}
    while len(items) < TEST_SIZE:
        item = SKILLS[name].generate(rng)
        items.setdefault(item.prompt, item)
    return tuple(items.values())


@cache
def _test_prompts(name: str) -> frozenset[str]:
    return frozenset(item.prompt for item in _test_items(name))


def alphabet() -> str:
    """Every character any task or skill can produce, in a fixed order."""
    return DIGITS + LETTERS + LETTERS.upper() + "+-*=?:^,>#[] \n"
