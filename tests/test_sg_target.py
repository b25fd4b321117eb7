"""train.sg_target: propagated SG targets (the default) against the DNI paper's bootstrapped
ones. Under "propagate" a layer passes the target that came back to it down, backpropagated
through itself, when it comes; under "bootstrap" it sends its SG prediction down at the
forward. The numerics against finite differences and autograd, the schedules' lock-step
orders, the configuration's refusals, and runs through the workers against the reference."""
import numpy as np
import pytest

from asyncdni import config
from asyncdni import schedules as S
from asyncdni.engine import coordinator, reference
from asyncdni.engine.plan import load_datasets, make_plan
from asyncdni.numerics.layer import LayerNode, LayerSpec, StepError
from tests.conftest import assert_equals_reference, raises_one_line

F64 = np.float64


def spec(index, n_layers=3, fan_in=5, fan_out=4, **kw) -> LayerSpec:
    base = dict(index=index, n_layers=n_layers, fan_in=fan_in, fan_out=fan_out, activation="tanh", init="he",
                loss="softmax_ce", task="classification", n_out=3, optimizer="adam", lr=1e-2, sg_model="linear",
                sg_hidden=0, sg_lr=1e-2, cond=True, microbatches=1, seed=2, schedule="async",
                sg_target="propagate")
    base.update(kw)
    return LayerSpec(**base)


def batch(B=6, fan_in=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (B, fan_in)), rng.integers(0, 3, B)


# ------------------------------------------------------------------ numpy numerics
@pytest.mark.parametrize("batch_norm", [False, True])
def test_propagated_target_is_the_input_gradient_of_the_layer(batch_norm):
    """A hidden layer sends nothing down at its forward; when its target g comes back it
    regresses its SG and returns dL/dx = J^T g with its current weights: the gradient of
    <g, h(x)> by central differences (batch norm: through the forward's batch statistics)."""
    node = LayerNode(spec(1, batch_norm=batch_norm), dtype=F64)
    x, y = batch()
    h, gx, m = node.dni_forward(0, x, y)
    assert gx is None and m is None and 0 in node.cache
    W, gamma = node.dense.W.copy(), None if node.dense.bn is None else node.dense.bn.gamma.copy()
    g = np.random.default_rng(5).normal(0, 0.1, h.shape)
    gd = node.sg_backward(0, g)
    assert node.sg_updates == 1 and node.cache == {}

    def f(xv):                       # <g, h(x)> with the weights the gradient was taken with
        z = xv @ W
        if batch_norm:
            mu, var = z.mean(0), z.var(0)
            z = (z - mu) / np.sqrt(var + node.dense.bn.eps) * gamma + node.dense.bn.beta
        else:
            z = z + node.dense.b
        return float(np.sum(g * np.tanh(z)))

    np.testing.assert_array_equal(node.dense.W, W)      # sg_backward trains the SG only, not the layer
    num = np.zeros_like(x)
    eps = 1e-6
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        num[idx] = (f(xp) - f(xm)) / (2 * eps)
    np.testing.assert_allclose(gd, num, rtol=1e-5, atol=1e-8)


def test_propagate_keeps_the_last_and_first_layers_as_they_were():
    """The last layer still sends the loss's gradient at its forward; the first layer keeps no
    backward context and sends nothing when its target comes; "bootstrap" sends the SG's
    prediction down at the forward and nothing from sg_backward."""
    x, y = batch()
    last = LayerNode(spec(2, fan_in=5, fan_out=3), dtype=F64)
    _, gx, m = last.dni_forward(0, x, y)
    assert gx is not None and gx.shape == x.shape and m is not None
    first = LayerNode(spec(0), dtype=F64)
    h, gx, _ = first.dni_forward(0, x, y)
    assert gx is None and first.cache[0][2] is None
    assert first.sg_backward(0, np.ones_like(h)) is None
    boot = LayerNode(spec(1, sg_target="bootstrap"), dtype=F64)
    h, gx, _ = boot.dni_forward(0, x, y)
    assert gx is not None and boot.cache[0][2] is None
    assert boot.sg_backward(0, np.ones_like(h)) is None
    with pytest.raises(StepError):
        boot.sg_backward(0, np.ones_like(h))           # the step is no longer in flight


