"""Wire format of every asyncdni message (the single owner of it).

A message has a header, a msgpack map::

      {"v": PROTOCOL_VERSION, "k": kind, "a": [[dtype_name, [d0, d1, ...]], ...],
       "f": {fields}, "s": step}

(one ``"a"`` entry per array; the encoder writes the step last, as a msgpack int64, so
that the header of a data message differs from step to step in its last 8 bytes only),
and the raw bytes of C-contiguous little-endian arrays, in the order of ``"a"``. It
travels in one of two layouts:

* **multipart** (arrays of more than :data:`INLINE_MAX` bytes in all, and every message
  without arrays): frame 0 is the header, frames 1..n the arrays, which the transport
  sends zero-copy.
* **inline** (arrays of up to :data:`INLINE_MAX` bytes in all): ONE frame::

      b"\xc1DNI" | header length (uint32 little-endian) | header | array 1 | array 2 ...

  Each array starts at the next multiple of :data:`INLINE_ALIGN` bytes from the start
  of the frame after the end of what precedes it; the padding is zero bytes, and the
  frame ends exactly where the last array ends. The offsets follow from the header, so a
  peer cannot point an array outside the frame or onto another one; the decoder checks
  the padding and the exact length. 0xc1 is never the first byte of msgpack, so the two
  layouts cannot be mistaken for each other. One frame costs less than two for small
  messages (see the README, "Transport"); the copy it needs costs more for large ones.

This module never imports zmq: :func:`encode` returns a list of frames that
``socket.send_multipart(frames, copy=False)`` accepts, and :func:`decode`
accepts ``bytes``, ``memoryview`` (or any buffer) and objects with a
``.buffer`` attribute (``zmq.Frame`` from ``recv_multipart(copy=False)``).
Nothing is ever pickled.

Decoding validates everything that comes from the peer before touching array
data: header size, msgpack limits (no ext types), header keys and types,
version, kind, array count, frame count, dtypes, shapes, buffer sizes, the inline
layout (preamble, padding, exact length) and the field schema of the kind. A header
that validated before, byte for byte except its int64 step, is not parsed again: a
small cache maps its bytes to the validated result, and the step is range-checked per
message. The cost is O(header) plus one length comparison per array; arrays are
read-only ``np.frombuffer`` views on the received buffers, never copies (except an
array whose place in a caller's buffer is not aligned for its dtype: that one is
copied, so that numerics always get aligned arrays). ``check_finite=True`` adds one
pass over float arrays.

Adding a message kind: add a string constant and one entry in :data:`KINDS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import msgpack
import numpy as np

from asyncdni.wire.codec import Codec, CodecError, wire_name

__all__ = [
    "PROTOCOL_VERSION", "MAX_HEADER_BYTES", "MAX_NDIM", "MAX_ARRAY_BYTES",
    "MAX_ARRAYS", "MAX_FIELD_DEPTH", "ALLOWED_DTYPES", "REASONS",
    "FWD", "BWD", "ACK", "DONE", "EVAL", "EVAL_RESULT", "MARKER",
    "HELLO", "READY", "SPEC", "START", "HEARTBEAT", "PROGRESS", "STATS", "ERROR",
    "STOP", "BYE", "CKPT", "CKPT_DONE", "AGENT_HELLO", "AGENT_WELCOME", "LAUNCH", "STARTED",
    "LAUNCH_FAILED", "EXITED", "KILL", "KILLED", "RELEASE",
    "KindSpec", "KINDS", "ProtocolError", "Message", "BATCH", "ArraySpec", "Expect",
    "step_rows", "layer_expect", "result_expect", "METRIC_RANGES", "INLINE_MAX", "INLINE_ALIGN",
    "encode", "decode", "frame_nbytes",
]

# --------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------

PROTOCOL_VERSION = 2      # 2: messages of up to INLINE_MAX bytes of arrays travel as one frame
MAX_HEADER_BYTES = 1 << 20      # size limit of the header frame
MAX_NDIM = 4
MAX_ARRAY_BYTES = 1 << 30       # per array
MAX_ARRAYS = 64                 # no kind may carry more arrays than this
MAX_FIELD_DEPTH = 8             # nesting depth of lists/maps inside "f"
MAX_CONTAINER_LEN = 1 << 16     # msgpack max_array_len / max_map_len
MAX_STEP = (1 << 63) - 1        # steps fit an int64
INLINE_MAX = 128 << 10          # arrays of up to this many bytes in all travel in one frame
INLINE_ALIGN = 8                # offset of every inline array: a multiple of this (>= any itemsize)
# little-endian; int8 and uint16 carry the int8 and bf16 codecs (asyncdni.wire.codec)
ALLOWED_DTYPES = ("float32", "float64", "float16", "int64", "int32", "uint8", "int8", "uint16")

# Stable short codes of ProtocolError.reason (used as counter names).
REASONS = ("header", "version", "kind", "frames", "dtype", "shape", "size",
           "fields", "range", "step", "nonfinite", "codec")

# --------------------------------------------------------------------------
# Message kinds
# --------------------------------------------------------------------------

# Data plane
FWD = "fwd"                  # [h, y] activations and targets; with a codec {"c": name}, [*wire(h), y] (+ [ids])
BWD = "bwd"                  # [g] dL/d(input of the sender); with a codec {"c": name}, [*wire(g)]
ACK = "ack"                  # sequential schedule: gradient for step s applied
DONE = "done"                # last layer -> feeder: step finished, its loss/metric
EVAL = "eval"                # [h, y] evaluation batch travelling forward
EVAL_RESULT = "eval_result"  # result of an evaluation batch
MARKER = "marker"            # checkpoint/snapshot marker travelling forward
# Control plane (worker <-> coordinator)
HELLO = "hello"
READY = "ready"              # worker -> coordinator: its bound endpoints
SPEC = "spec"                # coordinator -> worker, in reply to HELLO: the run spec
START = "start"
HEARTBEAT = "heartbeat"
PROGRESS = "progress"
STATS = "stats"
ERROR = "error"
STOP = "stop"
BYE = "bye"                  # final parameters + final stats
CKPT = "ckpt"
CKPT_DONE = "ckpt_done"
# Agent channel (per-host agent <-> the coordinator's agents launcher)
AGENT_HELLO = "agent_hello"      # agent -> coordinator: I am NAME, my workers bind to BIND
AGENT_WELCOME = "agent_welcome"  # coordinator -> agent: joined; heartbeat settings
LAUNCH = "launch"                # coordinator -> agent: start one worker
STARTED = "started"              # agent -> coordinator: that worker's pid
LAUNCH_FAILED = "launch_failed"  # agent -> coordinator: it could not be started
EXITED = "exited"                # agent -> coordinator: a worker ended (exit code, log tail)
KILL = "kill"                    # coordinator -> agent: end every worker (restart or shutdown)
KILLED = "killed"                # agent -> coordinator: all ended
RELEASE = "release"              # coordinator -> agent: the run is over; exit


@dataclass(frozen=True, slots=True)
class KindSpec:
    """Schema of one message kind.

    ``min_arrays``/``max_arrays``: allowed number of array frames (inclusive).
    ``required``/``optional``: field name -> ``int``, ``float``, ``str`` or
    ``bool`` (``int`` rejects ``bool``; ``float`` also accepts ``int``).
    ``free``: when True, fields not named in the schema are allowed and must be
    free-form values (None/bool/int/float/str/list/map with str keys, depth
    <= MAX_FIELD_DEPTH); when False, unknown fields are rejected.
    ``ranges``: field name -> inclusive ``(lo, hi)`` (None: unbounded on that side) for
    numeric fields; a value outside (or a NaN) is rejected with reason "range".
    """

    min_arrays: int = 0
    max_arrays: int = 0
    required: Mapping[str, type] = None  # type: ignore[assignment]
    optional: Mapping[str, type] = None  # type: ignore[assignment]
    free: bool = False
    ranges: Mapping[str, tuple] = None  # type: ignore[assignment]


def _kind(arrays: int | tuple[int, int] = 0, required: Mapping[str, type] | None = None,
          optional: Mapping[str, type] | None = None, free: bool = False,
          ranges: Mapping[str, tuple] | None = None) -> KindSpec:
    lo, hi = (arrays, arrays) if isinstance(arrays, int) else arrays
    if not 0 <= lo <= hi <= MAX_ARRAYS:
        raise ValueError(f"bad array count spec {arrays!r}")
    return KindSpec(lo, hi, dict(required or {}), dict(optional or {}), free, dict(ranges or {}))


_COUNT = (1, None)           # a number of samples: at least one
_FRACTION = (0.0, 1.0)       # an accuracy
_INDEX = (0, None)
_RMSE = (0.0, None)          # a root mean squared error
_R2 = (None, 1.0)            # a coefficient of determination
# The metrics of a DONE / EVAL_RESULT, by what the run's targets are: accuracies, or a
# regression's RMSE (metric) and R² (metric2). The schema below admits either; the
# feeder agrees to its run's own at start-up (result_expect) and holds every message to it.
METRIC_RANGES = {False: {"metric": _FRACTION, "metric2": _FRACTION},
                 True: {"metric": _RMSE, "metric2": _R2}}


# The schema table: one entry per kind.
KINDS: dict[str, KindSpec] = {
    # "c": the codec of the activations / the gradient (asyncdni.wire.codec; absent: fp32), which
    # the link agreed to at start-up (Expect.codec): its wire arrays replace the dense one
    # with --wire-fwd aq:CODEC every FWD also carries its rows' sample ids (int64), last
    FWD: _kind(arrays=(2, 4), optional={"c": str}),
    BWD: _kind(arrays=(1, 2), optional={"mb": int, "c": str}, ranges={"mb": _INDEX}),
    ACK: _kind(),
    DONE: _kind(required={"loss": float, "metric": float, "n": int},
                optional={"metric2": float},
                ranges={"metric": _RMSE, "metric2": _R2, "n": _COUNT}),
    EVAL: _kind(arrays=2, required={"eid": int}, ranges={"eid": _INDEX}),
    EVAL_RESULT: _kind(required={"eid": int, "loss": float, "metric": float, "n": int},
                       optional={"metric2": float},
                       ranges={"eid": _INDEX, "metric": _RMSE, "metric2": _R2, "n": _COUNT}),
    MARKER: _kind(required={"purpose": str}, optional={"tag": str}),
    HELLO: _kind(required={"role": str, "index": int, "pid": int, "host": str},
                 optional={"fwd": str, "bwd": str}, ranges={"index": _INDEX, "pid": _INDEX}),
    READY: _kind(free=True),
    SPEC: _kind(free=True),                  # validated by the worker (engine.spec.RunSpec.from_wire)
    START: _kind(free=True),                 # {"peers": [{"fwd": ep, "bwd": ep}, ...]}
    # the step: header "s"; "data": data-plane messages received so far; "sent": the feeder's
    # steps sent (the coordinator's progress detection and its stalled-link line)
    HEARTBEAT: _kind(optional={"state": str, "step": int, "data": int, "sent": int},
                     ranges={"step": (-1, None), "data": (0, None), "sent": (0, None)}),
    # test_*: the newest evaluation (--eval-every): its metric (accuracy; a regression's
    # RMSE), metric2 (exact sums; R²) and the step it was made at
    PROGRESS: _kind(required={"done": int, "total": int},
                    optional={"loss": float, "metric": float, "elapsed": float,
                              "test_metric": float, "test_metric2": float, "test_step": int},
                    ranges={"done": _INDEX, "total": _INDEX, "test_metric": _RMSE, "test_metric2": _R2,
                            "test_step": _INDEX}),
    STATS: _kind(free=True),
    ERROR: _kind(required={"role": str, "index": int, "error": str, "traceback": str},
                 ranges={"index": _INDEX}),
    STOP: _kind(optional={"reason": str}),
    BYE: _kind(arrays=(0, MAX_ARRAYS), free=True),
    CKPT: _kind(free=True),
    CKPT_DONE: _kind(free=True),
    AGENT_HELLO: _kind(required={"name": str, "bind": str, "host": str, "pid": int}),
    AGENT_WELCOME: _kind(required={"heartbeat_interval": float, "deadline": float}),
    LAUNCH: _kind(required={"name": str, "role": str, "index": int, "control": str, "blas_threads": int,
                            "start_timeout": float, "server_key": str, "secret_key": str}),
    STARTED: _kind(required={"name": str, "pid": int}),
    LAUNCH_FAILED: _kind(required={"name": str, "error": str}),
    EXITED: _kind(required={"name": str, "code": int, "tail": str}),
    KILL: _kind(optional={"grace": float}),
    KILLED: _kind(),
    RELEASE: _kind(optional={"reason": str}),
}

# --------------------------------------------------------------------------
# Errors and the decoded message
# --------------------------------------------------------------------------


class ProtocolError(ValueError):
    """A message (or a message about to be sent) violates the wire format.

    ``reason`` is one of :data:`REASONS`, short and stable (used in counters);
    ``message`` is a one-line human readable explanation. ``kind`` and ``step`` are
    the header's, when the header itself was valid (else None): a receiver can tell
    that the message it was waiting for arrived broken.
    """

    kind: str | None = None
    step: int | None = None

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.reason, self.message))


@dataclass(slots=True, repr=False)
class Message:
    kind: str
    step: int
    arrays: list  # list[np.ndarray], read-only views on the received buffers
    fields: dict

    def __repr__(self) -> str:
        arrs = ", ".join(f"{a.dtype.name}{list(a.shape)}" for a in self.arrays)
        return f"Message(kind={self.kind!r}, step={self.step}, arrays=[{arrs}], fields={self.fields!r})"


# --------------------------------------------------------------------------
# Precomputed tables
# --------------------------------------------------------------------------

_FIELD_CHECKS: dict[type, tuple[Callable[[Any], bool], str]] = {
    int: (lambda v: type(v) is int, "int"),
    float: (lambda v: type(v) is float or type(v) is int, "float"),
    str: (lambda v: type(v) is str, "str"),
    bool: (lambda v: type(v) is bool, "bool"),
}


@dataclass(frozen=True, slots=True)
class _Compiled:
    lo: int
    hi: int
    required: tuple      # ((name, check, typename), ...)
    optional: tuple
    known: frozenset
    free: bool
    ranges: tuple        # ((name, lo, hi), ...)


def _compile(kind: str, spec: KindSpec) -> _Compiled:
    def items(m: Mapping[str, type]) -> tuple:
        out = []
        for name, t in m.items():
            if t not in _FIELD_CHECKS:
                raise TypeError(f"KINDS[{kind!r}]: field {name!r} has unsupported type {t!r}")
            out.append((name, *_FIELD_CHECKS[t]))
        return tuple(out)

    req, opt = items(spec.required or {}), items(spec.optional or {})
    known = frozenset(n for n, _, _ in req + opt)
    ranges = tuple((n, lo, hi) for n, (lo, hi) in (spec.ranges or {}).items())
    for n, _, _ in ranges:
        if n not in known:
            raise TypeError(f"KINDS[{kind!r}]: range for unknown field {n!r}")
    return _Compiled(spec.min_arrays, spec.max_arrays, req, opt, known, spec.free, ranges)


_COMPILED: dict[str, _Compiled] = {}


def _compiled(kind: str) -> _Compiled | None:
    c = _COMPILED.get(kind)
    if c is None:
        spec = KINDS.get(kind)
        if spec is None:
            return None
        c = _COMPILED[kind] = _compile(kind, spec)   # kinds added to KINDS later compile lazily
    return c


for _k, _s in KINDS.items():
    _COMPILED[_k] = _compile(_k, _s)
del _k, _s

# name -> (little-endian dtype, itemsize, is_float)
_DEC_DTYPES: dict[str, tuple[np.dtype, int, bool]] = {}
# dtype -> name (for encode; only the exact little-endian dtype hashes equal)
_ENC_DTYPES: dict[np.dtype, str] = {}
for _name in ALLOWED_DTYPES:
    _dt = np.dtype(_name).newbyteorder("<")
    _DEC_DTYPES[_name] = (_dt, _dt.itemsize, _dt.kind == "f")
    _ENC_DTYPES[_dt] = _name
del _name, _dt

_HEADER_KEYS = frozenset(("v", "k", "s", "a", "f"))


class _ExtRejected(Exception):
    pass


def _reject_ext(code: int, data: bytes) -> Any:
    raise _ExtRejected(code)


_UNPACK_KW = dict(
    raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext,
    max_str_len=MAX_HEADER_BYTES, max_bin_len=MAX_HEADER_BYTES,
    max_array_len=MAX_CONTAINER_LEN, max_map_len=MAX_CONTAINER_LEN, max_ext_len=0,
)


def _one_line(s: object, limit: int = 200) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _fmt(dtype_name: str, shape) -> str:
    return f"{dtype_name}[{', '.join(str(d) for d in shape)}]"


# --------------------------------------------------------------------------
# Header validation (shared by encode's self-check and decode)
# --------------------------------------------------------------------------


def _check_free(value: Any, depth: int, where: str) -> None:
    """Free-form value: None/bool/int/float/str, lists and str-keyed maps."""
    t = type(value)
    if t is str or t is int or t is float or t is bool or value is None:
        return
    if t is dict or t is list:
        if depth >= MAX_FIELD_DEPTH:
            raise ProtocolError("fields", f"{where}: nested deeper than {MAX_FIELD_DEPTH} levels")
        if t is dict:
            for k, v in value.items():
                if type(k) is not str:
                    raise ProtocolError("fields", f"{where}: map key {k!r} is not a str")
                _check_free(v, depth + 1, f"{where}.{k}")
        else:
            for i, v in enumerate(value):
                _check_free(v, depth + 1, f"{where}[{i}]")
        return
    if isinstance(value, msgpack.Timestamp):
        raise ProtocolError("header", f"{where}: msgpack ext types are not allowed")
    raise ProtocolError("fields", f"{where}: values of type {t.__name__} are not allowed in fields")


def _check_fields(kind: str, c: _Compiled, f: dict) -> None:
    for name, check, tname in c.required:
        if name not in f:
            raise ProtocolError("fields", f"{kind}: missing required field {name!r} ({tname})")
        v = f[name]
        if not check(v):
            raise ProtocolError("fields", f"{kind}: field {name!r} must be {tname}, got {type(v).__name__} {_one_line(repr(v), 60)}")
    if not f:
        return
    for name, check, tname in c.optional:
        if name in f:
            v = f[name]
            if not check(v):
                raise ProtocolError("fields", f"{kind}: field {name!r} must be {tname}, got {type(v).__name__} {_one_line(repr(v), 60)}")
    if c.free:
        for k, v in f.items():
            if type(k) is not str:
                raise ProtocolError("fields", f"{kind}: field name {k!r} is not a str")
            if k not in c.known:
                _check_free(v, 1, f"{kind}: field {k!r}")
    elif len(f) > len(c.known) or not c.known.issuperset(f.keys()):
        extra = sorted(repr(k) for k in f if k not in c.known)
        raise ProtocolError("fields", f"{kind}: unexpected field(s) {', '.join(extra)}")
    for name, lo, hi in c.ranges:
        if name in f:
            _check_range(kind, name, f[name], lo, hi)


def _check_range(kind: str, name: str, v, lo, hi) -> None:
    # written so that a NaN fails too
    if not ((lo is None or v >= lo) and (hi is None or v <= hi)):
        want = f"{'-inf' if lo is None else lo}..{'inf' if hi is None else hi}"
        raise ProtocolError("range", f"{kind}: field {name!r} = {_one_line(repr(v), 40)} is outside {want}")


def _parse_header(hbuf, nframes: int | None):
    """Validate header bytes; return (kind, step, (descs, fields)). ``nframes``: the
    frames of a multipart message (None: the inline layout, checked by its caller).

    descs: list of (dtype_name, dtype, shape_tuple, count, nbytes, is_float).
    """
    hlen = len(hbuf) if type(hbuf) is bytes else hbuf.nbytes
    if hlen > MAX_HEADER_BYTES:
        raise ProtocolError("header", f"header frame has {hlen} bytes, limit is {MAX_HEADER_BYTES}")
    try:
        h = msgpack.unpackb(hbuf, **_UNPACK_KW)
    except _ExtRejected as e:
        raise ProtocolError("header", f"header contains msgpack ext type {e.args[0]}; ext types are not allowed") from None
    except Exception as e:  # msgpack raises ValueError subclasses, UnicodeDecodeError, ...
        msg = str(e)
        if "max_ext_len" in msg:
            raise ProtocolError("header", "header contains a msgpack ext type; ext types are not allowed") from None
        raise ProtocolError("header", f"header is not valid msgpack ({type(e).__name__}: {_one_line(msg, 120)})") from None
    if type(h) is not dict:
        raise ProtocolError("header", f"header is a msgpack {type(h).__name__}, expected a map")
    v = h.get("v")
    if type(v) is not int:
        raise ProtocolError("header", "header has no int 'v' (protocol version)")
    if v != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {v}, expected {PROTOCOL_VERSION}")
    if len(h) != 5 or h.keys() != _HEADER_KEYS:
        missing = sorted(_HEADER_KEYS.difference(h.keys()))
        extra = sorted(repr(k) for k in h if k not in _HEADER_KEYS)
        raise ProtocolError("header", f"header keys: missing {missing}, unexpected [{', '.join(extra)}]")
    kind = h["k"]
    if type(kind) is not str:
        raise ProtocolError("header", f"header 'k' (kind) must be a str, got {type(kind).__name__}")
    c = _COMPILED.get(kind) or _compiled(kind)
    if c is None:
        raise ProtocolError("kind", f"unknown message kind {_one_line(repr(kind), 60)}")
    step = h["s"]
    if type(step) is not int or step < -1 or step > MAX_STEP:
        raise ProtocolError("step", f"{kind}: step must be an int in -1..2**63-1, got {type(step).__name__} {_one_line(repr(step), 40)}")
    try:
        return kind, step, _parse_body(kind, step, c, h, nframes)
    except ProtocolError as e:
        e.kind, e.step = kind, step
        raise


def _parse_body(kind: str, step: int, c: _Compiled, h: dict, nframes: int | None):
    a = h["a"]
    if type(a) is not list:
        raise ProtocolError("header", f"{kind}: header 'a' must be a list, got {type(a).__name__}")
    f = h["f"]
    if type(f) is not dict:
        raise ProtocolError("header", f"{kind}: header 'f' must be a map, got {type(f).__name__}")
    na = len(a)
    if na < c.lo or na > c.hi:
        want = str(c.lo) if c.lo == c.hi else f"{c.lo}..{c.hi}"
        raise ProtocolError("frames", f"{kind}: carries {want} arrays, header lists {na}")
    if nframes is not None and nframes != 1 + na:
        raise ProtocolError("frames", f"{kind}: message has {nframes} frames, header lists {na} arrays (expected {1 + na} frames)")

    descs = []
    for i, entry in enumerate(a, 1):
        if type(entry) is not list or len(entry) != 2:
            raise ProtocolError("header", f"{kind} frame {i}: array descriptor must be [dtype, shape]")
        name, shape = entry
        if type(name) is not str:
            raise ProtocolError("dtype", f"{kind} frame {i}: dtype must be a str, got {type(name).__name__}")
        d = _DEC_DTYPES.get(name)
        if d is None:
            raise ProtocolError("dtype", f"{kind} frame {i}: dtype {_one_line(repr(name), 40)} not allowed (allowed: {', '.join(ALLOWED_DTYPES)})")
        if type(shape) is not list:
            raise ProtocolError("shape", f"{kind} frame {i}: shape must be a list, got {type(shape).__name__}")
        if len(shape) > MAX_NDIM:
            raise ProtocolError("shape", f"{kind} frame {i}: {len(shape)} dims, limit is {MAX_NDIM}")
        count = 1
        extent = 1                  # the product with zero dims counted as 1: numpy refuses
        for dim in shape:           # a shape such as (0, 2**62) whose extent overflows
            if type(dim) is not int or dim < 0:
                raise ProtocolError("shape", f"{kind} frame {i}: bad shape {_one_line(repr(shape), 80)} (dims must be ints >= 0)")
            count *= dim
            extent *= dim or 1
        dt, itemsize, is_float = d
        nbytes = count * itemsize
        if extent * itemsize > MAX_ARRAY_BYTES:
            raise ProtocolError("size", f"{kind} frame {i}: {_one_line(_fmt(name, shape), 120)} = {nbytes} bytes "
                                f"(extent {extent * itemsize}) exceeds the per-array limit {MAX_ARRAY_BYTES}")
        descs.append((name, dt, tuple(shape), count, nbytes, is_float))

    if f or c.required:
        _check_fields(kind, c, f)
    return descs, f


# --------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------


def _view(frame, i: int):
    """bytes, or a flat unsigned-byte memoryview of any buffer / zmq.Frame."""
    if type(frame) is bytes:
        return frame
    buf = getattr(frame, "buffer", None)   # zmq.Frame (copy=False receive)
    if buf is not None:
        frame = buf
    try:
        mv = memoryview(frame)
    except TypeError:
        raise ProtocolError("frames", f"frame {i} is a {type(frame).__name__}, not a buffer") from None
    if mv.ndim != 1 or mv.format != "B":
        if mv.nbytes == 0:
            return b""
        if not mv.c_contiguous:
            raise ProtocolError("frames", f"frame {i} is not a contiguous buffer")
        try:
            mv = mv.cast("B")
        except (TypeError, ValueError) as e:
            raise ProtocolError("frames", f"frame {i}: cannot view as bytes ({_one_line(e, 80)})") from None
    return mv


def frame_nbytes(frames) -> int:
    """Total number of bytes of a frame list (bytes, buffers, arrays, zmq.Frame)."""
    total = 0
    for f in frames:
        nb = getattr(f, "nbytes", None)       # memoryview, ndarray
        total += len(f) if nb is None else nb  # bytes, bytearray, zmq.Frame
    return total


# --------------------------------------------------------------------------
# encode / decode
# --------------------------------------------------------------------------


def _pack_default(obj: Any) -> Any:
    # numpy scalars in fields (np.float32 loss, np.int64 counts) become Python values.
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        return obj.item()
    raise TypeError(f"cannot put a {type(obj).__name__} in a message header")


def _packb(obj: Any) -> bytes:
    # msgpack.packb makes a fresh Packer per call: safe to use from several threads.
    return msgpack.packb(obj, default=_pack_default, use_bin_type=True)


_INLINE_MAGIC = b"\xc1DNI"              # 0xc1: never the first byte of a msgpack object
_PREAMBLE = len(_INLINE_MAGIC) + 4       # magic + uint32 little-endian header length
_STEP_KEY = b"\xa1s\xd3"                # the header's last entry: "s", a msgpack int64
_ZEROS = bytes(INLINE_ALIGN)
_CACHE_LIMIT = 1024                      # entries per cache below; a full cache starts afresh
# (kind, ((dtype_name, shape), ...)) -> header bytes before the step's 8 (messages without fields)
_PREFIXES: dict[tuple, bytes] = {}
# header bytes before the step's 8 -> (kind, compiled schema, descs): headers that validated
_VALIDATED: dict[bytes, tuple] = {}


def _header_prefix(kind: str, descr: Sequence[tuple], fields: Any) -> bytes:
    """The header up to the step's 8 bytes: a map of five entries, the step last."""
    return b"".join((b"\x85", _packb("v"), _packb(PROTOCOL_VERSION), _packb("k"), _packb(kind),
                     _packb("a"), _packb([[name, list(shape)] for name, shape in descr]),
                     _packb("f"), _packb(fields), _STEP_KEY))


