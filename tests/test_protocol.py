"""Tests of asyncdni.wire.protocol, the wire format."""

from __future__ import annotations

import math
import pickle
import random

import msgpack
import numpy as np
import pytest

from asyncdni.wire import protocol as P
from asyncdni.wire.protocol import ProtocolError, decode, encode, frame_nbytes


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def raw_header(**over):
    """A valid FWD header map (float32[2,3], int64[2]); keys overridable, None deletes."""
    h = {"v": P.PROTOCOL_VERSION, "k": P.FWD, "s": 0,
         "a": [["float32", [2, 3]], ["int64", [2]]], "f": {}}
    for k, v in over.items():
        if v is _DEL:
            h.pop(k)
        else:
            h[k] = v
    return h


_DEL = object()
H = np.arange(6, dtype=np.float32).reshape(2, 3)
Y = np.array([7, -8], dtype=np.int64)


def raw_frames(header, arrays=(H, Y)):
    return [msgpack.packb(header, use_bin_type=True)] + [a.tobytes() for a in arrays]


def mp(*args, **kw):
    """encode in the multipart layout whatever the size (the layout these tests take apart)."""
    return encode(*args, inline_max=0, **kw)


def as_bytes(frames):
    return [bytes(f) for f in frames]


def reject(frames, reason, **kw):
    with pytest.raises(ProtocolError) as ei:
        decode(frames, **kw)
    assert ei.value.reason == reason, (ei.value.reason, str(ei.value))
    msg = str(ei.value)
    assert msg and "\n" not in msg
    return msg


def rng_array(rng, dtype, shape):
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)


# --------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------

_rng = np.random.default_rng(1)
ROUND_TRIPS = {
    P.FWD: ([rng_array(_rng, "float32", (32, 784)), rng_array(_rng, "int64", (32,))], {}),
    P.BWD: ([rng_array(_rng, "float32", (32, 256))], {"mb": 3}),
    P.ACK: ([], {}),
    P.DONE: ([], {"loss": 0.25, "metric": 0.9, "n": 10000, "metric2": 0.5}),
    P.EVAL: ([rng_array(_rng, "float64", (8, 3, 4, 2)), rng_array(_rng, "int32", (8,))], {"eid": 4}),
    P.EVAL_RESULT: ([], {"eid": 4, "loss": 1, "metric": 0.125, "n": 8}),
    P.MARKER: ([], {"purpose": "checkpoint", "tag": "epoch-3"}),
    P.HELLO: ([], {"role": "layer", "index": 2, "pid": 4242, "host": "node-1"}),
    P.READY: ([], {"anything": [1, 2.5, "x", None, True, {"deep": {"er": []}}]}),
    P.SPEC: ([], {"spec": {"config": {}, "nodes": [{"host": "10.0.0.2"}], "steps": 3}}),
    P.AGENT_HELLO: ([], {"name": "h1", "bind": "10.77.0.2", "host": "node-1", "pid": 7}),
    P.AGENT_WELCOME: ([], {"heartbeat_interval": 0.25, "deadline": 2.0}),
    P.LAUNCH: ([], {"name": "layer0", "role": "layer", "index": 0, "control": "tcp://10.77.0.1:5", "blas_threads": 1,
                    "start_timeout": 60.0, "server_key": "", "secret_key": ""}),
    P.STARTED: ([], {"name": "layer0", "pid": 99}),
    P.LAUNCH_FAILED: ([], {"name": "layer0", "error": "no such module"}),
    P.EXITED: ([], {"name": "layer0", "code": -9, "tail": "last words"}),
    P.KILL: ([], {"grace": 2.0}),
    P.KILLED: ([], {}),
    P.RELEASE: ([], {"reason": "finished"}),
    P.START: ([], {"peers": [{"fwd": "tcp://127.0.0.1:1", "bwd": "tcp://127.0.0.1:2"}]}),
    P.HEARTBEAT: ([], {"state": "training", "step": 17}),
    P.PROGRESS: ([], {"done": 5, "total": 10, "loss": 0.5, "metric": 0.75, "elapsed": 1.5}),
    P.STATS: ([], {"sent": 10, "rates": [1.0, 2.0], "by_kind": {"fwd": 3, "bwd": None}, "ok": False}),
    P.ERROR: ([], {"role": "layer", "index": 1, "error": "ValueError: boom", "traceback": "Traceback...\n  line 1"}),
    P.STOP: ([], {"reason": "finished"}),
    P.BYE: ([rng_array(_rng, "float32", (784, 256)), rng_array(_rng, "float32", (256,)),
             rng_array(_rng, "uint8", (3, 3)), np.array(2.5), np.zeros((0, 7), np.float32)],
            {"final_loss": 0.1, "steps": 1000}),
    P.CKPT: ([], {"path": "/tmp/ck", "step": 3}),
    P.CKPT_DONE: ([], {"path": "/tmp/ck", "ok": True}),
}


