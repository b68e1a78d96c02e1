"""Property tests: decode() and decode_blob() answer any input with a Message or ProtocolError."""

from __future__ import annotations

import os
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tvmpipe.proto import (
    PROTOCOL_VERSION,
    Message,
    MsgType,
    ProtocolError,
    RemoteError,
    decode,
    decode_blob,
    encode,
    encode_blob,
)

# database=None: keep the repository free of a .hypothesis/ folder. 500 examples per property
# in make test (about 12 s of the suite's CPU); TVMPIPE_FUZZ_EXAMPLES=20000 for a long hunt.
FUZZ = settings(
    max_examples=int(os.environ.get("TVMPIPE_FUZZ_EXAMPLES", "500")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NUMERIC_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?", sizes=(16, 32, 64)),
    hnp.complex_number_dtypes(endianness="?"),
)
ARRAYS = hnp.arrays(
    dtype=NUMERIC_DTYPES,
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
)
NAMES = st.text(min_size=1, max_size=12)
TENSOR_DICTS = st.dictionaries(NAMES, ARRAYS, max_size=4)

# Values msgpack can carry, including the header's own keys, to reach past the first checks.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.sampled_from(["<f4", "|b1", ">i8", "|O", "V8", "<U4", "x"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)
HEADER_KEYS = st.sampled_from(["v", "t", "seq", "ep", "from", "tensors", "err", "other"])
HEADERS = st.dictionaries(HEADER_KEYS, VALUES, max_size=7).map(
    lambda h: {**h, "v": PROTOCOL_VERSION} if h.get("v") is None else h
)


def valid_messages() -> st.SearchStrategy[Message]:
    seqs = st.integers(min_value=0, max_value=2**63 - 1)
    senders = st.text(max_size=16)
    errors = st.builds(RemoteError, NAMES, NAMES, st.text(max_size=40), st.text(max_size=80))
    return st.one_of(
        st.builds(Message.data, seqs, senders, TENSOR_DICTS),
        st.builds(Message.failure, seqs, senders, errors),
        st.builds(Message.stop, senders),
    )


def decode_or_refuse(frames: list[Any]) -> Message | None:
    """decode(), where ProtocolError is a fine answer and any other exception is a bug."""
    try:
        msg = decode(frames)
    except ProtocolError:
        return None
    assert isinstance(msg, Message)
    assert len(msg.tensors) == len(frames) - 1
    for tensor, frame in zip(msg.tensors.values(), frames[1:], strict=True):
        assert tensor.nbytes == memoryview(frame).nbytes
    return msg


@pytest.mark.timeout(120)
@FUZZ
@given(
    st.one_of(
        st.lists(st.binary(max_size=64), max_size=5),
        st.tuples(HEADERS, st.lists(st.binary(max_size=32), max_size=3)).map(
            lambda hf: [msgpack.packb(hf[0]), *hf[1]]
        ),
    )
)
def test_random_frames(frames: list[bytes]) -> None:
    decode_or_refuse(frames)


@pytest.mark.timeout(120)
@FUZZ
@given(valid_messages(), st.data())
def test_mutated_messages(msg: Message, data: st.DataObject) -> None:
    frames: list[bytes] = [bytes(f) for f in encode(msg)]
    mutation = data.draw(st.sampled_from(["flip", "truncate", "drop", "duplicate", "append"]))
    if mutation == "flip":
        head = bytearray(frames[0])
        for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
            at = data.draw(st.integers(min_value=0, max_value=len(head) - 1))
            head[at] = data.draw(st.integers(min_value=0, max_value=255))
        frames[0] = bytes(head)
    elif mutation == "truncate":
        i = data.draw(st.integers(min_value=0, max_value=len(frames) - 1))
        frames[i] = frames[i][: data.draw(st.integers(min_value=0, max_value=len(frames[i])))]
    elif mutation == "drop":
        del frames[data.draw(st.integers(min_value=0, max_value=len(frames) - 1))]
    elif mutation == "duplicate":
        i = data.draw(st.integers(min_value=0, max_value=len(frames) - 1))
        frames.insert(i, frames[i])
    else:
        frames.append(data.draw(st.binary(max_size=16)))
    decode_or_refuse(frames)


@pytest.mark.timeout(120)
@FUZZ
@given(st.integers(min_value=0, max_value=2**63 - 1), st.text(max_size=16), TENSOR_DICTS)
def test_roundtrip(seq: int, sender: str, tensors: dict[str, np.ndarray]) -> None:
    for got in (
        decode(encode(Message.data(seq, sender, tensors))),
        decode_blob(encode_blob(Message.data(seq, sender, tensors))),
    ):
        assert (got.type, got.seq, got.sender) == (MsgType.DATA, seq, sender)
        assert list(got.tensors) == list(tensors)
        for name, array in tensors.items():
            assert got.tensors[name].dtype == array.dtype
            assert got.tensors[name].shape == array.shape
            assert got.tensors[name].tobytes() == array.tobytes()  # exact, NaN payloads too


@pytest.mark.timeout(120)
@FUZZ
@given(
    st.one_of(
        st.binary(max_size=128),
        st.binary(max_size=128).map(lambda b: b"TVPB" + b),
        st.tuples(valid_messages(), st.integers(min_value=0), st.integers(0, 255)).map(
            lambda m: _corrupt(encode_blob(m[0]), m[1], m[2])
        ),
    )
)
def test_random_blobs(data: bytes) -> None:
    try:
        msg = decode_blob(data)
    except ProtocolError:
        return
    assert isinstance(msg, Message)


def _corrupt(blob: bytes, where: int, value: int) -> bytes:
    """Set one byte, or cut the blob short when where points past its end."""
    if where < len(blob):
        return blob[:where] + bytes([value]) + blob[where + 1 :]
    return blob[: where % (len(blob) + 1)]