def _cached_prefix(kind: str, descr: tuple) -> bytes:
    key = (kind, descr)
    prefix = _PREFIXES.get(key)
    if prefix is None:
        prefix = _header_prefix(kind, descr, {})
        if len(_PREFIXES) >= _CACHE_LIMIT:
            _PREFIXES.clear()
        _PREFIXES[key] = prefix
    return prefix


def encode(kind: str, step: int = -1, arrays: Sequence[np.ndarray] = (),
           fields: dict | None = None, *, inline_max: int | None = None) -> list:
    """Build the frames of a message.

    Arrays of more than ``inline_max`` bytes in all (default :data:`INLINE_MAX`), and
    messages without arrays: ``[header_bytes, buf1, buf2, ...]``, each ``buf`` a flat
    byte memoryview of the (C-contiguous, possibly made so by a copy) array: zero-copy,
    suitable for ``send_multipart(frames, copy=False)``; the caller must not modify the
    arrays until the transport has sent them. Smaller arrays: ``[frame]``, one bytes
    object in the inline layout (a copy: the arrays are free at once).

    The result is validated against the schema exactly as :func:`decode`
    would validate it; a violation raises :class:`ProtocolError` (a
    ``ValueError``) before anything is sent.
    """
    if type(kind) is not str or kind not in KINDS:
        raise ProtocolError("kind", f"unknown message kind {_one_line(repr(kind), 60)}")
    if isinstance(step, np.integer):
        step = int(step)
    if type(step) is not int or step < -1 or step > MAX_STEP:
        raise ProtocolError("step", f"{kind}: step must be an int in -1..2**63-1, got {type(step).__name__} {_one_line(repr(step), 40)}")
    c = _COMPILED.get(kind) or _compiled(kind)
    if not c.lo <= len(arrays) <= c.hi:
        want = str(c.lo) if c.lo == c.hi else f"{c.lo}..{c.hi}"
        raise ProtocolError("frames", f"{kind}: carries {want} arrays, got {len(arrays)}")
    descr = []
    arrs = []
    total = 0
    for i, arr in enumerate(arrays, 1):
        if type(arr) is not np.ndarray:
            if isinstance(arr, np.generic):          # numpy scalar -> 0-d array
                arr = np.asarray(arr)
            elif not isinstance(arr, np.ndarray):
                raise ProtocolError("dtype", f"{kind} frame {i}: expected a numpy array, got {type(arr).__name__}")
        name = _ENC_DTYPES.get(arr.dtype)
        if name is None:
            raise ProtocolError("dtype", f"{kind} frame {i}: dtype {arr.dtype.str!r} not allowed (allowed: little-endian {', '.join(ALLOWED_DTYPES)})")
        if arr.ndim > MAX_NDIM:
            raise ProtocolError("shape", f"{kind} frame {i}: {arr.ndim} dims, limit is {MAX_NDIM}")
        nbytes = arr.nbytes
        if nbytes > MAX_ARRAY_BYTES:
            raise ProtocolError("size", f"{kind} frame {i}: {_fmt(name, arr.shape)} = {nbytes} bytes exceeds the per-array limit {MAX_ARRAY_BYTES}")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        descr.append((name, arr.shape))
        arrs.append(arr)
        total += nbytes
    if fields:
        try:
            prefix = _header_prefix(kind, descr, fields)
        except (TypeError, ValueError, OverflowError) as e:
            raise ProtocolError("fields", f"{kind}: fields cannot be encoded ({_one_line(e, 120)})") from None
    else:
        prefix = _cached_prefix(kind, tuple(descr))
    header = prefix + step.to_bytes(8, "big", signed=True)
    if fields or c.required:
        # self-check of the fields against the kind's schema: the peer must accept what we
        # send. Without fields, everything in the header was checked above (kind, step,
        # array count, dtypes, shapes, sizes), so the hot path skips the unpack.
        _parse_header(header, None)
    if not arrs or total > (INLINE_MAX if inline_max is None else inline_max):
        return [header, *[memoryview(a.reshape(-1).view(np.uint8)) for a in arrs]]
    hlen = len(header)
    parts = [_INLINE_MAGIC, hlen.to_bytes(4, "little"), header]
    off = _PREAMBLE + hlen
    for a in arrs:
        pad = -off % INLINE_ALIGN
        if pad:
            parts.append(_ZEROS[:pad])
            off += pad
        parts.append(a)               # bytes.join reads a C-contiguous array's buffer
        off += a.nbytes
    return [b"".join(parts)]


