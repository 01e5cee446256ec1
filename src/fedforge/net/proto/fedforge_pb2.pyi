from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
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
    __slots__ = ("protocol_version", "num_examples", "name")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    num_examples: int
    name: str
    def __init__(self, protocol_version: _Optional[int] = ..., num_examples: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

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
    def __init__(self, chunk: _Optional[_Union[Chunk, _Mapping]] = ..., num_examples: _Optional[int] = ..., train_loss: _Optional[float] = ...) -> None: ...

class ClientFailureReport(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: str
    def __init__(self, error: _Optional[str] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("envelope", "hello", "heartbeat", "result", "failure")
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
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., result: _Optional[_Union[ClientResultChunk, _Mapping]] = ..., failure: _Optional[_Union[ClientFailureReport, _Mapping]] = ...) -> None: ...

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

class FitTaskChunk(_message.Message):
    __slots__ = ("chunk", "client_seed", "deadline_unix_ms")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SEED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    chunk: Chunk
    client_seed: int
    deadline_unix_ms: int
    def __init__(self, chunk: _Optional[_Union[Chunk, _Mapping]] = ..., client_seed: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

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
    task: FitTaskChunk
    reject: Reject
    heartbeat: Heartbeat
    run_complete: RunComplete
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., task: _Optional[_Union[FitTaskChunk, _Mapping]] = ..., reject: _Optional[_Union[Reject, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., run_complete: _Optional[_Union[RunComplete, _Mapping]] = ...) -> None: ...
