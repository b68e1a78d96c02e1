"""The data-plane wire protocol as pure functions: messages in, lists of byte frames out.

Stages stream tensors to each other, and to and from the controller, over ZeroMQ PUSH/PULL
sockets. Traffic is one-way: there are no replies at this level. One message is one ZeroMQ
multipart message::

    frame 0       header: a msgpack map, at most MAX_HEADER_BYTES
    frame 1 + i   the raw bytes of tensor i in C order, exactly prod(shape) * itemsize long

Header fields, all required, no others allowed::

    "v"        int   protocol version; anything but PROTOCOL_VERSION is refused with
                     VersionMismatchError (checked first, so a newer peer is named as such)
    "t"        int   the MsgType below
    "seq"      int   sequence number of the pipeline input, 0 <= seq < 2**63
    "ep"       int   epoch, 0 <= ep < 2**32: the client opens a new one each time it sends
                     its inputs in flight again (after a stage was deployed again); a
                     receiver drops messages of an epoch older than the newest it has seen
    "from"     str   the sending stage's name, or "client"; at most MAX_NAME_LEN characters
    "tensors"  list  one [name, dtype.str, [dim, ...]] per tensor, in frame order; names are
                     unique non-empty strings of at most MAX_NAME_LEN characters, dtype.str is
                     byte order + kind + itemsize (e.g. "<f4", ">i8", "|b1") with kind one of
                     b, i, u, f, c, at most MAX_NDIM dims, each 0 <= dim < MAX_DIM, at most
                     MAX_TENSORS tensors and MAX_TENSOR_BYTES per tensor
    "err"      list  ERROR only: [stage, error_type, message, traceback_text], four strings

Message types (MsgType)::

    DATA  = 1  from the client (pipeline inputs) or a stage (its outputs): the named tensors of
               input #seq. A receiver counts one message per sender per seq and runs #seq once
               every sender it waits on has delivered one.
    ERROR = 2  from a stage whose module raised on input #seq, or that received an ERROR for it:
               the remote error, no tensors. It counts as that sender's message for #seq;
               receivers do not run #seq but pass the error on, and the controller raises it as
               a StageError naming the stage that failed. Never pickled.
    STOP  = 3  from the controller, passed on by every stage: end of stream. No tensors; seq is
               0 and means nothing. The receiving loop exits.

The same message also travels as one bytes object (encode_blob / decode_blob), for sending a set
of tensors through a tvm.rpc call (e.g. parameter updates)::

    b"TVPB" | u32 frame count | u64 length per frame | frames, each starting 16-byte aligned
    (zero padding in between), nothing after the last one; all integers little-endian.

Before streaming, controller and worker exchange handshake_info() dicts (over tvm.rpc) and call
check_handshake(), which refuses a different protocol version or a different apache-tvm
major.minor with a sentence that says what to align.

decode() and decode_blob() are the trust boundary: every header field is checked before any data
is touched, and any defect raises ProtocolError (VersionMismatchError for a version), never
another exception, so a receiver can count the message and drop it.
"""

from __future__ import annotations

import enum
import importlib.metadata
import platform
import re
import struct
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy

from .errors import ProtocolError, StageError, VersionMismatchError
from .version import PACKAGE_VERSION, PROTOCOL_VERSION

MAX_TENSORS = 1024
MAX_NDIM = 32
MAX_DIM = 2**40  # exclusive bound on each dimension
MAX_NAME_LEN = 256  # characters, for tensor, stage and sender names
MAX_SEQ = 2**63  # exclusive bound on seq
MAX_EPOCH = 2**32  # exclusive bound on ep
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSOR_BYTES = 2**34
# The largest single ZeroMQ frame a receiver must accept: set it as zmq.MAXMSGSIZE.
MAX_FRAME_BYTES = max(MAX_HEADER_BYTES, MAX_TENSOR_BYTES)
# Numeric kinds only: bool, signed and unsigned integers, floats, complex.
TENSOR_KINDS = "biufc"

_DTYPE_RE = re.compile(r"[<>|=]?[biufc][0-9]{1,2}")
# Characters kept of an error's message and traceback: even at 4 UTF-8 bytes per character,
# an ERROR header stays under MAX_HEADER_BYTES.
_ERROR_MESSAGE_CHARS = 4 * 1024
_ERROR_TRACEBACK_CHARS = 10 * 1024
_BLOB_MAGIC = b"TVPB"
_BLOB_ALIGN = 16


class MsgType(enum.IntEnum):
    """What a message means; the module docstring says who sends each and what it carries."""

    DATA = 1
    ERROR = 2
    STOP = 3


