"""The documents' contract: the README is a manual of at most 250 lines that opens with exactly two
set-up commands (the main job on a built-in default, the whole test suite), and every file path the
documents name exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def test_readme_is_a_manual_of_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_readme_opens_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first and text.index(first.group(0)) < text.index("\n## ")  # before the first section
    commands = [line.split("#")[0].strip() for line in first.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0].startswith("pip install -e . && shardwise plan ")
    assert commands[1] == "bash .ci/run" and (ROOT / ".ci" / "run").exists()


def test_every_path_the_documents_name_exists():
    missing = []
    for doc in DOCS:
        for path in re.findall(
            r"`((?:shardwise|tests|benchmarks|examples|docs)/[\w./-]+?\.(?:py|toml|md|png))`", doc.read_text()
        ):
            if not (ROOT / path).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
        for link in re.findall(r"\]\(((?!https?:)[^)#]+)", doc.read_text()):
            if not (doc.parent / link).exists():
                missing.append(f"{doc.relative_to(ROOT)}: link {link}")
    assert not missing, missing
