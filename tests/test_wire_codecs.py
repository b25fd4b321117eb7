"""Codecs on the wire (--wire-fwd/--wire-bwd) and DNI's backward saving (--sg-every):
what the protocol accepts and refuses, what the workers send, and that the in-process
reference, which sends its mailboxes through the same codecs, still ends with the workers'
weights. The codecs' own round trips and bounds are in test_codec.py."""
import numpy as np
import pytest

from asyncdni import config
from asyncdni import schedules as S
from asyncdni.engine import checkpoint as CK
from asyncdni.engine import coordinator, reference
from asyncdni.engine.plan import load_datasets, make_plan
from asyncdni.wire import codec as WC
from asyncdni.wire import protocol as P
from tests.conftest import assert_equals_reference, forge_later

SMALL = {"train.steps": 40, "model.width": 32, "data.train_size": 2048, "data.test_size": 256,
         "runtime.progress": False}


def small(**ov):
    return config.build(overrides={**SMALL, **ov})


# ------------------------------------------------------------------ the protocol
def _expect(fwd="int8", bwd="int8", batch=4):
    return P.layer_expect(16, 8, classes=10, targets=10, batch=batch, eval_batch=8,
                          fwd_codec=WC.parse(fwd), bwd_codec=WC.parse(bwd))


def _fwd_frames(codec, h, y, step=0, fields=None):
    c = WC.parse(codec)
    f = {"c": c.name} if c.lossy else {}
    return P.encode(P.FWD, step, (*c.encode(h), y), {**f, **(fields or {})})


RNG = np.random.default_rng(0)
H = RNG.normal(size=(4, 16)).astype(np.float32)
Y = np.array([1, 2, 3, 9], np.int64)
G = RNG.normal(size=(4, 8)).astype(np.float32)


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "int8:tensor", "topk:0.25"])
def test_a_coded_message_decodes_to_the_dense_tensor(codec):
    fwd, bwd = _expect(codec, codec)
    m = P.decode(_fwd_frames(codec, H, Y), expect=fwd, check_finite=True)
    c = WC.parse(codec)
    assert len(m.arrays) == 2 and m.arrays[0].shape == H.shape and m.arrays[0].dtype == np.float32
    assert np.array_equal(m.arrays[0], c.decode(c.encode(H), (16,)))
    assert np.array_equal(m.arrays[1], Y) and "c" not in m.fields
    if c.kind == "int8":
        assert np.abs(m.arrays[0] - H).max() <= np.abs(H).max() / 127 / 2 + 1e-6
    g = P.decode(P.encode(P.BWD, 3, c.encode(G), {"c": c.name}), expect=bwd)
    assert g.step == 3 and g.arrays[0].shape == G.shape


def test_the_wire_carries_fewer_bytes():
    fp32 = P.frame_nbytes(P.encode(P.BWD, 0, (np.zeros((64, 256), np.float32),)))
    c = WC.parse("int8")
    int8 = P.frame_nbytes(P.encode(P.BWD, 0, c.encode(np.ones((64, 256), np.float32)), {"c": c.name}))
    assert int8 <= 0.3 * fp32


def _refused(frames, expect, reason):
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames, expect=expect, check_finite=True)
    assert e.value.reason == reason, str(e.value)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_hostile_codec_payloads_are_refused():
    fwd, bwd = _expect("int8", "topk:0.25")
    q, scale = WC.parse("int8").encode(H)
    for bad in (np.nan, np.inf, 0.0, -1.0):
        s = scale.copy()
        s[2] = bad
        msg = _refused(P.encode(P.FWD, 0, (q, s, Y), {"c": "int8:row"}), fwd, "codec")
        assert "scale" in msg
    q2 = q.copy()
    q2[0, 0] = -128
    _refused(P.encode(P.FWD, 0, (q2, scale, Y), {"c": "int8:row"}), fwd, "codec")
    # wrong sizes: a scale per row is one per row, not one per tensor
    _refused(P.encode(P.FWD, 0, (q, scale[:1], Y), {"c": "int8:row"}), fwd, "shape")
    _refused(P.encode(P.FWD, 0, (q, scale, Y), {"c": "int8:tensor"}), fwd, "codec")
    _refused(P.encode(P.FWD, 0, (H, Y)), fwd, "codec")                      # fp32 on an int8 link
    vals, idx = WC.parse("topk:0.25").encode(G)
    for mutate in (lambda i: i.__setitem__((0, 0), 8), lambda i: i.__setitem__((1, 0), -1),
                   lambda i: i.__setitem__((2, 1), i[2, 0])):
        i2 = idx.copy()
        mutate(i2)
        msg = _refused(P.encode(P.BWD, 0, (vals, i2), {"c": "topk:0.25"}), bwd, "codec")
        assert "ind" in msg
    v2 = vals.copy()
    v2[0, 0] = np.nan
    _refused(P.encode(P.BWD, 0, (v2, idx), {"c": "topk:0.25"}), bwd, "codec")
    # a codec where the link agreed to fp32, and none where it agreed to one
    plain_fwd, _ = _expect("fp32", "fp32")
    _refused(P.encode(P.FWD, 0, (H, Y), {"c": "int8:row"}), plain_fwd, "codec")
    _refused(P.encode(P.BWD, 0, (G,)), bwd, "codec")


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("field,value", [("train.wire_fwd", "int4"), ("train.wire_bwd", "topk:0"),
                                         ("train.wire_bwd", "topk:1.5")])
