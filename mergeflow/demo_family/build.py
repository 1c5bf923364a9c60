"""Build the demo skills family: a base and one fine-tune per skill, cached by a content key.

Layout of ``out_dir`` (every folder is a Hugging Face model folder)::

    out_dir/
      base/      model.safetensors, config.json, generation_config.json, tokenizer files, README.md
      add/       fine-tune of base on two-digit + one-digit addition
      reverse/   fine-tune of base on letter reversal
      cipher/    fine-tune of base on a fixed letter-substitution table
      family.json   the content key and the model names; written last
      adapters/  LoRA adapters of base, one per skill: not built here but by ``adapters.build_adapters``

The training runs in a child process whose torch and MKL use the same arithmetic on every x86-64 CPU
(``pinned.run_pinned``), so the bytes do not depend on the machine's vector ISA.

The key hashes the settings, the source of this package and the library versions. A build goes into a
temporary sibling folder that replaces ``out_dir`` only when complete, so an interrupted build never
leaves a half-built family, and an up-to-date ``out_dir`` returns at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from mergeflow.demo_family.pinned import run_pinned
from mergeflow.demo_family.skills import SKILLS, pretraining_item
from mergeflow.demo_family.tokenizer import build_tokenizer, save_tokenizer
from mergeflow.demo_family.training import ModelShape, TrainSettings, accuracy, new_model, train

MARKER = "family.json"
BASE = "base"
_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors")


_BASE = TrainSettings(steps=600, learning_rate=3e-3, weight_decay=0.01, seed=0)
_FINETUNE = TrainSettings(steps=300, learning_rate=1e-3, freeze_embeddings=True, replay=0.1, seed=1)


def _measured_finetunes() -> dict[str, TrainSettings]:
    # The cipher's 26 facts need more steps than add and reverse with frozen embeddings.
    cipher = replace(_FINETUNE, steps=500, learning_rate=2e-3)
    return {"add": _FINETUNE, "reverse": _FINETUNE, "cipher": cipher}


@dataclass(frozen=True)
class FamilySettings:
    """What the family is made of; every field goes into the cache key."""

    shape: ModelShape = field(default_factory=ModelShape)
    init_seed: int = 0
    base: TrainSettings = field(default_factory=lambda: _BASE)
    finetunes: dict[str, TrainSettings] = field(default_factory=_measured_finetunes)
    """One fine-tune per skill (a name in ``skills.SKILLS``), in this order."""


class FamilySummary(BaseModel):
    """A built family: its folder, content key and one model folder per name ("base" and each skill).

    ``build_adapters`` returns one for the family's adapters too: ``root`` is their folder, ``models`` the
    adapter folders by skill.
    """

    model_config = ConfigDict(frozen=True)

    root: Path
    key: str
    models: dict[str, Path]
    cached: bool
    seconds: float


def family_key(settings: FamilySettings) -> str:
    """sha256 over the settings, this package's source and the versions of the libraries used."""
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    for library in _LIBRARIES:
        digest.update(f"{library}=={version(library)}".encode())
    return digest.hexdigest()


def build_family(out_dir: Path, *, force: bool = False, settings: FamilySettings | None = None) -> FamilySummary:
    """Build (or reuse) the demo family in ``out_dir``.

    Args:
        out_dir: the family's folder; created, or replaced when it holds an older family.
        force: rebuild even when ``out_dir`` already holds a family with the same key.
        settings: what to build; the defaults are the measured family.

    Raises:
        FileExistsError: ``out_dir`` exists, is not empty and holds no family (no family.json).

    Example:
        >>> summary = build_family(Path("demo-family"))  # doctest: +SKIP
        >>> summary.models["add"]  # doctest: +SKIP
        PosixPath('demo-family/add')
    """
    settings = settings or FamilySettings()
    started = time.perf_counter()
    key = family_key(settings)
    names = (BASE, *settings.finetunes)
    marker = out_dir / MARKER
    if out_dir.exists() and not marker.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} is not empty and holds no demo family ({MARKER} missing): "
            "choose an empty or new folder, or remove it first"
        )
    if not force and marker.exists() and json.loads(marker.read_text()).get("key") == key:
        return _summary(out_dir, key, names, cached=True, started=started)

    with staged(out_dir) as staging:
        run_pinned(_build_into, staging, settings)  # the same bytes on every x86-64 CPU
        (staging / MARKER).write_text(json.dumps({"key": key, "models": list(names)}, indent=2) + "\n")
    return _summary(out_dir, key, names, cached=False, started=started)


