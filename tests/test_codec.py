"""Tests of asyncdni.wire.codec: the link codecs (fp16, bf16, int8, topk) and error feedback."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from asyncdni.wire import codec as C
from asyncdni.wire.codec import Codec, CodecError, ErrorFeedback, parse

SHAPES = [(64, 256), (3, 7), (2, 4, 5, 5), (1, 1)]
NAMES = ["fp32", "fp16", "bf16", "int8:row", "int8:tensor", "topk:0.1", "topk:0.3", "topk:1.0"]
LOSSY = [n for n in NAMES if n != "fp32"]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def data(shape, seed=0, big=1e3):
    """Random normal float32 with a few large values and (with 2+ rows) an all-zero row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    if flat.size > 3:
        pos = rng.choice(flat.size, size=max(1, flat.size // 100), replace=False)
        flat[pos] = rng.choice([-1.0, 1.0], size=pos.size) * big * rng.uniform(1, 10, size=pos.size)
    if shape[0] >= 2:
        x[1] = 0.0
    return x


def readonly(arrays):
    """What the wire format hands decode: read-only views on copies."""
    out = []
    for a in arrays:
        b = np.array(a, copy=True)
        v = b.view()
        v.flags.writeable = False
        out.append(v)
    return out


def wire(name, shape=(4, 16), seed=0):
    c = parse(name)
    x = data(shape, seed)
    return c, x, [np.array(a, copy=True) for a in c.encode(x)]


def refused(c, arrays, fs, *words):
    with pytest.raises(CodecError) as ei:
        c.decode(readonly(arrays), fs)
    e = ei.value
    assert isinstance(e, ValueError) and e.reason == "codec"
    msg = str(e)
    assert "\n" not in msg and c.name in msg
    for w in words:
        assert w in msg, msg
    return msg


# --------------------------------------------------------------------------
# parse
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text,name,kind", [
    ("fp32", "fp32", "fp32"), ("fp16", "fp16", "fp16"), ("bf16", "bf16", "bf16"),
    ("int8", "int8:row", "int8"), ("int8:row", "int8:row", "int8"), ("int8:tensor", "int8:tensor", "int8"),
    ("topk:0.1", "topk:0.1", "topk"), ("topk:0.10", "topk:0.1", "topk"), ("topk:1", "topk:1.0", "topk"),
    ("  FP16 \n", "fp16", "fp16"), ("INT8:Tensor", "int8:tensor", "int8"), (" TopK:0.25 ", "topk:0.25", "topk"),
    ("topk:1e-2", "topk:0.01", "topk"),
])
def test_parse_forms_and_canonical_names(text, name, kind):
    c = parse(text)
    assert (c.name, c.kind) == (name, kind)
    assert parse(c.name) == c                       # canonical names parse to themselves
    assert c.lossy == (kind != "fp32")


def test_parse_fields():
    assert parse("int8").per_row and not parse("int8:tensor").per_row
    assert parse("topk:0.1").fraction == 0.1
    assert "topk:F" in C.FORMS and "int8:tensor" in C.FORMS


@pytest.mark.parametrize("text", ["int4", "topk:0", "topk:1.5", "topk:x", "", "   ", "topk", "topk:", "topk:-0.1",
                                  "topk:nan", "topk:inf", "int8:col", "fp32:1", "fp16:row", "float32", "int8:"])
def test_parse_refuses(text):
    with pytest.raises(ValueError) as ei:
        parse(text)
    msg = str(ei.value)
    assert "\n" not in msg
    assert repr(text) in msg                        # names the bad text
    assert "fp16" in msg and "topk:F" in msg        # and lists the allowed forms


def test_parse_refuses_non_string():
    with pytest.raises(ValueError):
        parse(8)


def test_k():
    c = parse("topk:0.1")
    assert c.k(256) == 26 and c.k(7) == 1 and c.k(1) == 1 and c.k(10) == 1 and c.k(11) == 2
    assert parse("topk:0.3").k(10) == 3             # 0.3 * 10 == 3.0000000000000004 in float
    assert parse("topk:0.7").k(10) == 7
    assert parse("topk:1.0").k(100) == 100
    assert parse("topk:1e-9").k(100) == 1
    assert parse("topk:0.5").k(7) == 4