def test_a_bad_codec_is_a_config_error_naming_the_field(field, value):
    with pytest.raises(config.ConfigError) as e:
        small(**{field: value})
    assert field in str(e.value) and "\n" not in str(e.value)


def test_codec_names_are_canonical_and_in_the_digest_only_when_set():
    assert small(**{"train.wire_fwd": "INT8"}).train.wire_fwd == "int8:row"
    assert small().digest() == small(**{"train.wire_fwd": "fp32"}).digest()
    assert small().digest() != small(**{"train.wire_bwd": "int8"}).digest()


# ------------------------------------------------------------------ DNI's backward saving
def test_lockstep_order_has_no_backward_on_steps_the_sg_does_not_regress_on():
    ticks = S.lockstep(S.get("sequential"), 3, 0, 4, sg_every=2)
    names = [" ".join(map(str, t)) for t in ticks]
    assert names == ["0F0 1F0 0B0 2F0 1B0", "0F1 1F1 2F1", "0F2 1F2 0B2 2F2 1B2", "0F3 1F3 2F3"]
    # true-gradient schedules need every gradient, whatever sg_every says
    assert S.lockstep(S.get("backprop"), 3, 0, 2, sg_every=2) == S.lockstep(S.get("backprop"), 3, 0, 2)


# ------------------------------------------------------------------ through the workers
_assert_reference = assert_equals_reference


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.parametrize("schedule,ref_schedule,wire", [
    ("sequential", "dni", ("int8", "int8")),
    ("backprop", "backprop", ("int8:tensor", "topk:0.3")),
    ("pipeline", "pipeline", ("bf16", "int8")),
    ("delayed_fixed", "delayed_fixed", ("fp16", "int8")),
])
def test_coded_lockstep_runs_equal_the_reference(schedule, ref_schedule, wire):
    """The workers encode what they send and decode what they receive; the reference sends
    its mailboxes through the same codecs (and error feedback): the same weights."""
    cfg = small(**{"train.schedule": schedule, "train.seed": 3, "train.microbatches": 3,
                   "train.wire_fwd": wire[0], "train.wire_bwd": wire[1]})
    result = coordinator.run(cfg)
    train, test = load_datasets(cfg)
    plan = make_plan(cfg, train)
    ref = reference.train_reference(plan, ref_schedule, train, cfg.train.seed, test=test)
    _assert_reference(result, ref)
    plain = reference.train_reference(make_plan(small(**{"train.schedule": schedule, "train.seed": 3,
                                                        "train.microbatches": 3}), train),
                                      ref_schedule, train, cfg.train.seed)
    assert not np.allclose(plain.nodes[0].dense.W, ref.nodes[0].dense.W)   # the codecs changed something
    assert all(L["rejected"] == {} for L in result.layers)
    # the middle layers sent coded activations and gradients: fewer bytes than fp32 would be
    fwd_bytes = [L["kind_bytes"].get("fwd", 0) for L in result.layers]
    assert fwd_bytes[-1] == 0 and all(b > 0 for b in fwd_bytes[:-1])


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("no_leftover_processes")
def test_sg_every_sends_fewer_gradients_and_still_equals_the_reference():
    base = {"train.schedule": "sequential", "train.seed": 1, "train.steps": 41, "train.sg_target": "bootstrap"}
    every = coordinator.run(small(**base))
    cfg = small(**base, **{"train.sg_every": 4})
    fourth = coordinator.run(cfg)
    train, _ = load_datasets(cfg)
    _assert_reference(fourth, reference.train_reference(make_plan(cfg, train), "dni", train, 1))
    for a, b in zip(every.layers[1:], fourth.layers[1:]):
        assert a["kind_msgs"]["bwd"] == 41 and b["kind_msgs"]["bwd"] == 11      # steps 0, 4, .., 40
        assert b["kind_bytes"]["bwd"] <= 0.3 * a["kind_bytes"]["bwd"]
    assert "bwd" not in fourth.layers[0]["kind_msgs"]
    # async with propagated targets (the default): each target goes on down when it comes
    r = coordinator.run(small(**{**base, "train.schedule": "async", "train.sg_every": 4, "train.sg_target": "propagate"}))
    for i, L in enumerate(r.layers):
        assert L["cached_steps"] == 0 and L["rejected"] == {}
        assert L["sg_updates"] == (11 if i < 3 else 0)
        if i:
            assert L["kind_msgs"]["bwd"] == 11


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("no_leftover_processes")
def test_error_feedback_survives_a_checkpoint(tmp_path):
    """backprop with an int8 gradient codec: 60 steps with a checkpoint at 30, resumed to 60,
    equals 60 in one go only if the residuals were saved and restored."""
    wire = {"train.schedule": "backprop", "train.wire_bwd": "int8", "train.wire_fwd": "int8"}
    whole = coordinator.run(small(**wire, **{"train.steps": 60}))
    first = coordinator.run(small(**wire, **{"train.steps": 30, "runtime.checkpoint_every": 30,
                                             "runtime.checkpoint_dir": str(tmp_path)}))
    ck = CK.validate(CK.step_dir(tmp_path, 30), first.config.digest(), 4)
    state = ck.read_layer(2)
    assert any(k.startswith(CK.WIRE_PREFIX) for k in state)
    assert np.abs(CK.wire_state(state)["ef0"]).max() > 0
    assert not any(k.startswith(CK.WIRE_PREFIX) for k in ck.read_layer(0))   # layer 1 sends no gradient
    rest = coordinator.run(small(**wire, **{"train.steps": 60, "runtime.resume": str(tmp_path)}))
    for a, b in zip(whole.params, rest.params):
        for k in a:
            assert np.array_equal(a[k], b[k]), k


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("no_leftover_processes")
def test_hostile_codec_messages_are_counted_not_applied():
    """Forged gradients on layer 1's backward inbox with a NaN scale, a topk payload where the
    link agreed to int8, and a NaN-scaled forward: refused, counted, the run unharmed."""
    q, scale = WC.parse("int8").encode(np.ones((64, 32), np.float32))
    bad = scale.copy()
    bad[5] = np.nan
    vals, idx = WC.parse("topk:0.5").encode(np.ones((64, 32), np.float32))

    def forge(c):
        forge_later(c, 1, "bwd", [P.encode(P.BWD, step, arrays, {"c": name}) for step in range(3)
                                  for arrays, name in (((q, bad), "int8:row"), ((vals, idx), "topk:0.5"))])

    res = coordinator.run(small(**{"train.schedule": "async", "train.steps": 200, "train.wire_bwd": "int8"}),
                          on_started=forge)
    assert res.layers[0]["rejected"].get("codec") == 6
    assert np.isfinite(res.series["loss"]).all()
    assert all(np.isfinite(v).all() for p in res.params for v in p.values())


