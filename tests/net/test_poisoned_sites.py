"""A site that poisons its updates and lies about its sizes, against a real server process
with honest sites of very different sizes: the poison is refused, the honest sites are
clamped (never rejected) and the run reaches their accuracy."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedforge.core.records import EVALUATE, FIT
from fedforge.data.datasets import load_digits
from fedforge.net.codec import Reassembler, decode_params, encode_params, split_payload
from fedforge.net.proto import fedforge_pb2 as pb
from tests.net.helpers import (
    PATIENCE,
    CraftedClient,
    base_architecture,
    free_port,
    make_keys,
    start_server,
    stop_all,
    stored_history,
    wait_for_port,
    wait_for_run,
    write_config,
)
from tests.net.hostile_sites import start_sites

pytestmark = pytest.mark.timeout(PATIENCE * 300)
HOLDOUT_CLAIM = 10_000_000


class Poisoner(CraftedClient):
    """Declares 1 training example and 10^7 held-out ones; sends an update of norm 1e37 in
    round 1 and a crafted delta of norm 5 in round 2 (finite: validation passes both), and
    claims accuracy 1.0 on its 10^7 held-out examples."""

    def __init__(self, port: int, creds: Path) -> None:
        super().__init__(port, creds, declared=1)
        self.rounds: list[int] = []

    def serve(self) -> None:
        assemblers: dict[bytes, Reassembler] = {}
        try:
            for message in self.stream:
                kind = message.WhichOneof("body")
                if kind == "welcome":
                    self.run_id = message.envelope.run_id
                    hello = pb.Hello(
                        num_examples=1,
                        holdout_examples=HOLDOUT_CLAIM,
                        architecture=base_architecture(),
                    )
                    hello.protocol_version = self._version()
                    self.out.put(pb.ClientMessage(hello=hello))
                elif kind == "task":
                    task = message.task
                    assembler = assemblers.setdefault(task.task_id, Reassembler(1 << 30))
                    payload = assembler.add(task.chunk)
                    if payload is not None:
                        del assemblers[task.task_id]
                        self._answer(message.envelope.round, task, decode_params(payload))
                elif kind == "run_complete":
                    break
        except grpc.RpcError:
            pass
        self.done.set()
        self.out.put(None)

    def _version(self) -> int:
        from fedforge.net.service import PROTOCOL_VERSION

        return PROTOCOL_VERSION

    def _answer(self, round_number: int, task: pb.TaskChunk, shared: dict[str, np.ndarray]) -> None:
        if task.stage == EVALUATE:
            reply = {"n": HOLDOUT_CLAIM, "metrics": {"accuracy": 1.0, "loss": 0.0}, "arrays": {}}
        else:
            assert task.stage == FIT
            self.rounds.append(round_number)
            arrays = {k: np.zeros_like(v) for k, v in shared.items()}
            size = sum(a.size for a in arrays.values())
            for name, values in arrays.items():
                if round_number == 1:  # norm 1e37, every value finite in float32
                    values[...] = 1e37 / math.sqrt(size)
                elif round_number == 2 and name.endswith("0.bias"):  # kill the hidden units
                    values[...] = -5 / math.sqrt(values.size)
            reply = {"n": 1, "metrics": {"train_loss": 0.1}, "arrays": arrays}
        for i, chunk in enumerate(split_payload(encode_params(reply["arrays"]))):
            self.out.put(
                pb.ClientMessage(
                    envelope=self.envelope(round_number),
                    reply=pb.ReplyChunk(
                        stage=task.stage,
                        num_examples=reply["n"] if i == 0 else 0,
                        metrics=reply["metrics"] if i == 0 else {},
                        chunk=chunk,
                        task_id=task.task_id,
                    ),
                )
            )


def test_poison_is_refused_and_large_honest_sites_are_clamped_not_rejected(
    tmp_path: Path,
) -> None:
    """Sites a and b train on their shares of the built-in data (about 70 examples each), big
    on 1000 of its own (800 trained on, 200 held out for federated evaluation, as a site's own
    file is split); b's operator figure (deploy.site_examples) is stale, 10. The median
    declaration (the liar's 1 included) is about 70: big counts at most 10 x that, b at most
    10: both clamped, both take part. The liar's poisoned rounds are refused and retried
    without it; its held-out claim is clamped too, and the per-site spread is reported."""
    names = ["a", "b", "big", "zz-liar"]
    keys = make_keys(tmp_path, names)
    port = free_port()
    train, _ = load_digits()
    own = tmp_path / "big.npz"
    np.savez(own, x=train.x[:1000], y=train.y[:1000])
    cfg = write_config(
        tmp_path,
        keys,
        port,
        rounds=2,
        clients=20,  # the built-in partition: a and b get small shares
        min_clients=4,
        timeout=60 * PATIENCE,
        server_extra='sampler = "poisson"\nsampling_rate = 1.0',
        uniform=False,
        deploy_extra='client_data = "own"\nsite_examples = { b = 10 }',
        extra="[evaluation]\nfraction = 1.0\n",
    )
    server = start_server(cfg, tmp_path / "server.log")
    honest = ["a=honest", "b=honest", f"big=honest:{own}"]
    sites = start_sites(port, keys, tmp_path / "client-state", honest, tmp_path / "sites.log")
    log = tmp_path / "server.log"
    liar: Poisoner | None = None
    try:
        wait_for_port(port)
        liar = Poisoner(port, keys / "zz-liar")
        thread = threading.Thread(target=liar.serve, daemon=True)
        thread.start()
        assert wait_for_run(server, sites, 200 * PATIENCE) == 0, log.read_text()[-4000:]
        assert sites.wait(timeout=30 * PATIENCE) == 0, (tmp_path / "sites.log").read_text()[-4000:]
    finally:
        stop_all([server, sites])
        if liar is not None:
            liar.done.set()
            liar.out.put(None)
    history = stored_history(tmp_path / "state")
    _, b, big, bad = range(4)
    assert [r.round for r in history] == [0, 1, 2]
    assert liar.rounds[:2] == [1, 2]  # it sent both poisons, and neither was applied
    for record in history[1:]:
        assert record.clients["refused"] == [bad]
        assert record.clients_completed == 3 and record.clients_rejected == 0
        assert {big, b} <= set(record.clients["clamped"])  # counted at their caps
        assert record.clients["fed_eval_clamped"] == [bad]
        m = record.metrics
        assert m["fed_eval.accuracy.min"] <= m["fed_eval.accuracy.client_mean"] < 1.0
    assert history[-1].test_accuracy > 0.5  # the honest sites' model
    assert history[-1].metrics["fed_eval.accuracy"] < 0.99  # was 0.99999 before the caps
    text = log.read_text()
    assert "refused the aggregate (model unchanged): outlying updates (zz-liar" in text
    assert "client big declares 800 examples" in text and "(clamped, still taking part" in text
    assert "outside the allowed range" not in text  # nobody rejected for its size
    assert os.path.exists(tmp_path / "state" / "final_model.safetensors")
