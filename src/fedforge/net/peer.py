"""Text and events from the other side of the network, made safe for one's own log.

A peer's words (a failure report, a rejection reason) are escaped before they reach a log
line, the live log or the dashboard, so they can neither forge a line nor move the cursor; and
what a peer can trigger at will (a refused connection, a stale message) is logged at a bounded
rate per peer.
"""

from __future__ import annotations

import threading
import time
import unicodedata
from collections import OrderedDict

# Unicode categories that are not shown as themselves: controls (newline, escape), format
# characters (bidirectional overrides, zero-width), line and paragraph separators, unassigned.
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def peer_text(text: str, limit: int = 500) -> str:
    """``text`` on one line: every character that is not shown as itself (newlines,
    terminal escapes, bidirectional overrides...) written as a ``\\x..``/``\\u....`` escape,
    backslashes doubled, cut to ``limit`` characters (marked with ``...``)."""
    out = []
    for char in text[:limit]:
        if char == "\\":
            out.append("\\\\")
        elif unicodedata.category(char) in _HIDDEN:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out) + ("..." if len(text) > limit else "")


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``):
    a client's port changes with every connection, its address does not."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class LogLimiter:
    """Decides whether an event of ``key`` (say, a refusal of one peer's address) is logged:
    the first is, then at most one every ``interval_s``, saying how many were not. At most
    ``max_keys`` keys are remembered (the oldest forgotten first)."""

    def __init__(self, interval_s: float = 60.0, max_keys: int = 1024) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._keys: OrderedDict[object, tuple[float, int]] = OrderedDict()

    def allow(self, key: object) -> int | None:
        """None: do not log this event; else the number of events of ``key`` left unlogged
        since the last one logged (0 for the first)."""
        now = time.monotonic()
        with self._lock:
            entry = self._keys.get(key)
            if entry is not None and now - entry[0] < self.interval_s:
                self._keys[key] = (entry[0], entry[1] + 1)
                return None
            self._keys[key] = (now, 0)
            self._keys.move_to_end(key)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
            return 0 if entry is None else entry[1]