BATCH = "B"   # in a shape spec: the message's batch dimension (equal in every array, >= 1)


@dataclass(frozen=True, slots=True)
class ArraySpec:
    """What one array of a message must be, as agreed at start-up.

    ``shape``: one entry per dimension: an int (exact), None (any size) or
    :data:`BATCH`. ``dtype``: a name from :data:`ALLOWED_DTYPES`, or None for any.
    ``lo``/``hi``: inclusive bounds of every value (labels; bit targets).
    """

    shape: tuple
    dtype: str | None = None
    lo: float | None = None
    hi: float | None = None


@dataclass(frozen=True, slots=True)
class Expect:
    """The arrays one kind must carry. ``rows`` bounds the :data:`BATCH` dimension:
    an inclusive ``(lo, hi)``, or a function of the message's step returning one
    (the rows of a step are fixed by the schedule). ``fields``: field name -> inclusive
    ``(lo, hi)`` agreed at start-up, checked on top of the kind's own ranges (a field
    that is absent is left to the kind's schema)."""

    arrays: tuple
    rows: tuple | Callable[[int], tuple] | None = None
    fields: Mapping[str, tuple] | None = None
    # (codec, feature shape, name): the first arrays are the codec's wire arrays of one dense
    # float32 (rows, *feature shape) tensor, which decode returns in their place; the message's
    # "c" field must be ``name`` (None: no codec, no "c")
    codec: tuple | None = None


