"""The one runtime seam: send tasks to clients, receive their replies as they arrive.

Every runtime implements :class:`Transport`: in-process (sequential, vectorized), forked
worker processes, Ray actors, and the network. A round is one or more exchanges (fit, then
federated evaluation; secure aggregation adds its own), each a call to ``exchange``. A client
that raises, crashes or misses its deadline is yielded as a ``ClientFailure``; a transport
never aborts an exchange because of one client, and never validates: the driver classifies
every reply the same way whatever the runtime. The network transport is also an
:class:`AsyncTransport`: tasks go out while others are in flight (FedBuff in real time).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from fedforge.core.records import Reply, Task


class Transport(Protocol):
    def exchange(self, tasks: Sequence[Task]) -> Iterator[Reply]: ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncTransport(Transport, Protocol):
    """A transport that accepts new tasks while others are in flight (asynchronous training
    in real time): ``submit`` returns at once; ``poll`` returns the next reply of any submitted
    task as it arrives (a ``ClientFailure`` for one past its deadline), or ``None`` when
    nothing is in flight or nothing came within ``timeout`` seconds."""

    def submit(self, tasks: Sequence[Task]) -> None: ...

    def poll(self, timeout: float | None = None) -> Reply | None: ...

    @property
    def in_flight(self) -> int: ...

    def cancel(self) -> None: ...
