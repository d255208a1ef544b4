from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("prompts", "png_images", "metadata_json")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    PNG_IMAGES_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    png_images: _containers.RepeatedScalarFieldContainer[bytes]
    metadata_json: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., png_images: _Optional[_Iterable[bytes]] = ..., metadata_json: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "missing", "reward", "version")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    missing: _containers.RepeatedScalarFieldContainer[bool]
    reward: str
    version: str
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., missing: _Optional[_Iterable[bool]] = ..., reward: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "reward", "version")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    status: str
    reward: str
    version: str
    def __init__(self, status: _Optional[str] = ..., reward: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...
