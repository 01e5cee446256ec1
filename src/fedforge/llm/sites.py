"""Python's docstrings as federated sites, and a deployed site's own text file.

- **classify**: docstrings of the ten packages of :data:`~fedforge.llm.stdlib_text.CLASSES`,
  labelled by package. A stable 20% (by each text's SHA-256) is the central test set; the
  rest goes to ``clients`` sites **by module**: every docstring of a module lands on the site
  its module name hashes to, so sites hold whole modules (non-IID: a site's label mix is that
  of its modules).
- **next_token**: one site per package (``CLASSES[:clients]``), its docstrings in file order,
  like the per-speaker Shakespeare split of the FedAvg paper; each site's last 20% of text
  windows are its share of the central test set.

A deployed site reads its own file instead (:func:`read_site_file`): a UTF-8 text file
(next_token), or JSON lines ``{"label": "<package>", "text": "..."}`` (classify);
:func:`write_site_file` writes simulation site ``index``'s share in that format.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedforge.core.errors import DataError
from fedforge.llm.stdlib_text import CLASSES, is_test_text, next_token_clients, stdlib_corpus

TEST_FRACTION = 0.2
MAX_SITE_FILE = 64 << 20  # bytes: a larger site file is refused before it is read

LabelledText = tuple[str, int]


def _site_of(module: str, clients: int) -> int:
    return int.from_bytes(hashlib.sha256(module.encode()).digest()[:8], "big") % clients


def classify_split(clients: int) -> tuple[list[list[LabelledText]], list[LabelledText]]:
    """(per site: (text, label) in file order; the central test set)."""
    sites: list[list[LabelledText]] = [[] for _ in range(clients)]
    test: list[LabelledText] = []
    for d in stdlib_corpus(CLASSES).docstrings:
        item = (d.text, CLASSES.index(d.package))
        if is_test_text(d.text, TEST_FRACTION):
            test.append(item)
        else:
            sites[_site_of(d.module, clients)].append(item)
    return sites, test


def next_token_texts(clients: int) -> list[str]:
    """One text per site: the docstrings of ``CLASSES[i]``."""
    if not 1 <= clients <= len(CLASSES):
        raise DataError(f"next-token sites are packages: 1 to {len(CLASSES)} clients")
    texts = next_token_clients(CLASSES).texts
    return [texts[package] for package in CLASSES[:clients]]


def read_site_file(path: Path, task: str) -> list[LabelledText] | str:
    """A deployed site's own data: its text (next_token) or labelled texts (classify)."""
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size > MAX_SITE_FILE:
        raise DataError(f"{path}: larger than {MAX_SITE_FILE >> 20} MiB")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if task == "next_token":
        if not text.strip():
            raise DataError(f"{path}: no text")
        return text
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}, line {number}: not JSON") from None
        if (
            not isinstance(row, dict)
            or row.get("label") not in CLASSES
            or not isinstance(row.get("text"), str)
        ):
            raise DataError(
                f'{path}, line {number}: need {{"label": one of {", ".join(CLASSES)}, '
                '"text": "..."}'
            )
        items.append((row["text"], CLASSES.index(row["label"])))
    if not items:
        raise DataError(f"{path}: no labelled texts")
    return items


def write_site_file(path: Path, task: str, clients: int, index: int) -> None:
    """Write simulation site ``index``'s share (of ``clients``) as a deployed site's file."""
    if task == "next_token":
        path.write_text(next_token_texts(clients)[index], encoding="utf-8")
        return
    rows = classify_split(clients)[0][index]
    lines = [json.dumps({"label": CLASSES[label], "text": text}) for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
