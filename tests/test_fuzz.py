"""Property-based fuzzing (hypothesis) of protocol.decode and of the workers' message handlers.

* decode: for random headers, shapes, dtypes, fields and frame counts it either returns a
  message that satisfies its kind's schema (and the expectation it was given), or raises
  ProtocolError with a reason from REASONS; never anything else.
* handlers: a layer's forward and backward inbox handlers, and the feeder's training and
  evaluation handlers, given any message at all, either apply it or count one rejection.
  The one other outcome is StepLost, the documented end of a run whose next step arrived
  broken, and only for exactly that message.
"""
import math

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from asyncdni import config
from asyncdni.wire import protocol as P
from asyncdni.engine.spec import NodeAddress, RunSpec
from asyncdni.engine.plan import load_datasets, make_plan, microbatch_bounds
from asyncdni.engine.worker import FeederWorker, LayerWorker, StepLost

pytestmark = pytest.mark.slow       # hypothesis: minutes of CPU on a loaded machine

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)

# --------------------------------------------------------------------------- decode
HUGE = [0, 1, 2, 3, 7, 64, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
dims = st.one_of(st.integers(0, 70), st.sampled_from(HUGE), st.integers(-3, -1), st.just(1.5), st.just("2"))
dtypes = st.one_of(st.sampled_from(P.ALLOWED_DTYPES), st.sampled_from(["complex64", ">f4", "object", "", "V8"]),
                   st.integers(0, 3))
shapes = st.one_of(st.lists(dims, max_size=6), st.just(None), st.text(max_size=3))
descs = st.one_of(st.tuples(dtypes, shapes).map(list), st.lists(st.integers(-2**63, 2**64 - 1), max_size=3),
                  st.just("x"))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=8), st.binary(max_size=8))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                   st.dictionaries(st.text(max_size=4), c, max_size=3)),
                      max_leaves=12)
FIELD_NAMES = sorted({n for spec in P.KINDS.values() for n in [*(spec.required or {}), *(spec.optional or {})]})
fields = st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=4)), values, max_size=6)
steps = st.one_of(st.integers(-3, 10), st.sampled_from([2**62, 2**63 - 1, 2**63, 2**64 - 1]), st.just(1.0))
kinds = st.one_of(st.sampled_from(sorted(P.KINDS)), st.text(max_size=6), st.integers(0, 3))


@st.composite
def headers(draw):
    h = {"v": draw(st.one_of(st.just(1), st.integers(-1, 3))), "k": draw(kinds), "s": draw(steps),
         "a": draw(st.one_of(st.lists(descs, max_size=4), st.just({}))), "f": draw(st.one_of(fields, st.just([])))}
    if draw(st.integers(0, 9)) == 0:
        del h[draw(st.sampled_from(sorted(h)))]
    if draw(st.integers(0, 9)) == 0:
        h[draw(st.text(max_size=3))] = 0
    return h


def _nbytes(desc) -> int | None:
    """The byte count a descriptor claims, if it is a small well-formed one."""
    try:
        name, shape = desc
        n = np.dtype(name).itemsize
        for d in shape:
            n *= int(d)
        return n if 0 <= n <= 4096 else None
    except Exception:  # noqa: BLE001 - any malformed descriptor: no exact size
        return None


@st.composite
def messages(draw):
    """[header, *array frames]: a random header and buffers, often of exactly the right size."""
    if draw(st.integers(0, 19)) == 0:
        return [draw(st.binary(max_size=64)) for _ in range(draw(st.integers(0, 3)))]
    h = draw(headers())
    head = msgpack.packb(h, use_bin_type=True)
    arrs = h.get("a") if isinstance(h.get("a"), list) else []
    frames = [head]
    for d in arrs:
        n = _nbytes(d)
        if n is not None and draw(st.booleans()):
            frames.append(draw(st.binary(min_size=n, max_size=n)))
        else:
            frames.append(draw(st.binary(max_size=32)))
    extra = draw(st.integers(-1, 1))
    if extra < 0 and len(frames) > 1:
        frames.pop()
    elif extra > 0:
        frames.append(b"")
    return frames


LAYER_FWD, LAYER_BWD = P.layer_expect(32, 16, classes=10, targets=10, batch=4, microbatches=3, eval_batch=8)