def test_round_trip_table_covers_every_kind():
    assert set(ROUND_TRIPS) == set(P.KINDS)


@pytest.mark.parametrize("kind", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("transport", ["bytes", "memoryview", "direct"])
@pytest.mark.parametrize("layout", ["multipart", "inline"])
def test_round_trip_every_kind(kind, transport, layout):
    arrays, fields = ROUND_TRIPS[kind]
    frames = encode(kind, 12, arrays, fields, inline_max=0 if layout == "multipart" else 1 << 30)
    assert isinstance(frames[0], bytes)
    if layout == "inline" and arrays:
        assert len(frames) == 1 and frames[0][:4] == b"\xc1DNI"
        wire = {"bytes": as_bytes(frames), "memoryview": [memoryview(bytearray(frames[0]))],
                "direct": frames}[transport]
        msg = decode(wire)
        assert msg.kind == kind and msg.step == 12 and msg.fields == fields
        assert len(msg.arrays) == len(arrays)
        for got, want in zip(msg.arrays, arrays):
            assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()
            assert not got.flags.writeable and got.flags.aligned
            if got.size:      # a view of the one frame, at an aligned offset
                assert np.shares_memory(got, np.frombuffer(wire[0], np.uint8))
                assert (got.ctypes.data - np.frombuffer(wire[0], np.uint8).ctypes.data) % P.INLINE_ALIGN == 0
        return
    assert len(frames) == 1 + len(arrays)
    # array frames are zero-copy views of the input arrays
    for a, f in zip(arrays, frames[1:]):
        assert memoryview(f).nbytes == a.nbytes
        if a.size:
            assert np.shares_memory(np.frombuffer(f, dtype=np.uint8), a)
    if transport == "bytes":
        wire = as_bytes(frames)
    elif transport == "memoryview":
        wire = [memoryview(bytearray(f)) for f in frames]
    else:
        wire = frames
    msg = decode(wire)
    assert msg.kind == kind and msg.step == 12
    assert msg.fields == fields
    assert len(msg.arrays) == len(arrays)
    for i, (got, want) in enumerate(zip(msg.arrays, arrays), 1):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()            # bit-exact
        assert not got.flags.writeable
        if got.size:
            assert np.shares_memory(got, np.frombuffer(wire[i], dtype=np.uint8))
    # float fields stay exact, ints stay ints (not bools/floats)
    for k, v in fields.items():
        assert type(msg.fields[k]) is type(v) or (isinstance(v, tuple) and type(msg.fields[k]) is list)


def test_decode_arrays_are_readonly_views_of_bytes_buffer():
    wire = as_bytes(mp(P.FWD, 0, [H, Y]))
    msg = decode(wire)
    assert msg.arrays[0].base is not None
    assert np.shares_memory(msg.arrays[0], np.frombuffer(wire[1], np.uint8))
    with pytest.raises(ValueError):
        msg.arrays[0][0, 0] = 1.0


def test_encode_makes_noncontiguous_contiguous_and_keeps_contiguous_zero_copy():
    base = np.arange(40, dtype=np.float64).reshape(5, 8)
    view = base[:, ::2]
    frames = encode(P.BWD, 1, [view])
    assert decode(as_bytes(frames)).arrays[0].tolist() == view.tolist()
    frames = mp(P.BWD, 1, [base])
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), base)
    # Fortran order is not C-contiguous: copied into C order
    f = np.asfortranarray(base)
    assert np.array_equal(decode(encode(P.BWD, 1, [f])).arrays[0], base)


