from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("nonce", "round", "run_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    nonce: bytes
    def __init__(
        self, run_id: str | None = ..., round: int | None = ..., nonce: bytes | None = ...
    ) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("count", "data", "index", "sha256", "total_bytes", "transfer_id")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    transfer_id: bytes
    index: int
    count: int
    total_bytes: int
    sha256: bytes
    data: bytes
    def __init__(
        self,
        transfer_id: bytes | None = ...,
        index: int | None = ...,
        count: int | None = ...,
        total_bytes: int | None = ...,
        sha256: bytes | None = ...,
        data: bytes | None = ...,
    ) -> None: ...

class Hello(_message.Message):
    __slots__ = ("name", "num_examples", "protocol_version")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    num_examples: int
    name: str
    def __init__(
        self,
        protocol_version: int | None = ...,
        num_examples: int | None = ...,
        name: str | None = ...,
    ) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClientResultChunk(_message.Message):
    __slots__ = ("chunk", "num_examples", "train_loss")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    chunk: Chunk
    num_examples: int
    train_loss: float
    def __init__(
        self,
        chunk: Chunk | _Mapping | None = ...,
        num_examples: int | None = ...,
        train_loss: float | None = ...,
    ) -> None: ...

class ClientFailureReport(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: str
    def __init__(self, error: str | None = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("envelope", "failure", "heartbeat", "hello", "result")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    hello: Hello
    heartbeat: Heartbeat
    result: ClientResultChunk
    failure: ClientFailureReport
    def __init__(
        self,
        envelope: Envelope | _Mapping | None = ...,
        hello: Hello | _Mapping | None = ...,
        heartbeat: Heartbeat | _Mapping | None = ...,
        result: ClientResultChunk | _Mapping | None = ...,
        failure: ClientFailureReport | _Mapping | None = ...,
    ) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("client_id", "client_name", "config_toml", "heartbeat_ms")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_TOML_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    client_id: int
    config_toml: str
    heartbeat_ms: int
    def __init__(
        self,
        client_name: str | None = ...,
        client_id: int | None = ...,
        config_toml: str | None = ...,
        heartbeat_ms: int | None = ...,
    ) -> None: ...

class FitTaskChunk(_message.Message):
    __slots__ = ("chunk", "client_seed", "deadline_unix_ms")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SEED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    chunk: Chunk
    client_seed: int
    deadline_unix_ms: int
    def __init__(
        self,
        chunk: Chunk | _Mapping | None = ...,
        client_seed: int | None = ...,
        deadline_unix_ms: int | None = ...,
    ) -> None: ...

class Reject(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: str | None = ...) -> None: ...

class RunComplete(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    def __init__(self, rounds: int | None = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("envelope", "heartbeat", "reject", "run_complete", "task", "welcome")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    REJECT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RUN_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    welcome: Welcome
    task: FitTaskChunk
    reject: Reject
    heartbeat: Heartbeat
    run_complete: RunComplete
    def __init__(
        self,
        envelope: Envelope | _Mapping | None = ...,
        welcome: Welcome | _Mapping | None = ...,
        task: FitTaskChunk | _Mapping | None = ...,
        reject: Reject | _Mapping | None = ...,
        heartbeat: Heartbeat | _Mapping | None = ...,
        run_complete: RunComplete | _Mapping | None = ...,
    ) -> None: ...
