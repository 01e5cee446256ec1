"""A deployed LoRA site's own file: what it reads, and one clear line for what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedforge.core.errors import DataError
from fedforge.llm.sites import classify_split, read_site_file, write_site_file
from fedforge.llm.stdlib_text import CLASSES


def test_a_written_site_file_reads_back_as_the_sites_share(tmp_path: Path) -> None:
    path = tmp_path / "site.jsonl"
    write_site_file(path, "classify", 3, 1)
    assert read_site_file(path, "classify") == classify_split(3)[0][1]
    sites, test = classify_split(3)
    assert all(sites) and test  # every site holds modules; a test split exists
    text = tmp_path / "site.txt"
    write_site_file(text, "next_token", 2, 0)
    assert isinstance(read_site_file(text, "next_token"), str)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not json\n", "line 1: not JSON"),
        (json.dumps({"label": "numpy", "text": "x"}).encode() + b"\n", "line 1: need"),
        (json.dumps({"label": CLASSES[0], "text": 3}).encode(), "line 1: need"),
        (b"\n\n", "no labelled texts"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_a_bad_site_file_is_refused_in_one_line(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "site.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=reason) as info:
        read_site_file(path, "classify")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="not a file"):
        read_site_file(tmp_path / "missing.txt", "next_token")