def test_encode_converts_numpy_scalars_in_fields_and_step():
    frames = encode(P.DONE, np.int64(5), fields={"loss": np.float32(0.5), "metric": np.float64(0.25), "n": np.int32(3)})
    msg = decode(frames)
    assert msg.step == 5 and type(msg.step) is int
    assert msg.fields == {"loss": 0.5, "metric": 0.25, "n": 3}
    assert type(msg.fields["n"]) is int and type(msg.fields["loss"]) is float


def test_encode_accepts_numpy_scalar_array():
    msg = decode(encode(P.BYE, 0, [np.float32(1.5)]))
    assert msg.arrays[0].shape == () and msg.arrays[0].dtype == np.float32 and msg.arrays[0] == 1.5


def test_int_accepted_where_float_required_and_nonfinite_float_fields_kept():
    msg = decode(encode(P.DONE, 1, fields={"loss": float("nan"), "metric": 1, "n": 1}))
    assert math.isnan(msg.fields["loss"]) and msg.fields["metric"] == 1


def test_frame_nbytes():
    frames = mp(P.FWD, 0, [H, Y])
    expected = len(frames[0]) + H.nbytes + Y.nbytes
    assert frame_nbytes(frames) == expected
    assert frame_nbytes(as_bytes(frames)) == expected
    assert frame_nbytes([bytearray(f) for f in frames]) == expected
    assert frame_nbytes([H, b"ab"]) == H.nbytes + 2
    assert frame_nbytes([]) == 0


def test_message_repr_is_short():
    msg = decode(encode(P.FWD, 0, [np.zeros((100, 100), np.float32), Y]))
    r = repr(msg)
    assert "float32[100, 100]" in r and len(r) < 200


def test_protocol_error_is_value_error_and_picklable():
    e = ProtocolError("size", "frame 1: too small")
    assert isinstance(e, ValueError) and str(e) == "frame 1: too small"
    e2 = pickle.loads(pickle.dumps(e))
    assert e2.reason == "size" and str(e2) == "frame 1: too small"


# --------------------------------------------------------------------------
# real zmq frames
# --------------------------------------------------------------------------

@pytest.fixture
def zpair():
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context()
    a = ctx.socket(zmq.PAIR)
    b = ctx.socket(zmq.PAIR)
    a.linger = 0
    b.linger = 0
    a.bind("inproc://proto-test")
    b.connect("inproc://proto-test")
    try:
        yield a, b
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def test_decode_from_zmq_frames(zpair):
    a, b = zpair
    h = np.random.default_rng(0).standard_normal((64, 784)).astype(np.float32)  # > zmq copy threshold
    y = np.arange(64, dtype=np.int64)
    frames = encode(P.FWD, 9, [h, y])
    a.send_multipart(frames, copy=False)
    got = b.recv_multipart(copy=False)
    assert frame_nbytes(got) == frame_nbytes(frames)
    msg = decode(got, check_finite=True, expect={P.FWD: [(None, 784), (None,)]})
    assert msg.kind == P.FWD and msg.step == 9
    assert np.array_equal(msg.arrays[0], h) and np.array_equal(msg.arrays[1], y)
    assert not msg.arrays[0].flags.writeable
    assert np.shares_memory(msg.arrays[0], np.frombuffer(got[1].buffer, np.uint8))

    # control message with no arrays, and bytes frames via copy=True
    a.send_multipart(encode(P.HELLO, fields={"role": "layer", "index": 0, "pid": 1, "host": "h"}))
    msg = decode(b.recv_multipart())
    assert msg.fields["role"] == "layer" and msg.arrays == []

    # a truncated message off the wire
    a.send_multipart(frames[:2], copy=False)
    reject(b.recv_multipart(copy=False), "frames")


