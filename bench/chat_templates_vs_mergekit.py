"""Render mergeflow's built-in chat templates and mergekit's files of the same names over a set of conversations
and compare the prompts (transformers' renderer, as ``apply_chat_template`` uses it).

mergekit is not a dependency: point ``--mergekit-templates`` at its ``mergekit/_data/chat_templates`` folder, e.g.::

    .venv/bin/python bench/chat_templates_vs_mergekit.py \\
        --mergekit-templates /work/mk-venv/lib/python3.11/site-packages/mergekit/_data/chat_templates

Prints a markdown table (per template: conversations x generation prompt on/off, how many prompts are equal,
how many both refuse) and exits 1 when any prompt differs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

from merge_ops.chat_templates import BUILT_IN


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


CONVERSATIONS = [
    [_message("user", "Hi there")],
    [_message("system", " Be brief. "), _message("user", " What is 2+2? "), _message("assistant", "4\n")],
    [_message("user", "a"), _message("assistant", "b"), _message("user", "c")],
    [_message("user", "Summarise"), _message("user_context", "text here"), _message("assistant", "ok")],
    [_message("system", "S1"), _message("system", "S2"), _message("user", "u")],
    [_message("assistant", "hello"), _message("user", "u")],
    [_message("user", "a"), _message("system", "late")],
    [_message("system", "only")],
    [_message("user", "x"), _message("assistant", "y"), _message("tool", "z")],
    [_message("system", "s"), _message("assistant", "first")],
    [_message("user", "  padded\n\n"), _message("assistant", "  reply  ")],
    [],
]
SPECIAL_TOKENS = ({"bos_token": "<s>", "eos_token": "</s>"}, {})
"""With BOS/EOS, and without (templates that need them must fail in both tools)."""


def _render(template: str, messages: list[dict[str, str]], generation_prompt: bool, tokens: dict[str, str]) -> str:
    try:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=generation_prompt, **tokens)
        return str(rendered[0])
    except Exception as err:  # a template may refuse a conversation; both tools must then refuse it
        return f"<refused: {type(err).__name__}>"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit-templates", type=Path, required=True, help="mergekit's _data/chat_templates folder")
    args = parser.parse_args()
    print("| template | prompts | equal | refused by both |\n|---|---|---|---|")
    differing = 0
    for name, ours in BUILT_IN.items():
        theirs = (args.mergekit_templates / f"{name}.jinja").read_text()
        pairs = [
            (_render(theirs, c, g, t), _render(ours, c, g, t))
            for c in CONVERSATIONS for g in (False, True) for t in SPECIAL_TOKENS
        ]
        equal = sum(a == b for a, b in pairs)
        refused = sum(a == b and a.startswith("<refused") for a, b in pairs)
        differing += len(pairs) - equal
        print(f"| {name} | {len(pairs)} | {equal} | {refused} |")
        for a, b in pairs:
            if a != b:
                print(f"  mergekit {a!r}\n  mergeflow {b!r}", file=sys.stderr)
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
