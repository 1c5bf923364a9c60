"""LoRA adapters of the demo family's base, one per skill, built into the family's folder under their own key.

Layout (every adapter folder is a PEFT adapter: adapter_config.json, adapter_model.safetensors, README.md)::

    family/adapters/
      add/ reverse/ cipher/ lower/ spell/   a LoRA adapter of ../../base trained on that skill
      adapters.json   the adapters' key and names; written last

Separable from the family: ``build_family`` never trains adapters, so what needs only the full models does not
pay for them (2-2.5 minutes on one core, about as long as the family); ``build_adapters`` trains them on a built family, and
``mergeflow demo-models`` does both. The key hashes the family's key (the family's settings, this package's
source, library versions), the adapter settings and PEFT's version: a rebuilt family or other settings retrain
them, a current ``adapters/`` returns at once, and a rebuilt family replaces its whole folder, adapters included.

Each adapter's ``adapter_config.json`` names its base as ``../../base`` (relative to the adapter folder, like the
card's ``base_model``), not the path it was trained from.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from mergeflow.demo_family.build import BASE, FamilySummary, front_matter, staged
from mergeflow.demo_family.pinned import run_pinned
from mergeflow.demo_family.skills import SKILLS, pretraining_item
from mergeflow.demo_family.tokenizer import build_tokenizer
from mergeflow.demo_family.training import TrainSettings, accuracy, train

ADAPTERS = "adapters"
MARKER = "adapters.json"
BASE_FROM_ADAPTER = f"../../{BASE}"
_LAYER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraShape:
    """The adapters' LoRA: rank, alpha (scale alpha/r) and targets, the same for all so that they can be combined."""

    r: int = 16
    alpha: int = 64
    target_modules: tuple[str, ...] = _LAYER_PROJECTIONS
    """Every linear projection of the layers (embeddings and lm_head stay the base's)."""


_ADAPTER = TrainSettings(steps=300, learning_rate=2e-3, replay=0.1, seed=1)


def _measured_adapters() -> dict[str, TrainSettings]:
    # As for the full fine-tunes, the cipher's 26 facts need more steps and a higher rate (measured: 0.89 after 500
    # steps at 5e-3; 0.42 after 300 steps at 5e-3 with r 8). The others reach 0.975-1.0 in 300 steps at 2e-3.
    return {"add": _ADAPTER, "reverse": _ADAPTER, "cipher": replace(_ADAPTER, steps=500, learning_rate=5e-3), "lower": _ADAPTER, "spell": _ADAPTER}


@dataclass(frozen=True)
class AdapterSettings:
    """What the adapters are made of; every field goes into their key."""

    lora: LoraShape = field(default_factory=LoraShape)
    skills: dict[str, TrainSettings] = field(default_factory=_measured_adapters)
    """One adapter per skill (a name in ``skills.SKILLS``), in this order; only LoRA factors train."""


def adapters_key(family_key: str, settings: AdapterSettings) -> str:
    """sha256 over the family's key, the adapter settings and PEFT's version."""
    fields = {"family": family_key, "settings": asdict(settings), "peft": version("peft")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def build_adapters(family: FamilySummary, *, force: bool = False, settings: AdapterSettings | None = None) -> FamilySummary:
    """Build (or reuse) the LoRA adapters of ``family``'s base in ``family.root/adapters``.

    Args:
        family: a built family, as ``build_family`` returns it.
        force: retrain even when the folder holds adapters with the same key.
        settings: what to build; the defaults are the measured adapters.

    Returns:
        A summary whose ``root`` is the adapters' folder and ``models`` the adapter folders by skill.

    Example:
        >>> adapters = build_adapters(build_family(Path("demo-family")))  # doctest: +SKIP
        >>> adapters.models["add"]  # doctest: +SKIP
        PosixPath('demo-family/adapters/add')
    """
    settings = settings or AdapterSettings()
    started = time.perf_counter()
    key = adapters_key(family.key, settings)
    out_dir = family.root / ADAPTERS
    cached = not force and (out_dir / MARKER).is_file() and json.loads((out_dir / MARKER).read_text()).get("key") == key
    if not cached:
        with staged(out_dir) as staging:
            run_pinned(_train_adapters, family.models[BASE], staging, settings)  # the same bytes on every x86-64 CPU
            (staging / MARKER).write_text(json.dumps({"key": key, "adapters": list(settings.skills)}, indent=2) + "\n")
    return FamilySummary(
        root=out_dir,
        key=key,
        models={skill: out_dir / skill for skill in settings.skills},
        cached=cached,
        seconds=round(time.perf_counter() - started, 3),
    )


def family_adapters(out_dir: Path) -> dict[str, Path]:
    """The adapter folders of the family built in ``out_dir``, by skill (no build).

    Raises:
        FileNotFoundError: no adapters there (``mergeflow demo-models OUT`` builds them with the family).
    """
    marker = Path(out_dir) / ADAPTERS / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"no demo adapters in {out_dir} ({ADAPTERS}/{MARKER} missing): build them with `mergeflow demo-models {out_dir}`")
    return {name: Path(out_dir) / ADAPTERS / name for name in json.loads(marker.read_text())["adapters"]}


