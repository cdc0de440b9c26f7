"""Build python_docs_sentences.txt: English sentences from CPython's own documentation.

Sources, both shipped with every CPython 3.11 install and licensed under the
PSF License Agreement (Python Software Foundation License, version 2):

* ``pydoc_data.topics``: the language reference topics ``help()`` shows;
* the docstrings of the standard library's Python sources (read with ``ast``,
  nothing is imported; the test suites, IDLE and lib2to3 are left out).

The corpus is regenerated with ``python examples/data/make_python_docs_corpus.py``
and is deterministic for a given CPython version (the committed file was made
with CPython 3.11). It exists so that text models can be calibrated, pruned
and evaluated on real prose without any download.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "__pycache__"}
BAD = re.compile(r"[<>*|=\[\]{}_`#~\\]|::|\(\)|https?:|\.\.\.|\$")
PERSONAL = re.compile(r"[\w.-]+@[\w-]+\.\w|[Cc]opyright|[Rr]ights [Rr]eserved|[Ww]ritten by")  # no e-mail addresses or credits


def texts():
    import pydoc_data.topics as topics

    for key in sorted(topics.topics):
        yield topics.topics[key]
    root = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    for path in sorted(root.rglob("*.py")):
        if set(path.relative_to(root).parts) & SKIP_DIRS:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield ast.get_docstring(node) or ""


def sentences():
    seen: set[str] = set()
    for text in texts():
        flat = re.sub(r"\s+", " ", text)
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            s = s.strip()
            if not (40 <= len(s) <= 220) or not s[0].isupper() or s[-1] not in ".!?" or s.count(" ") < 6:
                continue
            if BAD.search(s) or PERSONAL.search(s) or s in seen:
                continue
            seen.add(s)
            yield s


def main() -> None:
    out = Path(__file__).with_name("python_docs_sentences.txt")
    lines = list(sentences())
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} sentences to {out} (CPython {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