# --------------------------------------------------------------------------
# round trip, error bounds
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_exact(shape):
    c, x = parse("fp32"), data(shape)
    arrays = c.encode(x)
    assert len(arrays) == 1 and arrays[0] is x      # no copy
    y = c.decode(readonly(arrays), shape[1:])
    assert np.array_equal(y, x)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp16_relative_error(shape):
    c, x = parse("fp16"), data(shape)
    y = c.decode(readonly(c.encode(x)), shape[1:])
    normal = (np.abs(x) >= 2.0 ** -14) & (np.abs(x) <= 65504)
    assert np.all(np.abs(y - x)[normal] <= 2.0 ** -11 * np.abs(x)[normal])
    assert np.all(y[x == 0] == 0)


def test_fp16_clips_to_finite():
    c = parse("fp16")
    x = np.array([[1e6, -1e30, 65519.0, 3.0]], np.float32)
    q = c.encode(x)[0]
    assert np.isfinite(q).all()
    assert np.array_equal(c.decode(readonly([q]), (4,)), np.array([[65504, -65504, 65504, 3]], np.float32))


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_relative_error(shape):
    c, x = parse("bf16"), data(shape, big=1e30)
    y = c.decode(readonly(c.encode(x)), shape[1:])
    assert np.all(np.abs(y - x) <= 2.0 ** -8 * np.abs(x))


def test_bf16_round_to_nearest_even_and_extremes():
    c = parse("bf16")
    bits = np.array([[0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF808000]], np.uint32)
    x = bits.view(np.float32)
    q = c.encode(x)[0]
    assert q.tolist() == [[0x3F80, 0x3F82, 0x3F81, 0x3F80, 0xBF80]]   # ties to even; above / below the tie
    big = np.array([[np.finfo(np.float32).max, -np.finfo(np.float32).max, 1e-40]], np.float32)
    y = c.decode(readonly(c.encode(big)), (3,))
    assert np.isfinite(y).all() and y[0, 0] > 3e38 and y[0, 1] < -3e38


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["int8:row", "int8:tensor"])
def test_int8_error_within_half_scale(shape, name):
    c, x = parse(name), data(shape)
    q, s = c.encode(x)
    assert q.min() >= -127 and q.max() <= 127
    assert np.isfinite(s).all() and (s > 0).all()
    y = c.decode(readonly([q, s]), shape[1:])
    rows = shape[0]
    per = (s if c.per_row else np.full(rows, s[0])).reshape((rows,) + (1,) * (len(shape) - 1))
    assert np.all(np.abs(y - x) <= per * (0.5 + 2e-5))
    if rows >= 2 and c.per_row:
        assert s[1] == 1.0 and np.all(y[1] == 0)    # the all-zero row: scale 1.0


def test_int8_zero_tensor_and_tiny_values():
    for name in ("int8:row", "int8:tensor"):
        c = parse(name)
        q, s = c.encode(np.zeros((3, 5), np.float32))
        assert np.all(s == 1.0) and np.all(q == 0)
        tiny = np.array([[1e-44, -3e-45, 0], [1e-39, 2e-40, -1e-39], [1e-36, 5e-37, 0]], np.float32)
        q, s = c.encode(tiny)
        assert np.isfinite(s).all() and (s > 0).all()
        y = c.decode(readonly([q, s]), (3,))
        per = s[:, None] if c.per_row else s[0]
        assert np.all(np.abs(y - tiny) <= per * (0.5 + 2e-5))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["topk:0.1", "topk:0.3", "topk:1.0"])
def test_topk_keeps_the_largest(shape, name):
    c, x = parse(name), data(shape)
    vals, idx = c.encode(x)
    rows, m = shape[0], math.prod(shape[1:])
    k = c.k(m)
    assert vals.shape == idx.shape == (rows, k)
    assert np.all(np.diff(idx, axis=1) > 0) and idx.min() >= 0 and idx.max() < m
    y = c.decode(readonly([vals, idx]), shape[1:])
    x2, y2 = x.reshape(rows, m), y.reshape(rows, m)
    for r in range(rows):
        kept = np.zeros(m, bool)
        kept[idx[r]] = True
        assert np.array_equal(y2[r, kept], x2[r, kept])            # kept entries exact
        assert np.all(y2[r, ~kept] == 0)                          # zero elsewhere
        if (~kept).any():
            assert np.abs(x2[r, ~kept]).max() <= np.abs(x2[r, kept]).min()   # dropped: the smallest


# --------------------------------------------------------------------------
# wire arrays vs wire_specs, nbytes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_wire_arrays_match_specs(shape, name):
    c, x = parse(name), data(shape)
    fs = shape[1:]
    specs = c.wire_specs(fs)
    arrays = c.encode(x)
    assert len(arrays) == len(specs)
    for a, (sh, dt) in zip(arrays, specs):
        assert a.shape == tuple(shape[0] if d == "B" else d for d in sh)
        assert a.dtype == np.dtype(dt)
        assert a.flags.c_contiguous
        if name != "fp32":
            assert not np.shares_memory(a, x)
    assert c.nbytes(shape[0], fs) == sum(a.nbytes for a in arrays)