_TYPES = {t.value: t for t in MsgType}
_FIELDS = {
    t: frozenset(
        {"v", "t", "seq", "ep", "from", "tensors"} | ({"err"} if t is MsgType.ERROR else set())
    )
    for t in MsgType
}
# Dtype strings already parsed: at most a few thousand can pass _DTYPE_RE, so it stays small.
_DTYPES: dict[str, numpy.dtype] = {}


@dataclass(frozen=True)
class RemoteError:
    """An exception raised in a stage, as plain strings: its type cannot be pickled safely."""

    stage: str
    error_type: str
    message: str
    traceback_text: str

    @classmethod
    def from_exception(cls, stage: str, exc: BaseException) -> RemoteError:
        """Describe exc; long texts keep their end, where the cause is."""
        kind = type(exc)
        tb = "".join(traceback.format_exception(kind, exc, exc.__traceback__))
        try:
            message = str(exc)
        except Exception:  # a broken __str__ must not take the error report down with it
            message = f"<unprintable {kind.__name__}>"
        return cls(
            stage=stage[:MAX_NAME_LEN],
            error_type=_qualified_name(kind)[-MAX_NAME_LEN:],
            message=_tail(message, _ERROR_MESSAGE_CHARS),
            traceback_text=_tail(tb, _ERROR_TRACEBACK_CHARS),
        )

    def to_stage_error(self, seq: int) -> StageError:
        """The local exception that stands for this remote one."""
        return StageError(self.stage, seq, self.error_type, self.message, self.traceback_text)


# eq=False: comparing dicts of arrays with == has no single truth value.
@dataclass(frozen=True, eq=False)
class Message:
    """One data-plane message; see the module docstring for the meaning of each field."""

    type: MsgType
    seq: int
    sender: str = ""
    tensors: dict[str, numpy.ndarray] = field(default_factory=dict)
    error: RemoteError | None = None
    epoch: int = 0

    @classmethod
    def data(
        cls, seq: int, sender: str, tensors: dict[str, numpy.ndarray], epoch: int = 0
    ) -> Message:
        return cls(MsgType.DATA, seq, sender, dict(tensors), epoch=epoch)

    @classmethod
    def failure(cls, seq: int, sender: str, error: RemoteError, epoch: int = 0) -> Message:
        return cls(MsgType.ERROR, seq, sender, error=error, epoch=epoch)

    @classmethod
    def stop(cls, sender: str) -> Message:
        return cls(MsgType.STOP, 0, sender)


def encode(msg: Message) -> list[bytes | memoryview]:
    """Turn msg into frames for ``socket.send_multipart(frames, copy=False)``.

    A C-contiguous tensor is sent from its own memory, without a copy; any other is copied once.
    The frames therefore borrow the caller's arrays, and the caller must not write to them until
    ZeroMQ is done with the send: pyzmq keeps them alive, but only a ``track=True`` tracker says
    when libzmq stops reading them. Sending with ``copy=True`` gives ZeroMQ its own copy instead
    (pyzmq copies frames under 64 KiB anyway, so zero-copy only matters for large tensors).
    Raises ProtocolError for anything decode() would refuse, so mistakes surface at the sender.
    """
    _check_seq(msg.seq)
    _check_epoch(msg.epoch)
    _check_name("sender", msg.sender)
    if not isinstance(msg.type, MsgType):
        raise ProtocolError(f"message type must be a MsgType, got {msg.type!r}")
    if len(msg.tensors) > MAX_TENSORS:
        raise ProtocolError(f"{len(msg.tensors)} tensors, over the limit of {MAX_TENSORS}")
    if msg.type is not MsgType.DATA and msg.tensors:
        raise ProtocolError(f"a {msg.type.name} message carries no tensors")
    if (msg.type is MsgType.ERROR) != isinstance(msg.error, RemoteError):
        raise ProtocolError("an ERROR message, and only one, carries a RemoteError")

    specs: list[list[Any]] = []
    frames: list[bytes | memoryview] = []
    for name, value in msg.tensors.items():
        _check_name("tensor name", name)
        array = value if type(value) is numpy.ndarray else numpy.asarray(value)
        dtype = array.dtype
        if dtype.kind not in TENSOR_KINDS:
            raise ProtocolError(
                f"tensor {name!r} has dtype {dtype}; only bool, integer, float and "
                "complex tensors can be sent"
            )
        shape = list(array.shape)  # numpy dims are already non-negative Python ints
        if len(shape) > MAX_NDIM or (shape and max(shape) >= MAX_DIM):
            _check_shape(name, shape)
        if array.nbytes > MAX_TENSOR_BYTES:
            raise ProtocolError(
                f"tensor {name!r} is {array.nbytes} bytes, over the limit of {MAX_TENSOR_BYTES}"
            )
        if not array.flags.c_contiguous:
            array = numpy.ascontiguousarray(array)
        specs.append([name, dtype.str, shape])
        frames.append(_byte_view(array))

    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "t": int(msg.type),
        "seq": msg.seq,
        "ep": msg.epoch,
        "from": msg.sender,
        "tensors": specs,
    }
    if msg.error is not None:
        err = msg.error
        fields = [err.stage, err.error_type, err.message, err.traceback_text]
        if not all(isinstance(f, str) for f in fields):
            raise ProtocolError("every RemoteError field must be a str")
        _check_name("error stage", err.stage)
        _check_name("error type", err.error_type)
        header["err"] = fields
    packed = _packer().pack(header)
    if len(packed) > MAX_HEADER_BYTES:
        raise ProtocolError(
            f"header is {len(packed)} bytes, over the limit of {MAX_HEADER_BYTES}: "
            "send fewer tensors per message or use shorter names"
        )
    return [packed, *frames]