def _check_decoded(m: P.Message, frames, expect) -> None:
    assert m.kind in P.KINDS and -1 <= m.step < 2**63
    spec = P.KINDS[m.kind]
    assert spec.min_arrays <= len(m.arrays) <= spec.max_arrays == spec.max_arrays
    # the schema: what decode accepted, encode (which checks the kind's schema) accepts too
    again = P.decode(P.encode(m.kind, m.step, m.arrays, m.fields))
    assert again.kind == m.kind and again.step == m.step and again.fields.keys() == m.fields.keys()
    e = (expect or {}).get(m.kind)
    if isinstance(e, P.Expect):
        rows = {a.shape[0] for a in m.arrays}
        assert len(rows) == 1 and min(rows) >= 1
        for a, s in zip(m.arrays, e.arrays):
            assert a.dtype.name == s.dtype and a.ndim == len(s.shape)


@settings(max_examples=600, **SETTINGS)
@given(frames=messages(), expect=st.sampled_from([None, LAYER_FWD, LAYER_BWD]), finite=st.booleans())
def test_decode_returns_a_valid_message_or_raises_protocol_error(frames, expect, finite):
    try:
        m = P.decode(frames, expect=expect, check_finite=finite)
    except P.ProtocolError as e:
        assert e.reason in P.REASONS and "\n" not in str(e)
        return
    _check_decoded(m, frames, expect)
    if finite:
        assert all(np.isfinite(a).all() for a in m.arrays if a.dtype.kind == "f")


@settings(max_examples=300, **SETTINGS)
@given(kind=st.sampled_from([P.FWD, P.EVAL, P.BWD]), rows=st.lists(st.integers(0, 9), min_size=1, max_size=2),
       step=st.integers(0, 20), cols=st.sampled_from([16, 32, 10]),
       dtype=st.sampled_from(["float32", "float64", "int64"]), label=st.integers(-2, 12))
def test_agreed_shapes_bind_rows_dtypes_and_labels(kind, rows, step, cols, dtype, label):
    """Near-valid data-plane messages against a layer's expectation: accepted exactly when
    every dimension, dtype and label agrees with what was agreed at start-up."""
    expect = LAYER_BWD if kind == P.BWD else LAYER_FWD
    want_rows = {0: 2, 1: 1, 2: 1}[step % 3] if kind != P.EVAL else None      # batch 4 in 3 micro-batches
    r0, r1 = rows[0], rows[-1]
    if kind == P.BWD:
        arrays = [np.zeros((r0, cols), dtype)]
        ok = dtype == "float32" and cols == 16 and r0 == want_rows
    else:
        x = np.zeros((r0, cols), dtype)
        y = np.full(r1, label, np.int64)
        arrays = [x, y]
        row_ok = r0 == r1 and (1 <= r0 <= 8 if kind == P.EVAL else r0 == want_rows)
        ok = dtype == "float32" and cols == 32 and row_ok and (r1 == 0 or 0 <= label <= 9)
    frames = P.encode(kind, step, arrays, {"eid": 0} if kind == P.EVAL else None)
    try:
        P.decode(frames, expect=expect)
        accepted = True
    except P.ProtocolError as e:
        assert e.reason in ("shape", "dtype", "range") and e.kind == kind and e.step == step
        accepted = False
    assert accepted == ok


def test_step_rows_agree_with_the_micro_batches():
    for batch in (1, 4, 7, 64, 100):
        for m in (1, 2, 3, 4, 7):
            if m > batch:
                continue
            rows = P.step_rows(batch, m)
            for step in range(3 * m):
                a, b = microbatch_bounds(batch, m)[step % m]
                assert rows(step) == (b - a, b - a)


# --------------------------------------------------------------------------- workers
def _spec(cfg):
    train, _ = load_datasets(cfg)
    plan = make_plan(cfg, train)
    K = plan.n_layers
    nodes = tuple(NodeAddress("feeder" if j == 0 else "layer", "127.0.0.1") for j in range(K + 1))
    return RunSpec(config=cfg, nodes=nodes, specs=plan.specs, steps=plan.steps, max_message=1 << 24), plan


class InProcess:
    """A worker object with no peers: its sends are recorded, its control socket points nowhere."""

    def __init__(self, cls, cfg, index, spec=None):
        self.spec, self.plan = spec or _spec(cfg)
        self.ctx = zmq.Context()
        ctrl = self.ctx.socket(zmq.DEALER)
        ctrl.setsockopt(zmq.LINGER, 0)
        self.w = cls(self.spec, index, self.ctx, ctrl)
        self.w.setup()
        self.sent = []
        self.w.send = lambda sock, kind, step=-1, arrays=(), fields=None: self.sent.append((kind, step))
        self.w.up = self.w.down = self.w.sink = None

    def close(self):
        for s in self.w.socks:
            s.close(0)
        self.ctx.term()


def _rejections(w) -> int:
    return sum(w.rejected.values())