def test_wire_specs_literal():
    fs = (16, 8, 8)
    assert parse("fp32").wire_specs(fs) == ((("B", 16, 8, 8), "float32"),)
    assert parse("fp16").wire_specs(fs) == ((("B", 16, 8, 8), "float16"),)
    assert parse("bf16").wire_specs(fs) == ((("B", 16, 8, 8), "uint16"),)
    assert parse("int8").wire_specs(fs) == ((("B", 16, 8, 8), "int8"), (("B",), "float32"))
    assert parse("int8:tensor").wire_specs(fs) == ((("B", 16, 8, 8), "int8"), ((1,), "float32"))
    assert parse("topk:0.1").wire_specs((256,)) == ((("B", 26), "float32"), (("B", 26), "int32"))


def test_int8_moves_under_a_third_of_fp32():
    fp32 = parse("fp32").nbytes(64, (256,))
    assert fp32 == 64 * 256 * 4
    for name in ("int8:row", "int8:tensor"):
        assert parse(name).nbytes(64, (256,)) <= 0.3 * fp32
    assert parse("fp16").nbytes(64, (256,)) == fp32 // 2


# --------------------------------------------------------------------------
# decode: new writable arrays
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_decode_returns_new_writable_float32(name):
    c, x = parse(name), data((5, 3, 4))
    arrays = readonly(c.encode(x))
    y = c.decode(arrays, (3, 4))
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y.flags.writeable and y.flags.c_contiguous
    for a in arrays:
        assert not np.shares_memory(y, a)
    y += 1                                          # writable, and the wire arrays are untouched
    assert np.array_equal(arrays[0], readonly(c.encode(x))[0])


@pytest.mark.parametrize("name", NAMES)
def test_zero_rows(name):
    c = parse(name)
    x = np.zeros((0, 6), np.float32)
    arrays = c.encode(x)
    for a, (sh, dt) in zip(arrays, c.wire_specs((6,))):
        assert a.shape == tuple(0 if d == "B" else d for d in sh) and a.dtype == dt
    assert c.decode(readonly(arrays), (6,)).shape == (0, 6)


# --------------------------------------------------------------------------
# hostile payloads
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 0.0, -1.0, -0.0, 1e38])
@pytest.mark.parametrize("name", ["int8:row", "int8:tensor"])
def test_int8_refuses_bad_scale(name, bad):
    c, _x, (q, s) = wire(name)
    s[-1] = bad
    refused(c, [q, s], (16,), "scale")


def test_int8_names_the_bad_row():
    c, _x, (q, s) = wire("int8:row", (6, 16))
    s[4] = np.nan
    assert "row 4" in refused(c, [q, s], (16,))
    c, _x, (q, s) = wire("int8:row", (6, 16))
    q[3, 7] = -128
    assert "row 3" in refused(c, [q, s], (16,), "-128")


@pytest.mark.parametrize("name", ["int8:row", "int8:tensor"])
def test_int8_refuses_minus_128(name):
    c, _x, (q, s) = wire(name)
    q[0, 0] = -128
    refused(c, [q, s], (16,), "-128")


def test_int8_refuses_disagreeing_rows():
    c, x, (q, s) = wire("int8:row", (4, 16))
    refused(c, [q, s[:3]], (16,), "row")
    refused(c, [q[:3], s], (16,), "row")
    ct = parse("int8:tensor")
    q, s = ct.encode(x)
    refused(ct, [q, np.ones(2, np.float32)], (16,), "shape")


@pytest.mark.parametrize("what,words", [
    ("index_eq_m", ("index 16",)), ("negative", ("index -1",)), ("duplicate", ("increasing",)),
    ("decreasing", ("increasing",)), ("nan_value", ("non-finite",)), ("inf_value", ("non-finite",)),
    ("huge_index", ("index",)), ("int32_wrap", ("index",)),
])
def test_topk_refuses(what, words):
    c, _x, (vals, idx) = wire("topk:0.5", (3, 16))
    r = 2
    if what == "index_eq_m":
        idx[r, -1] = 16
    elif what == "negative":
        idx[r, 0] = -1
    elif what == "duplicate":
        idx[r, 3] = idx[r, 2]
    elif what == "decreasing":
        idx[r, 2], idx[r, 3] = idx[r, 3], idx[r, 2]
    elif what == "nan_value":
        vals[r, 1] = np.nan
    elif what == "inf_value":
        vals[r, 1] = -np.inf
    elif what == "huge_index":
        idx[r, -1] = 2 ** 31 - 1
    elif what == "int32_wrap":      # "increasing" only if the differences wrap around in int32
        idx[r, :5] = [5, 2 ** 31 - 1, -2 ** 31, -1, 3]
    msg = refused(c, [vals, idx], (16,), *words)
    assert f"row {r}" in msg


