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
    lines = [line for line in README.read_text().splitlines() if line.strip()]
    assert lines[1:5] == ["```bash", lines[2], lines[3], "```"]
    assert lines[2].startswith("bash scripts/main.sh") and lines[3].startswith("bash scripts/test.sh")