def test_a_dropped_stale_target_still_goes_down():
    """sg_stale_decay 0 drops a late target from the SG's regression, but the layer below
    still gets its own target (else its step would stay in flight for ever)."""
    node = LayerNode(spec(1, sg_stale_decay=0.0), dtype=F64)
    x, y = batch()
    h, _, _ = node.dni_forward(0, x, y)
    node.dni_forward(1, x, y)
    gd = node.sg_backward(0, np.ones_like(h))           # lag 1: dropped
    assert node.stale_dropped == 1 and node.sg_updates == 0
    assert gd is not None and gd.shape == x.shape and 0 not in node.cache


def test_sg_every_keeps_nothing_for_steps_without_a_target():
    node = LayerNode(spec(1, sg_every=2), dtype=F64)
    x, y = batch()
    for step in range(4):
        _, gx, _ = node.dni_forward(step, x, y)
        assert gx is None
    assert sorted(node.cache) == [0, 2] and all(e[2] is not None for e in node.cache.values())


# --------------------------------------------------------------------- schedules
def test_the_propagating_forms_of_the_schedules():
    seq = S.get("sequential", "propagate")
    assert not seq.hold_for_ack and seq.needs_ack and seq.gradient == S.SYNTHETIC
    ticks = S.lockstep(seq, 3, 0, 1)
    assert [(a.op, a.stage) for a in ticks[0]] == [("F", 0), ("F", 1), ("F", 2), ("B", 1), ("B", 0)]
    boot = S.get("sequential", "bootstrap")
    assert boot is S.get("sequential") and boot.hold_for_ack
    assert [(a.op, a.stage) for a in S.lockstep(boot, 3, 0, 1)[0]] == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1)]
    asy = S.get("async", "propagate")
    assert asy.release == ("done",) and asy.window == "max_inflight"
    for name in S.NAMES:
        if S.get(name).gradient != S.SYNTHETIC:
            assert S.get(name, "propagate") is S.get(name)
    with pytest.raises(ValueError, match="unknown SG target 'both'"):
        S.get("async", "both")


# ------------------------------------------------------------------ configuration
def _plan(**ov):
    cfg = config.build(overrides={"model.width": 8, "data.train_size": 256, "data.test_size": 64, **ov})
    train, _ = load_datasets(cfg)
    return make_plan(cfg, train)