def test_topk_refuses_wrong_k_and_disagreeing_rows():
    c, _x, (vals, idx) = wire("topk:0.5", (3, 16))
    refused(c, [vals[:, :7], idx[:, :7]], (16,))
    refused(c, [vals[:2], idx], (16,), "row")


@pytest.mark.parametrize("bits", [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF])
def test_fp16_refuses_inf_nan_patterns(bits):
    c, _x, (h,) = wire("fp16")
    h.view(np.uint16)[2, 5] = bits
    assert "row 2" in refused(c, [h], (16,), "NaN/Inf")


@pytest.mark.parametrize("bits", [0x7FC0, 0x7F80, 0xFF80, 0xFFC1, 0x7F81])
def test_bf16_refuses_inf_nan_patterns(bits):
    c, _x, (h,) = wire("bf16")
    h[3, 0] = bits
    assert "row 3" in refused(c, [h], (16,), "NaN/Inf")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_fp32_refuses_nonfinite(bad):
    c, x, _ = wire("fp32")
    x = x.copy()
    x[1, 2] = bad
    assert "row 1" in refused(c, [x], (16,), "non-finite")


@pytest.mark.parametrize("name", NAMES)
def test_refuses_wrong_number_of_arrays(name):
    c, _x, arrays = wire(name)
    refused(c, arrays + [arrays[0]], (16,), "wire array")
    refused(c, [], (16,), "wire array")
    if len(arrays) > 1:
        refused(c, arrays[:1], (16,), "wire array")


@pytest.mark.parametrize("name", NAMES)
def test_refuses_wrong_dtype_and_shape(name):
    c, _x, arrays = wire(name)
    refused(c, [arrays[0].astype(np.float64), *arrays[1:]], (16,), "dtype")
    refused(c, [arrays[0].reshape(-1), *arrays[1:]], (16,), "shape")
    refused(c, arrays, (160,))


# --------------------------------------------------------------------------
# error feedback
# --------------------------------------------------------------------------

