"""Schedules as data (schedules.TABLE, lock-step action lists, the reference runtime) and
the two decoupling methods DNI is measured against: delayed true gradients and local losses.

Unit tests here use no sockets; the integration tests at the end run real workers."""
import dataclasses
import signal

import numpy as np
import pytest

from asyncdni.engine import checkpoint as CK
from asyncdni import config
from asyncdni.engine import coordinator
from asyncdni.numerics import losses
from asyncdni.engine import reference
from asyncdni import schedules as S
from asyncdni.numerics.layer import ARITHMETIC, AuxHead, LayerNode, LayerSpec, StepError
from asyncdni.engine.plan import load_datasets, make_plan
from tests.test_faults import kill_when

SMALL = {"train.steps": 40, "model.width": 32, "data.train_size": 2048, "data.test_size": 256,
         "runtime.progress": False}


def small(**ov):
    return config.build(overrides={**SMALL, **ov})


def spec(index=1, n_layers=3, fan_in=6, fan_out=10, schedule="delayed", optimizer="sgd", lr=0.1, **kw):
    base = dict(index=index, n_layers=n_layers, fan_in=fan_in, fan_out=fan_out, activation="tanh", init="he",
                loss="softmax_ce", task="classification", n_out=4, optimizer=optimizer, lr=lr, sg_model="linear",
                sg_hidden=0, sg_lr=1e-3, cond=True, microbatches=1, seed=5, schedule=schedule, aux_features=16)
    base.update(kw)
    return LayerSpec(**base)


# ------------------------------------------------------------------ the table
def test_every_schedule_is_fully_described():
    assert config.SCHEDULES == S.NAMES
    for s in S.TABLE.values():
        assert s.gradient in ARITHMETIC
        assert s.window in ("max_inflight", "one", "lag")
        assert set(s.release) <= {"done", "ack"} and "done" in s.release
        assert s.parallelism in ("free", "locked", "microbatch")
        assert s.window_size(3, 4) >= 1
        # a gradient that travels back must be acknowledged, so that the window bounds it
        assert s.needs_ack == (s.gradient in (S.TRUE, S.DELAYED))
        ticks = S.lockstep(s, 3, 0, 4, 2)
        assert all(a.stage in range(3) and a.op in "FB" for t in ticks for a in t)
    assert S.get("delayed_fixed").lags(4) == (3, 2, 1, 0)
    assert S.get("delayed_fixed").window_size(3, 4) == 4      # enough in flight for layer 1's lag
    with pytest.raises(ValueError, match="unknown schedule 'nope'"):
        S.get("nope")


def _names(ticks):
    return [" ".join(map(str, t)) for t in ticks]


def test_lockstep_orders_print_short():
    K = 3
    assert _names(S.lockstep(S.get("sequential"), K, 0, 1)) == ["0F0 1F0 0B0 2F0 1B0"]
    assert _names(S.lockstep(S.get("backprop"), K, 0, 1)) == ["0F0 1F0 2F0 1B0 0B0"]
    assert _names(S.lockstep(S.get("pipeline"), K, 0, 1, 2)) == [
        "0F0.0 1F0.0 2F0.0 0F0.1 1F0.1 2F0.1 1B0.0 0B0.0 1B0.1 0B0.1"]
    assert _names(S.lockstep(S.get("local"), K, 0, 2)) == ["0F0 1F0 2F0", "0F1 1F1 2F1"]
    # layer i applies the gradient of step t - D_i, D = (2, 1, 0); at the end, what is owed
    assert _names(S.lockstep(S.get("delayed_fixed"), K, 0, 4)) == [
        "0F0 1F0 2F0", "0F1 1F1 2F1 1B0", "0F2 1F2 2F2 1B1 0B0", "0F3 1F3 2F3 1B2 0B1",
        "0B2 1B3 0B3"]
    # a drain point in the middle (evaluation, checkpoint): everything owed is applied there
    assert _names(S.lockstep(S.get("delayed_fixed"), K, 0, 4, boundaries=(2,))) == [
        "0F0 1F0 2F0", "0F1 1F1 2F1 1B0", "0B0 1B1 0B1", "0F2 1F2 2F2", "0F3 1F3 2F3 1B2", "0B2 1B3 0B3"]