@st.composite
def layer_messages(draw, w):
    """Frames for a layer: valid messages for its next step or for steps in flight, and
    near-valid and broken ones around them. The same draws happen whatever the worker's
    state (the state only picks among them), so failures replay and shrink."""
    ls = w.lspec
    B, M = w.batch_size, w.M
    choice = draw(st.integers(0, 9))
    sel = draw(st.integers(0, 5))
    rand_step = draw(st.integers(-1, 2**63 - 1))
    pick = draw(st.integers(0, 1000))
    r_sel = draw(st.integers(0, 5))
    r2_sel = draw(st.integers(0, 2))
    fill = draw(st.sampled_from([None, None, None, np.nan, np.inf, -np.inf, 1e30]))
    bad = draw(st.sampled_from([None, None, None, -1, ls.n_out, 2**62]))
    c_sel = draw(st.integers(0, 2))
    ex_sel, ey_sel = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    dt = draw(st.sampled_from([np.float32, np.float32, np.float32, np.float64]))
    extra = draw(st.sampled_from([P.ACK, P.MARKER, P.DONE, P.STOP, P.HEARTBEAT, P.EVAL_RESULT]))
    eid = draw(st.integers(0, 2**63))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    anything = draw(messages())

    nxt = w.next_step
    inflight = sorted(w.node.cache)
    step = [nxt, nxt, nxt + 1, max(-1, nxt - 1), inflight[pick % len(inflight)] if inflight else nxt, rand_step][sel]
    rows = P.step_rows(B, M)(max(0, step))[0]
    r = [rows, rows, rows, 0, 1, rows + 1][r_sel]
    r2 = [r, r, r + 2][r2_sel]
    cls = ls.task == "classification"

    def x_of(r, c, dt=np.float32):
        a = rng.standard_normal((r, c)).astype(dt)
        if fill is not None and a.size:
            a.flat[pick % a.size] = fill
        return a

    def y_of(r):
        if cls:
            y = rng.integers(0, ls.n_out, r).astype(np.int64)
            if bad is not None and r:
                y[0] = bad
            return y
        y = rng.integers(0, 2, (r, ls.n_out)).astype(np.float32)
        if bad is not None and r:
            y[0, 0] = np.nan
        return y

    if choice <= 3:                      # a forward message, mostly valid
        return P.encode(P.FWD, step, (x_of(r, ls.fan_in), y_of(r2)))
    if choice == 4:                      # an evaluation batch
        rx = [1, 2, 5, 6][ex_sel]
        return P.encode(P.EVAL, step, (x_of(rx, ls.fan_in), y_of([rx, rx, 7, 0][ey_sel])), {"eid": eid})
    if choice <= 6:                      # a gradient, for a step in flight or not
        c = [ls.fan_out, ls.fan_out, ls.fan_out + 1][c_sel]
        return P.encode(P.BWD, step, (x_of(r, c, dt),))
    if choice == 7:                      # kinds that do not belong on a layer's inboxes
        f = {P.MARKER: {"purpose": "ckpt"}, P.DONE: {"loss": 1.0, "metric": 0.5, "n": 3},
             P.EVAL_RESULT: {"eid": 0, "loss": 1.0, "metric": 0.5, "metric2": 0.5, "n": 3}}.get(extra)
        return P.encode(extra, step, (), f)
    return anything                      # anything at all


@pytest.mark.filterwarnings("ignore::RuntimeWarning")      # overflow in an optimizer fed 1e30
@pytest.mark.parametrize("schedule,index,layers", [
    ("async", 0, 3), ("async", 1, 3), ("async", 2, 3), ("sequential", 1, 3),
    ("backprop", 0, 2), ("backprop", 1, 2), ("pipeline", 0, 2), ("pipeline", 1, 2)])
