"""Regenerate the recipe reference in README.md from the schema.

Run ``python -m edgekit.docs``; a test fails when the README is stale.
"""

from __future__ import annotations

from pathlib import Path

from edgekit import fsio
from edgekit.recipe import schema_reference

START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def update_readme(readme: Path) -> bool:
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    new = f"{head}{START}\n{schema_reference().strip()}\n{END}{tail}"
    if new != text:
        fsio.write_text(readme, new)
        return True
    return False


if __name__ == "__main__":
    changed = update_readme(Path(__file__).resolve().parent.parent / "README.md")
    print("README.md updated" if changed else "README.md already up to date")