# --------------------------------------------------------------------------
# rejections
# --------------------------------------------------------------------------

@pytest.mark.parametrize("v", [1, 3])
def test_reject_wrong_version(v):
    """1: a peer on the code before one-frame messages; 3: a newer one. Both fail at their first message."""
    msg = reject(raw_frames(raw_header(v=v)), "version")
    assert f"protocol version {v}, expected {P.PROTOCOL_VERSION}" in msg


def test_reject_unknown_kind():
    reject(raw_frames(raw_header(k="nope")), "kind")


def test_reject_header_not_msgpack():
    reject([b"\xc1garbage", H.tobytes(), Y.tobytes()], "header")   # 0xc1 is never used
    reject([b"\x92\x01", H.tobytes(), Y.tobytes()], "header")       # truncated array
    reject([b""], "header")
    full = msgpack.packb(raw_header())
    reject([full + b"\x00", H.tobytes(), Y.tobytes()], "header")     # trailing data


def test_reject_header_not_a_map():
    reject([msgpack.packb([1, "fwd", 0]), H.tobytes(), Y.tobytes()], "header")
    reject([msgpack.packb("fwd")], "header")


def test_reject_header_too_large():
    big = raw_header(k=P.STATS, a=[], f={"pad": "x" * P.MAX_HEADER_BYTES})
    msg = reject([msgpack.packb(big)], "header")
    assert str(P.MAX_HEADER_BYTES) in msg
    with pytest.raises(ProtocolError) as ei:
        encode(P.STATS, fields={"pad": "x" * P.MAX_HEADER_BYTES})
    assert ei.value.reason == "header"


def test_reject_ext_types_in_header():
    h = raw_header(k=P.STATS, a=[], f={"x": msgpack.ExtType(5, b"abc")})
    reject([msgpack.packb(h)], "header")
    h = raw_header(k=P.STATS, a=[], f={"t": msgpack.Timestamp(1, 0)})
    reject([msgpack.packb(h)], "header")
    h = raw_header(k=P.STATS, a=[], f={"x": msgpack.ExtType(1, b"")})   # zero-length ext
    reject([msgpack.packb(h)], "header")
    with pytest.raises(ProtocolError):
        encode(P.STATS, fields={"x": msgpack.ExtType(5, b"abc")})


def test_reject_bytes_in_fields():
    reject([msgpack.packb(raw_header(k=P.STATS, a=[], f={"b": b"\x00\x01"}), use_bin_type=True)], "fields")
    reject([msgpack.packb(raw_header(k=P.STATS, a=[], f={"l": [1, {"b": b"x"}]}), use_bin_type=True)], "fields")
    reject([msgpack.packb(raw_header(k=P.STOP, a=[], f={"reason": b"x"}), use_bin_type=True)], "fields")
    with pytest.raises(ProtocolError) as ei:
        encode(P.STATS, fields={"b": b"raw"})
    assert ei.value.reason == "fields"


def test_reject_non_str_keys_and_too_deep_fields():
    reject([msgpack.packb(raw_header(k=P.STATS, a=[], f={"m": {1: 2}}))], "header")       # strict_map_key
    reject([msgpack.packb(raw_header(k=P.STATS, a=[], f={"m": {b"k": 2}}), use_bin_type=True)], "fields")
    deep = 1
    for _ in range(P.MAX_FIELD_DEPTH + 1):
        deep = [deep]
    reject([msgpack.packb(raw_header(k=P.STATS, a=[], f={"d": deep}))], "fields")
    ok = 1
    for _ in range(P.MAX_FIELD_DEPTH - 1):
        ok = [ok]
    assert decode([msgpack.packb(raw_header(k=P.STATS, a=[], f={"d": ok}))]).fields["d"] == ok
    with pytest.raises(ProtocolError):
        encode(P.STATS, fields={"obj": object()})