def test_configuration_of_sg_target_and_what_auto_resolves_to():
    t = config.build().train
    assert (t.sg_target, t.sg_clip) == ("auto", -1.0)
    assert config.build(overrides={"train.sg_clip": "auto"}).train.sg_clip == -1.0
    assert config.build(overrides={"train.sg_target": "bootstrap"}).train.sg_target == "bootstrap"
    msg = raises_one_line(config.ConfigError, config.build, overrides={"train.sg_target": "truth"})
    assert "train.sg_target" in msg and "propagate" in msg
    raises_one_line(config.ConfigError, config.build, overrides={"train.sg_clip": -2}, match_all=("train.sg_clip",))
    msg = raises_one_line(config.ConfigError, config.build, overrides={
        "train.schedule": "sequential", "train.sg_every": 4, "train.sg_target": "propagate"})
    assert "train.sg_every" in msg and "--sg-target bootstrap" in msg
    for ok in ({"train.schedule": "async", "train.sg_every": 4, "train.sg_target": "propagate"},
               {"train.schedule": "sequential", "train.sg_every": 4},
               {"train.schedule": "backprop", "train.sg_every": 4}):
        config.build(overrides=ok)
    # auto: bootstrap for shallow cDNI, propagate from 6 stages and for plain DNI; the clip follows
    for ov, want in (({"model.layers": 4}, ("bootstrap", 1.0)), ({"model.layers": 6}, ("propagate", 0.5)),
                     ({"model.layers": 3, "train.cond": False}, ("propagate", 0.5)),
                     ({"model.layers": 8, "train.schedule": "sequential", "train.sg_every": 2}, ("bootstrap", 1.0)),
                     ({"model.layers": 4, "train.sg_target": "propagate"}, ("propagate", 0.5)),
                     ({"model.layers": 8, "train.sg_target": "bootstrap", "train.sg_clip": 0.25}, ("bootstrap", 0.25))):
        specs = _plan(**ov).specs
        assert {(s.sg_target, s.sg_clip) for s in specs} == {want}, ov
    assert S.resolve_sg_target("auto", S.AUTO_PROPAGATE_DEPTH - 1, True) == "bootstrap"
    # the digest is of what auto chose: the same configuration as choosing it by hand
    assert config.build().digest() == config.build(overrides={"train.sg_target": "bootstrap"}).digest()
    assert config.build().digest() != config.build(overrides={"train.sg_target": "propagate"}).digest()
    deep = {"model.layers": 6}
    assert config.build(overrides=deep).digest() == config.build(
        overrides={**deep, "train.sg_target": "propagate", "train.sg_clip": 0.5}).digest()
    # torch stages: the stage count is the model's, so "auto" stays in the digest as it is
    torch_cfg = {"model.model": "mlp"}
    assert config.sg_in_effect(config.build(overrides=torch_cfg)) == ("auto", -1.0)


# -------------------------------------------------------------- the torch backend
def test_torch_stage_propagates_the_autograd_input_gradient():
    torch = pytest.importorskip("torch")
    from asyncdni.torch import pin_threads
    from asyncdni.torch.node import TorchNode
    pin_threads(1)
    IMG = (1, 8, 8)
    s = spec(1, fan_in=0, fan_out=0, activation="relu", n_out=10, optimizer="sgd", lr=0.1, backend="torch",
             model="cnn", sample_shape=IMG, cond=False)
    node = TorchNode(s)
    rng = np.random.default_rng(1)
    B = 8
    x = rng.standard_normal((B, 32 * 4 * 4)).astype(np.float32)
    y = rng.integers(0, 10, B)
    h, gx, _ = node.dni_forward(0, x, y)
    assert gx is None and node.cache[0][5] is not None      # the input and the forward's RNG state
    buffers = [b.clone() for b in node.stage.buffers()]
    g = rng.standard_normal(h.shape).astype(np.float32) * 0.1
    xt = torch.from_numpy(x.copy()).reshape(B, 32, 4, 4).requires_grad_(True)
    node.stage(xt).backward(torch.from_numpy(g).reshape(node.stage(xt).shape))   # autograd, current weights
    for b, v in zip(node.stage.buffers(), buffers):                  # (that forward moved the statistics:
        b.copy_(v)                                                   # put them back, as the node does)
    want = xt.grad.reshape(B, -1).numpy()
    node.stage.zero_grad(set_to_none=True)
    gd = node.sg_backward(0, g)
    np.testing.assert_allclose(np.asarray(gd).reshape(B, -1), want, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(b, v) for b, v in zip(node.stage.buffers(), buffers))   # statistics untouched
    assert all(p.grad is None for p in node.stage.parameters())                    # no weight gradient left
    assert node.sg_updates == 1 and node.cache == {}


