"""Tokenized text as fixed-width integer arrays, computed once and cached on disk.

Two layouts, both right-padded (padding never changes what real tokens see):

- classification: ``ids`` and ``mask`` of shape ``(n, max_length)`` (``[CLS] ... [SEP]``,
  truncated), labels beside them;
- next-token: a client's text as one token stream cut into windows of ``seq_len + 1`` tokens
  with stride ``seq_len`` (every token after the first is a target exactly once); the last
  window is padded and ``valid`` marks real tokens. :func:`next_token_batch` turns windows
  into inputs and targets (``-100`` where nothing is predicted).

The cache holds ``.npz`` files written without pickle and read with ``allow_pickle=False``,
named by the SHA-256 of everything the arrays depend on (the texts, the tokenizer's files,
the ``transformers`` and Python versions, the layout and its lengths), so a file name is
never user input and a changed input never hits a stale entry. A cache file that fails
validation is recomputed and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedforge.llm.models import TOKENIZER_FILES, require

IGNORE = -100  # target of a position that predicts nothing (PyTorch's ignore_index)
TokenArrays = dict[str, np.ndarray]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedforge" / "tokens"


def tokenizer_digest(directory: Path) -> str:
    """SHA-256 of the tokenizer's files in ``directory`` (names and bytes)."""
    digest = hashlib.sha256()
    for name in sorted((*TOKENIZER_FILES, "special_tokens_map.json")):
        path = directory / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class TokenCache:
    """A directory of token arrays keyed by content; ``None`` directory disables caching."""

    directory: Path | None

    def key(self, **parts: object) -> str:
        payload = json.dumps(
            {
                "format": 1,
                "python": platform.python_version(),
                "transformers": require("transformers").__version__,
                **parts,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def get_or_compute(
        self, key: str, compute: Callable[[], TokenArrays], names: Sequence[str]
    ) -> TokenArrays:
        """The cached arrays of ``key`` if the file holds exactly ``names`` as integer arrays
        of one length; otherwise compute, store atomically, and return them."""
        if self.directory is None:
            return compute()
        path = self.directory / f"{key}.npz"
        cached = _read(path, names)
        if cached is not None:
            return cached
        arrays = compute()
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            save: Any = np.savez  # integer arrays only: nothing is pickled
            with os.fdopen(fd, "wb") as f:
                save(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return arrays


def _read(path: Path, names: Sequence[str]) -> TokenArrays | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if sorted(data.files) != sorted(names):
                return None
            arrays = {n: data[n] for n in names}
    except (OSError, ValueError, EOFError):
        return None
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1 or not all(np.issubdtype(a.dtype, np.integer) for a in arrays.values()):
        return None
    return arrays


def encode_classification(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    cache: TokenCache,
    tokenizer_dir: Path,
) -> TokenArrays:
    """``ids`` (int32) and ``mask`` (int8) of shape ``(len(texts), max_length)``."""

    def compute() -> TokenArrays:
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length)
        return {
            "ids": np.asarray(enc["input_ids"], np.int32).reshape(len(texts), max_length),
            "mask": np.asarray(enc["attention_mask"], np.int8).reshape(len(texts), max_length),
        }

    key = cache.key(
        layout="classify",
        max_length=max_length,
        tokenizer=tokenizer_digest(tokenizer_dir),
        texts=_texts_digest(texts),
    )
    return cache.get_or_compute(key, compute, ("ids", "mask"))


def encode_stream(
    tokenizer: Any, text: str, seq_len: int, cache: TokenCache, tokenizer_dir: Path
) -> TokenArrays:
    """A client's text as windows: ``tokens`` (int32) and ``valid`` (int8), shape
    ``(windows, seq_len + 1)``. Docstrings are separated by the tokenizer's [SEP]."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")

    def compute() -> TokenArrays:
        parts = tokenizer(text.split("\n\n"), add_special_tokens=False)["input_ids"]
        sep = tokenizer.sep_token_id
        stream: list[int] = []
        for part in parts:
            stream.extend([*part, sep] if sep is not None else part)
        return windows(np.asarray(stream, np.int32), seq_len, int(tokenizer.pad_token_id or 0))

    key = cache.key(
        layout="stream",
        seq_len=seq_len,
        tokenizer=tokenizer_digest(tokenizer_dir),
        texts=_texts_digest([text]),
    )
    return cache.get_or_compute(key, compute, ("tokens", "valid"))


def windows(stream: np.ndarray, seq_len: int, pad: int) -> TokenArrays:
    """Windows of ``seq_len + 1`` tokens at stride ``seq_len``; the last one padded."""
    count = max(1, -(-(len(stream) - 1) // seq_len))
    tokens = np.full((count, seq_len + 1), pad, np.int32)
    valid = np.zeros((count, seq_len + 1), np.int8)
    for i in range(count):
        chunk = stream[i * seq_len : i * seq_len + seq_len + 1]
        tokens[i, : len(chunk)] = chunk
        valid[i, : len(chunk)] = 1
    return {"tokens": tokens, "valid": valid}


def next_token_batch(tokens: np.ndarray, valid: np.ndarray) -> TokenArrays:
    """Inputs ``ids``/``mask`` and targets ``labels`` (``IGNORE`` where the next token is
    padding) from windows."""
    labels = np.where(valid[:, 1:] > 0, tokens[:, 1:], IGNORE).astype(np.int64)
    return {"ids": tokens[:, :-1], "mask": valid[:, :-1], "labels": labels}


def _texts_digest(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode()
        digest.update(len(encoded).to_bytes(8, "big") + encoded)
    return digest.hexdigest()