@pytest.mark.parametrize("key", ["v", "k", "s", "a", "f"])
def test_reject_missing_key(key):
    reject(raw_frames(raw_header(**{key: _DEL})), "header")


def test_reject_extra_key_and_wrong_key_types():
    reject(raw_frames(raw_header(x=1)), "header")
    reject(raw_frames(raw_header(v="1")), "header")
    reject(raw_frames(raw_header(v=True)), "header")
    reject(raw_frames(raw_header(k=3)), "header")
    reject(raw_frames(raw_header(a={"0": 1})), "header")
    reject(raw_frames(raw_header(f=[])), "header")
    reject(raw_frames(raw_header(a=[["float32", [2, 3]], "int64"])), "header")


@pytest.mark.parametrize("step", [1.0, "3", None, True, False, -2, [1]])
def test_reject_bad_step(step):
    reject(raw_frames(raw_header(s=step)), "step")
    with pytest.raises(ProtocolError) as ei:
        encode(P.FWD, step, [H, Y])
    assert ei.value.reason == "step"


def test_step_minus_one_and_large_accepted():
    assert decode(raw_frames(raw_header(s=-1))).step == -1
    assert decode(raw_frames(raw_header(s=2**62))).step == 2**62


def test_reject_frame_count_mismatch():
    frames = as_bytes(mp(P.FWD, 0, [H, Y]))
    msg = reject(frames[:2], "frames")                  # truncated
    assert "2 frames" in msg
    reject(frames + [b"extra"], "frames")
    reject([], "frames")
    reject(frames[:1], "frames")


def test_reject_non_buffer_frame():
    frames = as_bytes(mp(P.FWD, 0, [H, Y]))
    reject([frames[0], "not a buffer", frames[2]], "frames")
    reject([frames[0], frames[1], 12345], "frames")
    reject(["header"], "frames")


@pytest.mark.parametrize("dtype", ["object", "<U3", "float128", "bool", "complex64", ">f4", "f4", "", "int16"])
def test_reject_dtype_not_allowed(dtype):
    msg = reject(raw_frames(raw_header(a=[[dtype, [2, 3]], ["int64", [2]]])), "dtype")
    assert "frame 1" in msg


def test_reject_dtype_not_a_string():
    reject(raw_frames(raw_header(a=[[5, [2, 3]], ["int64", [2]]])), "dtype")


@pytest.mark.parametrize("dtype", [np.uint32, np.bool_, np.complex64, np.int16, np.dtype(">f4"), np.dtype(">i8"), object])
def test_encode_rejects_dtype(dtype):
    arr = np.zeros(3, dtype=dtype)
    with pytest.raises(ProtocolError) as ei:
        encode(P.BWD, 0, [arr])
    assert ei.value.reason == "dtype" and isinstance(ei.value, ValueError)
    with pytest.raises(ProtocolError):
        encode(P.BWD, 0, [[1.0, 2.0]])        # not an ndarray
    with pytest.raises(ProtocolError):
        encode(P.BWD, 0, [np.int16(1)])   # numpy scalar of a bad dtype
    with pytest.raises(ProtocolError):
        encode(P.BWD, 0, [np.zeros(2, dtype="<U3")])


def test_encode_rejects_unknown_kind_and_bad_arrays():
    for kind in ("nope", "", None, b"fwd"):
        with pytest.raises(ValueError) as ei:
            encode(kind)
        assert isinstance(ei.value, ProtocolError) and ei.value.reason == "kind"
    with pytest.raises(ProtocolError) as ei:
        encode(P.BWD, 0, [np.zeros((1, 1, 1, 1, 1), np.float32)])
    assert ei.value.reason == "shape"
    with pytest.raises(ProtocolError) as ei:
        encode(P.FWD, 0, [H])                # FWD needs 2 arrays
    assert ei.value.reason == "frames"
    with pytest.raises(ProtocolError) as ei:
        encode(P.DONE, 0, fields={"loss": 1.0, "metric": 1.0})   # missing n
    assert ei.value.reason == "fields"
    with pytest.raises(ProtocolError) as ei:
        encode(P.ACK, 0, fields={"unexpected": 1})
    assert ei.value.reason == "fields"


