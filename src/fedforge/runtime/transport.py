"""The one runtime seam: send tasks to clients, receive their replies as they arrive.

Every runtime implements :class:`Transport`: in-process (sequential, vectorized), forked
worker processes, Ray actors, and the network. A round is one or more exchanges (fit, then
federated evaluation; secure aggregation adds its own), each a call to ``exchange``. A client
that raises, crashes or misses its deadline is yielded as a ``ClientFailure``; a transport
never aborts an exchange because of one client, and never validates: the driver classifies
every reply the same way whatever the runtime.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from fedforge.core.records import Reply, Task


class Transport(Protocol):
    def exchange(self, tasks: Sequence[Task]) -> Iterator[Reply]: ...

    def close(self) -> None: ...
