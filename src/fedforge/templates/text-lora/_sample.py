"""Federated LoRA: a language model's adapters fine-tuned on each site's own text (MiniLM).

The sample data is the text the simulation trains on, written as three deployed sites' files:
the docstrings of ten Python standard-library packages, labelled by package, split into three
sites by module (every docstring of a module on one site, so the sites' label mixes differ).
``data/site<k>.jsonl`` holds site k's share, one ``{"label": ..., "text": ...}`` per line:
what ``fedforge client --data`` reads. The split is fixed (by each text's SHA-256).
"""

from __future__ import annotations

from pathlib import Path

SITES = 3  # [lora] clients in fedforge.toml


def write(project: Path) -> list[Path]:
    """Write ``project/data/site<k>.jsonl`` for the three sites (no extra needed)."""
    from fedforge.llm.sites import write_site_file

    folder = project / "data"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(SITES):
        path = folder / f"site{k + 1}.jsonl"
        write_site_file(path, "classify", SITES, k)
        written.append(path)
    return written