def test_failed_action_prints_the_grid_with_it_marked():
    cfg = small(**{"train.schedule": "backprop", "model.layers": 3})
    train, _ = load_datasets(cfg)
    plan = make_plan(cfg, train)
    rt = reference.Runtime([LayerNode(s) for s in plan.specs], S.get("backprop"))
    ticks = S.lockstep(S.get("backprop"), 3, 0, 2)
    ticks[1] = [ticks[1][-1]] + ticks[1][:-1]                 # step 1: layer 1's backward before any forward
    with pytest.raises(S.ScheduleError) as e:
        rt.run(ticks, batch_of=lambda t: (train.x[:8], train.y[:8]))
    msg = str(e.value)
    assert "action 0B1 failed" in msg and "no gradient for stage 0 step 1" in msg
    lines = msg.splitlines()
    assert lines[1].split() == ["tick", "layer", "1", "layer", "2", "layer", "3"]
    row = [ln for ln in lines if "<- failed here" in ln]
    assert len(row) == 1 and "[0B1]" in row[0] and row[0].split()[0] == "1"
    assert lines[2].split() == ["0", "0F0", "0B0", "1F0", "1B0", "2F0"]


def test_train_step_runs_each_lockstep_order():
    cfg = small(**{"model.layers": 3})
    train, _ = load_datasets(cfg)
    for name in ("sequential", "backprop", "local"):
        plan = make_plan(config.replace(cfg, **{"train.schedule": name}), train)
        nodes = [LayerNode(s) for s in plan.specs]
        m = reference.train_step(nodes, name, 0, train.x[:64], train.y[:64])
        assert np.isfinite(m["loss"]) and m["n"] == 64
        assert all(n.updates == 1 for n in nodes)


# -------------------------------------------------------------- delayed gradients
def _run_order(sched, plan, train, steps, boundaries=()):
    nodes = [LayerNode(s) for s in plan.specs]
    rt = reference.Runtime(nodes, sched)
    from asyncdni.numerics.data import BatchStream
    stream = BatchStream(train, plan.batch_size, 0)
    seg = 0
    for cut in sorted(set(boundaries) | {steps}):
        rt.run(S.lockstep(sched, len(nodes), seg, cut), batch_of=stream.batch, on_metrics=lambda s, m: None)
        seg = cut
    return nodes


@pytest.mark.parametrize("stash", [False, True])
def test_delayed_with_zero_lag_is_backprop_bit_for_bit(stash):
    """The delayed arithmetic with D_i = 0 is update-locked backprop: same numbers exactly."""
    cfg = small(**{"model.layers": 4, "train.stash_weights": stash})
    train, _ = load_datasets(cfg)
    zero = dataclasses.replace(S.get("delayed_fixed"), name="delayed_fixed", lag_per_layer=0)
    bp = _run_order(S.get("backprop"), make_plan(config.replace(cfg, **{"train.schedule": "backprop"}), train),
                    train, 25)
    dl = _run_order(zero, make_plan(config.replace(cfg, **{"train.schedule": "delayed_fixed"}), train), train, 25)
    for a, b in zip(bp, dl):
        assert np.array_equal(a.dense.W, b.dense.W) and np.array_equal(a.dense.b, b.dense.b)
        assert b.delay_max == 0 and not b.cache


def test_fixed_lags_are_observed_per_layer():
    cfg = small(**{"model.layers": 4, "train.schedule": "delayed_fixed", "train.stash_weights": True})
    train, _ = load_datasets(cfg)
    plan = make_plan(cfg, train)
    res = reference.train_reference(plan, "delayed_fixed", train, 0, steps=30)
    for i, n in enumerate(res.nodes):
        D = 3 - i
        assert n.delay_max == D and n.delay_n == 30
        # the gradient of step s comes min(s, D) updates late
        assert n.delay_sum == sum(min(s, D) for s in range(30))
        assert n.stash_bytes == 0 and not n.cache
        if i < 3:
            assert n.stash_peak == (D + 1) * n.dense.W.nbytes   # D + 1 forward passes in flight at most


