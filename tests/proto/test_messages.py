"""Round trips and every refusal of the wire protocol, with hand-built frames."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from tvmpipe.proto import (
    MAX_FRAME_BYTES,
    MAX_TENSORS,
    PROTOCOL_VERSION,
    Message,
    MsgType,
    ProtocolError,
    RemoteError,
    StageError,
    VersionMismatchError,
    check_handshake,
    decode,
    decode_blob,
    encode,
    encode_blob,
    handshake_info,
)

DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]


def roundtrip(msg: Message) -> Message:
    return decode(encode(msg))


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array)


def header(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "t": 1,
        "seq": 0,
        "ep": 0,
        "from": "s",
        "tensors": [],
    }
    base.update(fields)
    return base


def raw(hdr: Any, *data: bytes) -> list[bytes]:
    return [msgpack.packb(hdr), *data]


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_every_dtype(dtype: str) -> None:
    array = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    got = roundtrip(Message.data(7, "stage0", {"x": array}))
    assert got.type is MsgType.DATA
    assert (got.seq, got.sender) == (7, "stage0")
    assert_same_tensors(got.tensors, {"x": array})


def test_roundtrip_shapes_and_byte_order() -> None:
    tensors = {
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((4, 0, 2), dtype=np.int32),
        "big_endian": np.arange(6, dtype=">f8").reshape(2, 3),
        "big_complex": np.array([1 + 2j, 3 - 4j], dtype=">c8"),
        "transposed": np.arange(12, dtype=np.int16).reshape(3, 4).T,
        "sliced": np.arange(30, dtype=np.float64).reshape(5, 6)[::2, 1::3],
        "reversed": np.arange(5, dtype=np.uint8)[::-1],
    }
    got = roundtrip(Message.data(1, "client", tensors))
    assert_same_tensors(got.tensors, tensors)
    assert got.tensors["big_endian"].dtype.str == ">f8"


def test_many_tensors_keep_their_order() -> None:
    tensors = {f"t{i}": np.full((2,), i, dtype=np.int64) for i in range(MAX_TENSORS)}
    assert_same_tensors(roundtrip(Message.data(0, "client", tensors)).tensors, tensors)


def test_contiguous_tensor_is_not_copied() -> None:
    array = np.arange(1000, dtype=np.float32)
    frames = encode(Message.data(0, "client", {"x": array}))
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), array)
    decoded = decode(frames)
    assert np.shares_memory(decoded.tensors["x"], array)


def test_non_contiguous_tensor_is_copied_once() -> None:
    array = np.arange(100, dtype=np.float32).reshape(10, 10).T
    frames = encode(Message.data(0, "client", {"x": array}))
    assert not np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), array)


def test_error_and_stop_roundtrip() -> None:
    try:
        raise KeyError("missing input")
    except KeyError as exc:
        err = RemoteError.from_exception("stage1", exc)
    got = roundtrip(Message.failure(42, "stage1", err))
    assert got.type is MsgType.ERROR
    assert (got.seq, got.sender, got.tensors) == (42, "stage1", {})
    assert got.error == err
    assert err.error_type == "KeyError" and "missing input" in err.traceback_text
    local = got.error.to_stage_error(42)
    assert isinstance(local, StageError)
    assert "stage1" in str(local) and "KeyError" in str(local)

    stop = roundtrip(Message.stop("client"))
    assert (stop.type, stop.sender, stop.tensors, stop.error) == (MsgType.STOP, "client", {}, None)


def test_huge_remote_error_still_fits_a_header() -> None:
    try:
        raise RuntimeError("\U0001f4a5" * 100_000)
    except RuntimeError as exc:
        err = RemoteError.from_exception("\U0001f4a5" * 1000, exc)
    got = roundtrip(Message.failure(1, "s", err)).error
    assert got is not None and got.message.startswith("[...]")
    assert got.traceback_text.endswith("\U0001f4a5\n")


def test_blob_roundtrip() -> None:
    tensors = {
        "w": np.arange(12, dtype=np.float64).reshape(3, 4),
        "b": np.ones(3, dtype=">i2"),
        "s": np.array(True),
    }
    blob = encode_blob(Message.data(3, "client", tensors))
    assert isinstance(blob, bytes)
    got = decode_blob(blob)
    assert_same_tensors(got.tensors, tensors)
    base = np.frombuffer(blob, dtype=np.uint8).ctypes.data
    assert all((t.ctypes.data - base) % 16 == 0 for t in got.tensors.values())


def test_zmq_roundtrip() -> None:
    tensors: dict[str, np.ndarray] = {
        "big": np.random.default_rng(0).random((256, 512), dtype=np.float32),  # over 64 KiB
        "small": np.arange(5, dtype=np.int8),
        "strided": np.arange(20, dtype=np.int32).reshape(4, 5).T,
    }
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        pull.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        pull.setsockopt(zmq.RCVTIMEO, 10_000)
        push.setsockopt(zmq.SNDTIMEO, 10_000)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send_multipart(encode(Message.data(9, "client", tensors)), copy=False)
        push.send_multipart(encode(Message.stop("client")), copy=False)
        first = decode(pull.recv_multipart(copy=False))
        second = decode(pull.recv_multipart(copy=False))
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()
    assert (first.type, first.seq, first.sender) == (MsgType.DATA, 9, "client")
    assert_same_tensors(first.tensors, tensors)
    assert second.type is MsgType.STOP


# --- encode refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        np.array([object(), 1], dtype=object),
        np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]),
        np.zeros(2, dtype="V8"),
        np.array(["ab", "c"]),
        np.array([1, 2], dtype="datetime64[s]"),
    ],
    ids=["object", "structured", "void", "unicode", "datetime"],
)
def test_encode_refuses_non_numeric(value: np.ndarray) -> None:
    with pytest.raises(ProtocolError, match="dtype"):
        encode(Message.data(0, "client", {"x": value}))


@pytest.mark.parametrize(
    ("msg", "word"),
    [
        (Message.data(-1, "client", {}), "seq"),
        (Message.data(2**63, "client", {}), "seq"),
        (Message.data(0, "x" * 300, {}), "sender"),
        (Message.data(0, "client", {"": np.zeros(1)}), "empty"),
        (Message(MsgType.STOP, 0, "client", {"x": np.zeros(1)}), "no tensors"),
        (Message(MsgType.ERROR, 0, "s"), "RemoteError"),
        (Message.data(0, "client", {f"{i:0200d}": np.zeros(1) for i in range(400)}), "header"),
    ],
)
def test_encode_refuses_bad_messages(msg: Message, word: str) -> None:
    with pytest.raises(ProtocolError, match=word):
        encode(msg)


# --- decode refusals -------------------------------------------------------------------------

GOOD_SPEC = ["x", "<f4", [2, 3]]
GOOD_DATA = bytes(24)


@pytest.mark.parametrize(
    ("frames", "word"),
    [
        ([], "empty"),
        ([b"\xc1"], "msgpack"),
        ([b"\x92\x01"], "msgpack"),
        ([msgpack.packb(header()) + b"\x00"], "msgpack"),
        (raw([1, 2, 3]), "map"),
        (raw({"t": 1}), "version"),
        (raw(header(v="1")), "version"),
        (raw({k: v for k, v in header().items() if k != "seq"}), "missing"),
        (raw(header(extra=1)), "extra"),
        (raw(header(t=9)), "type"),
        (raw(header(t=True)), "type"),
        (raw(header(seq=-1)), "seq"),
        (raw(header(seq=2**63)), "seq"),
        (raw(header(seq=1.0)), "seq"),
        (raw(header(seq=True)), "seq"),
        (raw(header(**{"from": 5})), "sender"),
        (raw(header(**{"from": "x" * 257})), "sender"),
        (raw(header(tensors={})), "list"),
        (raw(header(tensors=[["x", "<f4"]]), GOOD_DATA), "entry"),
        (raw(header(tensors=[["", "<f4", [2, 3]]]), GOOD_DATA), "empty"),
        (raw(header(tensors=[[7, "<f4", [2, 3]]]), GOOD_DATA), "name"),
        (raw(header(tensors=[["x" * 257, "<f4", [2, 3]]]), GOOD_DATA), "name"),
        (raw(header(tensors=[["x", "<f4", [-1, 3]]]), GOOD_DATA), "dim"),
        (raw(header(tensors=[["x", "<f4", [2**40, 3]]]), GOOD_DATA), "dim"),
        (raw(header(tensors=[["x", "<f4", [2.0, 3]]]), GOOD_DATA), "dim"),
        (raw(header(tensors=[["x", "<f4", [1] * 33]]), bytes(4)), "dims"),
        (raw(header(tensors=[["x", "<f4", 6]]), GOOD_DATA), "shape"),
        (raw(header(tensors=[["x", "<f4", [2**39, 2**39]]]), GOOD_DATA), "limit"),
        (raw(header(tensors=[["x", "<f4", [0, 2**39, 2**39, 2**39]]]), b""), "cannot"),
        (raw(header(tensors=[GOOD_SPEC]), GOOD_DATA[:-1]), "bytes"),
        (raw(header(tensors=[GOOD_SPEC]), GOOD_DATA + b"\x00"), "bytes"),
        (raw(header(tensors=[GOOD_SPEC])), "frames"),
        (raw(header(tensors=[GOOD_SPEC]), GOOD_DATA, GOOD_DATA), "frames"),
        (raw(header(tensors=[GOOD_SPEC, GOOD_SPEC]), GOOD_DATA, GOOD_DATA), "more than once"),
        (raw(header(tensors=[GOOD_SPEC] * (MAX_TENSORS + 1))), "exceeds"),
        ([msgpack.packb(header()), *([b""] * (MAX_TENSORS + 1))], "limit"),
        ([msgpack.packb(header()) + bytes(64 * 1024)], "limit"),
        (raw(header(t=3, tensors=[GOOD_SPEC]), GOOD_DATA), "no tensors"),
        (raw(header(t=2, err=["s", "E", "m", "tb"], tensors=[GOOD_SPEC]), GOOD_DATA), "no tensors"),
        (raw(header(t=2)), "missing"),
        (raw(header(t=2, err=["s", "E", "m"])), "err"),
        (raw(header(t=2, err=["s", "E", "m", 5])), "err"),
        (raw(header(t=1, err=["s", "E", "m", "tb"])), "extra"),
        ([msgpack.packb(header(tensors=[GOOD_SPEC])), 12345], "byte buffer"),
        ([msgpack.packb(header(tensors=[GOOD_SPEC])), np.zeros(12, np.float32)[::2]], "contig"),
    ],
)
def test_decode_refuses(frames: list[Any], word: str) -> None:
    with pytest.raises(ProtocolError, match=word):
        decode(frames)


@pytest.mark.parametrize(
    "dtype_str",
    [
        "|O",
        "O",
        "V8",
        "|V8",
        "garbage",
        "<U4",
        "S4",
        "<M8",
        "<m8",
        "i4,i4",
        "(2,)i4",
        "<i16",
        "",
        4,
    ],
)
def test_decode_refuses_bad_dtypes(dtype_str: Any) -> None:
    frames = raw(header(tensors=[["x", dtype_str, [1]]]), bytes(8))
    with pytest.raises(ProtocolError, match="dtype"):
        decode(frames)


def test_decode_accepts_alternative_buffers() -> None:
    frames = encode(Message.data(1, "client", {"x": np.arange(6, dtype=np.float32)}))
    as_bytes = [bytes(f) for f in frames]
    for variant in (as_bytes, [bytearray(f) for f in as_bytes], [memoryview(f) for f in as_bytes]):
        np.testing.assert_array_equal(decode(variant).tensors["x"], np.arange(6))
    # A typed buffer (not bytes) counts by its size in bytes.
    typed = [as_bytes[0], np.arange(6, dtype=np.float32)]
    np.testing.assert_array_equal(decode(typed).tensors["x"], np.arange(6))


def test_wrong_version_names_both_versions() -> None:
    frames = raw(header(v=PROTOCOL_VERSION + 1, t=99, unknown="future field"))
    with pytest.raises(VersionMismatchError) as info:
        decode(frames)
    text = str(info.value)
    assert f"protocol {PROTOCOL_VERSION + 1}" in text and f"protocol {PROTOCOL_VERSION}" in text
    assert "install the same tvmpipe" in text


# --- blob refusals ---------------------------------------------------------------------------


def test_decode_blob_refuses_damage() -> None:
    blob = encode_blob(Message.data(3, "client", {"x": np.arange(10, dtype=np.int32)}))
    with pytest.raises(ProtocolError, match="blob"):
        decode_blob(b"nope")
    with pytest.raises(ProtocolError, match="truncated"):
        decode_blob(blob[:-1])
    with pytest.raises(ProtocolError, match="extra"):
        decode_blob(blob + b"\x00")
    with pytest.raises(ProtocolError, match="frames"):
        decode_blob(b"TVPB" + struct.pack("<I", 2**31))
    with pytest.raises(ProtocolError, match="frames"):
        decode_blob(b"TVPB" + struct.pack("<I", 0))
    with pytest.raises(ProtocolError, match="truncated"):
        decode_blob(b"TVPB" + struct.pack("<IQ", 1, 2**63))
    header_end = 32 + struct.unpack_from("<Q", blob, 8)[0]  # magic, count, 2 lengths, align
    assert header_end % 16, "this message needs padding after its header"
    dirty = bytearray(blob)
    dirty[header_end] = 1
    with pytest.raises(ProtocolError, match="padding"):
        decode_blob(bytes(dirty))


# --- handshake -------------------------------------------------------------------------------


def test_handshake_info_fields() -> None:
    info = handshake_info()
    assert info["protocol"] == PROTOCOL_VERSION
    assert set(info) == {"protocol", "tvmpipe", "tvm", "numpy", "python"}
    assert all(isinstance(info[k], str) for k in ("tvmpipe", "tvm", "numpy", "python"))
    assert info["python"].count(".") == 2


def test_handshake_equal_passes() -> None:
    check_handshake(handshake_info(), handshake_info(), "worker 127.0.0.1:9091")


def test_handshake_protocol_mismatch_says_what_to_align() -> None:
    local = {"protocol": 1, "tvmpipe": "0.1.0", "tvm": "0.27.0"}
    remote = {"protocol": 2, "tvmpipe": "0.2.0", "tvm": "0.27.0"}
    with pytest.raises(VersionMismatchError) as info:
        check_handshake(local, remote, "worker 127.0.0.1:9091")
    assert str(info.value) == (
        "worker 127.0.0.1:9091 runs tvmpipe 0.2.0 (protocol 2) but this controller runs "
        "tvmpipe 0.1.0 (protocol 1): install the same tvmpipe version on both sides"
    )


def test_handshake_tvm_minor_mismatch() -> None:
    local = {"protocol": 1, "tvmpipe": "0.1.0", "tvm": "0.27.0.post1"}
    with pytest.raises(VersionMismatchError, match=r"apache-tvm major\.minor"):
        check_handshake(local, {**local, "tvm": "0.28.0"}, "worker w1")
    check_handshake(local, {**local, "tvm": "0.27.3"}, "worker w1")  # patch may differ
    check_handshake(local, {**local, "tvm": "unknown"}, "worker w1")  # cannot compare


@pytest.mark.parametrize(
    "remote",
    [
        None,
        [1, 2],
        {},
        {"protocol": "1", "tvmpipe": "0.1.0", "tvm": "0.27.0"},
        {"protocol": 1, "tvmpipe": 1, "tvm": "0.27.0"},
        {"protocol": 1, "tvmpipe": "0.1.0"},
    ],
)
def test_handshake_malformed(remote: Any) -> None:
    with pytest.raises(VersionMismatchError, match="handshake"):
        check_handshake(handshake_info(), remote, "worker w1")
