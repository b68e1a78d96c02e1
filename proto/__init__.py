"""tvmpipe's data-plane wire protocol as pure functions, with no sockets: ``encode`` turns a
Message (a type, an input sequence number, the sender and named numpy tensors, or a remote
error) into ZeroMQ frames, ``decode`` checks frames from the network and turns them back, and
the handshake helpers refuse peers that run incompatible versions. The exception tree and the
version numbers that both sides share live here too.
"""

from .errors import (
    BackpressureTimeout,
    ConfigError,
    DeployError,
    InputError,
    NothingToRunError,
    PackageError,
    PipelineClosedError,
    PipelineError,
    ProtocolError,
    StageError,
    TvmpipeError,
    VersionMismatchError,
)
from .messages import (
    MAX_DIM,
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    MAX_NAME_LEN,
    MAX_NDIM,
    MAX_SEQ,
    MAX_TENSOR_BYTES,
    MAX_TENSORS,
    TENSOR_KINDS,
    Message,
    MsgType,
    RemoteError,
    check_handshake,
    decode,
    decode_blob,
    encode,
    encode_blob,
    handshake_info,
)
from .version import PACKAGE_SCHEMA_VERSION, PACKAGE_VERSION, PROTOCOL_VERSION

__all__ = [
    "MAX_DIM",
    "MAX_FRAME_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_NAME_LEN",
    "MAX_NDIM",
    "MAX_SEQ",
    "MAX_TENSORS",
    "MAX_TENSOR_BYTES",
    "PACKAGE_SCHEMA_VERSION",
    "PACKAGE_VERSION",
    "PROTOCOL_VERSION",
    "TENSOR_KINDS",
    "BackpressureTimeout",
    "ConfigError",
    "DeployError",
    "InputError",
    "Message",
    "MsgType",
    "NothingToRunError",
    "PackageError",
    "PipelineClosedError",
    "PipelineError",
    "ProtocolError",
    "RemoteError",
    "StageError",
    "TvmpipeError",
    "VersionMismatchError",
    "check_handshake",
    "decode",
    "decode_blob",
    "encode",
    "encode_blob",
    "handshake_info",
]
