from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DaqState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DAQ_STATE_UNDEFINED: _ClassVar[DaqState]
    DAQ_STATE_ACQUIRING: _ClassVar[DaqState]
    DAQ_STATE_MERGING: _ClassVar[DaqState]
    DAQ_STATE_COMPLETED: _ClassVar[DaqState]

class DaqSubState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DAQ_SUB_STATE_UNDEFINED: _ClassVar[DaqSubState]
    DAQ_SUB_STATE_NOT_STARTED: _ClassVar[DaqSubState]
    DAQ_SUB_STATE_STARTING: _ClassVar[DaqSubState]
    DAQ_SUB_STATE_ACQUIRING: _ClassVar[DaqSubState]
    DAQ_SUB_STATE_STOPPING: _ClassVar[DaqSubState]
    DAQ_SUB_STATE_STOPPED: _ClassVar[DaqSubState]
    DAQ_SUB_STATE_ABORTING: _ClassVar[DaqSubState]
    DAQ_SUB_STATE_ABORTED: _ClassVar[DaqSubState]
    DAQ_SUB_STATE_NOT_SCHEDULED: _ClassVar[DaqSubState]
    DAQ_SUB_STATE_SCHEDULED: _ClassVar[DaqSubState]
    DAQ_SUB_STATE_COLLECTING: _ClassVar[DaqSubState]
    DAQ_SUB_STATE_MERGING: _ClassVar[DaqSubState]
    DAQ_SUB_STATE_RELEASING: _ClassVar[DaqSubState]
    DAQ_SUB_STATE_COMPLETED: _ClassVar[DaqSubState]

class AlertSeverity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_SEVERITY_UNDEFINED: _ClassVar[AlertSeverity]
    ALERT_SEVERITY_ERROR: _ClassVar[AlertSeverity]
    ALERT_SEVERITY_WARNING: _ClassVar[AlertSeverity]
    ALERT_SEVERITY_INFO: _ClassVar[AlertSeverity]
DAQ_STATE_UNDEFINED: DaqState
DAQ_STATE_ACQUIRING: DaqState
DAQ_STATE_MERGING: DaqState
DAQ_STATE_COMPLETED: DaqState
DAQ_SUB_STATE_UNDEFINED: DaqSubState
DAQ_SUB_STATE_NOT_STARTED: DaqSubState
DAQ_SUB_STATE_STARTING: DaqSubState
DAQ_SUB_STATE_ACQUIRING: DaqSubState
DAQ_SUB_STATE_STOPPING: DaqSubState
DAQ_SUB_STATE_STOPPED: DaqSubState
DAQ_SUB_STATE_ABORTING: DaqSubState
DAQ_SUB_STATE_ABORTED: DaqSubState
DAQ_SUB_STATE_NOT_SCHEDULED: DaqSubState
DAQ_SUB_STATE_SCHEDULED: DaqSubState
DAQ_SUB_STATE_COLLECTING: DaqSubState
DAQ_SUB_STATE_MERGING: DaqSubState
DAQ_SUB_STATE_RELEASING: DaqSubState
DAQ_SUB_STATE_COMPLETED: DaqSubState
ALERT_SEVERITY_UNDEFINED: AlertSeverity
ALERT_SEVERITY_ERROR: AlertSeverity
ALERT_SEVERITY_WARNING: AlertSeverity
ALERT_SEVERITY_INFO: AlertSeverity