def _want(spec) -> str:
    return "(" + ", ".join("*" if e is None else str(e) for e in spec) + ("," if len(spec) == 1 else "") + ")"


def _check_expect(kind: str, step: int, e, descs, fields=None) -> tuple:
    """Shapes, dtypes, the batch dimension and field ranges against the expectation; returns
    the value ranges to check once the arrays exist: ((index, lo, hi), ...)."""
    if type(e) is Expect:
        specs, rows = e.arrays, e.rows
        if e.fields and fields:
            for name, (lo, hi) in e.fields.items():
                if name in fields:
                    _check_range(kind, name, fields[name], lo, hi)
        got = fields.get("c") if fields else None
        want = e.codec[2] if e.codec is not None else None
        if got != want:
            raise ProtocolError("codec", f"{kind}: codec {got or 'fp32'!r}, but this link agreed to {want or 'fp32'!r}")
    else:
        specs, rows = e, None
    if len(specs) != len(descs):
        raise ProtocolError("shape", f"{kind}: expected {len(specs)} arrays, got {len(descs)}")
    batch = None
    ranges = ()
    for i, (spec, d) in enumerate(zip(specs, descs), 1):
        if type(spec) is ArraySpec:
            if spec.dtype is not None and d[0] != spec.dtype:
                raise ProtocolError("dtype", f"{kind} frame {i}: expected dtype {spec.dtype}, got {d[0]}")
            if spec.lo is not None or spec.hi is not None:
                ranges += ((i, spec.lo, spec.hi),)
            spec = spec.shape
        shape = d[2]
        if len(spec) != len(shape):
            raise ProtocolError("shape", f"{kind} frame {i}: expected shape {_want(spec)}, got {_fmt(d[0], shape)}")
        for want, got in zip(spec, shape):
            if want is None:
                continue
            if want == BATCH:
                if batch is None:
                    batch = got
                elif got != batch:
                    raise ProtocolError("shape", f"{kind} frame {i}: {_fmt(d[0], shape)} has {got} rows, "
                                                 f"frame 1 has {batch}")
            elif want != got:
                raise ProtocolError("shape", f"{kind} frame {i}: expected shape {_want(spec)}, got {_fmt(d[0], shape)}")
    if batch is not None:
        lo, hi = (1, None) if rows is None else rows(step) if callable(rows) else rows
        if batch < max(1, lo) or (hi is not None and batch > hi):
            want = str(lo) if lo == hi else f"{max(1, lo)}..{'' if hi is None else hi}"
            raise ProtocolError("shape", f"{kind} step {step}: a batch of {batch} rows, expected {want}")
    return ranges