def decode(frames: Sequence[object]) -> Message:
    """Check frames against the protocol and build the Message they describe.

    Frames may be bytes, bytearray, memoryview, zmq.Frame or anything with the buffer protocol.
    Tensors are views of their frames, not copies (read-only when a frame is), and keep the
    frames alive. Raises ProtocolError (VersionMismatchError for a version) and nothing else.
    """
    if len(frames) == 0:
        raise ProtocolError("empty message: no header frame")
    if len(frames) > 1 + MAX_TENSORS:
        raise ProtocolError(f"{len(frames)} frames, over the limit of {1 + MAX_TENSORS}")
    views = [_as_bytes(i, frame) for i, frame in enumerate(frames)]
    header = _unpack_header(views[0])

    msg_type = header.get("t")
    kind = _TYPES.get(msg_type) if type(msg_type) is int else None
    if kind is None:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    expected = _FIELDS[kind]
    if header.keys() != expected:
        missing = sorted(expected - set(header))
        extra = sorted(map(repr, set(header) - expected))
        raise ProtocolError(f"{kind.name} header fields wrong: missing {missing}, extra {extra}")
    seq, epoch, sender = header["seq"], header["ep"], header["from"]
    _check_seq(seq)
    _check_epoch(epoch)
    _check_name("sender", sender)

    specs = header["tensors"]
    if not isinstance(specs, list):
        raise ProtocolError(f"'tensors' must be a list, got {type(specs).__name__}")
    if len(specs) > MAX_TENSORS:
        raise ProtocolError(f"{len(specs)} tensors, over the limit of {MAX_TENSORS}")
    if kind is not MsgType.DATA and specs:
        raise ProtocolError(f"a {kind.name} message carries no tensors, got {len(specs)}")
    if len(views) != 1 + len(specs):
        raise ProtocolError(
            f"header lists {len(specs)} tensors but {len(views) - 1} data frames came"
        )
    parsed = [_parse_spec(i, spec) for i, spec in enumerate(specs)]
    seen: set[str] = set()
    for name, _, _ in parsed:
        if name in seen:
            raise ProtocolError(f"tensor name {name!r} appears more than once")
        seen.add(name)

    tensors: dict[str, numpy.ndarray] = {}
    for (name, dtype, shape), view in zip(parsed, views[1:], strict=True):
        size = dtype.itemsize
        for dim in shape:
            size *= dim
        if size > MAX_TENSOR_BYTES:
            raise ProtocolError(
                f"tensor {name!r} would be {size} bytes, over the limit of {MAX_TENSOR_BYTES}"
            )
        if size != view.nbytes:
            raise ProtocolError(
                f"tensor {name!r} ({dtype.str}, shape {shape}) needs {size} bytes "
                f"but its frame has {view.nbytes}"
            )
        try:
            tensors[name] = numpy.frombuffer(view, dtype=dtype).reshape(shape)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"tensor {name!r} cannot be built: {exc}") from exc

    error = _parse_error(header["err"]) if kind is MsgType.ERROR else None
    return Message(kind, seq, sender, tensors, error, epoch)


