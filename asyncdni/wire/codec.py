"""Codecs of the tensors that cross a link between pipeline stages (pure numpy).

A dense tensor is float32 of shape ``(rows, *feature_shape)``; ``rows`` is the batch
dimension. A codec turns it into a few *wire arrays* (:meth:`Codec.encode`) and back
(:meth:`Codec.decode`); :meth:`Codec.wire_specs` gives their shapes and dtypes, with the
string ``"B"`` standing for the rows, so that the wire format can check them before the
codec sees them. The forms (:func:`parse`):

=============  ==================================================  ===========================
name           wire arrays                                         error
=============  ==================================================  ===========================
fp32           float32 (B, *fs): the tensor itself                 none
fp16           float16 (B, *fs), clipped to +-65504                relative <= 2**-11
bf16           uint16 (B, *fs): upper half of the float32,         relative <= 2**-8
               rounded to nearest even
int8:row       int8 q (B, *fs), float32 scale (B,)                 <= scale / 2 per element
int8:tensor    int8 q (B, *fs), float32 scale (1,)                 <= scale / 2 per element
topk:F         float32 values (B, k), int32 indices (B, k): per    the dropped entries
               row the k = ceil(F * m) entries of largest
               magnitude, indices increasing
=============  ==================================================  ===========================

``decode`` trusts nothing: it refuses (:class:`CodecError`, reason ``"codec"``) a payload
that the encoder cannot have made and that would decode to something other than a finite
float32 tensor: non-finite or non-positive scales (or scales so large that 127 * scale
overflows), ``q == -128``, top-k indices out of range, repeated or not increasing,
non-finite values, fp16/bf16 NaN and Inf bit patterns. It always returns a new, writable
array. :class:`ErrorFeedback` keeps, on the sender's side, what a lossy codec dropped
and adds it to the next tensor of the same key, so that the sum of what arrives tracks
the sum of what was sent (the usual remedy for biased gradient compression).

This module never imports zmq nor the wire protocol.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np

__all__ = ["FORMS", "Codec", "CodecError", "ErrorFeedback", "DeltaHistory", "parse", "parse_wire", "wire_name", "check_ids"]

FORMS = "fp32, fp16, bf16, int8 (per-row scale; int8:tensor for one scale), topk:F (0 < F <= 1)"
KINDS = ("fp32", "fp16", "bf16", "int8", "topk")

_F32 = np.dtype(np.float32)
_FP16_MAX = 65504.0
_BF16_MAX = float(np.array(0x7F7F0000, np.uint32).view(np.float32))   # largest finite bfloat16
_TINY = float(np.finfo(np.float32).tiny)              # int8 scales never go below it: 1/scale stays finite
_SCALE_MAX = float(np.finfo(np.float32).max) / 127    # above it, 127 * scale overflows float32


class CodecError(ValueError):
    """A received codec payload is invalid. ``reason`` is always ``"codec"``; ``str()`` is
    one line naming the codec and the problem."""

    reason = "codec"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def parse(text: str) -> Codec:
    """The codec named by ``text`` (case and surrounding whitespace ignored): one of
    :data:`FORMS`. ``ValueError`` (one line) for anything else."""
    if not isinstance(text, str):
        raise ValueError(f"codec {text!r}: not a string; allowed: {FORMS}")
    t = text.strip().lower()
    head, sep, tail = t.partition(":")
    head, tail = head.strip(), tail.strip()
    if not sep and head in ("fp32", "fp16", "bf16"):
        return Codec(head, head)
    if head == "int8" and (not sep or tail == "row"):
        return Codec("int8:row", "int8", per_row=True)
    if head == "int8" and sep and tail == "tensor":
        return Codec("int8:tensor", "int8", per_row=False)
    if head == "topk" and sep:
        try:
            f = float(tail)
        except ValueError:
            f = math.nan
        if 0.0 < f <= 1.0:
            return Codec(f"topk:{f!r}", "topk", fraction=f)
        raise ValueError(f"codec {text!r}: topk needs a fraction F with 0 < F <= 1 (e.g. topk:0.1); allowed: {FORMS}")
    raise ValueError(f"unknown codec {text!r}; allowed: {FORMS}")


@functools.lru_cache(maxsize=256)
def _specs(codec: Codec, fs: tuple) -> tuple:
    b = ("B", *fs)
    if codec.kind == "fp32":
        return ((b, "float32"),)
    if codec.kind == "fp16":
        return ((b, "float16"),)
    if codec.kind == "bf16":
        return ((b, "uint16"),)
    if codec.kind == "int8":
        return ((b, "int8"), (("B",) if codec.per_row else (1,), "float32"))
    k = codec.k(math.prod(fs))
    return ((("B", k), "float32"), (("B", k), "int32"))


@dataclass(frozen=True)
class Codec:
    """One codec (build it with :func:`parse`). ``name`` is canonical: ``parse(c.name) == c``."""

    name: str
    kind: str
    per_row: bool = True      # int8 only: one scale per row (else one for the tensor)
    fraction: float = 1.0     # topk only: the fraction F of the entries of each row kept

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"codec kind {self.kind!r}: not one of {', '.join(KINDS)}")
        if self.kind == "topk" and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"codec {self.name!r}: topk fraction {self.fraction!r} not in (0, 1]")

    @property
    def lossy(self) -> bool:
        return self.kind != "fp32"

    def k(self, m: int) -> int:
        """Entries kept per row of ``m`` by topk: max(1, min(m, ceil(F * m))), where an F * m
        within rounding error of an integer counts as that integer (0.3 * 10 -> 3, not 4)."""
        if m <= 0:
            return 0
        p = self.fraction * m
        r = round(p)
        c = r if abs(p - r) <= 1e-9 * max(1.0, p) else math.ceil(p)
        return max(1, min(m, int(c)))

    def wire_specs(self, feature_shape: tuple) -> tuple:
        """One ``(shape, dtype_name)`` per wire array; ``"B"`` in a shape stands for the rows."""
        return _specs(self, tuple(int(d) for d in feature_shape))

    def nbytes(self, rows: int, feature_shape: tuple) -> int:
        """Bytes of the wire arrays of one (rows, *feature_shape) tensor."""
        return sum(math.prod(rows if d == "B" else d for d in shape) * np.dtype(dt).itemsize
                   for shape, dt in self.wire_specs(feature_shape))

    # ------------------------------------------------------------------ encode

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        """The wire arrays of ``x``, float32 (rows, *fs), finite (not checked: the receiver
        refuses what decodes non-finite). fp32 returns ``[x]`` itself; the others new
        C-contiguous arrays that never alias ``x``."""
        x = np.ascontiguousarray(x, dtype=_F32)
        if x.ndim < 1:
            raise ValueError(f"codec {self.name}: a tensor of shape (rows, *features) expected, got a scalar")
        kind = self.kind
        if kind == "fp32":
            return [x]
        if kind == "fp16":
            out = np.empty(x.shape, np.float16)
            np.clip(x, -_FP16_MAX, _FP16_MAX, out=out)
            return [out]
        if kind == "bf16":
            u = np.clip(x, -_BF16_MAX, _BF16_MAX).view(np.uint32)   # clipped: rounding cannot reach Inf
            lsb = np.right_shift(u, 16)
            np.bitwise_and(lsb, 1, out=lsb)
            np.add(u, 0x7FFF, out=u)
            np.add(u, lsb, out=u)                                   # + 0x7fff + lsb: round to nearest even
            np.right_shift(u, 16, out=u)
            return [u.astype(np.uint16)]
        rows, m = x.shape[0], math.prod(x.shape[1:])
        x2 = x.reshape(rows, m)
        if kind == "int8":
            tmp = np.empty_like(x2)
            np.abs(x2, out=tmp)
            if self.per_row:
                amax = tmp.max(axis=1) if m else np.zeros(rows, _F32)
            else:
                amax = np.array([tmp.max() if tmp.size else 0.0], _F32)
            scale = np.multiply(amax, np.float32(1 / 127))
            np.maximum(scale, np.float32(_TINY), out=scale)
            scale[amax == 0] = 1.0
            np.divide(x2, scale[:, None] if self.per_row else scale[0], out=tmp)
            np.rint(tmp, out=tmp)
            np.clip(tmp, -127, 127, out=tmp)
            return [tmp.astype(np.int8).reshape(x.shape), scale]
        # topk
        k = self.k(m)
        if k >= m:
            idx = np.broadcast_to(np.arange(m, dtype=np.int32), (rows, m)).copy()
            return [x2.copy(), idx]
        part = np.argpartition(np.abs(x2), m - k, axis=1)[:, m - k:]
        part.sort(axis=1)
        vals = np.take_along_axis(x2, part, axis=1)
        return [np.ascontiguousarray(vals), part.astype(np.int32)]

    # ------------------------------------------------------------------ decode

    def decode(self, arrays, feature_shape: tuple) -> np.ndarray:
        """The dense float32 (rows, *feature_shape) tensor of the wire ``arrays``: a new,
        writable, C-contiguous array. :class:`CodecError` (one line) for a payload the
        encoder cannot have made, or one that would not decode finite."""
        fs = tuple(int(d) for d in feature_shape)
        arrays = self._check(arrays, fs)
        out = self._decode(arrays, fs, check=True)
        return out

    def _err(self, what: str) -> CodecError:
        return CodecError(f"codec {self.name}: {what}")

    def _check(self, arrays, fs: tuple) -> list:
        """Cheap structural re-check of ``arrays`` against wire_specs (count, dtype, shape)."""
        specs = self.wire_specs(fs)
        try:
            arrays = list(arrays)
        except TypeError:
            raise self._err(f"wire arrays expected, got {type(arrays).__name__}") from None
        if len(arrays) != len(specs):
            raise self._err(f"{len(arrays)} wire array(s), expected {len(specs)}")
        rows = None
        for i, (a, (shape, dt)) in enumerate(zip(arrays, specs)):
            if not isinstance(a, np.ndarray):
                raise self._err(f"wire array {i} is a {type(a).__name__}, not an ndarray")
            if a.dtype != dt:
                raise self._err(f"wire array {i} has dtype {a.dtype}, expected {dt}")
            if a.ndim != len(shape):
                raise self._err(f"wire array {i} has shape {a.shape}, expected {_fmt(shape)}")
            for n, d in zip(a.shape, shape):
                if d == "B":
                    if rows is None:
                        rows = n
                    elif n != rows:
                        raise self._err(f"wire array {i} has {n} row(s), wire array 0 has {rows}")
                elif n != d:
                    raise self._err(f"wire array {i} has shape {a.shape}, expected {_fmt(shape)}")
        return arrays

    def _decode(self, arrays: list, fs: tuple, check: bool) -> np.ndarray:
        kind = self.kind
        a = arrays[0]
        if kind == "fp32":
            out = np.array(a, dtype=_F32, order="C", copy=True)
            if check and out.size and not np.isfinite(out).all():
                self._nonfinite(out, "value")
            return out
        if kind == "fp16":
            if check and a.size:
                # exponent bits all ones: Inf or NaN
                e = np.bitwise_and(a.view(np.uint16), 0x7C00)
                if (e == 0x7C00).any():
                    self._bad_pattern(e == 0x7C00, a.view(np.uint16), "fp16")
            return a.astype(_F32, order="C")
        if kind == "bf16":
            u = np.empty(a.shape, np.uint32)
            np.left_shift(a, 16, out=u, dtype=np.uint32)
            out = u.view(_F32)
            if check and out.size and not np.isfinite(out).all():
                self._bad_pattern(~np.isfinite(out), a, "bf16")
            return out
        rows = a.shape[0]
        if kind == "int8":
            q, s = a, arrays[1]
            if check:
                if s.size and not ((s > 0) & (s <= _SCALE_MAX)).all():
                    bad = np.flatnonzero(~((s > 0) & (s <= _SCALE_MAX)))[0]
                    where = f"of row {bad} " if self.per_row else ""
                    raise self._err(f"scale {where}is {float(s.flat[bad])!r} (must be finite, > 0 and <= {_SCALE_MAX:.6g})")
                if q.size and q.min() == -128:
                    r = int(np.flatnonzero((q.reshape(rows, -1) == -128).any(axis=1))[0])
                    raise self._err(f"q = -128 in row {r} (the encoder never makes it; range is -127..127)")
            if self.per_row:
                out = np.multiply(q, s.reshape((rows,) + (1,) * (q.ndim - 1)), dtype=_F32)
            else:
                out = np.multiply(q, s[0], dtype=_F32)
            return out
        # topk
        vals, idx = a, arrays[1]
        m = math.prod(fs)
        k = vals.shape[1]
        if check:
            if k != self.k(m):
                raise self._err(f"{k} entries per row, expected {self.k(m)} of {m}")
            if idx.size:
                lo, hi = idx.min(), idx.max()
                if lo < 0 or hi >= m:
                    bad = (idx < 0) | (idx >= m)
                    r = int(np.flatnonzero(bad.any(axis=1))[0])
                    v = idx[r][bad[r]][0]
                    raise self._err(f"index {v} in row {r} outside 0..{m - 1}")
                if k > 1:
                    inc = np.diff(idx, axis=1) > 0      # no overflow: all indices are in [0, m)
                    if not inc.all():
                        r = int(np.flatnonzero(~inc.all(axis=1))[0])
                        raise self._err(f"indices of row {r} not strictly increasing (repeated or out of order)")
                if not np.isfinite(vals).all():
                    r = int(np.flatnonzero(~np.isfinite(vals).all(axis=1))[0])
                    raise self._err(f"non-finite value in row {r}")
        out = np.zeros((rows, m), _F32)
        if rows and k:
            flat = np.add(idx, (np.arange(rows, dtype=np.int64) * m)[:, None], dtype=np.int64)
            out.reshape(-1)[flat.reshape(-1)] = vals.reshape(-1)
        return out.reshape((rows, *fs))

    def _nonfinite(self, out: np.ndarray, what: str):
        rows = out.shape[0] if out.ndim else 1
        r = int(np.flatnonzero(~np.isfinite(out.reshape(rows, -1)).all(axis=1))[0])
        raise self._err(f"non-finite {what} (NaN/Inf) in row {r}")

    def _bad_pattern(self, bad: np.ndarray, bits: np.ndarray, fmt: str):
        rows = bits.shape[0] if bits.ndim else 1
        r = int(np.flatnonzero(bad.reshape(rows, -1).any(axis=1))[0])
        b = int(bits.reshape(rows, -1)[r][bad.reshape(rows, -1)[r]][0])
        raise self._err(f"{fmt} NaN/Inf bit pattern 0x{b:04x} in row {r}")


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


_EF_NAME = re.compile(r"ef(-?[0-9]+)\Z")


class ErrorFeedback:
    """Sender-side error feedback for a lossy codec (gradients): :meth:`encode` sends
    ``x + residual`` and keeps ``residual = (x + residual) - decode(sent)``.

    One residual per ``key`` (e.g. the micro-batch index); a residual whose shape differs
    from ``x``'s is dropped (that step starts from zero). A residual that would turn
    non-finite (an overflowing input) is dropped too. A non-lossy codec keeps no state."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self._res: dict[int, np.ndarray] = {}

    def encode(self, x: np.ndarray, key: int = 0) -> list[np.ndarray]:
        codec = self.codec
        if not codec.lossy:
            return codec.encode(x)
        key = int(key)
        x = np.asarray(x, dtype=_F32)
        r = self._res.pop(key, None)
        if r is None or r.shape != x.shape:
            y = np.array(x, dtype=_F32, order="C", copy=True)
        else:
            y = r
            np.add(y, x, out=y)
        arrays = codec.encode(y)                 # a lossy codec's wire arrays never alias y
        sent = codec._decode(arrays, x.shape[1:], check=False)
        np.subtract(y, sent, out=y)
        if y.size == 0 or np.isfinite(y).all():
            self._res[key] = y
        return arrays

    def state(self) -> dict[str, np.ndarray]:
        """The residuals, ``{"ef<key>": float32 copy}``: names usable as npz keys."""
        return {f"ef{k}": r.copy() for k, r in sorted(self._res.items())}

    def load(self, state: dict[str, np.ndarray]) -> None:
        """Replace the residuals by ``state`` (what :meth:`state` returned). ``ValueError``
        (one line) for a bad name, a dtype other than float32 or non-finite values; then
        nothing changes."""
        new = {}
        for name, v in state.items():
            mt = _EF_NAME.match(name) if isinstance(name, str) else None
            if mt is None:
                raise ValueError(f"error feedback state: bad name {name!r} (expected ef<key>, e.g. ef0)")
            dt = getattr(v, "dtype", None)
            if dt != _F32:
                raise ValueError(f"error feedback state {name}: dtype {dt}, expected float32")
            a = np.array(v, dtype=_F32, order="C", copy=True)
            if a.ndim < 1:
                raise ValueError(f"error feedback state {name}: a scalar, expected a (rows, *features) array")
            if a.size and not np.isfinite(a).all():
                raise ValueError(f"error feedback state {name}: {int(a.size - np.count_nonzero(np.isfinite(a)))} "
                                 "non-finite value(s)")
            new[int(mt.group(1))] = a
        if not self.codec.lossy:
            new = {}
        self._res = new

    @property
    def nbytes(self) -> int:
        """Memory held by the residuals."""
        return sum(r.nbytes for r in self._res.values())