def step_rows(batch: int, microbatches: int = 1) -> Callable[[int], tuple]:
    """The rows every array of a FWD/BWD for a (micro-)step must have: the batch size, or
    with M micro-batches, micro-batch ``step % M`` of near-equal contiguous splits (the
    first ``batch % M`` one row larger; ``model.microbatch_bounds``)."""
    if microbatches <= 1:
        exact = (batch, batch)
        return lambda step: exact
    base, extra = divmod(batch, microbatches)
    big, small = (base + 1, base + 1), (base, base)
    return lambda step: big if step % microbatches < extra else small


def layer_expect(fan_in: int, fan_out: int, *, classes: int | None, targets: int, batch: int,
                 microbatches: int = 1, eval_batch: int, in_shape: tuple | None = None,
                 target_range: tuple | None = None, out_shape: tuple | None = None,
                 fwd_codec: Codec | None = None, bwd_codec: Codec | None = None, fwd_delta: bool = False,
                 n_samples: int = 0) -> tuple[dict, dict]:
    """The shapes a layer agrees to at start-up, for its two inboxes: ``(fwd, bwd)``
    expectations for :func:`decode`. x is float32 (rows, *in_shape) (default in_shape:
    (fan_in,); the first layer takes the plan's ``in_shape``); y is int64 labels in
    0..classes-1 (rows,) with ``classes``, else float32 targets (rows, targets), each in
    ``target_range`` (inclusive (lo, hi): 0..1 for bits; None: any, e.g. regression targets,
    whose finiteness ``check_finite`` checks); a gradient is float32 (rows, *out_shape) (default
    (fan_out,); a torch stage's feature maps travel as (rows, C, H, W)). Every
    array of a message has the same rows: the step's (micro-)batch for FWD/BWD,
    1..eval_batch for EVAL. ``fwd_codec``: the codec x comes through in a FWD (from the layer
    below; EVAL batches travel as float32); ``bwd_codec``: the codec of the gradient in a BWD.
    ``fwd_delta``: x comes as changes (``aq:`` + the codec's name, asyncdni.wire.codec.DeltaHistory);
    ``n_samples``: a FWD carries its rows' sample ids, int64 in 0..n_samples-1, last (0: none)."""
    x = ArraySpec((BATCH, *(in_shape or (fan_in,))), "float32")
    lo, hi = target_range or (None, None)
    y = (ArraySpec((BATCH,), "int64", 0, classes - 1) if classes is not None
         else ArraySpec((BATCH, targets), "float32", lo, hi))
    rows = step_rows(batch, microbatches)
    g = ArraySpec((BATCH, *(out_shape or (fan_out,))), "float32")
    ids = (ArraySpec((BATCH,), "int64", 0, n_samples - 1),) if n_samples else ()
    name = wire_name(fwd_codec, fwd_delta) if fwd_codec is not None else None
    fwd = {FWD: _coded(x, fwd_codec, rows, y, *ids, name=name), EVAL: Expect((x, y), (1, eval_batch))}
    bwd = {BWD: _coded(g, bwd_codec, rows)}
    return fwd, bwd