# -------------------------------------------------------------- through the workers
SMALL = {"train.steps": 30, "model.width": 32, "model.layers": 4, "data.train_size": 2048, "data.test_size": 256,
         "runtime.progress": False, "train.seed": 3}


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.parametrize("target", ["propagate", "bootstrap"])
def test_sequential_equals_the_reference_under_either_target(target):
    cfg = config.build(overrides={**SMALL, "train.schedule": "sequential", "train.sg_target": target})
    r = coordinator.run(cfg)
    train, _ = load_datasets(cfg)
    ref = reference.train_reference(make_plan(cfg, train), "sequential", train, 3)
    assert_equals_reference(r, ref, (target,))
    for i, L in enumerate(r.layers):
        assert L["cached_steps"] == 0 and L["rejected"] == {}
        assert L["sg_updates"] == (30 if i < 3 else 0)
        assert L["kind_msgs"].get("bwd", 0) == (30 if i else 0)


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("no_leftover_processes")
def test_async_propagates_every_target_down_the_chain():
    r = coordinator.run(config.build(overrides={**SMALL, "train.schedule": "async", "train.steps": 40,
                                                "train.sg_target": "propagate"}))
    for i, L in enumerate(r.layers):
        assert L["cached_steps"] == 0 and L["rejected"] == {}
        assert L["sg_updates"] == (40 if i < 3 else 0)
        assert L["kind_msgs"].get("bwd", 0) == (40 if i else 0)
    assert np.isfinite(r.series["loss"]).all()


# ------------------------------------------------------------------ benchmarks.depth
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_leftover_processes")
def test_depth_benchmark_methods_and_a_tiny_run(capsys, monkeypatch):
    from benchmarks import depth
    assert depth.method_overrides("dni sequential") == depth.METHODS["dni"]
    assert depth.method_overrides("cdni bootstrap")["train.sg_target"] == "bootstrap"
    assert depth.method_overrides("backprop sequential") is None and depth.method_overrides("nope") is None
    assert depth.main(["--methods", "cdni,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert depth.main(["--set", "sg_clip"]) == 2

    def tiny_digits(directory):      # scikit-learn's digits stand-in: 8x8 "images", 10 classes
        rng = np.random.default_rng(0)
        y = rng.integers(0, 10, 400)
        x = (rng.random((400, 64)) * 0.3 + np.eye(10)[y].repeat(7, axis=1)[:, :64]).astype(np.float32)
        path = f"{directory}/digits.npz"
        np.savez(path, x=x, y=y.astype(np.int64))
        return path

    monkeypatch.setattr(depth, "digits_npz", tiny_digits)
    assert depth.main(["--datasets", "digits", "--depths", "3", "--epochs", "0.5", "--seeds", "0", "--bn", "off",
                       "--methods", "backprop,cdni,cdni sequential", "--eval-every", "5",
                       "--set", "train.sg_clip=0.25"]) == 0
    out = capsys.readouterr().out
    for row in ("| backprop |", "| cdni |", "| cdni sequential |"):
        assert row in out
    assert "digits depth 3 no-bn cdni sequential seed 0: test error" in out


def test_depth_cells_are_in_seed_order():
    from benchmarks.depth import fmt_cell
    runs = [{"seed": 2, "test_error": 3.0, "steps_to_target": None}, {"seed": 0, "test_error": 1.0, "steps_to_target": 5},
            {"seed": 1, "test_error": 2.0, "steps_to_target": 7}]
    assert fmt_cell(runs) == "2.00 (1.00 / 2.00 / 3.00)"
    assert fmt_cell(runs, "steps_to_target") == "5 / 7 / never"


def test_a_checkpoint_recorded_before_sg_target_existed_is_explained():
    """A manifest's recorded configuration without train.sg_target was written when every
    run bootstrapped: the mismatch names it (and every other differing field) in one line."""
    old = config.build(overrides={"train.sg_target": "bootstrap", "train.sg_clip": 1.0}).to_dict()
    del old["train"]["sg_target"]
    why = config.explain_mismatch(old, config.build(overrides={"train.sg_target": "propagate", "train.sg_clip": 0.5}))
    assert why == ("train.sg_clip is 1 in the checkpoint, 0.5 here; "
                   "train.sg_target is bootstrap in the checkpoint, propagate here")
    same = config.build(overrides={"train.sg_target": "bootstrap", "train.sg_clip": 1.0})
    assert config.explain_mismatch(old, same) is None