# ----------------------------------------------------------------- AQ-SGD: activation changes
AQ_PREFIX = "aq:"


def parse_wire(text: str) -> tuple[Codec, bool]:
    """A ``--wire-fwd`` value: ``(codec, delta)``. ``aq:CODEC`` (e.g. ``aq:int8``) sends each
    sample's activation as the change since it last crossed, through the lossy ``CODEC``
    (:class:`DeltaHistory`); anything else is :func:`parse`'s, with ``delta`` False.
    ValueError (one line) otherwise."""
    s = str(text).strip()
    if s.lower().startswith(AQ_PREFIX):
        inner = parse(s[len(AQ_PREFIX):])
        if not inner.lossy:
            raise ValueError(f"{text!r}: aq: needs a lossy codec to compress the changes with (e.g. aq:int8), "
                             "not fp32")
        return inner, True
    return parse(s), False


def wire_name(codec: Codec, delta: bool) -> str:
    """The canonical name of a ``--wire-fwd`` value (what :func:`parse_wire` reads back)."""
    return AQ_PREFIX + codec.name if delta else codec.name


class DeltaHistory:
    """One end of a link that sends activation *changes* (AQ-SGD, Wang et al., NeurIPS 2022).

    Both ends keep ``m[i]``, sample ``i``'s activation as the receiver last reconstructed it
    (zeros before the sample first crosses). The sender sends ``Q(h - m[ids])`` and adds
    what the receiver will decode to ``m[ids]``; the receiver adds the decoded change to its
    own ``m[ids]`` and uses the result. The two copies of ``m`` stay equal as long as both
    ends see the same messages in the same order (the link's step order). A sample's
    activation drifts slowly between epochs, so its change is small and the codec's error,
    relative to the activation, shrinks: the first epoch costs what the plain codec costs.
    Memory: ``n_samples x features`` float32 per end (:attr:`nbytes`)."""

    def __init__(self, codec: Codec, n_samples: int):
        if not codec.lossy:
            raise ValueError("DeltaHistory needs a lossy codec")
        if n_samples < 1:
            raise ValueError(f"DeltaHistory needs the training set's size, got {n_samples}")
        self.codec = codec
        self.n = int(n_samples)
        self.m: np.ndarray | None = None        # (n, *features), made at the first message

    def _rows(self, ids: np.ndarray, fs: tuple) -> np.ndarray:
        if self.m is None:
            self.m = np.zeros((self.n, *fs), _F32)
        elif self.m.shape[1:] != tuple(fs):
            raise ValueError(f"activation history of features {_fmt(self.m.shape[1:])}, got {_fmt(fs)}")
        return self.m[ids]

    def encode(self, h: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
        """Sender: the wire arrays of ``h``'s change since its samples (``ids``) last crossed."""
        h = np.asarray(h, dtype=_F32)
        old = self._rows(ids, h.shape[1:])
        arrays = self.codec.encode(np.ascontiguousarray(h - old))
        self.m[ids] = old + self.codec._decode(arrays, h.shape[1:], check=False)
        return arrays

    def decode(self, delta: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Receiver: the activations, from the decoded change of samples ``ids``
        (distinct: :func:`check_ids`). A new array."""
        new = self._rows(ids, delta.shape[1:]) + delta
        if new.size and not np.isfinite(new).all():
            raise CodecError(f"{AQ_PREFIX}{self.codec.name}: the change takes an activation to a non-finite value")
        self.m[ids] = new
        return new

    def state(self, name: str) -> dict[str, np.ndarray]:
        return {} if self.m is None else {name: self.m.copy()}

    def load(self, m: np.ndarray | None) -> None:
        """Replace the history (None: none yet). ValueError (one line) for a wrong row count,
        a dtype other than float32 or non-finite values; then nothing changes."""
        if m is None:
            self.m = None
            return
        if getattr(m, "dtype", None) != _F32 or m.ndim < 2 or m.shape[0] != self.n:
            raise ValueError(f"activation history: {getattr(m, 'dtype', type(m).__name__)} "
                             f"{_fmt(getattr(m, 'shape', ()))}, expected float32 ({self.n}, features...)")
        if not np.isfinite(m).all():
            raise ValueError("activation history: non-finite values")
        self.m = np.array(m, dtype=_F32, order="C", copy=True)

    @property
    def nbytes(self) -> int:
        return 0 if self.m is None else self.m.nbytes


def check_ids(ids: np.ndarray, n: int) -> str | None:
    """Why a batch's sample ids cannot index a :class:`DeltaHistory` of ``n`` samples (out of
    range, repeated), or None."""
    if ids.size == 0:
        return None
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= n:
        return f"sample ids {lo}..{hi} outside 0..{n - 1}"
    if np.unique(ids).size != ids.size:
        return "a sample id repeats within the batch"
    return None
