"""The architecture fingerprint: equal for the same architecture whatever its weights; the
first difference named for a shape, a dtype, a missing tensor or a data schema; a peer's
implausible listing refused (the deployment test checks the refusal in the handshake)."""

from __future__ import annotations

import torch

from fedforge.workload.fingerprint import MAX_ENTRIES, MAX_ENTRY_CHARS, fingerprint, received


def net(hidden: int = 8, norm: bool = False) -> torch.nn.Module:
    layers = [torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2)]
    if norm:
        layers.insert(1, torch.nn.BatchNorm1d(hidden))
    return torch.nn.Sequential(*layers)


def test_the_fingerprint_names_the_first_difference() -> None:
    torch.manual_seed(0)
    a = fingerprint(net(), {"labels": "B,M"})
    torch.manual_seed(1)
    assert fingerprint(net(), {"labels": "B,M"}) == a  # weights do not matter
    assert a.difference(fingerprint(net(), {"labels": "B,M"}), "server", "x") is None
    wide = fingerprint(net(hidden=16), {"labels": "B,M"})
    assert wide.digest != a.digest
    assert a.difference(wide, "the server", "site1") == (
        "the server has '0.weight float32 [8, 4]' where site1 has '0.weight float32 [16, 4]'"
    )
    double = fingerprint(net().double(), {"labels": "B,M"})
    assert "'0.weight float64 [8, 4]'" in str(a.difference(double, "s", "c"))
    swapped = fingerprint(net(), {"labels": "M,B"})  # same model, labels in another order
    assert a.difference(swapped, "s", "c") == (
        "s has 'schema labels = B,M' where c has 'schema labels = M,B'"
    )
    normed = fingerprint(net(norm=True), {"labels": "B,M"})  # batch norm's buffers count too
    assert "1.weight float32 [8]" in str(a.difference(normed, "s", "c"))
    assert fingerprint(net()).difference(a, "s", "c") == "s lacks 'schema labels = B,M'"


def test_an_implausible_listing_from_a_peer_is_refused() -> None:
    assert received([]) is None
    assert received(["x"] * (MAX_ENTRIES + 1)) is None
    assert received(["x" * (MAX_ENTRY_CHARS + 1)]) is None
    assert received(["0.weight float32 [8, 4]"]) is not None