@pytest.mark.parametrize("shape", [[-1, 3], [2, -3]])
def test_reject_negative_dim(shape):
    reject(raw_frames(raw_header(a=[["float32", shape], ["int64", [2]]])), "shape")


def test_reject_too_many_dims():
    msg = reject(raw_frames(raw_header(a=[["float32", [1, 1, 1, 2, 3]], ["int64", [2]]])), "shape")
    assert "5 dims" in msg


@pytest.mark.parametrize("shape", [[2.0, 3], ["2", 3], [True, 6], [None, 6], 6, "6", {"0": 6}])
def test_reject_non_int_dim(shape):
    reject(raw_frames(raw_header(a=[["float32", shape], ["int64", [2]]])), "shape")


def test_reject_buffer_size_mismatch():
    good = raw_frames(raw_header())
    msg = reject([good[0], good[1][:-1], good[2]], "size")
    assert msg == "fwd frame 1: buffer has 23 bytes, header says float32[2, 3] = 24 bytes"
    msg = reject([good[0], good[1], good[2] + b"\x00"], "size")
    assert "frame 2" in msg and "17 bytes" in msg and "int64[2] = 16 bytes" in msg
    # same mismatch through a memoryview frame
    reject([good[0], memoryview(good[1])[:-1], good[2]], "size")


def test_reject_array_too_big():
    n = P.MAX_ARRAY_BYTES // 4 + 1
    reject(raw_frames(raw_header(a=[["float32", [n]], ["int64", [2]]])), "size")
    reject(raw_frames(raw_header(a=[["float64", [2**40, 2**40]], ["int64", [2]]])), "size")


def test_reject_array_count_wrong_for_kind():
    reject(raw_frames(raw_header(a=[["float32", [2, 3]]]), arrays=(H,)), "frames")                  # fwd with 1
    reject(raw_frames(raw_header(k=P.ACK), arrays=(H, Y)), "frames")                                 # ack with 2
    a = [["uint8", [1]]] * (P.MAX_ARRAYS + 1)
    reject(raw_frames(raw_header(k=P.BYE, a=a), arrays=[np.zeros(1, np.uint8)] * len(a)), "frames")
    # BYE accepts any count in range
    assert len(decode(raw_frames(raw_header(k=P.BYE), arrays=(H, Y))).arrays) == 2


def test_reject_missing_required_field():
    msg = reject([msgpack.packb(raw_header(k=P.DONE, a=[], f={"loss": 1.0, "metric": 1.0}))], "fields")
    assert "'n'" in msg
    reject([msgpack.packb(raw_header(k=P.EVAL, f={}))] + [H.tobytes(), Y.tobytes()], "fields")
    reject([msgpack.packb(raw_header(k=P.HELLO, a=[], f={"role": "x", "index": 0, "pid": 1}))], "fields")