def _coded(dense: ArraySpec, codec: Codec | None, rows, *rest, name: str | None = None) -> Expect:
    """The expectation of a message whose first array is ``dense`` sent through ``codec``
    (None or fp32: the dense array itself), its "c" field ``name`` (default: the codec's)."""
    if codec is None or not codec.lossy:
        return Expect((dense, *rest), rows)
    features = dense.shape[1:]
    wire = tuple(ArraySpec(tuple(BATCH if d == "B" else d for d in shape), dtype)
                 for shape, dtype in codec.wire_specs(features))
    return Expect((*wire, *rest), rows, codec=(codec, features, name or codec.name))


def result_expect(regression: bool) -> dict:
    """What the feeder agrees to receive from the last layer: DONE and EVAL_RESULT metrics
    that are accuracies (0..1), or for a regression an RMSE (>= 0) and an R² (<= 1)."""
    r = METRIC_RANGES[bool(regression)]
    return {DONE: Expect((), fields=r), EVAL_RESULT: Expect((), fields=r)}


def decode(frames: Sequence, *, check_finite: bool = False,
           expect: dict | None = None) -> Message:
    """Validate and decode a received message, in either layout.

    ``frames``: bytes / memoryview / buffer objects / zmq.Frame.
    ``check_finite``: reject NaN/Inf in float arrays (reason "nonfinite").
    ``expect``: optional ``{kind: spec}``, the shapes agreed at start-up. ``spec`` is
    an :class:`Expect` (dtypes, :data:`BATCH` dimensions bound together and to the
    step's rows, value ranges), or a list with one tuple per array, each dim an int or
    None (None = any size), e.g. ``{"fwd": [(None, 784), (None,)]}``. A mismatch is
    rejected with reason "shape", "dtype" or "range".

    Arrays in the result are read-only views sharing memory with the frames.
    Raises :class:`ProtocolError` for anything malformed, never another error.
    """
    try:
        n = len(frames)
    except TypeError:
        raise ProtocolError("frames", f"frames must be a sequence, got {type(frames).__name__}") from None
    if n == 0:
        raise ProtocolError("frames", "empty message (zero frames)")
    f0 = _view(frames[0], 0)
    flen = len(f0) if type(f0) is bytes else f0.nbytes
    if flen and f0[0] == 0xC1:
        return _decode_inline(f0, flen, n, check_finite, expect)
    kind, step, descs, fields = _header(f0, flen, n)
    try:
        spec = expect.get(kind) if expect else None
        ranges = () if spec is None else _check_expect(kind, step, spec, descs, fields)
        bufs = []
        for i, d in enumerate(descs, 1):
            b = _view(frames[i], i)
            blen = len(b) if type(b) is bytes else b.nbytes
            if blen != d[4]:
                raise ProtocolError("size", f"{kind} frame {i}: buffer has {blen} bytes, header says {_fmt(d[0], d[2])} = {d[4]} bytes")
            bufs.append(b)
        arrays = [_array(b, d, 0) for b, d in zip(bufs, descs)]
        return _finish(kind, step, arrays, descs, fields, check_finite, ranges, spec)
    except ProtocolError as e:
        e.kind, e.step = kind, step
        raise