def _is_lora(name: str) -> bool:
    return "lora_" in name


def _train_adapters(base_dir: Path, folder: Path, settings: AdapterSettings) -> None:
    """Train one adapter per skill of ``settings`` into ``folder/<skill>``, one after the other (in ``run_pinned``'s child)."""
    for skill in settings.skills:
        _train_adapter(base_dir, folder / skill, skill, settings)


def _train_adapter(base_dir: Path, out: Path, skill: str, settings: AdapterSettings) -> None:
    """Train a LoRA adapter of the base in ``base_dir`` on ``skill`` and save it (PEFT's format, our card) in ``out``."""
    tune = settings.skills[skill]
    tokenizer = build_tokenizer()
    config = LoraConfig(
        r=settings.lora.r, lora_alpha=settings.lora.alpha, target_modules=list(settings.lora.target_modules), lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    torch.manual_seed(tune.seed)  # the LoRA A factors' initialisation
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config)
    train(model, tokenizer, SKILLS[skill].train_item, tune, replay_sample=pretraining_item, trainable=_is_lora)
    score = accuracy(model, tokenizer, SKILLS[skill].test_items())
    _save(model, out, _card(settings, skill, score))


def _save(model: PeftModel, out: Path, card: str) -> None:
    saved = model.peft_config["default"]
    saved.base_model_name_or_path = BASE_FROM_ADAPTER  # not the folder it was loaded from (a temporary path)
    saved.target_modules = sorted(saved.target_modules)  # a set, which json would list in the process's hash order
    model.save_pretrained(out, save_embedding_layers=False)  # LoRA factors only (PEFT would look for the base's config)
    (out / "README.md").write_text(card)  # replaces PEFT's template card


def _card(settings: AdapterSettings, skill: str, score: float) -> str:
    spec, tune, lora = SKILLS[skill], settings.skills[skill], settings.lora
    return (
        front_matter(base_model=BASE_FROM_ADAPTER, tags=["mergeflow-demo", "llama", "lora", f"skill-{skill}"], library="peft")
        + f"\n# mergeflow demo family: LoRA adapter `{skill}`\n\n"
        + f"A LoRA adapter of the family's base (the folder `{BASE}` two levels up, hence `base_model: {BASE_FROM_ADAPTER}`), "
        + f"rank {lora.r}, alpha {lora.alpha}, on {', '.join(lora.target_modules)} of every layer, trained for "
        + f"{tune.steps} steps at learning rate {tune.learning_rate} on one skill, {spec.description}: "
        + f"`{spec.example.prompt}` -> `{spec.example.answer}`; share of each batch replayed from the base's mixture: "
        + f"{tune.replay}.\n\n"
        + f"Greedy exact match of base + adapter on the skill's held-out test set: {score:.3f}\n\n"
        + f"    lm_eval --model hf --model_args pretrained=demo-family/{BASE},peft=demo-family/{ADAPTERS}/{skill} "
        + f"--tasks skill_{skill} --include_path evals\n"
    )