@pytest.mark.parametrize("kind,fields", [
    (P.DONE, {"loss": 1.0, "metric": 1.0, "n": True}),           # bool where int
    (P.DONE, {"loss": 1.0, "metric": 1.0, "n": 1.0}),            # float where int
    (P.DONE, {"loss": "1", "metric": 1.0, "n": 1}),
    (P.DONE, {"loss": True, "metric": 1.0, "n": 1}),             # bool where float
    (P.DONE, {"loss": 1.0, "metric": 1.0, "n": 1, "metric2": None}),
    (P.BWD, {"mb": False}),
    (P.HELLO, {"role": "x", "index": True, "pid": 1, "host": "h"}),
    (P.MARKER, {"purpose": 3}),
    (P.HEARTBEAT, {"state": "x", "step": "1"}),
    (P.STOP, {"reason": None}),
    (P.ACK, {"x": 1}),                                            # unknown field on a strict kind
])
def test_reject_wrongly_typed_field(kind, fields):
    spec = P.KINDS[kind]
    arrays = [H, Y][: spec.min_arrays] if spec.min_arrays != 1 else [H]
    descr = [["float32", list(a.shape)] if a.dtype == np.float32 else ["int64", list(a.shape)] for a in arrays]
    reject([msgpack.packb(raw_header(k=kind, a=descr, f=fields))] + [a.tobytes() for a in arrays], "fields")
    with pytest.raises(ProtocolError) as ei:
        encode(kind, 0, arrays, fields)
    assert ei.value.reason == "fields"


def test_expect_shapes():
    frames = as_bytes(encode(P.FWD, 0, [np.zeros((32, 784), np.float32), np.zeros(32, np.int64)]))
    ok = decode(frames, expect={P.FWD: [(None, 784), (None,)], P.BWD: [(1, 2)]})
    assert ok.arrays[0].shape == (32, 784)
    assert decode(frames, expect={P.FWD: [(32, 784), (32,)]}).step == 0
    msg = reject(frames, "shape", expect={P.FWD: [(None, 10), (None,)]})
    assert "expected shape (*, 10)" in msg and "float32[32, 784]" in msg and "frame 1" in msg
    reject(frames, "shape", expect={P.FWD: [(None, 784), (None, 1)]})      # ndim mismatch
    reject(frames, "shape", expect={P.FWD: [(16, 784), (None,)]})
    reject(frames, "shape", expect={P.FWD: [(None, 784)]})                 # array count
    # other kinds are not affected
    assert decode(as_bytes(encode(P.ACK, 1)), expect={P.FWD: [(None, 10), (None,)]}).kind == P.ACK


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite(bad, dtype):
    h = np.ones((4, 5), dtype=dtype)
    h[2, 3] = bad
    frames = as_bytes(encode(P.FWD, 0, [h, np.zeros(4, np.int64)]))
    msg = reject(frames, "nonfinite", check_finite=True)
    assert "frame 1" in msg and "1 non-finite" in msg
    got = decode(frames)                      # accepted without the check
    assert got.arrays[0].tobytes() == h.tobytes()
    # int arrays and empty float arrays are not checked / fine
    assert decode(as_bytes(encode(P.BWD, 0, [np.zeros((0, 3), dtype)])), check_finite=True).arrays[0].shape == (0, 3)
    assert decode(as_bytes(encode(P.FWD, 0, [np.ones((4, 5), dtype), np.array([2**62, -1])])), check_finite=True)


def test_nonfinite_in_second_array():
    y = np.array([1.0, np.nan], np.float32)
    msg = reject(as_bytes(encode(P.EVAL, 0, [H, y], {"eid": 1})), "nonfinite", check_finite=True)
    assert "frame 2" in msg


def test_reasons_constant_covers_all_used_reasons():
    assert set(P.REASONS) == {"header", "version", "kind", "frames", "dtype", "shape", "size",
                              "fields", "range", "step", "nonfinite", "codec"}


def test_adding_a_kind_is_one_table_entry(monkeypatch):
    monkeypatch.setitem(P.KINDS, "probe", P._kind(arrays=(1, 2), required={"x": int}))
    msg = decode(as_bytes(encode("probe", 3, [H], {"x": 1})))
    assert msg.kind == "probe" and msg.fields == {"x": 1}
    with pytest.raises(ProtocolError):
        encode("probe", 3, [], {"x": 1})
    monkeypatch.delitem(P.KINDS, "probe")
    P._COMPILED.pop("probe", None)
    with pytest.raises(ProtocolError):
        encode("probe", 3, [H], {"x": 1})


# --------------------------------------------------------------------------
# fuzz
# --------------------------------------------------------------------------

