from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("run_id", "round", "nonce")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    nonce: bytes
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("transfer_id", "index", "count", "total_bytes", "sha256", "data")
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
    def __init__(self, transfer_id: _Optional[bytes] = ..., index: _Optional[int] = ..., count: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "num_examples", "name", "holdout_examples", "architecture")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    num_examples: int
    name: str
    holdout_examples: int
    architecture: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, protocol_version: _Optional[int] = ..., num_examples: _Optional[int] = ..., name: _Optional[str] = ..., holdout_examples: _Optional[int] = ..., architecture: _Optional[_Iterable[str]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplyChunk(_message.Message):
    __slots__ = ("stage", "num_examples", "scalars", "metrics", "chunk", "task_id")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    stage: str
    num_examples: int
    scalars: _containers.ScalarMap[str, float]
    metrics: _containers.ScalarMap[str, float]
    chunk: Chunk
    task_id: bytes
    def __init__(self, stage: _Optional[str] = ..., num_examples: _Optional[int] = ..., scalars: _Optional[_Mapping[str, float]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., task_id: _Optional[bytes] = ...) -> None: ...

class ClientFailureReport(_message.Message):
    __slots__ = ("error", "task_id")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    error: str
    task_id: bytes
    def __init__(self, error: _Optional[str] = ..., task_id: _Optional[bytes] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("envelope", "hello", "heartbeat", "reply", "failure")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    hello: Hello
    heartbeat: Heartbeat
    reply: ReplyChunk
    failure: ClientFailureReport
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., reply: _Optional[_Union[ReplyChunk, _Mapping]] = ..., failure: _Optional[_Union[ClientFailureReport, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("client_name", "client_id", "config_toml", "heartbeat_ms")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_TOML_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    client_id: int
    config_toml: str
    heartbeat_ms: int
    def __init__(self, client_name: _Optional[str] = ..., client_id: _Optional[int] = ..., config_toml: _Optional[str] = ..., heartbeat_ms: _Optional[int] = ...) -> None: ...

class TaskChunk(_message.Message):
    __slots__ = ("stage", "seed", "scalars", "deadline_unix_ms", "chunk", "task_id")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    stage: str
    seed: bytes
    scalars: _containers.ScalarMap[str, float]
    deadline_unix_ms: int
    chunk: Chunk
    task_id: bytes
    def __init__(self, stage: _Optional[str] = ..., seed: _Optional[bytes] = ..., scalars: _Optional[_Mapping[str, float]] = ..., deadline_unix_ms: _Optional[int] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., task_id: _Optional[bytes] = ...) -> None: ...

class Reject(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class RunComplete(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    def __init__(self, rounds: _Optional[int] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("envelope", "welcome", "task", "reject", "heartbeat", "run_complete")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    REJECT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RUN_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    welcome: Welcome
    task: TaskChunk
    reject: Reject
    heartbeat: Heartbeat
    run_complete: RunComplete
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., task: _Optional[_Union[TaskChunk, _Mapping]] = ..., reject: _Optional[_Union[Reject, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., run_complete: _Optional[_Union[RunComplete, _Mapping]] = ...) -> None: ...
