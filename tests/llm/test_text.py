"""Python's own docstrings as federated text, and the token cache."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fedforge.core.errors import DataError
from fedforge.llm.stdlib_text import (
    CLASSES,
    classification_set,
    next_token_clients,
    stdlib_corpus,
    stdlib_dir,
)


def test_corpus_is_read_from_source_without_importing_anything() -> None:
    names = {"turtle", "antigravity", "wsgiref", "xmlrpc"}  # turtle imports tkinter

    def imported() -> set[str]:
        return {m for m in sys.modules if m.split(".")[0] in names}

    before = imported()
    assert not before & {"turtle", "antigravity"}
    corpus = stdlib_corpus(sorted(names))
    assert imported() == before
    assert len(corpus.docstrings) > 100 and {d.package for d in corpus.docstrings} == names
    from fedforge.llm.stdlib_text import _parse

    fresh = _parse.__wrapped__(stdlib_dir(), tuple(sorted(names)), 40)
    assert fresh == corpus and len(corpus.digest) == 64  # deterministic


def test_classification_set_is_labelled_by_package_with_a_stable_split() -> None:
    data = classification_set()
    counts = np.bincount(data.labels, minlength=len(CLASSES))
    assert data.classes == CLASSES and counts.min() >= 40 and counts.sum() == len(data.texts)
    assert 0.15 < np.mean(data.test) < 0.25
    assert data.python == ".".join(map(str, sys.version_info[:3]))
    assert len(set(data.texts)) == len(data.texts)  # duplicates dropped
    again = classification_set(per_class=5)
    assert again.texts == tuple(
        t for c in range(10) for t in np.array(data.texts)[np.array(data.labels) == c][:5]
    )
    kept = dict(zip(data.texts, data.test, strict=True))
    assert all(kept[t] == s for t, s in zip(again.texts, again.test, strict=True))


def test_no_docstring_comes_from_tests_or_private_modules() -> None:
    corpus = stdlib_corpus(["unittest", "email", "json"])
    modules = {d.module for d in corpus.docstrings}
    assert "unittest.case" in modules and "email.message" in modules
    assert not any(".test" in m or m.startswith("_") for m in modules)
    with pytest.raises(DataError, match="not in this Python"):
        stdlib_corpus(["no_such_package"])


def test_next_token_clients_are_one_per_module() -> None:
    clients = next_token_clients(["json", "base64", "this", "logging"], min_client_chars=1000)
    assert sorted(clients.texts) == ["base64", "json", "logging"]  # `this` has no docstring
    assert "JSON" in clients.texts["json"] and len(clients.digest) == 64


class CountingTokenizer:
    """The real tokenizer, counting calls."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.calls = inner, 0
        self.sep_token_id, self.pad_token_id = inner.sep_token_id, inner.pad_token_id

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_tokens_are_computed_once_and_cached_without_pickle(decoder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedforge.llm.tokens import TokenCache, encode_classification, encode_stream

    tok = CountingTokenizer(decoder.tokenizer)
    cache, where = TokenCache(tmp_path), decoder.spec.tokenizer_dir()
    texts = ["Return the JSON encoding.", "Parse a header line."]
    first = encode_classification(tok, texts, 16, cache, where)
    second = encode_classification(tok, texts, 16, cache, where)
    assert tok.calls == 1 and all(np.array_equal(first[k], second[k]) for k in first)
    assert first["ids"].shape == (2, 16) and first["mask"][0].sum() < 16
    (file,) = tmp_path.glob("*.npz")
    assert len(file.stem) == 64 and np.load(file, allow_pickle=False)["ids"].dtype == np.int32
    encode_classification(tok, texts, 12, cache, where)  # another length: another entry
    assert tok.calls == 2
    file.write_bytes(b"not an npz")  # a damaged entry is recomputed, not trusted
    again = encode_classification(tok, texts, 16, cache, where)
    assert tok.calls == 3 and np.array_equal(again["ids"], first["ids"])
    stream = encode_stream(
        tok, "one two three four five six seven\n\neight nine ten", 4, cache, where
    )
    assert (
        encode_stream(tok, "one two three four five six seven\n\neight nine ten", 4, cache, where)[
            "tokens"
        ].tolist()
        == stream["tokens"].tolist()
    )
    assert tok.calls == 4


def test_windows_predict_every_token_after_the_first_exactly_once() -> None:
    from fedforge.llm.tokens import IGNORE, next_token_batch, windows

    stream = np.arange(1, 12, dtype=np.int32)  # 11 tokens
    w = windows(stream, seq_len=4, pad=0)
    assert w["tokens"].shape == (3, 5)
    batch = next_token_batch(w["tokens"], w["valid"])
    targets = batch["labels"][batch["labels"] != IGNORE]
    assert targets.tolist() == stream[1:].tolist()
    assert (batch["ids"][batch["mask"] > 0][:4] == stream[:4]).all()
