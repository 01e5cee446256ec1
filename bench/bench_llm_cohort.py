"""One round of federated LoRA: batched cohort vs sequential vs one model copy per client.

Workload: 10 clients, each 16 examples of real text (Python's own docstrings), one local
epoch of SGD at ``--batch-size`` (default 8: 2 steps per client), LoRA rank 8 on the
attention projections. ``classify``: the packaged all-MiniLM-L6-v2 (22.7M parameters) with a
10-way head, ``--seq-len`` tokens per text (default 64), one client per package.
``next_token``: the default GPT-2 configuration (about 5M parameters, MiniLM's vocabulary),
``--seq-len``-token windows, one client per module.

Contenders, on identical starts and batches:
- ``batched``: ``train_batched``, the cohort as one program over the one shared base;
- ``sequential``: ``train_sequential``, one client after another on the one shared base;
- ``copies``: one model (base and adapters) per client, each client trained on its own copy
  (what a framework that instantiates the model per client holds in memory).

Timing: one process, ``torch.set_num_threads(1)``, contenders interleaved, the median over
``--repeats`` rounds of CPU seconds (``time.process_time``) and wall seconds. Memory: one
process per contender (new session, ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave
the resident set), the peak resident memory above the process's state after imports and
data preparation, over model loading and one round.

    python -m bench.bench_llm_cohort [--clients 10] [--repeats 5] [--batch-size 8] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

MODES = ("batched", "sequential", "copies")


def status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


SIZES = {"batch_size": 8, "seq_len": 64}  # set from the command line


def workload(task: str, clients: int):  # type: ignore[no-untyped-def]
    """The spec, each client's tokenized data and the local program (no model loaded)."""
    from fedforge.llm.batched import TextData, text_loss
    from fedforge.llm.models import LoraModelSpec, load_tokenizer
    from fedforge.llm.stdlib_text import CLASSES, classification_set, next_token_clients
    from fedforge.llm.tokens import (
        TokenCache,
        encode_classification,
        encode_stream,
        next_token_batch,
    )
    from fedforge.train.program import LocalProgram, LocalSGD

    spec = LoraModelSpec(task, num_labels=len(CLASSES), rank=8)  # type: ignore[arg-type]
    tokenizer_dir = spec.tokenizer_dir()
    tokenizer = load_tokenizer(spec)
    cache = TokenCache(None)
    datas = []
    if task == "classify":
        data = classification_set(per_class=16)
        enc = encode_classification(tokenizer, data.texts, SIZES["seq_len"], cache, tokenizer_dir)
        labels = np.asarray(data.labels)
        for c in range(clients):
            rows = np.flatnonzero(labels == c % len(CLASSES))[:16]
            datas.append(TextData(enc["ids"][rows], enc["mask"][rows], labels[rows]))
    else:
        texts = next_token_clients().texts
        for name in sorted(texts)[:clients]:
            w = encode_stream(tokenizer, texts[name], SIZES["seq_len"], cache, tokenizer_dir)
            b = next_token_batch(w["tokens"][:16], w["valid"][:16])
            datas.append(TextData(b["ids"], b["mask"], b["labels"]))
    program = LocalProgram(
        LocalSGD(lr=0.05, epochs=1, batch_size=SIZES["batch_size"], loss_fn=text_loss)
    )
    return spec, datas, program


def round_fn(mode: str, task: str, clients: int) -> tuple[Callable[[], None], int]:
    """A function that trains one round in ``mode``, and the bytes of the base."""
    from fedforge.llm.adapters import get_adapters, load_lora_model
    from fedforge.llm.batched import train_batched, train_sequential
    from fedforge.llm.memory import base_bytes

    spec, datas, program = workload(task, clients)
    lm = load_lora_model(spec)
    start, trained = get_adapters(lm), list(lm.layout.spec())
    models = [load_lora_model.__wrapped__(spec) for _ in range(clients)] if mode == "copies" else []

    def rngs() -> list[np.random.Generator]:
        return [np.random.default_rng(i) for i in range(clients)]

    def run() -> None:
        if mode == "batched":
            train_batched(lm, program, [start] * clients, datas, rngs(), trained)
        else:
            for i, (data, rng) in enumerate(zip(datas, rngs(), strict=True)):
                model = models[i] if models else lm
                train_sequential(model, program, start, data, rng, trained)

    return run, base_bytes(lm)


def time_contenders(task: str, clients: int, repeats: int) -> dict[str, dict[str, float]]:
    import torch

    torch.set_num_threads(1)
    runs = {mode: round_fn(mode, task, clients)[0] for mode in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    wall: dict[str, list[float]] = {m: [] for m in MODES}
    for mode in MODES:
        runs[mode]()  # warm-up
    for _ in range(repeats):
        for mode in MODES:
            c0, w0 = time.process_time(), time.perf_counter()
            runs[mode]()
            cpu[mode].append(time.process_time() - c0)
            wall[mode].append(time.perf_counter() - w0)
    return {
        m: {"cpu_s": statistics.median(cpu[m]), "wall_s": statistics.median(wall[m])} for m in MODES
    }


def memory_of(mode: str, task: str, clients: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    workload(task, clients)  # imports, tokenizer and data: the baseline
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS:")
    run, base = round_fn(mode, task, clients)
    loaded = status("VmRSS:") - before
    run()
    return {
        "peak_mib": (status("VmHWM:") - before) / 2**20,
        "loaded_mib": loaded / 2**20,
        "base_mib": base / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", nargs="+", default=["classify", "next_token"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--worker", nargs=3, metavar=("WHAT", "MODE", "TASK"))
    args = parser.parse_args()
    SIZES.update(batch_size=args.batch_size, seq_len=args.seq_len)
    if args.worker:
        what, mode, task = args.worker
        result = (
            time_contenders(task, args.clients, args.repeats)
            if what == "time"
            else memory_of(mode, task, args.clients)
        )
        print(json.dumps(result))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}

    def worker(*argv: str) -> dict[str, object]:
        cmd = [
            sys.executable,
            "-m",
            "bench.bench_llm_cohort",
            "--clients",
            str(args.clients),
            "--repeats",
            str(args.repeats),
            "--batch-size",
            str(args.batch_size),
            "--seq-len",
            str(args.seq_len),
            "--worker",
            *argv,
        ]
        out = subprocess.run(
            cmd, capture_output=True, text=True, env=env, check=True, start_new_session=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    print(
        f"| task | contender | round CPU s | round wall s | CPU vs batched | peak MiB | "
        f"models MiB |  ({args.clients} clients, batch {args.batch_size}, {args.seq_len} tokens, "
        f"median of {args.repeats})"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for task in args.tasks:
        times = worker("time", "-", task)
        for mode in MODES:
            mem = worker("memory", mode, task)
            t = times[mode]  # type: ignore[index]
            ratio = t["cpu_s"] / times["batched"]["cpu_s"]  # type: ignore[index]
            print(
                f"| {task} | {mode} | {t['cpu_s']:.2f} | {t['wall_s']:.2f} | {ratio:.2f}x | "
                f"{mem['peak_mib']:.0f} | {mem['loaded_mib']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