def _header(hb, hlen: int, nframes: int | None):
    """:func:`_parse_header`, with the cache of headers that validated before: one equal
    to such a header but for its int64 step gets the same result, with its own step."""
    if hlen > 8:
        key = bytes(hb[:-8])
        hit = _VALIDATED.get(key)
        if hit is not None:
            kind, c, descs = hit
            step = int.from_bytes(hb[-8:], "big", signed=True)
            if step >= -1 and (nframes is None or nframes == 1 + len(descs)) and _COMPILED.get(kind) is c:
                return kind, step, descs, {}
            # else: the full parse below raises the error
    kind, step, (descs, fields) = _parse_header(hb, nframes)
    if not fields and hlen > 8 and len(descs) <= MAX_ARRAYS:
        # only a header in the encoder's own form, whose last 8 bytes are the step alone
        if key == _cached_prefix(kind, tuple((d[0], d[2]) for d in descs)):
            if len(_VALIDATED) >= _CACHE_LIMIT:
                _VALIDATED.clear()
            _VALIDATED[key] = (kind, _COMPILED.get(kind), descs)
    return kind, step, descs, fields


def _decode_inline(f0, flen: int, n: int, check_finite: bool, expect) -> Message:
    if flen < _PREAMBLE or f0[:4] != _INLINE_MAGIC:
        raise ProtocolError("header", f"frame 0 starts with 0xc1 but is no inline message "
                            f"(expected {_INLINE_MAGIC!r} and a 4-byte header length)")
    if n != 1:
        raise ProtocolError("frames", f"an inline message is one frame, got {n}")
    hlen = int.from_bytes(f0[4:_PREAMBLE], "little")
    if hlen > MAX_HEADER_BYTES:
        raise ProtocolError("header", f"inline header of {hlen} bytes, limit is {MAX_HEADER_BYTES}")
    end = _PREAMBLE + hlen
    if end > flen:
        raise ProtocolError("size", f"inline frame of {flen} bytes is shorter than its {hlen}-byte header")
    kind, step, descs, fields = _header(f0[_PREAMBLE:end], hlen, None)
    try:
        spec = expect.get(kind) if expect else None
        ranges = () if spec is None else _check_expect(kind, step, spec, descs, fields)
        offsets = []
        for d in descs:
            end += -end % INLINE_ALIGN
            offsets.append(end)
            end += d[4]
        if end != flen:
            what = "ends before" if end > flen else "has bytes after"
            raise ProtocolError("size", f"{kind}: inline frame of {flen} bytes {what} its arrays "
                                f"({', '.join(_fmt(d[0], d[2]) for d in descs) or 'none'}; {end} bytes)")
        pad_from = _PREAMBLE + hlen
        for off, d in zip(offsets, descs):
            if off > pad_from and f0[pad_from:off] != _ZEROS[:off - pad_from]:
                raise ProtocolError("frames", f"{kind}: inline padding at bytes {pad_from}..{off - 1} is not zero")
            pad_from = off + d[4]
        arrays = [_array(f0, d, off) for off, d in zip(offsets, descs)]
        return _finish(kind, step, arrays, descs, fields, check_finite, ranges, spec)
    except ProtocolError as e:
        e.kind, e.step = kind, step
        raise


