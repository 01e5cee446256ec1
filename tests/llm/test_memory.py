"""The memory planner: estimate against a measured peak, and the refusal before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedforge.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_estimate_matches_the_measured_peak_of_a_batched_step(encoder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import transformers

    from fedforge.llm.memory import TOLERANCE

    # A small BERT (MiniLM's architecture and vocabulary, 2 layers of width 64) keeps it quick.
    config = transformers.BertConfig(
        vocab_size=encoder.tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    configs = ["classify:4:8:64", "next_token:2:4:32"]
    script = str(ROOT / "tests" / "llm" / "measure_peak.py")
    proc = subprocess.run(
        [sys.executable, script, str(tmp_path), *configs],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["measured"] > 5 * 2**20  # a real step: MiBs of activations
        assert abs(row["estimate"] - row["measured"]) <= TOLERANCE * row["measured"], row


def test_an_oversized_round_is_refused_with_the_estimate_and_what_to_lower(decoder) -> None:  # type: ignore[no-untyped-def]
    from fedforge.llm.batched import text_loss
    from fedforge.llm.memory import (
        available_memory,
        check_fits,
        estimate_memory,
        largest_cohort,
    )
    from fedforge.train.program import LocalProgram, LocalSGD

    program = LocalProgram(LocalSGD(momentum=0.9, loss_fn=text_loss))
    small = estimate_memory(decoder, program, clients=2, batch_size=4, seq_len=32)
    assert small.optimizer == small.adapters == small.gradients > 0
    check_fits(small, available_memory())  # fits: no error
    huge = estimate_memory(decoder, program, clients=100_000, batch_size=64, seq_len=32)
    sequences = (100_000 * 64) / (2 * 4)
    assert huge.activations == pytest.approx(small.activations * sequences, rel=0.01)
    with pytest.raises(ConfigError) as refused:
        check_fits(huge, available_memory())
    message = str(refused.value)
    assert "estimated peak" in message and "100000 client(s)" in message
    assert "lower the clients trained at once" in message and "batch_size (64)" in message
    # The largest cohort that fits a budget fits, and one more client does not.
    budget = 300 * 2**20
    most = largest_cohort(decoder, program, 4, 32, budget)
    assert most >= 2
    assert estimate_memory(decoder, program, most, 4, 32).training <= 0.9 * budget
    assert estimate_memory(decoder, program, most + 1, 4, 32).training > 0.9 * budget