def test_weight_stashing_takes_the_input_gradient_with_the_forward_weights():
    rng = np.random.default_rng(0)
    for stash in (False, True):
        node = LayerNode(spec(stash=stash), dtype=np.float64)
        W0 = node.dense.W.copy()
        x0, x1 = rng.standard_normal((2, 5, 6))
        g0, g1 = rng.standard_normal((2, 5, 10))
        node.delayed_forward(0, x0, None)
        h1, _, _ = node.delayed_forward(1, x1, None)
        node.delayed_backward(0, g0)                  # the weights move
        W_now = node.dense.W.copy()
        gx = node.delayed_backward(1, g1)
        gz = g1 * (1 - h1 * h1)
        assert np.allclose(gx, gz @ (W0 if stash else W_now).T)
        assert node.stash_bytes == 0 and node.stash_peak == (2 * W0.nbytes if stash else 0)
        assert (node.delay_max, node.delay_n) == (1, 2)


def test_lr_scale_remedy_divides_the_step_by_one_plus_delay():
    rng = np.random.default_rng(1)
    lr = 0.1
    for remedy, want_scale in (("none", 1.0), ("lr_scale", 0.5)):
        node = LayerNode(spec(delay_remedy=remedy, lr=lr), dtype=np.float64)
        x0, x1 = rng.standard_normal((2, 5, 6))
        g0, g1 = rng.standard_normal((2, 5, 10))
        node.delayed_forward(0, x0, None)
        h1, _, _ = node.delayed_forward(1, x1, None)
        node.delayed_backward(0, g0)                  # delay 0: a plain step
        before = node.dense.W.copy()
        node.delayed_backward(1, g1)                  # delay 1
        gW = x1.T @ (g1 * (1 - h1 * h1))
        assert np.allclose(before - node.dense.W, want_scale * lr * gW)


def test_delayed_step_not_in_flight_is_a_step_error():
    node = LayerNode(spec())
    with pytest.raises(StepError, match="not in flight"):
        node.delayed_backward(3, np.zeros((2, 10), np.float32))


# ------------------------------------------------------------------ local losses
def _fd(f, x, eps=1e-6):
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


