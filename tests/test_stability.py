"""``train.sg_clip`` (the layer's step capped by its SG prediction's norm) and ``train.sg_damp``
(the SG model's own step damped while its predictions outgrow its targets): the two measures
against the async DNI collapse (README "Stability under staleness"). Pure numpy, in one
process, no sockets."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from asyncdni import config
from asyncdni.engine.checkpoint import CheckpointError, node_state, restore_node
from asyncdni.numerics.layer import TARGET_NORM_DECAY, LayerNode, LayerSpec

F64 = np.float64


def spec(**kw) -> LayerSpec:
    base = {"index": 1, "n_layers": 3, "fan_in": 5, "fan_out": 4, "activation": "relu", "init": "he",
            "loss": "softmax_ce", "task": "classification", "n_out": 3, "optimizer": "sgd", "lr": 0.1,
            "sg_model": "linear", "sg_hidden": 0, "sg_lr": 0.05, "cond": True, "microbatches": 1, "seed": 3}
    return LayerSpec(**{**base, **kw})


def batch(B=8, seed=2):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (B, 5)), rng.integers(0, 3, B), rng.normal(0, 1, (B, 4)) / B


def randomise_sg(node, seed=7):
    rng = np.random.default_rng(seed)
    for p in node.sg.params:
        p[...] = rng.normal(0, 1, p.shape)


def one_step(node, x, y, g):
    """One DNI step and its SG update: (the layer's move, the gradient sent down, the SG's move)."""
    W0 = node.dense.W.copy()
    _, sent, _ = node.dni_forward(0, x, y)
    move = node.dense.W - W0
    A0 = node.sg.A.copy()
    node.sg_update(0, g)
    return move, sent, node.sg.A - A0


def test_target_norm_is_a_running_mean_of_per_example_target_norms():
    node = LayerNode(spec(sg_clip=2.0), dtype=F64)
    x, y, g = batch()
    B = x.shape[0]
    node.dni_forward(0, x, y)
    node.dni_forward(1, x, y)
    assert node.target_norm == 0.0
    node.sg_update(0, g)
    n1 = np.linalg.norm(g) * B
    assert node.target_norm == pytest.approx(n1, rel=1e-12)          # the first target sets it
    node.sg_update(1, 3 * g)
    assert node.target_norm == pytest.approx(TARGET_NORM_DECAY * n1 + (1 - TARGET_NORM_DECAY) * 3 * n1, rel=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("clip", [0.5, 1e6])
def test_clip_scales_the_layer_step_not_the_gradients(clip, optimizer):
    """The cap scales the layer's learning rate for the step, so W moves by exactly
    cap / |pred| of the uncapped move under Adam too (scaling the gradient instead would be
    undone by Adam's normalisation); a cap above |pred| changes nothing. The gradient sent
    down and the SG's regression are those of the uncapped prediction."""
    x, y, g = batch()
    nodes = {c: LayerNode(spec(sg_clip=c, optimizer=optimizer), dtype=F64) for c in (0.0, clip)}
    moves, sg_moves, sent = {}, {}, {}
    for c, node in nodes.items():
        randomise_sg(node)
        node.target_norm = 1.0                       # as if targets of per-example norm 1 had come in
        moves[c], sent[c], sg_moves[c] = one_step(node, x, y, g)
    fresh = LayerNode(spec(), dtype=F64)             # the prediction both made, from the same state
    randomise_sg(fresh)
    pn = np.linalg.norm(fresh.sg.predict(fresh.dense.forward(x), fresh._cond(y)))
    scale = min(1.0, clip * 1.0 / pn)
    assert (scale < 1) == (clip == 0.5)
    np.testing.assert_allclose(moves[clip], scale * moves[0.0], rtol=1e-9, atol=1e-14)
    np.testing.assert_array_equal(sent[clip], sent[0.0])
    np.testing.assert_allclose(sg_moves[clip], sg_moves[0.0], rtol=1e-10, atol=1e-14)
    assert nodes[clip].sg_clipped == (1 if scale < 1 else 0)
    assert nodes[0.0].target_norm == 1.0                   # off: never tracked
    assert nodes[clip].opt.lr == nodes[0.0].opt.lr         # the scale is for that one step only


def test_no_cap_before_the_first_target():
    node = LayerNode(spec(sg_clip=1e-9), dtype=F64)
    randomise_sg(node)
    ref = LayerNode(spec(), dtype=F64)
    randomise_sg(ref)
    x, y, _ = batch()
    node.dni_forward(0, x, y)
    ref.dni_forward(0, x, y)
    np.testing.assert_array_equal(node.dense.W, ref.dense.W)


def test_checkpoint_keeps_the_running_target_norm():
    node = LayerNode(spec(sg_clip=2.0), dtype=F64)
    node.target_norm = 0.75
    state = node_state(node)
    other = LayerNode(spec(sg_clip=2.0), dtype=F64)
    restore_node(other, state)
    assert other.target_norm == 0.75
    bad = dict(state, sgclip=np.array([-1.0]))
    with pytest.raises(CheckpointError, match="sgclip"):
        restore_node(other, bad)
    assert "sgclip" not in node_state(LayerNode(spec(), dtype=F64))   # off: layout unchanged


def test_config_validates_sg_clip_and_keeps_old_digests():
    with pytest.raises(config.ConfigError, match="sg_clip"):
        config.build(overrides={"train.sg_clip": -0.5})          # (-1 is "auto")
    on = config.build(overrides={"train.sg_clip": 1.0})
    off = config.build(overrides={"train.sg_clip": 0.0})
    assert on.train.sg_clip == 1.0 and dataclasses.replace(on.train, sg_clip=0.0) == off.train
    assert config.DIGEST_OMIT_AT_DEFAULT["train.sg_clip"] == 0.0   # checkpoints from before it still load


# ----------------------------------------------------------------------------- sg_damp
def test_damp_scale_is_the_squared_ratio_of_running_norms_below_one():
    node = LayerNode(spec(sg_damp=0.8), dtype=F64)
    assert node.damp_scale() == 1.0                        # no norms yet
    node.target_norm, node.pred_norm = 1.0, 4.0
    assert node.damp_scale() == pytest.approx((0.8 * 1.0 / 4.0) ** 2, rel=1e-15)
    node.target_norm, node.pred_norm = 1.0, 0.8            # predictions within sg_damp x targets
    assert node.damp_scale() == 1.0
    assert node.sg_damped == 1
    off = LayerNode(spec(), dtype=F64)
    off.target_norm, off.pred_norm = 1.0, 100.0
    assert off.damp_scale() == 1.0


def test_prediction_norm_is_a_running_mean_of_forward_prediction_norms():
    node = LayerNode(spec(sg_damp=1.0), dtype=F64)
    randomise_sg(node)
    x, y, g = batch()
    node.dni_forward(0, x, y)
    p0 = np.linalg.norm(node.cache[0][1])
    assert node.pred_norm == pytest.approx(p0, rel=1e-12)          # the first prediction sets it
    node.dni_forward(1, 2 * x, y)
    p1 = np.linalg.norm(node.cache[1][1])
    assert p1 != pytest.approx(p0)
    assert node.pred_norm == pytest.approx(TARGET_NORM_DECAY * p0 + (1 - TARGET_NORM_DECAY) * p1, rel=1e-12)
    node.sg_update(0, g)                                           # targets are tracked under sg_damp too
    assert node.target_norm == pytest.approx(np.linalg.norm(g) * x.shape[0], rel=1e-12)
    assert LayerNode(spec(), dtype=F64).pred_norm == 0.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_damp_scales_the_sg_step_only(optimizer):
    """Predictions 4x their targets with sg_damp 0.8: the SG model's step is (0.8/4)^2 of the
    undamped one, under Adam too (the learning rate is scaled, not the gradient); the layer's
    own step, the gradient it sends down and the SG learning rate afterwards are unchanged."""
    x, y, g = batch()
    nodes = {d: LayerNode(spec(sg_damp=d, optimizer=optimizer), dtype=F64) for d in (0.0, 0.8)}
    moves, sg_moves, sent = {}, {}, {}
    for d, node in nodes.items():
        randomise_sg(node)
        W0 = node.dense.W.copy()
        _, sent[d], _ = node.dni_forward(0, x, y)
        moves[d] = node.dense.W - W0
        node.target_norm, node.pred_norm = 1.0, 4.0        # as if after many steps (both runs alike)
        A0 = node.sg.A.copy()
        node.sg_update(0, g)
        sg_moves[d] = node.sg.A - A0
    # sg_update tracks the new target before it scales the step
    t_after = TARGET_NORM_DECAY * 1.0 + (1 - TARGET_NORM_DECAY) * np.linalg.norm(g) * x.shape[0]
    scale = (0.8 * t_after / 4.0) ** 2
    assert scale < 0.1
    np.testing.assert_allclose(sg_moves[0.8], scale * sg_moves[0.0], rtol=1e-9, atol=1e-14)
    np.testing.assert_array_equal(moves[0.8], moves[0.0])
    np.testing.assert_array_equal(sent[0.8], sent[0.0])
    assert nodes[0.8].sg_damped == 1 and nodes[0.0].sg_damped == 0
    assert nodes[0.8].sg_opt.lr == nodes[0.0].sg_opt.lr == 0.05


def test_checkpoint_keeps_both_running_norms_under_sg_damp():
    node = LayerNode(spec(sg_damp=0.8), dtype=F64)
    node.target_norm, node.pred_norm = 0.75, 2.5
    state = node_state(node)
    assert set(state) >= {"sgclip", "sgdamp"}
    other = LayerNode(spec(sg_damp=0.8), dtype=F64)
    restore_node(other, state)
    assert (other.target_norm, other.pred_norm) == (0.75, 2.5)
    with pytest.raises(CheckpointError, match="sgdamp"):
        restore_node(other, dict(state, sgdamp=np.array([-1.0])))
    with pytest.raises(CheckpointError, match="checkpoint state has no"):   # saved with it off: refused
        restore_node(other, node_state(LayerNode(spec(), dtype=F64)))
    assert "sgdamp" not in node_state(LayerNode(spec(sg_clip=1.0), dtype=F64))


def test_config_validates_sg_damp_and_keeps_old_digests():
    for bad in (-0.5, float("inf"), float("nan")):
        with pytest.raises(config.ConfigError, match="sg_damp"):
            config.build(overrides={"train.sg_damp": bad})
    on = config.build(overrides={"train.sg_damp": 0.8})
    off = config.build(overrides={"train.sg_damp": 0.0})
    assert on.train.sg_damp == 0.8 and on.digest() != off.digest()
    assert config.DIGEST_OMIT_AT_DEFAULT["train.sg_damp"] == 0.0   # checkpoints from before it: the 0 digest


def test_sg_damp_flag_reaches_the_config_and_a_bad_value_is_one_line(capsys):
    import argparse
    from asyncdni import cli
    p = argparse.ArgumentParser()
    cli._add_train_flags(p)
    ov = cli.overrides_from_args(p.parse_args(["--sg-damp", "0.8"]))
    assert ov["train.sg_damp"] == "0.8"
    assert config.build(overrides=ov).train.sg_damp == 0.8
    assert cli.main(["train", "--sg-damp", "-1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.sg_damp" in err, err


# ---------------------------------------------------------------------------- sg_trust
def test_trust_is_a_running_cosine_of_predictions_with_their_targets():
    from asyncdni.numerics.layer import TRUST_DECAY
    node = LayerNode(spec(sg_trust=True), dtype=F64)
    randomise_sg(node)
    x, y, g = batch()
    _, _, _ = node.dni_forward(0, x, y)
    pred = node.cache[0][1].copy()                       # what the layer stepped on
    node.sg_update(0, pred / x.shape[0])                 # a target in the same direction: cosine 1
    assert node.trust == pytest.approx(1 - TRUST_DECAY, rel=1e-12)
    node.dni_forward(1, x, y)
    pred = node.cache[1][1].copy()
    node.sg_update(1, -pred)                             # the opposite direction: cosine -1
    assert node.trust == pytest.approx(TRUST_DECAY * (1 - TRUST_DECAY) - (1 - TRUST_DECAY), rel=1e-12)
    assert node.trust_scale() == 0.0                     # disagreement: the layer does not move
    off = LayerNode(spec(), dtype=F64)
    assert off.trust_scale() == 1.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_trust_scales_the_layer_step_only(optimizer):
    """The layer's step is its untrusted step times max(0, trust), under Adam too; what it
    sends down and the SG's own step are unchanged; trust 0 (a fresh layer) means no move."""
    x, y, g = batch()
    moves, sent, sg_moves = {}, {}, {}
    for t in (None, 0.3, 0.0):
        node = LayerNode(spec(optimizer=optimizer, sg_trust=t is not None), dtype=F64)
        randomise_sg(node)
        if t is not None:
            node.trust = t
        moves[t], sent[t], sg_moves[t] = one_step(node, x, y, g)
    np.testing.assert_allclose(moves[0.3], 0.3 * moves[None], rtol=1e-9, atol=1e-14)
    np.testing.assert_array_equal(moves[0.0], 0 * moves[None])
    np.testing.assert_array_equal(sent[0.3], sent[None])
    np.testing.assert_allclose(sg_moves[0.3], sg_moves[None], rtol=1e-10, atol=1e-14)


def test_checkpoint_keeps_the_trust_and_refuses_an_impossible_one():
    node = LayerNode(spec(sg_trust=True), dtype=F64)
    node.trust = 0.42
    state = node_state(node)
    other = LayerNode(spec(sg_trust=True), dtype=F64)
    restore_node(other, state)
    assert other.trust == 0.42
    with pytest.raises(CheckpointError, match="sgtrust"):
        restore_node(other, dict(state, sgtrust=np.array([1.5])))
    assert "sgtrust" not in node_state(LayerNode(spec(), dtype=F64))   # off: layout unchanged


def test_sg_trust_and_sg_clip_flags_reach_the_config(capsys):
    from asyncdni import cli
    ap = cli.make_parser()
    for argv, want in ((["train", "--sg-trust"], True), (["train", "--no-sg-trust"], False), (["train"], False)):
        assert config.build(overrides=cli.overrides_from_args(ap.parse_args(argv))).train.sg_trust is want
    args = ap.parse_args(["train", "--sg-clip", "0"])
    assert config.build(overrides=cli.overrides_from_args(args)).train.sg_clip == 0.0
    assert config.build().train.sg_clip == -1.0           # auto (0.5 or 1 by the SG targets), since 2026-12-05
    args = ap.parse_args(["train", "--sg-target", "bootstrap"])
    assert config.build(overrides=cli.overrides_from_args(args)).train.sg_target == "bootstrap"
    assert config.DIGEST_OMIT_AT_DEFAULT["train.sg_trust"] is False
    with pytest.raises(SystemExit):
        ap.parse_args(["train", "--sg-trust", "--no-sg-trust"])
    capsys.readouterr()
