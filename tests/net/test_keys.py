import stat
from pathlib import Path

import pytest

from fedforge.net.keys import (
    CredentialsError,
    ServerCredentials,
    add_client,
    certificate_identity,
    init_keys,
    revoke_client,
)


def test_keys_layout_permissions_and_revocation(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys, ["localhost", "127.0.0.1"])
    add_client(keys, "alice", keys / "alice")
    for private in [keys / "ca.key", keys / "server.key", keys / "alice" / "client.key"]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    name, serial = certificate_identity((keys / "alice" / "client.crt").read_bytes())
    assert name == "alice"
    creds = ServerCredentials.load(keys)
    assert creds.clients == {"alice": serial} and serial not in creds.revoked
    assert revoke_client(keys, "alice") == serial
    assert serial in ServerCredentials.load(keys).revoked
    with pytest.raises(CredentialsError, match="already exists"):
        add_client(keys, "alice", keys / "alice2")
    with pytest.raises(CredentialsError, match="already holds a CA"):
        init_keys(keys, ["localhost"])
    with pytest.raises(CredentialsError, match="client name"):
        add_client(keys, "../evil", keys / "evil")
