"""Federated LoRA deployed on loopback: a server and two `fedforge client CONFIG --data FILE`
processes (each loads its base and text from its own disk) train a small GPT-2's adapters for
two rounds; only the adapters travel (bytes match the formula, the server's checkpoint holds
no base weight); a client whose base differs is refused in the handshake naming both
SHA-256 digests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.llm.conftest import need_extra
from tests.net.helpers import fedforge, free_port, make_keys, stop_all, wait_for_port

pytestmark = pytest.mark.timeout(300)

CONFIG = """
seed = 1
[lora]
model = "gpt2-small"
rank = 2
alpha = 4.0
clients = 2
seq_len = 12
examples = 4
test_examples = 4
decoder_layers = 2
decoder_width = 32
decoder_heads = 2
[client]
epochs = 1
batch_size = 2
lr = 0.1
[server]
rounds = 2
clients_per_round = 2
[deploy]
address = "127.0.0.1:{port}"
keys = "{keys}"
state_dir = "{state}"
min_clients = 2
round_timeout_s = 120
linger_s = 0
client_data = "own"
"""


def test_lora_deployment_sends_adapters_only_and_refuses_another_base(tmp_path: Path) -> None:
    need_extra()
    from fedforge.config import load_config
    from fedforge.llm.sites import write_site_file
    from fedforge.llm.workload import LoraSetup, lora_pairs
    from fedforge.runtime.checkpoint import CheckpointStore

    keys = make_keys(tmp_path, ["site0", "site1", "rogue"])
    port = free_port()
    config = tmp_path / "lora.toml"
    config.write_text(CONFIG.format(port=port, keys=keys, state=tmp_path / "state"))
    rogue = tmp_path / "rogue.toml"  # another seed: another randomly initialized base
    rogue.write_text(config.read_text().replace("seed = 1", "seed = 2"))
    for i in range(2):
        write_site_file(tmp_path / f"site{i}.txt", "next_token", 2, i)

    def client(name: str, conf: Path, data: str) -> subprocess.Popen[bytes]:
        args = ["client", str(conf), "--server", f"127.0.0.1:{port}"]
        args += ["--credentials", str(keys / name), "--data", str(tmp_path / data)]
        return fedforge(args, tmp_path / f"{name}.log")

    server = fedforge(["server", str(config)], tmp_path / "server.log")
    procs = [server]
    try:
        wait_for_port(port, timeout=240)
        refused = client("rogue", rogue, "site0.txt")  # first: the run waits for two sites
        procs.append(refused)
        assert refused.wait(timeout=240) == 1, (tmp_path / "rogue.log").read_text()[-3000:]
        clients = [client(f"site{i}", config, f"site{i}.txt") for i in range(2)]
        procs += clients
        assert server.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for i, c in enumerate(clients):
            assert c.wait(timeout=60) == 0, (tmp_path / f"site{i}.log").read_text()[-3000:]
    finally:
        stop_all(procs)
    rogue_log = (tmp_path / "rogue.log").read_text()
    assert "architecture mismatch" in rogue_log and "Traceback" not in rogue_log
    assert rogue_log.count("frozen weights sha256 ") == 2  # both digests, server's and its own

    setup = LoraSetup.of(load_config(config))
    pairs = lora_pairs(setup)
    saved = CheckpointStore(tmp_path / "state").load()
    assert saved is not None
    state, history = saved.state, saved.history
    assert set(state.params) == {n for p in pairs for n in (p.a, p.b)}  # adapters only
    per_client = 4 * sum(state.params[p.a].size + state.params[p.b].size for p in pairs)
    for record in history[1:]:
        assert record.clients_completed == 2
        assert record.bytes_up == record.bytes_down == 2 * per_client