# ------------------------------------------------------------------ AQ-SGD: activation changes
def test_aq_wire_names_and_refusals():
    c, delta = WC.parse_wire("AQ:int8")
    assert delta and c.name == "int8:row" and WC.wire_name(c, delta) == "aq:int8:row"
    assert WC.parse_wire("int8") == (WC.parse("int8"), False)
    with pytest.raises(ValueError, match="lossy"):
        WC.parse_wire("aq:fp32")
    assert small(**{"train.wire_fwd": "aq:int8"}).train.wire_fwd == "aq:int8:row"
    with pytest.raises(config.ConfigError, match="train.wire_bwd"):
        small(**{"train.wire_bwd": "aq:int8"})
    with pytest.raises(config.ConfigError, match="train.wire_fwd"):
        small(**{"train.wire_fwd": "aq:int4"})


def test_delta_history_both_ends_agree_and_a_second_crossing_is_finer():
    c = WC.parse("int8")
    send, recv = WC.DeltaHistory(c, 10), WC.DeltaHistory(c, 10)
    rng = np.random.default_rng(1)
    h = rng.normal(size=(4, 16)).astype(np.float32)
    ids = np.array([7, 2, 9, 0])
    first = recv.decode(c.decode(send.encode(h, ids), (16,)), ids)
    err1 = np.abs(first - h).max()
    assert 0 < err1 <= np.abs(h).max() / 127 / 2 + 1e-6
    drift = h + 0.01 * rng.normal(size=h.shape).astype(np.float32)   # the next epoch: a small change
    second = recv.decode(c.decode(send.encode(drift, ids), (16,)), ids)
    assert np.abs(second - drift).max() < err1 / 5
    np.testing.assert_array_equal(send.m, recv.m)
    assert send.nbytes == 10 * 16 * 4
    np.testing.assert_array_equal(recv.m[ids], second)
    assert not recv.m[[1, 3, 4, 5, 6, 8]].any()                       # samples that never crossed
    # state round trip; a wrong shape or a NaN refused with nothing changed
    other = WC.DeltaHistory(c, 10)
    other.load(send.state("aqsend")["aqsend"])
    np.testing.assert_array_equal(other.m, send.m)
    for bad in (np.zeros((9, 16), np.float32), np.zeros((10, 16), np.float64), np.full((10, 16), np.nan, np.float32)):
        with pytest.raises(ValueError, match="activation history"):
            other.load(bad)
    np.testing.assert_array_equal(other.m, send.m)
    assert WC.check_ids(np.array([1, 1]), 10) == "a sample id repeats within the batch"
    assert "outside" in WC.check_ids(np.array([3, 10]), 10) and WC.check_ids(ids, 10) is None


