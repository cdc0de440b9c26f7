"""Build python_docs_sentences.txt: English sentences from CPython's own documentation.

Sources, both shipped with every CPython 3.11 install and licensed under the
PSF License Agreement (Python Software Foundation License, version 2):

* ``pydoc_data.topics``: the language reference topics ``help()`` shows;
* the docstrings of the pure-Python standard library modules listed below.

The corpus is regenerated with ``python examples/data/make_python_docs_corpus.py``
and is deterministic for a given CPython version (the committed file was made
with CPython 3.11). It exists so that text models can be calibrated, pruned
and evaluated on real prose without any download.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

MODULES = (
    "abc argparse ast asyncio bisect calendar codecs collections concurrent.futures configparser contextlib copy csv "
    "dataclasses datetime decimal difflib email enum fnmatch fractions functools getopt gettext glob gzip hashlib heapq "
    "hmac html http.client http.server imaplib inspect io ipaddress itertools json logging mailbox mimetypes netrc "
    "numbers operator optparse os pathlib pickle pkgutil platform plistlib poplib pprint queue random re sched secrets "
    "selectors shelve shlex shutil smtplib socket socketserver sqlite3 ssl statistics string struct subprocess "
    "tarfile tempfile textwrap threading timeit tokenize trace traceback types typing unittest urllib.parse "
    "urllib.request uuid warnings weakref wave xml.dom.minidom xml.etree.ElementTree zipfile zipimport"
).split()
BAD = re.compile(r"[<>*|=\[\]{}_`#~\\]|::|\(\)|https?:|\.\.\.|\$")


def texts():
    import pydoc_data.topics as topics

    for key in sorted(topics.topics):
        yield topics.topics[key]
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        yield inspect.getdoc(mod) or ""
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                yield inspect.getdoc(obj) or ""
                if inspect.isclass(obj):
                    for meth in sorted(vars(obj)):
                        fn = vars(obj)[meth]
                        if inspect.isfunction(fn):
                            yield inspect.getdoc(fn) or ""


def sentences():
    seen: set[str] = set()
    for text in texts():
        flat = re.sub(r"\s+", " ", text)
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            s = s.strip()
            if not (40 <= len(s) <= 220) or not s[0].isupper() or s[-1] not in ".!?" or s.count(" ") < 6:
                continue
            if BAD.search(s) or s in seen:
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
