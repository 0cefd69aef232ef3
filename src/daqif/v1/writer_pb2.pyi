from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WriterState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WRITER_STATE_UNDEFINED: _ClassVar[WriterState]
    WRITER_STATE_READY: _ClassVar[WriterState]
    WRITER_STATE_WRITING: _ClassVar[WriterState]
    WRITER_STATE_UNKNOWN: _ClassVar[WriterState]

class AcquisitionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACQUISITION_STATE_UNDEFINED: _ClassVar[AcquisitionState]
    ACQUISITION_STATE_FINISHED: _ClassVar[AcquisitionState]
    ACQUISITION_STATE_FAILED: _ClassVar[AcquisitionState]
    ACQUISITION_STATE_WRITING: _ClassVar[AcquisitionState]
    ACQUISITION_STATE_WAITING_IMAGES: _ClassVar[AcquisitionState]
    ACQUISITION_STATE_ACQUIRING_IMAGES: _ClassVar[AcquisitionState]
    ACQUISITION_STATE_FLUSHING_IMAGES: _ClassVar[AcquisitionState]

class DeploymentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPLOYMENT_STATE_UNDEFINED: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_SUCCESS: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_ERROR: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_RUNNING: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_UNKNOWN: _ClassVar[DeploymentState]
WRITER_STATE_UNDEFINED: WriterState
WRITER_STATE_READY: WriterState
WRITER_STATE_WRITING: WriterState
WRITER_STATE_UNKNOWN: WriterState
ACQUISITION_STATE_UNDEFINED: AcquisitionState
ACQUISITION_STATE_FINISHED: AcquisitionState
ACQUISITION_STATE_FAILED: AcquisitionState
ACQUISITION_STATE_WRITING: AcquisitionState
ACQUISITION_STATE_WAITING_IMAGES: AcquisitionState
ACQUISITION_STATE_ACQUIRING_IMAGES: AcquisitionState
ACQUISITION_STATE_FLUSHING_IMAGES: AcquisitionState
DEPLOYMENT_STATE_UNDEFINED: DeploymentState
DEPLOYMENT_STATE_SUCCESS: DeploymentState
DEPLOYMENT_STATE_ERROR: DeploymentState
DEPLOYMENT_STATE_RUNNING: DeploymentState
DEPLOYMENT_STATE_UNKNOWN: DeploymentState

class AcquisitionInfo(_message.Message):
    __slots__ = ("n_images", "output_file", "run_id", "writer_user_id")
    N_IMAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FILE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WRITER_USER_ID_FIELD_NUMBER: _ClassVar[int]
    n_images: int
    output_file: str
    run_id: str
    writer_user_id: int
    def __init__(self, n_images: _Optional[int] = ..., output_file: _Optional[str] = ..., run_id: _Optional[str] = ..., writer_user_id: _Optional[int] = ...) -> None: ...

class AcquisitionStats(_message.Message):
    __slots__ = ("n_write_completed", "n_write_requested", "start_time", "stop_time")
    N_WRITE_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    N_WRITE_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    STOP_TIME_FIELD_NUMBER: _ClassVar[int]
    n_write_completed: int
    n_write_requested: int
    start_time: float
    stop_time: float
    def __init__(self, n_write_completed: _Optional[int] = ..., n_write_requested: _Optional[int] = ..., start_time: _Optional[float] = ..., stop_time: _Optional[float] = ...) -> None: ...

class Acquisition(_message.Message):
    __slots__ = ("info", "state", "message", "stats")
    INFO_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    info: AcquisitionInfo
    state: AcquisitionState
    message: str
    stats: AcquisitionStats
    def __init__(self, info: _Optional[_Union[AcquisitionInfo, _Mapping]] = ..., state: _Optional[_Union[AcquisitionState, str]] = ..., message: _Optional[str] = ..., stats: _Optional[_Union[AcquisitionStats, _Mapping]] = ...) -> None: ...

class WriterStatus(_message.Message):
    __slots__ = ("state", "acquisition")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACQUISITION_FIELD_NUMBER: _ClassVar[int]
    state: WriterState
    acquisition: Acquisition
    def __init__(self, state: _Optional[_Union[WriterState, str]] = ..., acquisition: _Optional[_Union[Acquisition, _Mapping]] = ...) -> None: ...

class ModulePosition(_message.Message):
    __slots__ = ("coordinates",)
    COORDINATES_FIELD_NUMBER: _ClassVar[int]
    coordinates: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, coordinates: _Optional[_Iterable[int]] = ...) -> None: ...