def encode_blob(msg: Message) -> bytes:
    """Pack msg into one bytes object, for a tvm.rpc call argument (copies every tensor)."""
    frames = encode(msg)
    parts: list[bytes | memoryview] = [
        _BLOB_MAGIC,
        struct.pack(f"<I{len(frames)}Q", len(frames), *(memoryview(f).nbytes for f in frames)),
    ]
    offset = len(parts[1]) + len(_BLOB_MAGIC)
    for frame in frames:
        pad = -offset % _BLOB_ALIGN
        parts.append(bytes(pad))
        parts.append(frame)
        offset += pad + memoryview(frame).nbytes
    return b"".join(parts)


def decode_blob(data: object) -> Message:
    """Unpack encode_blob()'s output as strictly as decode(); tensors are views into data."""
    view = _as_bytes(0, data)
    prefix = len(_BLOB_MAGIC) + 4
    if view.nbytes < prefix or view[:4] != _BLOB_MAGIC:
        raise ProtocolError("not a tvmpipe blob: it does not start with b'TVPB' and a count")
    (count,) = struct.unpack_from("<I", view, 4)
    if not 1 <= count <= 1 + MAX_TENSORS:
        raise ProtocolError(f"blob claims {count} frames, outside 1..{1 + MAX_TENSORS}")
    offset = prefix + 8 * count
    if view.nbytes < offset:
        raise ProtocolError(f"blob is truncated: {view.nbytes} bytes, its table alone is {offset}")
    lengths = struct.unpack_from(f"<{count}Q", view, prefix)
    frames: list[memoryview] = []
    for i, length in enumerate(lengths):
        start = offset + (-offset % _BLOB_ALIGN)
        end = start + length
        if end > view.nbytes:
            raise ProtocolError(f"blob is truncated: frame {i} ends at {end}, past {view.nbytes}")
        if any(view[offset:start]):
            raise ProtocolError(f"blob padding before frame {i} is not zero")
        frames.append(view[start:end])
        offset = end
    if offset != view.nbytes:
        raise ProtocolError(f"blob has {view.nbytes - offset} extra bytes after its last frame")
    return decode(frames)


