"""The inline layout of the wire format: a small message as ONE frame (header + arrays).

Hand-built frames check that the decoder is as strict as in the multipart layout:
truncated, extended, lying header lengths and shapes, missing or non-zero padding,
extra frames, misaligned buffers, and the cache of validated headers.
"""

from __future__ import annotations

import random

import msgpack
import numpy as np
import pytest

from asyncdni.wire import protocol as P
from asyncdni.wire.protocol import ProtocolError, decode, encode

H = np.arange(6, dtype=np.float32).reshape(2, 3)          # 24 bytes: the next array needs no pad
Y = np.array([7, -8], dtype=np.int64)
ODD = np.arange(3, dtype=np.float32)                       # 12 bytes: the next array needs a pad
MAGIC = b"\xc1DNI"


def header(kind=P.FWD, step=0, arrays=(H, Y), fields=None, **over):
    h = {"v": P.PROTOCOL_VERSION, "k": kind, "a": [[a.dtype.name, list(a.shape)] for a in arrays],
         "f": fields or {}, "s": step}
    h.update(over)
    return msgpack.packb(h, use_bin_type=True)


def inline(hdr, arrays=(H, Y), *, align=P.INLINE_ALIGN, hlen=None, pad=b"\0"):
    """An inline frame built by hand; ``align``/``hlen``/``pad`` can lie."""
    out = bytearray(MAGIC + (len(hdr) if hlen is None else hlen).to_bytes(4, "little") + hdr)
    for a in arrays:
        out += pad * (-len(out) % align)
        out += a.tobytes()
    return bytes(out)


def reject(frames, reason, **kw):
    with pytest.raises(ProtocolError) as ei:
        decode(frames, **kw)
    assert ei.value.reason == reason, (ei.value.reason, str(ei.value))
    assert str(ei.value) and "\n" not in str(ei.value)
    return str(ei.value)


def offsets(frame):
    """The array offsets of a valid inline frame, as the format defines them."""
    hlen = int.from_bytes(frame[4:8], "little")
    h = msgpack.unpackb(frame[8:8 + hlen])
    out, end = [], 8 + hlen
    for name, shape in h["a"]:
        end += -end % P.INLINE_ALIGN
        out.append(end)
        end += int(np.prod(shape, dtype=np.int64)) * np.dtype(name).itemsize
    return out, end


# --------------------------------------------------------------------------
# which layout, and what it looks like
# --------------------------------------------------------------------------