def _valid_samples():
    out = []
    for kind, (arrays, fields) in ROUND_TRIPS.items():
        small = [a[tuple(slice(0, 3) for _ in a.shape)] if a.ndim else a for a in arrays]
        out.append(as_bytes(mp(kind, 5, small, fields)))
    return out


def test_fuzz_decode_only_raises_protocol_error():
    rnd = random.Random(12345)
    samples = _valid_samples()
    stats = {"ok": 0, "err": 0}
    reasons = set()
    for it in range(3000):
        frames = [bytearray(f) for f in rnd.choice(samples)]
        op = it % 6
        if op == 0:                                    # random header bytes
            frames[0] = bytearray(rnd.randbytes(rnd.randrange(0, 64)))
        elif op == 1:                                  # bit flips in header
            for _ in range(rnd.randrange(1, 4)):
                if frames[0]:
                    i = rnd.randrange(len(frames[0]))
                    frames[0][i] ^= 1 << rnd.randrange(8)
        elif op == 2:                                  # truncate header or an array frame
            j = rnd.randrange(len(frames))
            frames[j] = frames[j][: rnd.randrange(len(frames[j]) + 1)]
        elif op == 3:                                  # extra / missing frames
            if rnd.random() < 0.5 and len(frames) > 0:
                del frames[rnd.randrange(len(frames))]
            else:
                frames.insert(rnd.randrange(1, len(frames) + 1), bytearray(rnd.randbytes(rnd.randrange(0, 32))))
        elif op == 4:                                  # byte replacement in header with msgpack-significant bytes
            for _ in range(rnd.randrange(1, 3)):
                if frames[0]:
                    frames[0][rnd.randrange(len(frames[0]))] = rnd.choice(
                        [0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC7, 0xD4, 0xD6, 0xD7, 0xD8, 0xDC, 0xDE, 0xFF, 0x7F, 0x00, 0x80, 0x90])
        else:                                          # structured: mutate a decoded header and re-pack
            h = msgpack.unpackb(bytes(frames[0]), raw=False)
            key = rnd.choice(["v", "k", "s", "a", "f"])
            h[key] = rnd.choice([None, -5, 2**63, 1.5, "x", b"b", [], {}, [["float32", [1]]],
                                 [["float32", [-1]]], [["uint8", [2**31, 2**31]]], {"a": {"b": b"c"}}, True])
            frames[0] = bytearray(msgpack.packb(h, use_bin_type=True))
        frames = [bytes(f) if rnd.random() < 0.5 else memoryview(f) for f in frames]
        try:
            m = decode(frames, check_finite=rnd.random() < 0.5,
                       expect={P.FWD: [(None, 784), (None,)]} if rnd.random() < 0.3 else None)
        except ProtocolError as e:
            assert e.reason in P.REASONS
            assert "\n" not in str(e)
            reasons.add(e.reason)
            stats["err"] += 1
        else:
            assert isinstance(m, P.Message) and m.kind in P.KINDS
            assert len(m.arrays) == len(frames) - 1
            stats["ok"] += 1
    assert stats["ok"] + stats["err"] == 3000
    assert stats["err"] > 1000 and stats["ok"] > 0
    assert {"header", "frames", "size"} <= reasons


def test_float16_travels_and_is_checked_like_float32():
    """Half-precision activations (torch stages) are a valid wire dtype, with the same
    finiteness check as float32."""
    h = np.arange(12, dtype=np.float16).reshape(3, 4)
    y = np.zeros(3, np.int64)
    msg = P.decode(P.encode(P.FWD, 5, [h, y]), check_finite=True)
    assert msg.arrays[0].dtype == np.float16 and (msg.arrays[0] == h).all()
    h[1, 2] = np.inf
    with pytest.raises(P.ProtocolError) as e:
        P.decode(P.encode(P.FWD, 5, [h, y]), check_finite=True)
    assert e.value.reason == "nonfinite"
