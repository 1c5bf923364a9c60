"""Write each skill's held-out test set as JSONL (the files lm-eval's tasks in evals/ read).

Run ``python -m mergeflow.demo_family.test_sets evals/data`` to regenerate them; the output is the same
bytes every time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mergeflow.demo_family.skills import SKILLS


def write_test_sets(out_dir: Path) -> dict[str, Path]:
    """Write ``out_dir/<skill>.jsonl`` (one ``{"prompt", "answer"}`` object a line) for every skill.

    Returns:
        The written file of each skill, by skill name.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, skill in SKILLS.items():
        lines = (json.dumps({"prompt": item.prompt, "answer": item.answer}) for item in skill.test_items())
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(f"{line}\n" for line in lines))
        written[name] = path
    return written


if __name__ == "__main__":
    for skill_name, file in write_test_sets(Path(sys.argv[1] if len(sys.argv) > 1 else "evals/data")).items():
        print(f"{skill_name}: {file}")