def family_models(out_dir: Path) -> dict[str, Path]:
    """The model folders of the family built in ``out_dir``, by name (no build).

    Raises:
        FileNotFoundError: no family there (``mergeflow demo-models OUT`` builds one).
    """
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"no demo family in {out_dir} ({MARKER} missing): build it with `mergeflow demo-models {out_dir}`")
    return {name: Path(out_dir) / name for name in json.loads(marker.read_text())["models"]}


def _summary(out_dir: Path, key: str, names: tuple[str, ...], *, cached: bool, started: float) -> FamilySummary:
    return FamilySummary(
        root=out_dir,
        key=key,
        models={name: out_dir / name for name in names},
        cached=cached,
        seconds=round(time.perf_counter() - started, 3),
    )


@contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A new hidden sibling folder of ``out_dir`` to build into; it replaces ``out_dir`` when the block succeeds."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        _replace(out_dir, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(out_dir: Path, staging: Path) -> None:
    """Swap the finished ``staging`` folder in for ``out_dir`` (two renames)."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)


def _build_into(folder: Path, settings: FamilySettings) -> None:
    """Train and save the base, then each fine-tune, one after the other (on one thread, in ``run_pinned``'s child).

    (Fine-tunes in parallel processes were slower on the shared 2-core machine: 127 s vs 88 s.)
    """
    tokenizer = build_tokenizer()
    base = new_model(settings.shape, tokenizer, seed=settings.init_seed)
    train(base, tokenizer, pretraining_item, settings.base)
    scores = {name: accuracy(base, tokenizer, SKILLS[name].test_items()) for name in settings.finetunes}
    _save(folder / BASE, base, tokenizer, _card_base(settings, scores))
    for skill in settings.finetunes:
        _finetune(folder, settings, skill)


def _finetune(folder: Path, settings: FamilySettings, skill: str) -> None:
    """Fine-tune ``folder/base`` on ``skill`` into ``folder/skill``."""
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM.from_pretrained(folder / BASE)
    train(model, tokenizer, SKILLS[skill].train_item, settings.finetunes[skill], replay_sample=pretraining_item)
    score = accuracy(model, tokenizer, SKILLS[skill].test_items())
    _save(folder / skill, model, tokenizer, _card_skill(settings, skill, score))


def _save(folder: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, card: str) -> None:
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    (folder / "README.md").write_text(card)


def front_matter(*, base_model: str | None, tags: list[str], library: str = "transformers") -> str:
    """A model card's YAML front matter (``---`` lines included) for a demo model or adapter."""
    lines = ["---", f"library_name: {library}", "pipeline_tag: text-generation"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["tags:", *(f"- {tag}" for tag in tags), "---", ""]
    return "\n".join(lines)


def _card_base(settings: FamilySettings, scores: dict[str, float]) -> str:
    rows = "\n".join(f"| {name} | {score:.3f} |" for name, score in scores.items())
    return (
        front_matter(base_model=None, tags=["mergeflow-demo", "llama", "base"])
        + "\n# mergeflow demo family: base\n\n"
        + "A tiny LlamaForCausalLM with a character-level tokenizer, pre-trained for "
        + f"{settings.base.steps} steps on a mixture of synthetic tasks (subtraction, multiplication, "
        + "copy, upper-casing, max, first/last letter). It knows none of the family's skills.\n\n"
        + "Greedy exact match on each skill's held-out test set:\n\n| skill | exact match |\n|---|---|\n"
        + rows
        + "\n"
    )


def _card_skill(settings: FamilySettings, skill: str, score: float) -> str:
    spec = SKILLS[skill]
    tune = settings.finetunes[skill]
    return (
        front_matter(base_model=f"../{BASE}", tags=["mergeflow-demo", "llama", f"skill-{skill}"])
        + f"\n# mergeflow demo family: {skill}\n\n"
        + f"The family's base (the sibling folder `{BASE}`, hence `base_model: ../{BASE}`) fine-tuned "
        + f"for {tune.steps} steps at learning rate {tune.learning_rate} on one skill, {spec.description}: "
        + f"`{spec.example.prompt}` -> `{spec.example.answer}`. Embeddings and lm_head frozen: "
        + f"{tune.freeze_embeddings}; share of each batch replayed from the base's mixture: {tune.replay}.\n\n"
        + f"Greedy exact match on the skill's held-out test set: {score:.3f}\n"
    )
