"""A deployed site's own text: the file `fedforge client fedforge.toml --data FILE` reads.

With [lora], fedforge reads the text itself (data.loader cannot be set with [lora]): in
simulation each site holds its share of Python's docstrings; deployed, each site brings one
file of JSON lines {"label": "<package>", "text": "..."} (classification; for
model = "gpt2-small", plain UTF-8 text). The labels are the classes of the model's head, the
ten packages in LABELS. write_site writes your labelled texts in that format; check_site reads
a file exactly as the client will (python data.py FILE...), so a bad line is found before the
site joins."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from fedforge.llm.sites import read_site_file
from fedforge.llm.stdlib_text import CLASSES

LABELS = CLASSES  # the head's classes, in order


def write_site(rows: Iterable[tuple[str, str]], path: Path) -> Path:
    """Write (label, text) pairs as a site's file; a label outside LABELS is refused."""
    lines = []
    for label, text in rows:
        if label not in LABELS:
            raise ValueError(f"label {label!r} is not one of {', '.join(LABELS)}")
        lines.append(json.dumps({"label": label, "text": text}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def check_site(path: Path) -> Counter[str]:
    """The texts per label of a site's file, read as the deployed client reads it."""
    items = read_site_file(path, "classify")
    assert isinstance(items, list)
    return Counter(LABELS[label] for _, label in items)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        counts = check_site(Path(name))
        print(
            f"{name}: {sum(counts.values())} texts, "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        )