def test_layer_handlers_apply_or_count_every_message(schedule, index, layers):
    """Each example: a fresh layer worker and a sequence of messages into its two inboxes."""
    cfg = config.build(overrides={"model.width": 8, "model.layers": layers, "train.batch_size": 5,
                                  "train.microbatches": 2, "train.schedule": schedule, "train.steps": 50,
                                  "data.train_size": 64, "data.test_size": 16, "train.eval_batch": 6})
    spec = _spec(cfg)
    applied = []

    @settings(max_examples=40, **SETTINGS)
    @given(data=st.data())
    def check(data):
        h = InProcess(LayerWorker, cfg, index, spec)
        w = h.w
        try:
            for _ in range(data.draw(st.integers(1, 10))):
                inbox = data.draw(st.sampled_from(["fwd", "bwd"]))
                frames = data.draw(layer_messages(w))
                before, nxt = _rejections(w), w.next_step
                try:
                    (w.handle_fwd if inbox == "fwd" else w.handle_bwd)(frames)
                except StepLost:
                    e = w.last_reject
                    assert inbox == "fwd" and _rejections(w) == before + 1
                    assert (e.kind == P.FWD and e.step == nxt) or (e.kind == P.EVAL and e.reason == "nonfinite")
                    continue              # the run would end here; the state is unchanged
                after = _rejections(w)
                assert after - before in (0, 1)
                if after == before:       # applied: it was a valid message for this inbox
                    P.decode(frames, expect=w.expect_fwd if inbox == "fwd" else w.expect_bwd, check_finite=True)
            applied.append(w.node.fwd_steps)
        finally:
            h.close()

    check()
    assert max(applied) >= 1                 # valid messages did get through


@pytest.mark.parametrize("schedule", ["async", "backprop"])
def test_feeder_handlers_apply_or_count_every_message(schedule):
    cfg = config.build(overrides={"model.width": 8, "train.schedule": schedule, "train.steps": 40,
                                  "data.train_size": 64, "data.test_size": 10, "train.eval_batch": 4})
    h = InProcess(FeederWorker, cfg, 0)
    w = h.w
    need = 1 if schedule == "async" else 3
    sent = 12
    got = np.zeros(w.steps, np.uint8)
    evals: dict = {}
    n_eval = [len(y) for _, y in w.eval_set]          # 4, 4, 2
    try:
        @settings(max_examples=250, **SETTINGS)
        @given(data=st.data())
        def check(data):
            kind = data.draw(st.sampled_from([P.DONE, P.ACK, P.EVAL_RESULT, P.FWD, None]))
            step = data.draw(st.one_of(st.integers(-1, 14), st.integers(-1, 2**63 - 1)))
            if kind is None:
                frames = data.draw(messages())
            else:
                f = data.draw(st.fixed_dictionaries({
                    "loss": st.floats(allow_nan=True), "metric": st.floats(-0.5, 1.5), "n": st.integers(-1, 6),
                    "eid": st.integers(-1, 4), "metric2": st.floats(0, 1)}))
                f = {k: v for k, v in f.items()
                     if k in (P.KINDS[kind].required or {}) or k in (P.KINDS[kind].optional or {})}
                hdr = msgpack.packb({"v": P.PROTOCOL_VERSION, "k": kind, "s": step, "f": f,
                                     "a": [] if kind != P.FWD else [["float32", [1, 1]], ["int64", [1]]]})
                frames = [hdr] + ([b"\0" * 4, b"\0" * 8] if kind == P.FWD else [])
            before = _rejections(w)
            if data.draw(st.booleans()):
                try:
                    s = w.on_inbox(frames, sent, got, need)
                except StepLost:
                    e = w.last_reject
                    assert e.kind in (P.DONE, P.ACK) and 0 <= e.step < sent
                    return
                if s is not None:
                    assert 0 <= s < sent and got[s] == need
            else:
                msg = w.accept(frames)
                if msg is not None:
                    w.on_eval_result(msg, evals)
            after = _rejections(w)
            assert after - before in (0, 1)
            for eid, r in evals.items():      # what evaluate() averages is always well defined
                assert r["n"] == n_eval[eid] and 0 <= r["metric"] <= 1 and "metric2" in r
        check()
        if evals:
            n = sum(r["n"] for r in evals.values())
            assert n > 0 and math.isfinite(sum(r["metric"] * r["n"] for r in evals.values()) / n)
    finally:
        h.close()


def test_evaluation_is_off_the_busy_clock():
    """An EVAL message is traced but not counted as busy time: evaluations are off the training
    clock, and busy time over training time is the figure the bench's layer balance reads."""
    cfg = config.build(overrides={"model.width": 8, "model.layers": 2, "train.batch_size": 5, "train.steps": 10,
                                  "data.train_size": 64, "data.test_size": 16, "train.eval_batch": 6})
    h = InProcess(LayerWorker, cfg, 0)
    try:
        w = h.w
        x = np.zeros((6, w.lspec.fan_in), np.float32)
        y = np.zeros((6, w.lspec.n_out), np.float32)
        w.handle_fwd(P.encode(P.EVAL, 0, [x, y], {"eid": 0}))
        assert h.sent and h.sent[-1][0] == P.EVAL and w.busy == 0.0
        w.handle_fwd(P.encode(P.FWD, 0, [x[:5], y[:5]]))
        assert w.busy > 0
    finally:
        h.close()
