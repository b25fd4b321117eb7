"""``train.sg_clip``: the cap on a synthetic gradient's norm that keeps async DNI stable
(README "Stability under staleness"). Pure numpy, in one process, no sockets."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from asyncdni import config
from asyncdni.checkpoint import CheckpointError, node_state, restore_node
from asyncdni.layer import TARGET_NORM_DECAY, LayerNode, LayerSpec

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
        W0 = node.dense.W.copy()
        _, sent[c], _ = node.dni_forward(0, x, y)
        moves[c] = node.dense.W - W0
        A0 = node.sg.A.copy()
        node.sg_update(0, g)
        sg_moves[c] = node.sg.A - A0
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
        config.build(overrides={"train.sg_clip": -1})
    on = config.build(overrides={"train.sg_clip": 1.0})
    off = config.build(overrides={"train.sg_clip": 0.0})
    assert on.train.sg_clip == 1.0 and dataclasses.replace(on.train, sg_clip=0.0) == off.train
    assert config.DIGEST_OMIT_AT_DEFAULT["train.sg_clip"] == 0.0   # checkpoints from before it still load
