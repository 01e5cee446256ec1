"""Deployed sites built from the library, some with one secure-aggregation step overridden:
``python -m tests.net.hostile_sites SERVER KEYS STATE NAME=BEHAVIOUR[:DATA.npz] ...`` runs
one :class:`~fedforge.net.client.FederatedClient` per site over mutual TLS (as ``fedforge
client`` does, on its share of the built-in dataset or on ``DATA.npz``) until the run
completes; exits 0 when every site did. One process for all sites: one torch import.

Behaviours: ``honest``; ``sig`` (keys it did not sign), ``key`` (an all-zero key); and
``shifty``: garbage shares in round 1, crafted unmask shares in round 2, a crafted masked
input in the first attempt of round 3.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from subprocess import STDOUT, Popen
from typing import ClassVar

from cryptography import x509

from fedforge.config import RunConfig
from fedforge.core.records import Record, Task
from fedforge.net import worker as worker_module
from fedforge.net.client import FederatedClient
from fedforge.net.keys import ClientCredentials
from fedforge.net.site import LocalSite
from fedforge.secagg import crypto
from fedforge.secagg.client import SecAggClient
from fedforge.secagg.session import Identity, Session
from tests.secagg.hostile import BadSignature, CraftedInput, CraftedUnmask, GarbageShares, ZeroKey


class Shifty(GarbageShares, CraftedUnmask, CraftedInput):
    """A different trick in each round."""

    crafted: ClassVar[set[int]] = set()  # rounds whose masked input it crafted (once per round)

    def share(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        if task.round == 1:
            return GarbageShares.share(self, task, session)
        return SecAggClient.share(self, task, session)

    def unmask(self, task: Task, session: Session | None) -> Record:
        if task.round == 2:
            return CraftedUnmask.unmask(self, task, session)
        return SecAggClient.unmask(self, task, session)

    def mask(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        if task.round == 3 and task.round not in Shifty.crafted:
            Shifty.crafted.add(task.round)
            return CraftedInput.mask(self, task, session)
        return SecAggClient.mask(self, task, session)


BEHAVIOURS: dict[str, type[SecAggClient]] = {
    "honest": SecAggClient,
    "sig": BadSignature,
    "key": ZeroKey,
    "shifty": Shifty,
}


def start_sites(port: int, keys: Path, state: Path, sites: list[str], log: Path) -> Popen[bytes]:
    """This module as a process serving ``sites`` (``NAME=BEHAVIOUR[:DATA.npz]``)."""
    with open(log, "wb") as out:
        return Popen(
            [sys.executable, "-m", __name__, f"127.0.0.1:{port}", str(keys), str(state), *sites],
            cwd=Path(__file__).resolve().parents[2],
            stdout=out,
            stderr=STDOUT,
        )


def main(server: str, keys: Path, state: Path, sites: dict[str, str]) -> int:
    real = worker_module.secure_client

    def secure_client(config: RunConfig, identity: Identity | None) -> SecAggClient | None:
        honest = real(config, identity)
        if honest is None or identity is None:
            return honest
        name = crypto.certificate_name(x509.load_der_x509_certificate(identity.certificate_der))
        behaviour = BEHAVIOURS[sites[name].split(":")[0]]
        return behaviour(identity, withhold_metrics=honest.withhold_metrics)

    worker_module.secure_client = secure_client  # each site's secure side, by its name
    done: dict[str, int] = {}

    def serve(name: str) -> None:
        _, _, data = sites[name].partition(":")
        site = FederatedClient(
            server,
            ClientCredentials.load(keys / name),
            LocalSite(data=Path(data)) if data else None,  # its own file, else its share
            name=name,
            state_dir=state / name,
        )
        site.run()
        done[name] = 1

    threads = [threading.Thread(target=serve, args=(n,), name=n) for n in sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0 if len(done) == len(sites) else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(threadName)s %(message)s")
    pairs = dict(arg.split("=", 1) for arg in sys.argv[4:])
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), pairs))