def test_layout_follows_the_threshold():
    small = np.zeros(P.INLINE_MAX // 4, np.float32)            # exactly INLINE_MAX bytes
    big = np.zeros(P.INLINE_MAX // 4 + 1, np.float32)
    assert len(encode(P.BWD, 1, [small])) == 1
    assert len(encode(P.BWD, 1, [big])) == 2
    fwd = encode(P.FWD, 1, [small, np.zeros(1, np.int64)])      # the total counts, not each array
    assert len(fwd) == 3
    # no arrays: the header alone, plain msgpack (the same in both layouts)
    (only,) = encode(P.ACK, 3)
    assert msgpack.unpackb(only)["s"] == 3
    assert len(encode(P.BWD, 1, [small], inline_max=0)) == 2
    assert len(encode(P.BWD, 1, [big], inline_max=1 << 30)) == 1


def test_inline_frame_is_preamble_header_aligned_arrays_zero_padding():
    arrays = [ODD, Y, np.array(3.5), np.zeros((0, 4), np.float32), np.arange(5, dtype=np.uint8),
              np.ones((2, 2), np.float64)]
    (frame,) = encode(P.BYE, 7, arrays, {"k": 1})
    assert frame[:4] == MAGIC
    offs, end = offsets(frame)
    assert end == len(frame)
    prev_end = 8 + int.from_bytes(frame[4:8], "little")
    for off, a in zip(offs, arrays):
        assert off % P.INLINE_ALIGN == 0
        assert frame[prev_end:off] == bytes(off - prev_end)            # zero padding
        assert frame[off:off + a.nbytes] == a.tobytes()
        prev_end = off + a.nbytes
    msg = decode([frame])
    assert msg.kind == P.BYE and msg.step == 7 and msg.fields == {"k": 1}
    for got, want in zip(msg.arrays, arrays):
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        assert not got.flags.writeable and got.flags.aligned
    base = np.frombuffer(frame, np.uint8)
    views = [g for g in msg.arrays if g.size]
    assert all(np.shares_memory(g, base) for g in views)                  # views, not copies
    for i, g in enumerate(views):                                          # and never overlapping
        assert not any(np.shares_memory(g, o) for o in views[i + 1:])


def test_hand_built_inline_frame_decodes_like_encode():
    frame = inline(header(step=12))
    msg = decode([frame])
    assert msg.step == 12 and np.array_equal(msg.arrays[0], H) and np.array_equal(msg.arrays[1], Y)
    # the header in any key order is fine (only the encoder's own order is cached)
    hdr = msgpack.packb({"s": 5, "f": {}, "a": [["float32", [2, 3]], ["int64", [2]]], "k": P.FWD,
                         "v": P.PROTOCOL_VERSION})
    assert decode([inline(hdr)]).step == 5


@pytest.mark.parametrize("kind", [P.FWD, P.BWD, P.EVAL, P.BYE])
def test_inline_and_multipart_decode_alike(kind):
    rng = np.random.default_rng(3)
    arrays = {P.FWD: [rng.standard_normal((5, 7)).astype(np.float32), np.arange(5)],
              P.BWD: [rng.standard_normal((5, 3)).astype(np.float32)],
              P.EVAL: [rng.standard_normal((1, 9)), np.arange(1, dtype=np.int32)],
              P.BYE: [np.zeros(3, np.uint8), np.ones((2, 2), np.float32), np.array(1, np.int64)]}[kind]
    fields = {"eid": 2} if kind == P.EVAL else {}
    a = decode(encode(kind, 9, arrays, fields, inline_max=1 << 30))
    b = decode(encode(kind, 9, arrays, fields, inline_max=0))
    assert (a.kind, a.step, a.fields) == (b.kind, b.step, b.fields)
    for x, y in zip(a.arrays, b.arrays):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


# --------------------------------------------------------------------------
# rejections
# --------------------------------------------------------------------------

def test_truncated_anywhere_is_rejected():
    (frame,) = encode(P.EVAL, 4, [ODD.reshape(1, 3), np.array([1], np.int64)], {"eid": 0})
    reasons = set()
    for n in range(len(frame)):
        with pytest.raises(ProtocolError) as ei:
            decode([frame[:n]])
        reasons.add(ei.value.reason)
    assert reasons <= {"header", "size"} and "size" in reasons


@pytest.mark.parametrize("extra", [b"\0", bytes(8), b"garbage!", bytes(4096)])
def test_extended_is_rejected(extra):
    (frame,) = encode(P.FWD, 1, [H, Y])
    msg = reject([frame + extra], "size")
    assert "bytes after its arrays" in msg


def test_extra_frames_are_rejected():
    (frame,) = encode(P.FWD, 1, [H, Y])
    reject([frame, b""], "frames")
    reject([frame, H.tobytes(), Y.tobytes()], "frames")
    reject([frame, frame], "frames")


def test_bad_preamble_is_rejected():
    (frame,) = encode(P.FWD, 1, [H, Y])
    for bad in (b"\xc1", b"\xc1DN", b"\xc1DNI\x00", b"\xc1XNI" + frame[4:], b"\xc1dni" + frame[4:]):
        reject([bad], "header")


def test_lying_header_length_is_rejected():
    hdr = header()
    for hlen in (0, 1, len(hdr) - 8, len(hdr) - 1, len(hdr) + 1, len(hdr) + 8):
        with pytest.raises(ProtocolError) as ei:
            decode([inline(hdr, hlen=hlen)])
        assert ei.value.reason in ("header", "size")
    # pointing past the end of the frame
    msg = reject([inline(hdr, hlen=10_000)], "size")
    assert "shorter than its 10000-byte header" in msg
    reject([inline(hdr, hlen=P.MAX_HEADER_BYTES + 1)], "header")
    reject([inline(hdr, hlen=2**32 - 1)], "header")


def test_lying_shapes_are_rejected():
    # the header says more (or fewer) bytes than the frame carries
    reject([inline(header(arrays=(np.zeros((3, 3), np.float32), Y)))], "size")
    reject([inline(header(arrays=(np.zeros((1, 3), np.float32), Y)))], "size")
    reject([inline(header(arrays=(H, np.zeros(3, np.int64))))], "size")
    # a size beyond any frame, and one that overflows: rejected from the header alone
    reject([inline(header(arrays=(np.zeros((2, 3), np.float32),), a=[["float32", [2**20, 2**20]], ["int64", [2]]]))],
           "size")
    # the arrays' dtypes swapped: same bytes in all, other sizes per array -> the total differs
    reject([inline(header(a=[["int64", [2, 3]], ["float32", [2]]]))], "size")


def test_misplaced_arrays_are_rejected():
    hdr = header(kind=P.BYE, arrays=(ODD, Y))
    good = inline(hdr, arrays=(ODD, Y))
    assert np.array_equal(decode([good]).arrays[1], Y)
    # no padding (Y right after ODD, at an offset that is not a multiple of 8)
    reject([inline(hdr, arrays=(ODD, Y), align=1)], "size")
    # padding of 16 instead of 8: every array shifted -> the frame is longer than the header says
    reject([inline(hdr, arrays=(ODD, Y), align=16) + bytes(8)], "size")
    # non-zero padding bytes
    msg = reject([inline(hdr, arrays=(ODD, Y), pad=b"\x01")], "frames")
    assert "padding" in msg


def test_header_checks_are_the_same_in_both_layouts():
    cases = [
        (dict(v=1), "version"), (dict(v=3), "version"), (dict(k="nope"), "kind"), (dict(s=-2), "step"),
        (dict(s=1.5), "step"),
        (dict(a=[["complex64", [2, 3]], ["int64", [2]]]), "dtype"),
        (dict(a=[["float32", [2, -3]], ["int64", [2]]]), "shape"),
        (dict(a=[["float32", [1, 1, 1, 1, 6]], ["int64", [2]]]), "shape"),
        (dict(a=[["float32", [2, 3]]]), "frames"),
        (dict(f={"x": 1}), "fields"), (dict(x=1), "header"),
    ]
    for over, reason in cases:
        hdr = header(**over)
        reject([inline(hdr)], reason)
        reject([hdr, H.tobytes(), Y.tobytes()], reason)
    reject([inline(header(kind=P.DONE, arrays=(), fields={"loss": 1.0, "metric": -1.0, "n": 1}), arrays=())],
           "range")
    # an accuracy above 1 is refused by the feeder's expectation of a classification run
    reject([inline(header(kind=P.DONE, arrays=(), fields={"loss": 1.0, "metric": 2.0, "n": 1}), arrays=())],
           "range", expect=P.result_expect(regression=False))
    # the expectations agreed at start-up apply to both layouts
    (frame,) = encode(P.FWD, 0, [H, Y])
    reject([frame], "shape", expect={P.FWD: [(None, 4), (None,)]})
    (frame,) = encode(P.FWD, 0, [np.array([[np.nan, 0, 0]], np.float32), np.zeros(1, np.int64)])
    reject([frame], "nonfinite", check_finite=True)


def test_encode_rejects_steps_outside_int64():
    with pytest.raises(ProtocolError) as ei:
        encode(P.FWD, 2**63, [H, Y])
    assert ei.value.reason == "step"
    assert decode(encode(P.FWD, 2**63 - 1, [H, Y])).step == 2**63 - 1


# --------------------------------------------------------------------------
# alignment
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shift", range(1, 8))
def test_misaligned_buffer_gives_aligned_read_only_arrays(shift):
    (frame,) = encode(P.BYE, 1, [np.arange(5, dtype=np.float64), np.arange(3, dtype=np.int32)])
    buf = bytearray(len(frame) + 16)
    base = np.frombuffer(buf, np.uint8).ctypes.data
    start = next(s for s in range(16) if (base + s) % 8 == shift)     # an address that is not 8-aligned
    buf[start:start + len(frame)] = frame
    view = memoryview(buf)[start:start + len(frame)]
    msg = decode([view])
    assert np.array_equal(msg.arrays[0], np.arange(5)) and np.array_equal(msg.arrays[1], np.arange(3))
    for a in msg.arrays:
        assert a.flags.aligned and not a.flags.writeable


# --------------------------------------------------------------------------
# the cache of validated headers
# --------------------------------------------------------------------------

def test_cached_header_still_checks_step_frames_and_kind(monkeypatch):
    (frame,) = encode(P.BWD, 5, [H])
    assert decode([frame]).step == 5
    assert decode([frame]).step == 5                                  # a hit
    hlen = int.from_bytes(frame[4:8], "little")
    end = 8 + hlen
    for step, ok in ((-1, True), (0, True), (2**63 - 1, True), (-2, False), (-(2**63), False)):
        f = frame[:end - 8] + step.to_bytes(8, "big", signed=True) + frame[end:]
        if ok:
            assert decode([f]).step == step
        else:
            reject([f], "step")
    # the same header in the multipart layout with the wrong number of frames
    hdr = frame[8:end]
    assert decode([hdr, H.tobytes()]).step == 5
    reject([hdr], "frames")
    reject([hdr, H.tobytes(), b""], "frames")
    # a kind that is no longer known is not served from the cache
    monkeypatch.setitem(P.KINDS, "probe", P._kind(arrays=1))
    (pf,) = encode("probe", 1, [H])
    assert decode([pf]).kind == "probe" and decode([pf]).kind == "probe"
    monkeypatch.delitem(P.KINDS, "probe")
    P._COMPILED.pop("probe", None)
    reject([pf], "kind")


def test_cache_is_bounded():
    for n in range(1, P._CACHE_LIMIT + 50):
        decode(encode(P.BWD, 0, [np.zeros((n, 1), np.float32)]))
    assert len(P._VALIDATED) <= P._CACHE_LIMIT and len(P._PREFIXES) <= P._CACHE_LIMIT
    assert decode(encode(P.BWD, 3, [H])).step == 3


def test_fields_are_fresh_per_message():
    a = decode(encode(P.FWD, 1, [H, Y]))
    a.fields["x"] = 1
    assert decode(encode(P.FWD, 2, [H, Y])).fields == {}


# --------------------------------------------------------------------------
# fuzz and real sockets
# --------------------------------------------------------------------------

def test_fuzz_inline_only_raises_protocol_error():
    rnd = random.Random(99)
    samples = [encode(P.FWD, 3, [H, Y])[0], encode(P.BWD, 2**40, [ODD.reshape(1, 3)], {"mb": 1})[0],
               encode(P.BYE, 1, [ODD, Y, np.array(2.0)], {"x": [1, {"y": None}]})[0],
               encode(P.EVAL, 0, [H, Y], {"eid": 3})[0]]
    reasons = set()
    ok = 0
    for it in range(4000):
        f = bytearray(rnd.choice(samples))
        op = it % 5
        if op == 0:                                     # bit flips anywhere
            for _ in range(rnd.randrange(1, 4)):
                i = rnd.randrange(len(f))
                f[i] ^= 1 << rnd.randrange(8)
        elif op == 1:                                   # truncate
            del f[rnd.randrange(len(f) + 1):]
        elif op == 2:                                   # insert bytes
            i = rnd.randrange(len(f) + 1)
            f[i:i] = rnd.randbytes(rnd.randrange(1, 16))
        elif op == 3:                                   # the header length field
            f[4:8] = rnd.randrange(2**32).to_bytes(4, "little") if rnd.random() < 0.5 else \
                (int.from_bytes(f[4:8], "little") + rnd.choice([-9, -8, -1, 1, 7, 8])).to_bytes(4, "little", signed=True)
        else:                                           # msgpack-significant bytes in the header
            hend = 8 + int.from_bytes(f[4:8], "little")
            for _ in range(rnd.randrange(1, 3)):
                f[rnd.randrange(8, hend)] = rnd.choice([0xC0, 0xC1, 0xC2, 0xD3, 0xDC, 0xDE, 0xFF, 0x7F, 0x00, 0x80])
        wire = [bytes(f) if rnd.random() < 0.5 else memoryview(f)]
        try:
            m = decode(wire, check_finite=rnd.random() < 0.5)
        except ProtocolError as e:
            assert e.reason in P.REASONS and "\n" not in str(e)
            reasons.add(e.reason)
        else:
            ok += 1
            assert isinstance(m, P.Message) and m.kind in P.KINDS
            offs, end = offsets(bytes(f))
            assert end == len(f)
            for a, off in zip(m.arrays, offs):
                assert a.tobytes() == bytes(f[off:off + a.nbytes])
    assert ok > 0 and {"header", "size"} <= reasons


def test_inline_and_multipart_over_zmq():
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://inline-test")
        b.connect("inproc://inline-test")
        rng = np.random.default_rng(0)
        for rows in (1, 64, 200):          # 1 KiB and 64 KiB inline, 200 KiB multipart
            h = rng.standard_normal((rows, 256)).astype(np.float32)
            y = rng.integers(0, 10, rows)
            frames = encode(P.FWD, rows, [h, y])
            assert len(frames) == (1 if h.nbytes + y.nbytes <= P.INLINE_MAX else 3)
            a.send_multipart(frames, copy=False)
            got = b.recv_multipart(copy=False)
            msg = decode(got, check_finite=True, expect={P.FWD: [(None, 256), (None,)]})
            assert msg.step == rows and np.array_equal(msg.arrays[0], h) and np.array_equal(msg.arrays[1], y)
            assert all(x.flags.aligned and not x.flags.writeable for x in msg.arrays)
            assert np.shares_memory(msg.arrays[0], np.frombuffer(got[0 if len(got) == 1 else 1].buffer, np.uint8))
    finally:
        a.close(0)
        b.close(0)
        ctx.term()