def test_aq_messages_carry_sample_ids_in_range():
    fwd, _ = P.layer_expect(16, 8, classes=10, targets=10, batch=4, eval_batch=8, fwd_codec=WC.parse("int8"),
                            fwd_delta=True, n_samples=100)
    c = WC.parse("int8")
    ids = np.array([5, 6, 99, 0], np.int64)
    m = P.decode(P.encode(P.FWD, 0, (*c.encode(H), Y, ids), {"c": "aq:int8:row"}), expect=fwd, check_finite=True)
    assert len(m.arrays) == 3 and np.array_equal(m.arrays[2], ids)
    _refused(P.encode(P.FWD, 0, (*c.encode(H), Y, ids), {"c": "int8:row"}), fwd, "codec")   # not as changes
    _refused(P.encode(P.FWD, 0, (*c.encode(H), Y, ids + 1), {"c": "aq:int8:row"}), fwd, "range")
    _refused(P.encode(P.FWD, 0, (*c.encode(H), Y), {"c": "aq:int8:row"}), fwd, "shape")       # no ids


AQ = {"data.train_size": 512, "train.steps": 30, "train.wire_fwd": "aq:int8"}    # 8 steps an epoch


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.parametrize("schedule,ref_schedule", [("sequential", "dni"), ("pipeline", "pipeline"),
                                                   ("backprop", "backprop")])
def test_aq_lockstep_runs_equal_the_reference(schedule, ref_schedule):
    """Activation changes over almost four epochs: each end's history, the ids the feeder
    sends (sliced per micro-batch under pipeline), the reference's two ends per link."""
    cfg = small(**AQ, **{"train.schedule": schedule, "train.seed": 5, "train.microbatches": 3,
                         "train.wire_bwd": "int8"})
    result = coordinator.run(cfg)
    train, _ = load_datasets(cfg)
    ref = reference.train_reference(make_plan(cfg, train), ref_schedule, train, cfg.train.seed)
    _assert_reference(result, ref)
    assert all(L["rejected"] == {} for L in result.layers)
    # layers 1..3 send (512 x 32 float32 = 64 KiB), layers 2..4 receive: one or two histories each
    assert [L["wire_state_bytes"] >= (1 if i in (0, 3) else 2) * 512 * 32 * 4 for i, L in enumerate(result.layers)] \
        == [True] * 4


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("no_leftover_processes")
def test_aq_histories_survive_a_checkpoint(tmp_path):
    seq = {**AQ, "train.schedule": "sequential"}
    whole = coordinator.run(small(**seq))
    first = coordinator.run(small(**{**seq, "train.steps": 20, "runtime.checkpoint_every": 20,
                                     "runtime.checkpoint_dir": str(tmp_path)}))
    ck = CK.validate(CK.step_dir(tmp_path, 20), first.config.digest(), 4)
    ws = CK.wire_state(ck.read_layer(1))
    assert set(ws) == {"aqsend", "aqrecv"} and ws["aqsend"].shape == (512, 32)
    np.testing.assert_array_equal(ws["aqsend"], CK.wire_state(ck.read_layer(2))["aqrecv"])   # both ends agree
    rest = coordinator.run(small(**seq, **{"runtime.resume": str(tmp_path)}))
    for a, b in zip(whole.params, rest.params):
        for k in a:
            assert np.array_equal(a[k], b[k]), k
