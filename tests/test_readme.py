"""The README's method table is the one the method declarations generate."""
from __future__ import annotations

from pathlib import Path

from mergeflow.method_table import BEGIN, END, method_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_method_table_is_generated_from_the_registry() -> None:
    text = README.read_text()
    assert BEGIN in text and END in text, "README lost its generated method table markers"
    current = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert current == method_table(), "run: .venv/bin/python -m mergeflow.method_table and paste it into README.md"


def test_readme_starts_with_the_two_commands() -> None:
    # Right under the title, one bash block of exactly two commands (each with a comment): the main job, then the
    # tests; both scripts exist.
    lines = [line for line in README.read_text().splitlines() if line.strip()]
    assert lines[0].startswith("# ") and lines[1] == "```bash" and lines[4] == "```", lines[:5]
    commands = [line.split("#", 1)[0].strip() for line in lines[2:4]]
    assert commands == ["bash scripts/main.sh", "bash scripts/test.sh"], lines[2:4]
    assert all("#" in line for line in lines[2:4]), "each command says what it does"
    assert all((README.parent / command.split()[1]).is_file() for command in commands)