class DaqException(_message.Message):
    __slots__ = ("id", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    message: str
    def __init__(self, id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class DaqAlert(_message.Message):
    __slots__ = ("id", "severity", "description", "timestamp")
    ID_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    id: str
    severity: AlertSeverity
    description: str
    timestamp: float
    def __init__(self, id: _Optional[str] = ..., severity: _Optional[_Union[AlertSeverity, str]] = ..., description: _Optional[str] = ..., timestamp: _Optional[float] = ...) -> None: ...

class DaqReply(_message.Message):
    __slots__ = ("id", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    error: bool
    def __init__(self, id: _Optional[str] = ..., error: _Optional[bool] = ...) -> None: ...

class DaqStatus(_message.Message):
    __slots__ = ("id", "file_id", "state", "substate", "error", "alerts", "result", "message", "timestamp")
    ID_FIELD_NUMBER: _ClassVar[int]
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUBSTATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    id: str
    file_id: str
    state: DaqState
    substate: DaqSubState
    error: bool
    alerts: _containers.RepeatedCompositeFieldContainer[DaqAlert]
    result: str
    message: str
    timestamp: float
    def __init__(self, id: _Optional[str] = ..., file_id: _Optional[str] = ..., state: _Optional[_Union[DaqState, str]] = ..., substate: _Optional[_Union[DaqSubState, str]] = ..., error: _Optional[bool] = ..., alerts: _Optional[_Iterable[_Union[DaqAlert, _Mapping]]] = ..., result: _Optional[str] = ..., message: _Optional[str] = ..., timestamp: _Optional[float] = ...) -> None: ...

class SourceRecord(_message.Message):
    __slots__ = ("source_name", "location", "local_path", "bytes", "outcome", "timestamp")
    SOURCE_NAME_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    source_name: str
    location: str
    local_path: str
    bytes: int
    outcome: str
    timestamp: float
    def __init__(self, source_name: _Optional[str] = ..., location: _Optional[str] = ..., local_path: _Optional[str] = ..., bytes: _Optional[int] = ..., outcome: _Optional[str] = ..., timestamp: _Optional[float] = ...) -> None: ...

class ReleaseRecord(_message.Message):
    __slots__ = ("index", "path", "host", "released_path", "outcome", "timestamp")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    RELEASED_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    index: int
    path: str
    host: str
    released_path: str
    outcome: str
    timestamp: float
    def __init__(self, index: _Optional[int] = ..., path: _Optional[str] = ..., host: _Optional[str] = ..., released_path: _Optional[str] = ..., outcome: _Optional[str] = ..., timestamp: _Optional[float] = ...) -> None: ...

class SubStateChange(_message.Message):
    __slots__ = ("substate", "timestamp", "message")
    SUBSTATE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    substate: DaqSubState
    timestamp: float
    message: str
    def __init__(self, substate: _Optional[_Union[DaqSubState, str]] = ..., timestamp: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class AttemptCounter(_message.Message):
    __slots__ = ("step", "attempts")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    step: str
    attempts: int
    def __init__(self, step: _Optional[str] = ..., attempts: _Optional[int] = ...) -> None: ...

class InternalDaqStatus(_message.Message):
    __slots__ = ("status", "workspace", "specification", "sources", "receivers", "merge_log", "attempts", "history")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    SPECIFICATION_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    RECEIVERS_FIELD_NUMBER: _ClassVar[int]
    MERGE_LOG_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    status: DaqStatus
    workspace: str
    specification: str
    sources: _containers.RepeatedCompositeFieldContainer[SourceRecord]
    receivers: _containers.RepeatedCompositeFieldContainer[ReleaseRecord]
    merge_log: str
    attempts: _containers.RepeatedCompositeFieldContainer[AttemptCounter]
    history: _containers.RepeatedCompositeFieldContainer[SubStateChange]
    def __init__(self, status: _Optional[_Union[DaqStatus, _Mapping]] = ..., workspace: _Optional[str] = ..., specification: _Optional[str] = ..., sources: _Optional[_Iterable[_Union[SourceRecord, _Mapping]]] = ..., receivers: _Optional[_Iterable[_Union[ReleaseRecord, _Mapping]]] = ..., merge_log: _Optional[str] = ..., attempts: _Optional[_Iterable[_Union[AttemptCounter, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[SubStateChange, _Mapping]]] = ...) -> None: ...

class StorageStatus(_message.Message):
    __slots__ = ("path", "capacity", "free", "available", "timestamp")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    path: str
    capacity: int
    free: int
    available: int
    timestamp: float
    def __init__(self, path: _Optional[str] = ..., capacity: _Optional[int] = ..., free: _Optional[int] = ..., available: _Optional[int] = ..., timestamp: _Optional[float] = ...) -> None: ...

class QueueDaqRequest(_message.Message):
    __slots__ = ("specification",)
    SPECIFICATION_FIELD_NUMBER: _ClassVar[int]
    specification: str
    def __init__(self, specification: _Optional[str] = ...) -> None: ...

class AbortDaqRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RetryMergeDaqRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetDaqStatusRequest(_message.Message):
    __slots__ = ("id", "include_archived")
    ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ARCHIVED_FIELD_NUMBER: _ClassVar[int]
    id: str
    include_archived: bool
    def __init__(self, id: _Optional[str] = ..., include_archived: _Optional[bool] = ...) -> None: ...

class GetActiveDaqsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetActiveDaqsResponse(_message.Message):
    __slots__ = ("daqs",)
    DAQS_FIELD_NUMBER: _ClassVar[int]
    daqs: _containers.RepeatedCompositeFieldContainer[DaqStatus]
    def __init__(self, daqs: _Optional[_Iterable[_Union[DaqStatus, _Mapping]]] = ...) -> None: ...

class GetInternalDaqStatusRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchDaqStatusRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class QueryStorageStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchStorageStatusRequest(_message.Message):
    __slots__ = ("interval",)
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    interval: float
    def __init__(self, interval: _Optional[float] = ...) -> None: ...

class ExitRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExitResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...