@pytest.mark.parametrize("pool,loss,dim", [(1, "softmax_ce", 7), (3, "softmax_ce", 10), (4, "sigmoid_bce", 8)])
def test_aux_head_gradients_match_finite_differences(pool, loss, dim):
    rng = np.random.default_rng(2)
    head = AuxHead(dim, pool, 4, rng, np.float64)
    head.a[...] = rng.standard_normal(4) * 0.1
    h = rng.standard_normal((5, dim))
    y = rng.integers(0, 4, 5) if loss == "softmax_ce" else (rng.random((5, 4)) > 0.5).astype(np.float64)

    def f():
        return losses.compute(loss, head.logits(h), y)[0]

    _, _, (gA, ga), gh = head.loss_and_grads(h, y, loss)
    assert head.A.shape == (-(-dim // pool), 4)
    assert np.allclose(gA, _fd(f, head.A), atol=1e-7)
    assert np.allclose(ga, _fd(f, head.a), atol=1e-7)
    assert np.allclose(gh, _fd(f, h), atol=1e-7)


def test_local_update_is_the_aux_loss_gradient_and_nothing_goes_back():
    """SGD with lr 1: the weight change equals dL_aux/dW by finite differences (head fixed)."""
    rng = np.random.default_rng(3)
    node = LayerNode(spec(schedule="local", lr=1.0, aux_features=4), dtype=np.float64)  # 10 features -> pool 3
    assert node.aux.pool == 3 and node.aux.A.shape == (4, 4)
    x = rng.standard_normal((6, 6))
    y = rng.integers(0, 4, 6)
    W0, b0 = node.dense.W.copy(), node.dense.b.copy()
    A0, a0 = node.aux.A.copy(), node.aux.a.copy()
    W, b = W0.copy(), b0.copy()
    ref_head = AuxHead(10, 3, 4, rng, np.float64)
    ref_head.A[...], ref_head.a[...] = A0, a0

    def f():
        return losses.compute("softmax_ce", ref_head.logits(np.tanh(x @ W + b)), y)[0]

    h, gx, metrics = node.forward(0, x, y)
    assert gx is None and metrics is None and h.shape == (6, 10)
    assert np.allclose(W0 - node.dense.W, _fd(f, W), atol=1e-7)
    assert np.allclose(b0 - node.dense.b, _fd(f, b), atol=1e-7)
    assert not np.allclose(A0, node.aux.A)                       # the head trained too
    with pytest.raises(StepError, match="sends none back"):
        node.backward(0, np.zeros((6, 10)))
    assert len(node.aux_recent) == 1


def test_flops_follow_the_gradient_kind():
    s = spec(index=1, fan_in=100, fan_out=100, schedule="local", aux_features=256, n_out=10)
    node = LayerNode(s)
    mm = 2 * 8 * 100 * 100
    assert node.flops_per_batch(8, "backprop") == node.flops_per_batch(8, "delayed") == 3 * mm
    assert node.flops_per_batch(8) == 2 * mm + 3 * 2 * 8 * 100 * 10       # no input gradient; the head
    wide = LayerNode(spec(fan_in=100, fan_out=1000, schedule="local", aux_features=256, n_out=10))
    assert wide.aux.pool == 4 and wide.aux.A.shape == (250, 10)
    assert wide.flops_per_batch(8) == 2 * (2 * 8 * 100 * 1000) + 3 * 2 * 8 * 250 * 10


def test_local_node_state_round_trips_the_aux_head():
    rng = np.random.default_rng(4)
    a = LayerNode(spec(schedule="local", optimizer="adam"))
    for step in range(3):
        a.forward(step, rng.standard_normal((5, 6)).astype(np.float32), rng.integers(0, 4, 5))
    state = CK.node_state(a)
    assert {"aux.0", "aux.1", "auxopt.t"} <= set(state)
    b = LayerNode(spec(schedule="local", optimizer="adam"))
    CK.restore_node(b, state)
    for k, v in a.params().items():
        assert np.array_equal(v, b.params()[k]), k
    assert b.aux_opt.t == 3
    with pytest.raises(CK.CheckpointError, match="unexpected entries aux.0"):
        CK.restore_node(LayerNode(spec(schedule="async", optimizer="adam")), state)


def test_config_options_of_the_new_schedules():
    with pytest.raises(config.ConfigError, match="train.delay_remedy"):
        small(**{"train.delay_remedy": "pray"})
    with pytest.raises(config.ConfigError, match="train.aux_features"):
        small(**{"train.aux_features": 0})
    cfg = small(**{"train.schedule": "local", "model.layers": 3})
    plan = make_plan(cfg, load_datasets(cfg)[0])
    assert [s.has_aux for s in plan.specs] == [True, True, False]
    assert all(s.param_count() == sum(p.size for p in LayerNode(s).params().values()) for s in plan.specs)


# ------------------------------------------------------------- through the workers
def _assert_equal_to_reference(result, ref):
    for i, node in enumerate(ref.nodes):
        for name, want in node.params().items():
            got = result.params[i][name]
            assert got.shape == want.shape
            assert np.allclose(got, want, rtol=1e-5, atol=1e-6), (i, name)
    assert np.allclose(ref.losses, result.series["loss"], rtol=1e-5)


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.parametrize("schedule,extra", [
    ("delayed_fixed", {"train.stash_weights": True, "train.eval_every": 15}),
    ("delayed_fixed", {"train.delay_remedy": "lr_scale"}),
    ("local", {"train.max_inflight": 3, "train.aux_features": 8}),
])
def test_multiprocess_matches_reference(schedule, extra):
    """delayed with fixed lags (executed by the workers' lag rule, and by the reference from
    the action list) and local (free-running: no gradient travels back, so the arrival
    order cannot matter) end with the reference's weights."""
    cfg = small(**{"train.schedule": schedule, "train.seed": 3, **extra})
    result = coordinator.run(cfg)
    train, test = load_datasets(cfg)
    ref = reference.train_reference(make_plan(cfg, train), schedule, train, 3, test=test,
                                    eval_every=cfg.train.eval_every)
    _assert_equal_to_reference(result, ref)
    for i, (L, n) in enumerate(zip(result.layers, ref.nodes)):
        assert L["cached_steps"] == 0 and L["rejected"] == {}
        assert L["updates"] == 40
        if schedule == "delayed_fixed":
            assert L["delay_max"] == n.delay_max == 3 - i
            assert L["delay_mean"] == pytest.approx(n.delay_sum / n.delay_n)
        else:
            assert (L["aux_train_metric"] is None) == (i == 3)
    if schedule == "local":
        aux = reference.aux_evaluate(result.plan, result.params, test)
        assert aux[:3] == pytest.approx(reference.aux_metrics(ref.nodes, test)[:3]) and aux[3] is None
        assert all(0 <= a <= 1 for a in aux[:3])


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_leftover_processes")
def test_delayed_free_running_trains_within_its_window():
    cfg = small(**{"train.schedule": "delayed", "train.steps": 600, "model.width": 128, "train.max_inflight": 3,
                   "train.stash_weights": True})
    r = coordinator.run(cfg)
    loss = r.series["loss"]
    assert np.isfinite(loss).all() and loss[-30:].mean() < loss[:30].mean() - 0.5
    for i, L in enumerate(r.layers):
        assert L["steps"] == 600 and L["updates"] == 600 and L["cached_steps"] == 0
        # a step is complete only once layer 1 applied its gradient: at most window - 1 late
        assert L["delay_max"] <= cfg.train.max_inflight - 1
        assert 0 <= L["delay_mean"] <= L["delay_max"]
        if i < 3:
            assert 0 < L["stash_peak_bytes"] <= cfg.train.max_inflight * L["fan_in"] * L["fan_out"] * 4
    assert r.layers[3]["delay_max"] == 0


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.parametrize("schedule", ["delayed_fixed", "local"])
def test_checkpoint_resume_and_restart_are_exact(tmp_path, schedule):
    """A checkpointed run, resumed, and a run whose layer is SIGKILLed and restarted from
    its last checkpoint both end with the reference's weights (drain points included)."""
    base = {"train.schedule": schedule, "train.steps": 120, "train.seed": 1}
    train, _ = load_datasets(small())
    ref = reference.train_reference(make_plan(small(**base), train), schedule, train, 1,
                                    boundaries=(30, 60, 90))
    first = coordinator.run(small(**{**base, "train.steps": 60, "runtime.checkpoint_every": 30,
                                     "runtime.checkpoint_dir": str(tmp_path / "a")}))
    assert first.checkpoints == [30, 60]
    rest = coordinator.run(small(**{**base, "runtime.checkpoint_every": 30,
                                    "runtime.resume": str(tmp_path / "a")}))
    assert rest.resumed_from == 60
    _assert_equal_to_reference(rest, ref)

    cfg = small(**{**base, "runtime.checkpoint_every": 30, "runtime.checkpoint_dir": str(tmp_path / "b"),
                   "runtime.max_restarts": 1})
    box = {}

    def started(c):
        if "k" not in box:
            box["k"] = kill_when(c, 70, signal.SIGKILL, index=1)

    res = coordinator.run(cfg, on_started=started)
    assert len(res.restarts) == 1 and res.restarts[0]["resumed_from_step"] in (60, 90)
    _assert_equal_to_reference(res, ref)


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_leftover_processes")
def test_delayed_free_running_checkpoints_and_resumes(tmp_path):
    """Free-running delayed gradients drain at a checkpoint like every schedule: every layer
    saves after exactly the same steps, with no gradient outstanding, and a resume goes on."""
    base = {"train.schedule": "delayed", "train.stash_weights": True}
    first = coordinator.run(small(**base, **{"train.steps": 60, "runtime.checkpoint_every": 30,
                                             "runtime.checkpoint_dir": str(tmp_path)}))
    assert first.checkpoints == [30, 60]
    state = CK.validate(CK.step_dir(tmp_path, 60), first.config.digest(), 4).read_layer(0)
    assert np.array_equal(state["W"], first.params[0]["W"])
    rest = coordinator.run(small(**base, **{"train.steps": 90, "runtime.resume": str(tmp_path)}))
    assert rest.resumed_from == 60
    assert all(L["updates"] == 90 and L["cached_steps"] == 0 for L in rest.layers)
    assert np.isfinite(rest.series["loss"]).all()
