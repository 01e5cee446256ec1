"""Text that ships with Python itself: the docstrings of the standard library's source files.

Always offline and deterministic given the Python version. Nothing is imported: every ``.py``
file under the interpreter's standard-library directory (``sysconfig.get_paths()["stdlib"]``)
is read as UTF-8 text and parsed with :mod:`ast`, and the docstrings of its module, classes and
functions (``ast.get_docstring``, indentation cleaned, ends stripped) are collected in sorted
path order.
Skipped: ``site-packages``/``dist-packages``, ``__pycache__``, test directories (``test``,
``tests``, ``idle_test``), directories whose names are not identifiers (``lib-dynload``,
``config-*``), private top-level modules (``_pydecimal``, ``_pyio``: copies of public modules'
docs), docstrings shorter than ``min_chars``, and exact duplicates (first kept).

Two tasks come from it:

- **classification**: each docstring labelled by its top-level package, over :data:`CLASSES`:
  the ten packages with the most docstrings on CPython 3.11 once packages that are optional
  in distributions (``tkinter``, ``idlelib``), removed in later versions (``distutils``,
  ``lib2to3``) or generated boilerplate (``encodings``) are left out;
- **next-token prediction**: one client per top-level module or package (its docstrings in
  file order), naturally non-IID like the per-speaker Shakespeare split of the FedAvg paper.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fedforge.core.errors import DataError

CLASSES = (
    "asyncio",
    "email",
    "http",
    "importlib",
    "logging",
    "multiprocessing",
    "unittest",
    "urllib",
    "wsgiref",
    "xml",
)
SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class Docstring:
    """One docstring: its top-level package or module, its module and qualified name."""

    package: str
    module: str
    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Docstrings of some top-level packages, with the Python version they come from and a
    SHA-256 digest of their content (modules, names, texts)."""

    python: str
    docstrings: tuple[Docstring, ...]
    digest: str

    def by_package(self) -> dict[str, list[Docstring]]:
        out: dict[str, list[Docstring]] = {}
        for d in self.docstrings:
            out.setdefault(d.package, []).append(d)
        return out


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def top_levels(root: Path | None = None) -> list[str]:
    """Public top-level modules and packages of the standard library, sorted."""
    root = root or stdlib_dir()
    names = set()
    for entry in root.iterdir():
        name = entry.name.removesuffix(".py") if entry.is_file() else entry.name
        public = name.isidentifier() and not name.startswith("_")
        if public and name not in SKIPPED_DIRS and (entry.suffix == ".py" or entry.is_dir()):
            names.add(name)
    return sorted(names)


def _source_files(root: Path, top: str) -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of every source file of one top-level name, sorted."""
    single = root / f"{top}.py"
    if single.is_file():
        yield top, single
        return
    for dirpath, dirnames, filenames in os.walk(root / top):
        dirnames[:] = sorted(d for d in dirnames if d.isidentifier() and d not in SKIPPED_DIRS)
        rel = Path(dirpath).relative_to(root).parts
        for file in sorted(f for f in filenames if f.endswith(".py")):
            stem = file.removesuffix(".py")
            yield ".".join(rel if stem == "__init__" else (*rel, stem)), Path(dirpath) / file


def _docstrings(module: str, path: Path) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) in source order; a file that does not parse yields none."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, DOC_NODES):
            doc = (ast.get_docstring(node, clean=True) or "").strip()
            if doc:
                yield prefix or module, doc
        for child in ast.iter_child_nodes(node):
            name = getattr(child, "name", None)
            if isinstance(child, DOC_NODES[1:]):
                yield from visit(child, f"{prefix or module}.{name}")
            elif not isinstance(child, ast.expr):
                yield from visit(child, prefix)

    yield from visit(tree, "")


def stdlib_corpus(tops: Iterable[str] | None = None, min_chars: int = 40) -> Corpus:
    """The docstrings of the given top-level names (default: all public ones); parsed once
    per process."""
    root = stdlib_dir()
    available = top_levels(root)
    wanted = available if tops is None else list(tops)
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise DataError(f"not in this Python's standard library ({root}): {', '.join(missing)}")
    return _parse(root, tuple(sorted(set(wanted))), min_chars)


@functools.lru_cache(maxsize=8)
def _parse(root: Path, tops: tuple[str, ...], min_chars: int) -> Corpus:
    seen: set[str] = set()
    docs: list[Docstring] = []
    digest = hashlib.sha256()
    for top in tops:
        for module, path in _source_files(root, top):
            for name, text in _docstrings(module, path):
                if len(text) < min_chars or text in seen:
                    continue
                seen.add(text)
                docs.append(Docstring(top, module, name, text))
                digest.update(f"{module}\0{name}\0{text}\0".encode())
    return Corpus(platform.python_version(), tuple(docs), digest.hexdigest())


@dataclass(frozen=True)
class LabelledTexts:
    """Texts, integer labels (index into ``classes``), and which texts are held out."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    test: tuple[bool, ...]
    python: str
    digest: str


def is_test_text(text: str, fraction: float) -> bool:
    """A stable split: the text's SHA-256 decides, so the split does not depend on order."""
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return value < fraction * 2**64


def classification_set(
    classes: tuple[str, ...] = CLASSES,
    min_chars: int = 40,
    test_fraction: float = 0.2,
    per_class: int | None = None,
) -> LabelledTexts:
    """Docstrings labelled by top-level package; ``per_class`` keeps at most that many of each
    (the first in file order) for small runs."""
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    corpus = stdlib_corpus(classes, min_chars)
    groups = corpus.by_package()
    texts: list[str] = []
    labels: list[int] = []
    for label, package in enumerate(classes):
        kept = groups.get(package, [])[:per_class]
        if len(kept) < 2:
            raise DataError(f"package {package!r} has too few docstrings ({len(kept)})")
        texts.extend(d.text for d in kept)
        labels.extend([label] * len(kept))
    test = tuple(is_test_text(t, test_fraction) for t in texts)
    return LabelledTexts(tuple(texts), tuple(labels), classes, test, corpus.python, corpus.digest)


@dataclass(frozen=True)
class ClientTexts:
    """Next-token clients: name -> text, with the Python version and corpus digest."""

    texts: dict[str, str]
    python: str
    digest: str


def next_token_clients(
    tops: Iterable[str] | None = None, min_chars: int = 40, min_client_chars: int = 2000
) -> ClientTexts:
    """One client per top-level module or package with at least ``min_client_chars`` of
    docstrings: its docstrings joined by blank lines, in file order."""
    corpus = stdlib_corpus(tops, min_chars)
    texts = {}
    for package, docs in corpus.by_package().items():
        text = "\n\n".join(d.text for d in docs)
        if len(text) >= min_client_chars:
            texts[package] = text
    if not texts:
        raise DataError(f"no module has {min_client_chars} characters of docstrings")
    return ClientTexts(texts, corpus.python, corpus.digest)