def _array(buf, d, offset: int) -> np.ndarray:
    """A read-only view of one array (a copy where the buffer leaves it unaligned)."""
    arr = np.frombuffer(buf, dtype=d[1], count=d[3], offset=offset).reshape(d[2])
    if not arr.flags.aligned:
        arr = arr.copy()
        arr.flags.writeable = False
    elif arr.flags.writeable:
        arr.flags.writeable = False
    return arr


def _finish(kind, step, arrays, descs, fields, check_finite, ranges, spec=None) -> Message:
    coded = type(spec) is Expect and spec.codec is not None
    # a codec's wire arrays are the codec's to check (finite values, positive scales, indices)
    skip = len(spec.codec[0].wire_specs(spec.codec[1])) if coded else 0
    if check_finite:
        for i, (arr, d) in enumerate(zip(arrays, descs), 1):
            if i <= skip:
                continue
            if d[5] and arr.size and not (math.isfinite(arr.min()) and math.isfinite(arr.max())):
                bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
                raise ProtocolError("nonfinite", f"{kind} frame {i}: {bad} non-finite value(s) (NaN/Inf) in {_fmt(d[0], d[2])}")
    for i, lo, hi in ranges:
        arr = arrays[i - 1]
        if arr.size:
            amin, amax = arr.min(), arr.max()
            if (lo is not None and not amin >= lo) or (hi is not None and not amax <= hi):
                raise ProtocolError("range", f"{kind} frame {i}: values {amin}..{amax} outside {lo}..{hi}")
    if coded:
        codec, features, _name = spec.codec
        try:
            dense = codec.decode(arrays[:skip], features)
        except CodecError as e:
            raise ProtocolError("codec", f"{kind}: {e}") from None
        arrays = [dense, *arrays[skip:]]
        fields = {k: v for k, v in fields.items() if k != "c"}
    return Message(kind, step, arrays, fields)