class DaqConfig(_message.Message):
    __slots__ = ("bit_depth", "detector_name", "detector_type", "image_pixel_height", "image_pixel_width", "n_modules", "start_udp_port", "writer_user_id", "module_positions")
    class ModulePositionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ModulePosition
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ModulePosition, _Mapping]] = ...) -> None: ...
    BIT_DEPTH_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_NAME_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_TYPE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PIXEL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PIXEL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    N_MODULES_FIELD_NUMBER: _ClassVar[int]
    START_UDP_PORT_FIELD_NUMBER: _ClassVar[int]
    WRITER_USER_ID_FIELD_NUMBER: _ClassVar[int]
    MODULE_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    bit_depth: int
    detector_name: str
    detector_type: str
    image_pixel_height: int
    image_pixel_width: int
    n_modules: int
    start_udp_port: int
    writer_user_id: int
    module_positions: _containers.MessageMap[str, ModulePosition]
    def __init__(self, bit_depth: _Optional[int] = ..., detector_name: _Optional[str] = ..., detector_type: _Optional[str] = ..., image_pixel_height: _Optional[int] = ..., image_pixel_width: _Optional[int] = ..., n_modules: _Optional[int] = ..., start_udp_port: _Optional[int] = ..., writer_user_id: _Optional[int] = ..., module_positions: _Optional[_Mapping[str, ModulePosition]] = ...) -> None: ...

class Throughput(_message.Message):
    __slots__ = ("bytes_per_second", "images_per_second")
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    bytes_per_second: float
    images_per_second: float
    def __init__(self, bytes_per_second: _Optional[float] = ..., images_per_second: _Optional[float] = ...) -> None: ...

class FrameCounters(_message.Message):
    __slots__ = ("received", "written", "discarded", "malformed")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_FIELD_NUMBER: _ClassVar[int]
    MALFORMED_FIELD_NUMBER: _ClassVar[int]
    received: int
    written: int
    discarded: int
    malformed: int
    def __init__(self, received: _Optional[int] = ..., written: _Optional[int] = ..., discarded: _Optional[int] = ..., malformed: _Optional[int] = ...) -> None: ...

class DaqStats(_message.Message):
    __slots__ = ("detector", "writer", "counters")
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    WRITER_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    detector: Throughput
    writer: Throughput
    counters: FrameCounters
    def __init__(self, detector: _Optional[_Union[Throughput, _Mapping]] = ..., writer: _Optional[_Union[Throughput, _Mapping]] = ..., counters: _Optional[_Union[FrameCounters, _Mapping]] = ...) -> None: ...

class DeploymentStats(_message.Message):
    __slots__ = ("start_time", "stop_time")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    STOP_TIME_FIELD_NUMBER: _ClassVar[int]
    start_time: float
    stop_time: float
    def __init__(self, start_time: _Optional[float] = ..., stop_time: _Optional[float] = ...) -> None: ...

class DeploymentStatus(_message.Message):
    __slots__ = ("config_id", "message", "servers", "stats", "status")
    class ServersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONFIG_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    config_id: str
    message: str
    servers: _containers.ScalarMap[str, str]
    stats: DeploymentStats
    status: DeploymentState
    def __init__(self, config_id: _Optional[str] = ..., message: _Optional[str] = ..., servers: _Optional[_Mapping[str, str]] = ..., stats: _Optional[_Union[DeploymentStats, _Mapping]] = ..., status: _Optional[_Union[DeploymentState, str]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetConfigRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetConfigRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: DaqConfig
    def __init__(self, config: _Optional[_Union[DaqConfig, _Mapping]] = ...) -> None: ...

class GetLogsRequest(_message.Message):
    __slots__ = ("n_last_logs",)
    N_LAST_LOGS_FIELD_NUMBER: _ClassVar[int]
    n_last_logs: int
    def __init__(self, n_last_logs: _Optional[int] = ...) -> None: ...

class GetLogsResponse(_message.Message):
    __slots__ = ("logs",)
    LOGS_FIELD_NUMBER: _ClassVar[int]
    logs: _containers.RepeatedCompositeFieldContainer[Acquisition]
    def __init__(self, logs: _Optional[_Iterable[_Union[Acquisition, _Mapping]]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetDeploymentStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StartWriterAsyncRequest(_message.Message):
    __slots__ = ("output_file", "n_images", "run_id", "writer_user_id")
    OUTPUT_FILE_FIELD_NUMBER: _ClassVar[int]
    N_IMAGES_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WRITER_USER_ID_FIELD_NUMBER: _ClassVar[int]
    output_file: str
    n_images: int
    run_id: str
    writer_user_id: int
    def __init__(self, output_file: _Optional[str] = ..., n_images: _Optional[int] = ..., run_id: _Optional[str] = ..., writer_user_id: _Optional[int] = ...) -> None: ...

class StartWriterSyncRequest(_message.Message):
    __slots__ = ("output_file", "n_images", "run_id", "timeout", "writer_user_id")
    OUTPUT_FILE_FIELD_NUMBER: _ClassVar[int]
    N_IMAGES_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    WRITER_USER_ID_FIELD_NUMBER: _ClassVar[int]
    output_file: str
    n_images: int
    run_id: str
    timeout: float
    writer_user_id: int
    def __init__(self, output_file: _Optional[str] = ..., n_images: _Optional[int] = ..., run_id: _Optional[str] = ..., timeout: _Optional[float] = ..., writer_user_id: _Optional[int] = ...) -> None: ...

class StopWriterRequest(_message.Message):
    __slots__ = ("output_file",)
    OUTPUT_FILE_FIELD_NUMBER: _ClassVar[int]
    output_file: str
    def __init__(self, output_file: _Optional[str] = ...) -> None: ...

class WatchStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