def handshake_info() -> dict[str, Any]:
    """Versions this process speaks and runs, for the peer's check_handshake()."""
    return {
        "protocol": PROTOCOL_VERSION,
        "tvmpipe": PACKAGE_VERSION,
        "tvm": _installed_version("apache-tvm", "tvm"),
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def check_handshake(
    local: dict[str, Any],
    remote: object,
    peer: str,
    local_name: str = "this controller",
) -> None:
    """Refuse a peer that cannot talk to us, saying in one sentence what to align.

    The protocol version must match, and so must apache-tvm's major.minor (compiled modules do
    not load across those). A version that cannot be read on either side is not compared.
    """
    if not isinstance(remote, dict) or type(remote.get("protocol")) is not int:
        raise VersionMismatchError(
            f"{peer} sent a malformed handshake ({str(remote)[:200]!r}): "
            "install the same tvmpipe version on both sides"
        )
    for key in ("tvmpipe", "tvm"):
        if not isinstance(remote.get(key), str) or len(remote[key]) > MAX_NAME_LEN:
            raise VersionMismatchError(
                f"{peer} sent a handshake whose {key!r} version is not a short string "
                f"({remote.get(key)!r:.200}): install the same tvmpipe version on both sides"
            )
    if remote["protocol"] != local["protocol"]:
        raise VersionMismatchError(
            f"{peer} runs tvmpipe {remote['tvmpipe']} (protocol {remote['protocol']}) but "
            f"{local_name} runs tvmpipe {local['tvmpipe']} (protocol {local['protocol']}): "
            "install the same tvmpipe version on both sides"
        )
    theirs, ours = _major_minor(remote["tvm"]), _major_minor(local["tvm"])
    if theirs is not None and ours is not None and theirs != ours:
        raise VersionMismatchError(
            f"{peer} runs apache-tvm {remote['tvm']} but {local_name} runs apache-tvm "
            f"{local['tvm']}: install the same apache-tvm major.minor version on both sides"
        )


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "[...]" + text[-(limit - 5) :]


def _qualified_name(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _installed_version(*dists: str) -> str:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


_PACKERS = threading.local()


def _packer() -> msgpack.Packer:
    """This thread's Packer: ``msgpack.packb`` makes one per call, a third of a header's cost."""
    try:
        packer: msgpack.Packer = _PACKERS.packer
    except AttributeError:
        packer = _PACKERS.packer = msgpack.Packer(use_bin_type=True)
    return packer


def _as_bytes(index: int, frame: object) -> memoryview:
    """A flat byte view of one frame, without copying it."""
    source: Any = getattr(frame, "buffer", frame)  # zmq.Frame exposes its memory as .buffer
    try:
        view = memoryview(source)
        if view.c_contiguous:
            return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(
            f"frame {index} is a {type(frame).__name__}, not a byte buffer: {exc}"
        ) from exc
    raise ProtocolError(f"frame {index} is not a contiguous buffer")


def _unpack_header(view: memoryview) -> dict[str, Any]:
    if view.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {view.nbytes} bytes, over the limit of {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            view,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_HEADER_BYTES,
            max_bin_len=MAX_HEADER_BYTES,
            max_array_len=MAX_TENSORS,
            max_map_len=16,
            max_ext_len=0,
        )
    # msgpack documents that "other exceptions can be raised during unpacking".
    except Exception as exc:
        raise ProtocolError(f"header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    if "v" not in header:
        raise ProtocolError("header has no protocol version 'v'")
    version = header["v"]
    if type(version) is not int:
        raise ProtocolError(f"protocol version must be an int, got {version!r:.100}")
    if version != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"message speaks protocol {version} but this side speaks protocol "
            f"{PROTOCOL_VERSION}: install the same tvmpipe version on both sides"
        )
    return header


def _parse_spec(index: int, spec: object) -> tuple[str, numpy.dtype, list[int]]:
    if not (isinstance(spec, list) and len(spec) == 3):
        raise ProtocolError(f"tensor entry {index} must be [name, dtype, shape], got {spec!r:.100}")
    name, dtype_str, shape = spec
    _check_name("tensor name", name)
    dtype = _DTYPES.get(dtype_str) if type(dtype_str) is str else None
    if dtype is None:
        dtype = _parse_dtype(name, dtype_str)
    if not isinstance(shape, list):
        raise ProtocolError(f"tensor {name!r} shape must be a list, got {shape!r:.100}")
    _check_shape(name, shape)
    return name, dtype, shape


def _parse_dtype(name: str, dtype_str: object) -> numpy.dtype:
    if not (isinstance(dtype_str, str) and _DTYPE_RE.fullmatch(dtype_str)):
        raise ProtocolError(
            f"tensor {name!r} has dtype {dtype_str!r:.40}; only bool, integer, float and "
            "complex dtypes like '<f4' are allowed"
        )
    try:
        dtype = numpy.dtype(dtype_str)
    except TypeError as exc:
        raise ProtocolError(f"tensor {name!r} has unknown dtype {dtype_str!r}") from exc
    if dtype.kind not in TENSOR_KINDS:
        raise ProtocolError(f"tensor {name!r} has non-numeric dtype {dtype_str!r}")
    if type(dtype_str) is str:
        _DTYPES[dtype_str] = dtype
    return dtype


def _byte_view(array: numpy.ndarray) -> memoryview:
    """The bytes of a C-contiguous array as a flat memoryview, without a copy."""
    if array.size:
        return array.data.cast("B")
    return array.reshape(-1).view(numpy.uint8).data  # cast() refuses zeros in the shape


def _check_shape(name: str, shape: list[Any]) -> None:
    if len(shape) > MAX_NDIM:
        raise ProtocolError(f"tensor {name!r} has {len(shape)} dims, over the limit of {MAX_NDIM}")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim < MAX_DIM:
            raise ProtocolError(
                f"tensor {name!r} has dim {dim!r:.40}; dims are ints in [0, {MAX_DIM})"
            )


def _parse_error(err: object) -> RemoteError:
    if not (isinstance(err, list) and len(err) == 4 and all(isinstance(s, str) for s in err)):
        raise ProtocolError(
            f"'err' must be [stage, type, message, traceback] strings, got {err!r:.100}"
        )
    _check_name("error stage", err[0])
    _check_name("error type", err[1])
    return RemoteError(*err)


def _check_seq(seq: object) -> None:
    if type(seq) is not int or not 0 <= seq < MAX_SEQ:
        raise ProtocolError(f"seq must be an int in [0, 2**63), got {seq!r:.40}")


def _check_epoch(epoch: object) -> None:
    if type(epoch) is not int or not 0 <= epoch < MAX_EPOCH:
        raise ProtocolError(f"ep must be an int in [0, 2**32), got {epoch!r:.40}")


def _check_name(what: str, name: object) -> None:
    if not isinstance(name, str) or len(name) > MAX_NAME_LEN:
        raise ProtocolError(
            f"{what} must be a str of at most {MAX_NAME_LEN} characters, got {name!r:.60}"
        )
    if not name and what != "sender":
        raise ProtocolError(f"{what} must not be empty")
