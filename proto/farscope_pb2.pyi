from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScanRequest(_message.Message):
    __slots__ = ("model", "ir_version", "document")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IR_VERSION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    ir_version: int
    document: bytes
    def __init__(self, model: _Optional[str] = ..., ir_version: _Optional[int] = ..., document: _Optional[bytes] = ...) -> None: ...

class ScanResult(_message.Message):
    __slots__ = ("document",)
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    document: bytes
    def __init__(self, document: _Optional[bytes] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobState(_message.Message):
    __slots__ = ("job_id", "state")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "architecture", "num_parameters", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    num_parameters: int
    dtype: str
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., num_parameters: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "server_version", "ir_versions")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    IR_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    server_version: str
    ir_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ..., server_version: _Optional[str] = ..., ir_versions: _Optional[_Iterable[int]] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ModuleInfo(_message.Message):
    __slots__ = ("path", "class_name")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    path: str
    class_name: str
    def __init__(self, path: _Optional[str] = ..., class_name: _Optional[str] = ...) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("summary", "modules", "repr", "config_json", "tokenizer_sha256")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    REPR_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    summary: ModelSummary
    modules: _containers.RepeatedCompositeFieldContainer[ModuleInfo]
    repr: str
    config_json: str
    tokenizer_sha256: str
    def __init__(self, summary: _Optional[_Union[ModelSummary, _Mapping]] = ..., modules: _Optional[_Iterable[_Union[ModuleInfo, _Mapping]]] = ..., repr: _Optional[str] = ..., config_json: _Optional[str] = ..., tokenizer_sha256: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("name", "offset", "data", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    data: bytes
    size: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class RequestHeader(_message.Message):
    __slots__ = ("model", "client_version", "ir_version", "graph_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    IR_VERSION_FIELD_NUMBER: _ClassVar[int]
    GRAPH_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    client_version: str
    ir_version: int
    graph_bytes: int
    def __init__(self, model: _Optional[str] = ..., client_version: _Optional[str] = ..., ir_version: _Optional[int] = ..., graph_bytes: _Optional[int] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("header", "graph_chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    GRAPH_CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    graph_chunk: bytes
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., graph_chunk: _Optional[bytes] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("job_id", "position")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    position: int
    def __init__(self, job_id: _Optional[str] = ..., position: _Optional[int] = ...) -> None: ...

class Running(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("blob_sizes",)
    BLOB_SIZES_FIELD_NUMBER: _ClassVar[int]
    blob_sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, blob_sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class ResultChunk(_message.Message):
    __slots__ = ("blob", "offset", "data")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    blob: int
    offset: int
    data: bytes
    def __init__(self, blob: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("job_id", "run_seconds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    run_seconds: float
    def __init__(self, job_id: _Optional[str] = ..., run_seconds: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("job_id", "step", "total")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: int
    total: int
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ExecuteEvent(_message.Message):
    __slots__ = ("queued", "running", "result", "chunk", "done", "log", "progress")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    queued: Queued
    running: Running
    result: ResultHeader
    chunk: ResultChunk
    done: Done
    log: LogLine
    progress: Progress
    def __init__(self, queued: _Optional[_Union[Queued, _Mapping]] = ..., running: _Optional[_Union[Running, _Mapping]] = ..., result: _Optional[_Union[ResultHeader, _Mapping]] = ..., chunk: _Optional[_Union[ResultChunk, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ..., log: _Optional[_Union[LogLine, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...