def _sum_error(codec, g, steps, feedback):
    ef = ErrorFeedback(codec)
    total = np.zeros(g.shape, np.float64)
    errs = {}
    for n in range(1, steps + 1):
        arrays = ef.encode(g) if feedback else codec.encode(g)
        total += codec.decode(readonly(arrays), g.shape[1:])
        if n in (steps // 10, steps):
            errs[n] = float(np.abs(total - n * g.astype(np.float64)).max())
    return errs


@pytest.mark.parametrize("name", ["int8:row", "int8:tensor", "topk:0.1", "topk:0.3", "fp16", "bf16"])
def test_error_feedback_sum_converges(name):
    c = parse(name)
    g = data((4, 40), seed=3, big=20)
    one_step = float(np.abs(c.decode(readonly(c.encode(g)), (40,)) - g).max())
    assert one_step > 0
    steps = 400
    with_ef = _sum_error(c, g, steps, feedback=True)
    without = _sum_error(c, g, steps, feedback=False)
    # with feedback the error of the sum is what the residual holds: bounded, not growing with N
    if c.kind == "topk":
        bound = (1 / c.fraction + 1) * float(np.abs(g).max())   # a dropped entry waits at most ~1/F steps
    else:   # half a quantisation step at the largest magnitude (the residual joins it: a little more)
        unit = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8, "int8": 0.5 / 127}[c.kind]
        bound = 1.05 * unit * float(np.abs(g).max())
    assert with_ef[steps] <= bound, (with_ef, bound)
    assert with_ef[steps] <= with_ef[steps // 10] + bound
    # without it the error grows linearly: N * one step's
    assert without[steps] >= 0.99 * steps * one_step
    assert without[steps] > 10 * with_ef[steps]


def test_error_feedback_int8_constant_gradient_tight():
    c = parse("int8:row")
    g = data((8, 64), seed=5)
    ef = ErrorFeedback(c)
    total = np.zeros(g.shape, np.float64)
    for n in range(1, 1001):
        total += c.decode(readonly(ef.encode(g, key=7)), (64,))
        if n % 250 == 0:
            q, s = c.encode(g)
            assert np.all(np.abs(total - n * g) <= s[:, None] * 0.6 + 1e-6 * n * np.abs(g))


def test_error_feedback_state_round_trip():
    c = parse("topk:0.2")
    rng = np.random.default_rng(1)
    a, b = ErrorFeedback(c), ErrorFeedback(c)
    for _step in range(5):
        for key in (0, 1, 3):
            a.encode(rng.standard_normal((4, 10)).astype(np.float32), key=key)
    st = a.state()
    assert sorted(st) == ["ef0", "ef1", "ef3"]
    assert all(v.dtype == np.float32 and v.shape == (4, 10) for v in st.values())
    assert a.nbytes == 3 * 4 * 10 * 4
    buf = io.BytesIO()
    np.savez(buf, **st)                             # names usable as npz keys
    buf.seek(0)
    with np.load(buf) as z:
        b.load({k: z[k] for k in z.files})
    assert b.nbytes == a.nbytes
    for _step in range(4):
        for key in (0, 1, 3):
            x = rng.standard_normal((4, 10)).astype(np.float32)
            wa, wb = a.encode(x, key=key), b.encode(x, key=key)
            assert all(np.array_equal(p, q) for p, q in zip(wa, wb))
    # state() returns copies
    st = a.state()
    st["ef0"][:] = 1e9
    assert np.abs(a.state()["ef0"]).max() < 1e9


@pytest.mark.parametrize("state,words", [
    ({"ef0": np.array([[np.nan, 0]], np.float32)}, "non-finite"),
    ({"ef0": np.array([[np.inf, 0]], np.float32)}, "non-finite"),
    ({"residual": np.zeros((2, 2), np.float32)}, "name"),
    ({"ef": np.zeros((2, 2), np.float32)}, "name"),
    ({"ef0x": np.zeros((2, 2), np.float32)}, "name"),
    ({"ef0": np.zeros((2, 2), np.float64)}, "float32"),
    ({"ef0": [[0.0, 1.0]]}, "float32"),
])
def test_error_feedback_load_refuses(state, words):
    ef = ErrorFeedback(parse("int8"))
    ef.encode(np.ones((2, 2), np.float32) * 0.3)
    before = ef.state()
    with pytest.raises(ValueError) as ei:
        ef.load({"ef1": np.zeros((2, 2), np.float32), **state})
    assert "\n" not in str(ei.value) and words in str(ei.value)
    after = ef.state()
    assert sorted(after) == sorted(before) and all(np.array_equal(after[k], before[k]) for k in before)


def test_error_feedback_shape_change_drops_residual():
    c = parse("int8:tensor")
    ef = ErrorFeedback(c)
    ef.encode(data((4, 8), seed=1), key=2)
    assert ef.nbytes == 4 * 8 * 4
    x = data((3, 8), seed=2)
    got = ef.encode(x, key=2)
    assert all(np.array_equal(p, q) for p, q in zip(got, c.encode(x)))   # started from zero
    assert ef.state()["ef2"].shape == (3, 8) and ef.nbytes == 3 * 8 * 4


def test_error_feedback_keys_are_independent():
    c = parse("int8:row")
    ef = ErrorFeedback(c)
    x = data((2, 8), seed=4)
    ef.encode(x, key=0)
    got = ef.encode(x, key=1)                       # key 1 has no residual yet
    assert all(np.array_equal(p, q) for p, q in zip(got, c.encode(x)))


def test_error_feedback_non_lossy_keeps_no_state():
    ef = ErrorFeedback(parse("fp32"))
    x = data((4, 8))
    for _ in range(3):
        arrays = ef.encode(x, key=1)
        assert len(arrays) == 1 and arrays[0] is x
    assert ef.state() == {} and ef.nbytes == 0


def test_error_feedback_does_not_touch_input():
    c = parse("topk:0.1")
    ef = ErrorFeedback(c)
    x = data((4, 32))
    keep = x.copy()
    for _ in range(3):
        arrays = ef.encode(x)
        for a in arrays:
            assert not np.shares_memory(a, x)
    assert np.array_equal(x, keep)


def test_codec_is_hashable_value():
    assert parse("int8") == parse("INT8:row") and hash(parse("int8")) == hash(parse("int8:row"))
    assert {parse("topk:0.1"), parse("topk:0.10")} == {parse("topk:0.1")}
    with pytest.raises(ValueError):
        Codec("x", "int4")
