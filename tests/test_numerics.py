"""Numerical correctness of the training arithmetic (numpy only, no processes, no sockets).

* central finite differences in float64 for every analytic gradient: dense layers, losses,
  synthetic-gradient models, and a whole 3-layer network trained through ``LayerNode``;
* DNI semantics of ``LayerNode`` (zero-initialised SG, SG regression target scale, last-layer
  true-gradient update, unknown steps);
* pipeline micro-batch accumulation == one full-batch backprop step;
* optimizers against hand-written references, checkpoint state round-trip;
* activation stability, initialisation statistics, metrics on hand-made cases.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from asyncdni.numerics import layer as layer_mod
from asyncdni.numerics import losses
from asyncdni.numerics.layer import LayerNode, LayerSpec, StepError, condition_vector
from asyncdni.engine.plan import microbatch_bounds
from asyncdni.numerics.nn import ACTIVATIONS, Dense, activate, activation_backward, init_weights
from asyncdni.numerics.optim import SGD, Adam, Momentum, make_optimizer
from asyncdni.numerics.synthetic import LinearSG, LowRankSG, MLPSG, make_sg_model
from asyncdni.numerics.synthetic import param_count as sg_param_count

F64 = np.float64
EPS = 1e-6      # finite-difference step
RTOL = 1e-6     # relative error tolerance of analytic vs numerical gradients


# --------------------------------------------------------------------------- helpers
def numgrad(f, p: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Central finite differences of the scalar f() wrt every entry of p (perturbed in place)."""
    g = np.zeros_like(p, dtype=F64)
    for idx in np.ndindex(p.shape):
        old = p[idx]
        p[idx] = old + eps
        fp = f()
        p[idx] = old - eps
        fm = f()
        p[idx] = old
        g[idx] = (fp - fm) / (2 * eps)
    return g


def rel_err(a: np.ndarray, n: np.ndarray) -> float:
    a = np.asarray(a, F64)
    n = np.asarray(n, F64)
    denom = np.linalg.norm(a) + np.linalg.norm(n)
    return float(np.linalg.norm(a - n) / max(denom, 1e-300))


def assert_grad(analytic, numeric, name: str, tol: float = RTOL):
    assert analytic.shape == numeric.shape, f"{name}: shape {analytic.shape} vs {numeric.shape}"
    # a check against an all-zero gradient would be vacuous
    assert np.linalg.norm(numeric) > 1e-6, f"{name}: numerical gradient is (near) zero; test is trivial"
    err = rel_err(analytic, numeric)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:g}"


def make_spec(index, n_layers, fan_in, fan_out, activation, *, loss="softmax_ce",
              task="classification", n_out=3, optimizer="sgd", lr=1.0, sg_model="linear",
              sg_hidden=0, sg_lr=0.1, cond=False, microbatches=1, seed=0, init="he") -> LayerSpec:
    return LayerSpec(index=index, n_layers=n_layers, fan_in=fan_in, fan_out=fan_out,
                     activation=activation, init=init, loss=loss, task=task, n_out=n_out,
                     optimizer=optimizer, lr=lr, sg_model=sg_model, sg_hidden=sg_hidden,
                     sg_lr=sg_lr, cond=cond, microbatches=microbatches, seed=seed)


def make_net(widths, acts, *, loss, task, n_out, optimizer="sgd", lr=1.0, microbatches=1,
             seed=0, sg_model="linear"):
    K = len(acts)
    return [LayerNode(make_spec(i, K, widths[i], widths[i + 1], acts[i], loss=loss, task=task,
                                n_out=n_out, optimizer=optimizer, lr=lr,
                                microbatches=microbatches, seed=seed, sg_model=sg_model),
                      dtype=F64)
            for i in range(K)]


def net_loss(nodes, x, y, loss):
    h = x
    for node in nodes:
        h = node.forward_only(h)
    return losses.compute(loss, h, y)[0]


def sigmoid_ref(z):
    return 1.0 / (1.0 + np.exp(-z))


# ------------------------------------------------------------ 1. finite differences
def _dense_case(activation: str):
    """A float64 Dense layer with random W, b, x; for relu all |pre-activations| >= 0.05."""
    for seed in range(200):
        rng = np.random.default_rng(seed)
        d = Dense.create(rng, 5, 4, activation, "he", F64)
        d.b[...] = rng.normal(0, 0.5, d.b.shape)
        x = rng.normal(0, 1, (6, 5))
        z = x @ d.W + d.b
        if activation != "relu" or (np.abs(z).min() > 0.05 and (z > 0).sum() >= 6):
            return rng, d, x
    raise AssertionError("no well-conditioned relu case found")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_backward_matches_finite_differences(activation):
    rng, d, x = _dense_case(activation)
    assert d.W.dtype == F64 and d.b.dtype == F64
    R = rng.normal(0, 1, (6, 4))                # L = sum(h * R)  =>  dL/dh = R

    def f():
        return float((d.forward(x) * R).sum())

    h = d.forward(x)
    gW, gb, gx = d.backward(x, h, R.copy(), need_input_grad=True)
    assert_grad(gW, numgrad(f, d.W), f"{activation} gW")
    assert_grad(gb, numgrad(f, d.b), f"{activation} gb")
    assert_grad(gx, numgrad(f, x), f"{activation} gx")
    # need_input_grad=False returns the same parameter gradients and no gx
    gW2, gb2, gx2 = d.backward(x, h, R.copy(), need_input_grad=False)
    assert gx2 is None
    np.testing.assert_array_equal(gW2, gW)
    np.testing.assert_array_equal(gb2, gb)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_backward_is_derivative_of_activate(activation):
    z = np.linspace(-3, 3, 25) + 0.0123          # no exact zero (relu kink)
    h = activate(activation, z)
    num = (activate(activation, z + EPS) - activate(activation, z - EPS)) / (2 * EPS)
    ana = activation_backward(activation, h, np.ones_like(z))
    np.testing.assert_allclose(ana, num, rtol=1e-6, atol=1e-9)


def test_softmax_ce_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (7, 5))
    labels = rng.integers(0, 5, 7)
    loss, g = losses.softmax_cross_entropy(logits, labels)
    # loss value against a direct formula
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(7), labels]).mean(), rel=1e-12)
    num = numgrad(lambda: losses.softmax_cross_entropy(logits, labels)[0], logits)
    assert_grad(g, num, "softmax_ce")
    assert g.dtype == F64
    # each row's gradient sums to zero (softmax minus one-hot), scaled by 1/B
    np.testing.assert_allclose(g.sum(axis=1), 0, atol=1e-15)


def test_softmax_ce_stable_for_large_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [-1000.0, 1000.0, 999.0]])
    labels = np.array([0, 2])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, g = losses.softmax_cross_entropy(logits, labels)
    # row 0: p(0)=1 -> 0; row 1: -log softmax at 999 vs 1000 = log(1+e)
    assert loss == pytest.approx((0.0 + np.log1p(np.e)) / 2, rel=1e-12)
    assert np.all(np.isfinite(g))


def test_sigmoid_bce_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (6, 4))
    logits[0] = [25.0, -25.0, 30.0, -30.0]      # large |logits| both sides of zero
    logits[1] = [0.0, 1e-3, -1e-3, 8.0]
    targets = rng.integers(0, 2, (6, 4))
    targets[0] = [1, 1, 0, 0]                    # confident-right and confident-wrong
    loss, g = losses.sigmoid_bce(logits, targets)
    p = sigmoid_ref(logits)
    ref = (np.logaddexp(0, logits) - targets * logits).sum() / 6     # -log sigmoid, stably
    assert loss == pytest.approx(ref, rel=1e-9)
    num = numgrad(lambda: losses.sigmoid_bce(logits, targets)[0], logits)
    assert_grad(g, num, "sigmoid_bce")
    np.testing.assert_allclose(g, (p - targets) / 6, rtol=1e-12, atol=1e-18)


def test_sigmoid_bce_stable_for_huge_logits():
    logits = np.array([[1000.0, -1000.0, 1000.0, -1000.0]])
    targets = np.array([[1, 0, 0, 1]])
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        loss, g = losses.sigmoid_bce(logits, targets)
    # the two wrong, confident outputs cost |logit| each; the right ones cost ~0
    assert loss == pytest.approx(2000.0, rel=1e-12)
    np.testing.assert_allclose(g, [[0.0, 0.0, 1.0, -1.0]], atol=1e-300)


def test_mse_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    pred = rng.normal(0, 1, (5, 3))
    target = rng.normal(0, 1, (5, 3))
    loss, g = losses.mse(pred, target)
    assert loss == pytest.approx(((pred - target) ** 2).sum() / 5, rel=1e-12)
    num = numgrad(lambda: losses.mse(pred, target)[0], pred)
    assert_grad(g, num, "mse")


@pytest.mark.parametrize("name", losses.LOSSES)
def test_losses_compute_dispatches(name):
    rng = np.random.default_rng(4)
    out = rng.normal(0, 1, (4, 3))
    y = rng.integers(0, 3, 4) if name == "softmax_ce" else rng.integers(0, 2, (4, 3))
    direct = {"softmax_ce": losses.softmax_cross_entropy, "sigmoid_bce": losses.sigmoid_bce,
              "mse": losses.mse}[name](out, y)
    loss, g = losses.compute(name, out, y)
    assert loss == direct[0]
    np.testing.assert_array_equal(g, direct[1])


def _randomise(params, rng, scale=0.5):
    for p in params:
        p[...] = rng.normal(0, scale, p.shape)


@pytest.mark.parametrize("cond_dim", [0, 3])
def test_linear_sg_grads_match_finite_differences(cond_dim):
    rng = np.random.default_rng(5)
    sg = LinearSG(4, cond_dim, rng, F64)
    assert len(sg.params) == (3 if cond_dim else 2)
    assert all(p.dtype == F64 for p in sg.params)
    h = rng.normal(0, 1, (6, 4))
    c = condition_vector("classification", cond_dim, rng.integers(0, cond_dim, 6), F64) if cond_dim else None
    target = rng.normal(0, 1, (6, 4))
    # zero-initialised: an untrained model predicts exactly zero
    np.testing.assert_array_equal(sg.predict(h, c), np.zeros((6, 4)))
    _randomise(sg.params, rng)
    pred = sg.predict(h, c)
    loss, grads = sg.loss_and_grads(h, c, target)
    assert loss == pytest.approx(((pred - target) ** 2).sum() / 6, rel=1e-12)
    assert len(grads) == len(sg.params)
    names = ["A", "a", "C"]
    for i, p in enumerate(sg.params):
        num = numgrad(lambda: sg.loss_and_grads(h, c, target)[0], p)
        assert_grad(grads[i], num, f"LinearSG {names[i]}")


@pytest.mark.parametrize("cond_dim", [0, 3])
@pytest.mark.parametrize("rank", [2, 6])
def test_lowrank_sg_grads_match_finite_differences(cond_dim, rank):
    rng = np.random.default_rng(7)
    d = 5
    sg = LowRankSG(d, cond_dim, rank, rng, F64)
    r = min(rank, d)                                           # a rank above d is capped at d
    assert [p.shape for p in sg.params] == [(r, d), (d, r), (d,)] + ([(cond_dim, d)] if cond_dim else [])
    assert all(p.dtype == F64 for p in sg.params)
    # V starts with orthonormal columns, U at zero: an untrained model predicts exactly zero
    np.testing.assert_allclose(sg.V.T @ sg.V, np.eye(r), atol=1e-12)
    h = rng.normal(0, 1, (6, d))
    c = condition_vector("classification", cond_dim, rng.integers(0, cond_dim, 6), F64) if cond_dim else None
    target = rng.normal(0, 1, (6, d))
    np.testing.assert_array_equal(sg.predict(h, c), np.zeros((6, d)))
    # ... and from zero, U (not V) gets a gradient: the model learns from the first step
    _, g0 = sg.loss_and_grads(h, c, target)
    assert np.abs(g0[0]).max() > 1e-3 and not g0[1].any()
    _randomise(sg.params, rng)
    pred = sg.predict(h, c)
    np.testing.assert_allclose(pred, h @ sg.V @ sg.U + sg.a + (c @ sg.C if cond_dim else 0), rtol=1e-12)
    loss, grads = sg.loss_and_grads(h, c, target)
    assert loss == pytest.approx(((pred - target) ** 2).sum() / 6, rel=1e-12)
    assert len(grads) == len(sg.params)
    for name, p, g in zip(["U", "V", "a", "C"], sg.params, grads):
        num = numgrad(lambda: sg.loss_and_grads(h, c, target)[0], p)
        assert_grad(g, num, f"LowRankSG {name} (rank {rank}, cond {cond_dim})")


def test_lowrank_sg_flops_and_params():
    rng = np.random.default_rng(0)
    d, k, r, B = 32, 3, 4, 8
    sg = LowRankSG(d, k, r, rng)
    assert sg_param_count("lowrank", d, k, 0, rank=r) == sum(p.size for p in sg.params) == 2 * r * d + (1 + k) * d
    p, u = sg.flops(B)
    assert p == 2 * B * (2 * d * r + k * d)                  # hV, zU, cC
    assert u == 2 * B * (3 * r * d + k * d)                  # dU, dz, dV, dC
    lin_p, _ = LinearSG(d, k, rng).flops(B)
    assert p < lin_p / 3                                     # r << d: a fraction of the linear model


def _mlp_preacts(sg, h, c):
    z = [h @ sg.W[0] + sg.b[0] + (c @ sg.C1 if sg.C1 is not None else 0)]
    for W, b in zip(sg.W[1:], sg.b[1:]):
        z.append(np.maximum(z[-1], 0) @ W + b)
    return z


def _mlp_case(cond_dim, layers=1):
    """MLPSG with random params whose hidden pre-activations are all >= 0.05 away from 0."""
    for seed in range(500):
        rng = np.random.default_rng(seed)
        sg = MLPSG(4, cond_dim, 5, rng, F64, layers=layers)
        h = rng.normal(0, 1, (6, 4))
        c = (condition_vector("bits", cond_dim, rng.integers(0, 2, (6, cond_dim)), F64)
             if cond_dim else None)
        # zero-initialised skip and output layer: an untrained model predicts exactly zero
        np.testing.assert_array_equal(sg.predict(h, c), np.zeros((6, 4)))
        assert all(np.any(W != 0) for W in sg.W)
        _randomise(sg.params, rng)
        zs = _mlp_preacts(sg, h, c)
        if all(np.abs(z).min() > 0.05 and (z > 0).mean() > 0.3 for z in zs):
            return rng, sg, h, c
    raise AssertionError("no well-conditioned MLPSG case found")


@pytest.mark.parametrize("cond_dim,layers", [(0, 1), (3, 1), (3, 2), (0, 3)])
def test_mlp_sg_grads_match_finite_differences(cond_dim, layers):
    rng, sg, h, c = _mlp_case(cond_dim, layers)
    k = 1 if cond_dim else 0
    assert len(sg.params) == (2 + k) + (2 + k) + 2 * (layers - 1) + 1
    target = rng.normal(0, 1, (6, 4))
    pred = sg.predict(h, c)
    # prediction = linear skip + MLP
    linear = h @ sg.A + sg.a + (c @ sg.C if cond_dim else 0)
    np.testing.assert_allclose(pred, linear + np.maximum(_mlp_preacts(sg, h, c)[-1], 0) @ sg.Wo, rtol=1e-12)
    loss, grads = sg.loss_and_grads(h, c, target)
    assert loss == pytest.approx(((pred - target) ** 2).sum() / 6, rel=1e-12)
    assert len(grads) == len(sg.params)
    for i, p in enumerate(sg.params):
        assert grads[i].shape == p.shape
        num = numgrad(lambda: sg.loss_and_grads(h, c, target)[0], p)
        assert_grad(grads[i], num, f"MLPSG param {i} (layers={layers}, cond={cond_dim})")


def test_mlp_sg_label_path_has_its_own_fan_in():
    """The label weights are He over the label's own fan-in (k), not a slice of one draw over
    d + k inputs (std sqrt(2/(d+k)), 5x smaller here), so the label reaches the hidden layer
    at a scale comparable to the activation's."""
    rng = np.random.default_rng(0)
    d, k, hid = 256, 10, 512
    sg = MLPSG(d, k, hid, rng)
    assert sg.C1.std() == pytest.approx(np.sqrt(2.0 / k), rel=0.05)
    assert sg.W[0].std() == pytest.approx(np.sqrt(2.0 / d), rel=0.05)
    h = np.abs(rng.normal(0, 1, (64, d))).astype(np.float32)
    c = condition_vector("classification", k, rng.integers(0, k, 64))
    ratio = (c @ sg.C1).std() / (h @ sg.W[0]).std()
    assert 0.25 < ratio < 1.0       # the old slice gave ~0.06


def test_mlp_sg_with_zero_mlp_output_is_the_linear_sg():
    """With the MLP's output at zero, the skip is exactly the linear SG: same prediction and
    the same gradients for the shared parameters."""
    rng = np.random.default_rng(4)
    d, k = 5, 3
    mlp = MLPSG(d, k, 6, rng, F64, layers=2)
    lin = LinearSG(d, k, rng, F64)
    for p_lin, p_mlp in zip(lin.params, mlp.params[:3]):
        p_lin[...] = rng.normal(0, 0.5, p_lin.shape)
        p_mlp[...] = p_lin
    h = rng.normal(0, 1, (7, d))
    c = condition_vector("bits", k, rng.integers(0, 2, (7, k)), F64)
    t = rng.normal(0, 1, (7, d))
    np.testing.assert_allclose(mlp.predict(h, c), lin.predict(h, c), rtol=1e-12)
    (l1, g1), (l2, g2) = lin.loss_and_grads(h, c, t), mlp.loss_and_grads(h, c, t)
    assert l1 == pytest.approx(l2, rel=1e-12)
    for a, b in zip(g1, g2[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_make_sg_model_and_unknown_kind():
    rng = np.random.default_rng(0)
    assert isinstance(make_sg_model("linear", 3, 0, 0, rng, F64), LinearSG)
    m = make_sg_model("mlp", 3, 2, 0, rng, F64)
    assert isinstance(m, MLPSG) and m.Wo.shape == (3, 3)     # hidden defaults to dim
    m = make_sg_model("mlp", 3, 2, 7, rng, F64, layers=2)
    assert [W.shape for W in m.W] == [(3, 7), (7, 7)] and m.Wo.shape == (7, 3)
    assert sum(p.size for p in m.params) == sg_param_count("mlp", 3, 2, 7, 2)
    with pytest.raises(ValueError):
        make_sg_model("conv", 3, 0, 0, rng)
    with pytest.raises(ValueError):
        make_sg_model("mlp", 3, 0, 0, rng, layers=0)


# --------------------------------------------------------- 2. whole-network check
NET_CASES = {
    "softmax_ce": dict(acts=("tanh", "sigmoid", "linear"), loss="softmax_ce",
                       task="classification", n_out=3),
    "sigmoid_bce": dict(acts=("sigmoid", "tanh", "linear"), loss="sigmoid_bce", task="bits", n_out=3),
    "mse": dict(acts=("linear", "tanh", "sigmoid"), loss="mse", task="bits", n_out=3),
}


@pytest.mark.parametrize("case", sorted(NET_CASES))
def test_three_layer_backprop_gradients_match_finite_differences(case):
    cfg = NET_CASES[case]
    widths = (6, 5, 4, 3)
    nodes = make_net(widths, cfg["acts"], loss=cfg["loss"], task=cfg["task"], n_out=cfg["n_out"],
                     optimizer="sgd", lr=1.0, seed=11)
    rng = np.random.default_rng(12)
    for node in nodes:
        assert node.dense.W.dtype == F64
        node.dense.b[...] = rng.normal(0, 0.3, node.dense.b.shape)
    B = 8
    x = rng.normal(0, 1, (B, 6))
    y = rng.integers(0, 3, B) if cfg["task"] == "classification" else rng.integers(0, 2, (B, 3))

    def f():
        return net_loss(nodes, x, y, cfg["loss"])

    L0 = f()
    numeric = [(numgrad(f, n.dense.W), numgrad(f, n.dense.b)) for n in nodes]
    before = [(n.dense.W.copy(), n.dense.b.copy()) for n in nodes]

    # capture what each layer hands its optimizer, and when
    captured = {}
    for i, node in enumerate(nodes):
        orig = node.opt.step

        def step(grads, i=i, orig=orig):
            captured[i] = [g.copy() for g in grads]
            return orig(grads)
        node.opt.step = step

    h = x
    for node in nodes[:-1]:
        h, gx, m = node.bp_forward(0, h, y)
        assert gx is None and m is None
    assert captured == {}                                  # nothing applied before the loss
    _, g, metrics = nodes[-1].bp_forward(0, h, y)
    assert metrics["loss"] == pytest.approx(L0, rel=1e-12)
    assert metrics["n"] == B
    for node in reversed(nodes[:-1]):
        g = node.bp_backward(0, g)
    assert g is None                                       # first layer: no input gradient
    assert sorted(captured) == [0, 1, 2]
    for i, node in enumerate(nodes):
        W0, b0 = before[i]
        gW, gb = W0 - node.dense.W, b0 - node.dense.b      # SGD, lr=1: update = -gradient
        np.testing.assert_allclose(gW, captured[i][0], rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(gb, captured[i][1], rtol=1e-9, atol=1e-14)
        assert_grad(captured[i][0], numeric[i][0], f"{case} layer {i + 1} W")
        assert_grad(captured[i][1], numeric[i][1], f"{case} layer {i + 1} b")
        assert node.updates == 1
        assert node.cache == {}
    with pytest.raises(StepError):
        nodes[0].bp_backward(0, np.zeros((B, 5)))              # step already consumed


# ------------------------------------------------------------- 3. DNI semantics
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("sg_model", ["linear", "mlp", "lowrank"])
def test_dni_forward_with_untrained_sg_leaves_weights_unchanged(optimizer, sg_model):
    node = LayerNode(make_spec(1, 3, 5, 4, "tanh", optimizer=optimizer, lr=0.5,
                               sg_model=sg_model, sg_hidden=6, seed=3), dtype=F64)
    node.dense.b[...] = 0.1
    W0, b0 = node.dense.W.copy(), node.dense.b.copy()
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (7, 5))
    y = rng.integers(0, 3, 7)
    h, gx, metrics = node.dni_forward(42, x, y)
    np.testing.assert_array_equal(node.dense.W, W0)
    np.testing.assert_array_equal(node.dense.b, b0)
    np.testing.assert_allclose(h, np.tanh(x @ W0 + b0), rtol=1e-14)
    assert metrics is None
    np.testing.assert_array_equal(gx, np.zeros((7, 5)))        # zero synthetic gradient passed down
    assert 42 in node.cache
    ctx, pred, back = node.cache[42]                           # what the SG regression step will need
    assert back is None                                        # bootstrapped targets: no backward pass kept
    np.testing.assert_array_equal(ctx[0], h)
    assert ctx[1] is None                                      # no conditioning
    np.testing.assert_array_equal(pred, np.zeros((7, 4)))      # the prediction the update was made with
    assert node.fwd_steps == 1


def test_dni_forward_caches_condition_vector():
    node = LayerNode(make_spec(0, 2, 5, 4, "relu", cond=True, n_out=3, seed=1), dtype=F64)
    x = np.random.default_rng(0).normal(0, 1, (4, 5))
    y = np.array([2, 0, 1, 2])
    h, gx, _ = node.dni_forward(7, x, y)
    assert gx is None                                          # first layer
    c = node.cache[7][0][1]
    np.testing.assert_array_equal(c, np.eye(3)[y])
    assert c.dtype == F64


def test_condition_vector():
    c = condition_vector("classification", 4, np.array([3, 0, 1]), F64)
    np.testing.assert_array_equal(c, [[0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]])
    bits = np.array([[1, 0, 1], [0, 0, 1]], dtype=np.uint8)
    cb = condition_vector("bits", 3, bits, np.float32)
    assert cb.dtype == np.float32
    np.testing.assert_array_equal(cb, bits)


@pytest.mark.parametrize("sg_model", ["linear", "mlp", "lowrank"])
def test_sg_update_moves_prediction_toward_target(sg_model):
    # lr=0 for the layer keeps W (and so h) fixed; the SG trains with its own sg_lr
    node = LayerNode(make_spec(1, 3, 5, 4, "tanh", optimizer="sgd", lr=0.0, sg_model=sg_model,
                               sg_hidden=8, sg_lr=0.05, seed=4), dtype=F64)
    rng = np.random.default_rng(1)
    B = 16
    x = rng.normal(0, 1, (B, 5))
    y = rng.integers(0, 3, B)
    h0 = node.dense.forward(x)
    # a target the SG can represent (affine in h), so the regression can get close to it
    target = h0 @ rng.normal(0, 1, (4, 4)) + rng.normal(0, 1, 4)
    g = target / B                            # the true dL/dh of a batch-mean loss
    W_fixed = node.dense.W.copy()
    sg_losses, dists = [], []
    for step in range(60):
        h, _, _ = node.dni_forward(step, x, y)
        dists.append(np.linalg.norm(node.sg.predict(h, None) - target))
        sg_losses.append(node.sg_update(step, g))
        assert step not in node.cache
    assert node.sg_updates == 60
    assert node.last_sg_loss == sg_losses[-1]
    # the first update sees the zero prediction: loss = mean over rows of |target|^2
    assert sg_losses[0] == pytest.approx((target ** 2).sum() / B, rel=1e-12)
    assert dists[1] < dists[0]
    assert all(b <= a + 1e-12 for a, b in zip(sg_losses, sg_losses[1:])), "SG loss not monotone"
    assert sg_losses[-1] < 0.05 * sg_losses[0]
    np.testing.assert_array_equal(node.dense.W, W_fixed)          # lr=0: h really was fixed


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_stale_sg_targets_are_weighted_by_decay_per_step_of_lag(decay):
    """sg_stale_decay: a target that arrives after the layer ran L more forward steps moves
    the SG by decay**L of a fresh one (plain SGD, so the step is linear in the weight);
    decay 0 drops stale targets and counts them. A fresh target (L = 0) is never touched."""
    import dataclasses
    base = make_spec(1, 3, 5, 4, "tanh", optimizer="sgd", lr=0.0, sg_lr=0.05, seed=4)
    rng = np.random.default_rng(2)
    B = 8
    x = rng.normal(0, 1, (B, 5))
    y = rng.integers(0, 3, B)
    g = rng.normal(0, 1, (B, 4)) / B
    moves = {}
    for d in (1.0, decay):
        node = LayerNode(dataclasses.replace(base, sg_stale_decay=d), dtype=F64)
        for step in range(3):                       # steps 0, 1, 2 forward; then step 0's target
            node.dni_forward(step, x, y)
        A0 = node.sg.A.copy()
        loss = node.sg_update(0, g)                 # lag 2
        moves[d] = node.sg.A - A0
        node.sg_update(2, g)                        # lag 0: always applied
        assert node.sg_updates == (2 if d else 1)
        assert node.stale_dropped == (1 if d == 0.0 else 0)
        if d == 0.0:
            assert np.isnan(loss) and not moves[d].any()
    assert np.abs(moves[1.0]).max() > 0
    np.testing.assert_allclose(moves[decay], decay ** 2 * moves[1.0], rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("sg_model", ["linear", "lowrank"])
@pytest.mark.parametrize("reuse", [False, True])
def test_sg_every_regresses_on_every_nth_step_only(sg_model, reuse):
    """--sg-every 3: steps 0, 3, 6, .. train the SG model exactly as with sg_every 1 fed only
    those steps' targets; the others keep no state, and the layer above neither computes
    nor sends their gradient (counted in sg_skipped, not in sg_updates). The layer's own
    update from the prediction happens on every step."""
    import dataclasses
    base = dataclasses.replace(make_spec(1, 3, 5, 4, "tanh", optimizer="adam", lr=1e-2, sg_model=sg_model,
                                         sg_lr=0.05, seed=4, cond=True), sg_reuse=reuse, sg_rank=2)
    rng = np.random.default_rng(3)
    batches = [(rng.normal(0, 1, (6, 5)), rng.integers(0, 3, 6), rng.normal(0, 1, (6, 4)) / 6) for _ in range(8)]
    every = LayerNode(dataclasses.replace(base, sg_every=3), dtype=F64)
    above = LayerNode(dataclasses.replace(base, index=2, n_layers=4, fan_in=4, fan_out=3, sg_every=3), dtype=F64)
    for step, (x, y, g) in enumerate(batches):
        h, _, _ = every.dni_forward(step, x, y)
        assert (step in every.cache) == (step % 3 == 0)
        if step % 3:
            with pytest.raises(StepError):
                every.sg_update(step, g)           # no gradient is owed for it
        else:
            assert np.isfinite(every.sg_update(step, g))
        assert step not in every.cache
        # the layer above computes (and sends) the input gradient of the regressed steps only
        _, gx, _ = above.dni_forward(step, h, y)
        assert (gx is None) == (step % 3 != 0)
    assert (every.sg_updates, every.sg_skipped, every.updates) == (3, 5, 8)
    # the same SG trajectory as a layer that only ever sees steps 0, 3, 6's targets; the
    # layer itself updated from the prediction on every step in both
    ref = LayerNode(base, dtype=F64)
    for step, (x, y, g) in enumerate(batches):
        ref.dni_forward(step, x, y)
        if step % 3 == 0:
            ref.sg_update(step, g)
        else:
            ref.drop_step(step)
    for a, b in zip(every.sg.params, ref.sg.params):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(every.dense.W, ref.dense.W)
    # the FLOP accounting: the regression (re-prediction unless reused, and the update) / 3
    parts1 = ref.flops_parts(6, "async")
    parts3 = every.flops_parts(6, "async")
    assert parts3["sg_predict"] == parts1["sg_predict"] > 0
    assert parts3["sg_update"] == pytest.approx(parts1["sg_update"] / 3)
    assert parts3["sg_repredict"] == pytest.approx(parts1["sg_repredict"] / 3)
    assert (parts1["sg_repredict"] == 0) == reuse


def test_sg_trained_on_per_example_gradient_scale():
    """The SG regresses onto B * dL/dh, and the layer divides its prediction by B again."""
    node = LayerNode(make_spec(1, 3, 5, 4, "tanh", optimizer="sgd", lr=0.0, sg_model="linear",
                               sg_lr=0.2, seed=5), dtype=F64)
    rng = np.random.default_rng(2)
    B = 32
    x = rng.normal(0, 1, (B, 5))
    y = rng.integers(0, 3, B)
    t = np.array([1.0, -2.0, 0.5, 3.0])        # constant per-example gradient
    g = np.tile(t / B, (B, 1))                   # dL/dh for a batch-mean loss
    for step in range(400):
        node.dni_forward(step, x, y)
        node.sg_update(step, g)
    h = node.dense.forward(x)
    pred = node.sg.predict(h, None)
    np.testing.assert_allclose(pred, np.tile(t, (B, 1)), atol=1e-8)   # t, not t / B
    # now let the layer learn: its update must be the one the true gradient g would give
    node.opt.lr = 1.0
    W0, b0 = node.dense.W.copy(), node.dense.b.copy()
    node.dni_forward(10_000, x, y)
    gW, gb, _ = Dense(W0.copy(), b0.copy(), "tanh").backward(x, h, g)
    np.testing.assert_allclose(W0 - node.dense.W, gW, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(b0 - node.dense.b, gb, rtol=1e-6, atol=1e-10)


def test_sg_update_unknown_step_raises():
    node = LayerNode(make_spec(0, 2, 3, 3, "tanh", seed=0), dtype=F64)
    with pytest.raises(StepError):
        node.sg_update(5, np.zeros((2, 3)))
    assert issubclass(layer_mod.StepError, RuntimeError)
    x = np.ones((2, 3))
    node.dni_forward(1, x, np.array([0, 1]))
    node.sg_update(1, np.zeros((2, 3)))
    with pytest.raises(StepError):
        node.sg_update(1, np.zeros((2, 3)))                   # already consumed
    node.dni_forward(2, x, np.array([0, 1]))
    node.drop_step(2)
    with pytest.raises(StepError):
        node.sg_update(2, np.zeros((2, 3)))
    with pytest.raises(StepError):
        node.bp_backward(99, np.zeros((2, 3)))


@pytest.mark.parametrize("loss,task,act", [("softmax_ce", "classification", "linear"),
                                           ("sigmoid_bce", "bits", "linear"),
                                           ("mse", "bits", "sigmoid")])
def test_last_layer_dni_forward_applies_true_gradient(loss, task, act):
    lr = 0.3
    node = LayerNode(make_spec(1, 2, 5, 3, act, loss=loss, task=task, n_out=3, optimizer="sgd",
                               lr=lr, seed=6), dtype=F64)
    assert node.sg is None
    rng = np.random.default_rng(3)
    node.dense.b[...] = rng.normal(0, 0.3, 3)
    B = 6
    x = rng.normal(0, 1, (B, 5))
    y = rng.integers(0, 3, B) if task == "classification" else rng.integers(0, 2, (B, 3))
    W0, b0 = node.dense.W.copy(), node.dense.b.copy()
    # manual forward, loss gradient and SGD step, written independently of the package
    z = x @ W0 + b0
    if loss == "softmax_ce":
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        gz = (p - np.eye(3)[y]) / B
        ref_loss = -np.log(p[np.arange(B), y]).mean()
    elif loss == "sigmoid_bce":
        p = sigmoid_ref(z)
        gz = (p - y) / B
        ref_loss = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum() / B
    else:
        s = sigmoid_ref(z)
        gz = 2 * (s - y) / B * s * (1 - s)
        ref_loss = ((s - y) ** 2).sum() / B
    h, gx, metrics = node.dni_forward(0, x, y)
    assert h is None
    np.testing.assert_allclose(node.dense.W, W0 - lr * (x.T @ gz), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(node.dense.b, b0 - lr * gz.sum(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(gx, gz @ W0.T, rtol=1e-12, atol=1e-15)   # with the pre-update W
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-10)
    assert metrics["n"] == B
    assert node.cache == {}
    assert node.updates == 1


# ------------------------------------------------- 4. pipeline micro-batch accumulation
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("M", [2, 3])
def test_pipeline_microbatches_equal_full_batch_step(optimizer, M):
    widths, acts = (6, 5, 4, 3), ("tanh", "sigmoid", "linear")
    kw = dict(loss="softmax_ce", task="classification", n_out=3, optimizer=optimizer, lr=0.05, seed=21)
    full = make_net(widths, acts, microbatches=1, **kw)
    pipe = make_net(widths, acts, microbatches=M, **kw)
    for a, b in zip(full, pipe):
        np.testing.assert_array_equal(a.dense.W, b.dense.W)
    init = [(n.dense.W.copy(), n.dense.b.copy()) for n in pipe]
    rng = np.random.default_rng(22)
    B = 10
    x = rng.normal(0, 1, (B, 6))
    y = rng.integers(0, 3, B)

    # one full-batch backprop step
    h = x
    for node in full[:-1]:
        h, _, _ = node.bp_forward(0, h, y)
    _, g, _ = full[-1].bp_forward(0, h, y)
    for node in reversed(full[:-1]):
        g = node.bp_backward(0, g)
    assert all(n.step_complete for n in full)

    def unchanged():
        return all(np.array_equal(n.dense.W, W) and np.array_equal(n.dense.b, b)
                   for n, (W, b) in zip(pipe, init))

    # pipeline order: all micro-batch forwards, then all backwards
    bounds = microbatch_bounds(B, M)
    assert len(bounds) == M and bounds[-1][1] == B
    grads = []
    for j, (a, b) in enumerate(bounds):
        h = x[a:b]
        for node in pipe[:-1]:
            h, _, _ = node.bp_forward(j, h, y[a:b], scale=(b - a) / B)
        _, g, _ = pipe[-1].bp_forward(j, h, y[a:b], scale=(b - a) / B)
        grads.append(g)
        assert pipe[-1].step_complete == (j == M - 1)
        assert pipe[-1].updates == (1 if j == M - 1 else 0)
        if j < M - 1:
            assert unchanged()
    for j, g in enumerate(grads):
        for node in reversed(pipe[:-1]):
            g = node.bp_backward(j, g)
        for node in pipe[:-1]:
            assert node.step_complete == (j == M - 1)
            assert node.updates == (1 if j == M - 1 else 0)
    assert all(n.step_complete for n in pipe)
    for i, (a, b) in enumerate(zip(full, pipe)):
        assert not np.array_equal(b.dense.W, init[i][0])      # something happened
        np.testing.assert_allclose(b.dense.W, a.dense.W, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(b.dense.b, a.dense.b, rtol=1e-12, atol=1e-14)
        assert b.updates == 1 and b.cache == {}


# --------------------------------------------------------------------- 5. optimizers
def _grads(rng, shapes, n):
    return [[rng.normal(0, 1, s) for s in shapes] for _ in range(n)]


SHAPES = [(3, 4), (4,)]


def test_sgd_exact_update():
    rng = np.random.default_rng(0)
    params = [rng.normal(0, 1, s) for s in SHAPES]
    ref = [p.copy() for p in params]
    opt = SGD(params, 0.1)
    for gs in _grads(rng, SHAPES, 3):
        opt.step(gs)
        ref = [p - 0.1 * g for p, g in zip(ref, gs)]
        for p, r in zip(params, ref):
            np.testing.assert_array_equal(p, r)
    assert opt.t == 3


def test_momentum_matches_reference():
    rng = np.random.default_rng(1)
    params = [rng.normal(0, 1, s) for s in SHAPES]
    ref = [p.copy() for p in params]
    vel = [np.zeros(s) for s in SHAPES]
    lr, beta = 0.05, 0.9
    opt = Momentum(params, lr)
    assert opt.beta == beta
    for gs in _grads(rng, SHAPES, 3):
        opt.step(gs)
        vel = [beta * v + g for v, g in zip(vel, gs)]
        ref = [p - lr * v for p, v in zip(ref, vel)]
        for p, r in zip(params, ref):
            np.testing.assert_allclose(p, r, rtol=1e-14, atol=1e-15)
    # after 2+ steps the update differs from plain SGD (velocity carries over)
    assert not np.allclose(vel[0], gs[0])


def _adam_efficient(ref, grads_seq, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = [np.zeros_like(p) for p in ref]
    v = [np.zeros_like(p) for p in ref]
    ref = [p.copy() for p in ref]
    out = []
    for t, gs in enumerate(grads_seq, start=1):
        a = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        for k, g in enumerate(gs):
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            ref[k] = ref[k] - a * m[k] / (np.sqrt(v[k]) + eps)
        out.append([p.copy() for p in ref])
    return out


def _adam_textbook(ref, grads_seq, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = [np.zeros_like(p) for p in ref]
    v = [np.zeros_like(p) for p in ref]
    ref = [p.copy() for p in ref]
    out = []
    for t, gs in enumerate(grads_seq, start=1):
        for k, g in enumerate(gs):
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            mhat = m[k] / (1 - b1 ** t)
            vhat = v[k] / (1 - b2 ** t)
            ref[k] = ref[k] - lr * mhat / (np.sqrt(vhat) + eps)
        out.append([p.copy() for p in ref])
    return out


def test_adam_matches_reference():
    rng = np.random.default_rng(2)
    params = [rng.normal(0, 1, s) for s in SHAPES]
    p0 = [p.copy() for p in params]
    # well-scaled gradients: |g| in [0.5, 2]
    grads_seq = [[rng.choice([-1, 1], s) * rng.uniform(0.5, 2, s) for s in SHAPES] for _ in range(5)]
    lr = 1e-3
    eff = _adam_efficient(p0, grads_seq, lr)
    txt = _adam_textbook(p0, grads_seq, lr)
    opt = Adam(params, lr)
    assert (opt.b1, opt.b2, opt.eps) == (0.9, 0.999, 1e-8)
    for t, gs in enumerate(grads_seq):
        opt.step(gs)
        for p, e, tb, q0 in zip(params, eff[t], txt[t], p0):
            np.testing.assert_allclose(p, e, rtol=1e-13, atol=1e-15)
            np.testing.assert_allclose(p, tb, rtol=0, atol=1e-6)
            # first step of Adam moves every coordinate by ~lr (sign of the gradient)
            if t == 0:
                np.testing.assert_allclose(np.abs(q0 - p), lr, rtol=1e-4)
    assert opt.t == 5


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_optimizer_state_round_trip(name):
    rng = np.random.default_rng(3)
    params = [rng.normal(0, 1, s) for s in SHAPES]
    opt = make_optimizer(name, params, 0.01)
    assert opt.name == name
    for gs in _grads(rng, SHAPES, 3):
        opt.step(gs)
    snap = {k: np.array(v, copy=True) for k, v in opt.state().items()}   # as a checkpoint would
    assert int(snap["t"]) == 3
    params2 = [p.copy() for p in params]
    opt2 = make_optimizer(name, params2, 0.01)
    opt2.load_state(snap)
    assert opt2.t == 3
    later = _grads(rng, SHAPES, 3)
    for gs in later:
        opt.step([g.copy() for g in gs])
        opt2.step([g.copy() for g in gs])
        for p, q in zip(params, params2):
            np.testing.assert_array_equal(p, q)
    if name != "sgd":
        # a fresh optimizer without the restored state diverges: the state matters
        params3 = [q.copy() for q in params2]
        fresh = make_optimizer(name, params3, 0.01)
        fresh.step(later[0])
        opt2.step(later[0])
        assert not np.allclose(params3[0], params2[0], rtol=0, atol=1e-12)


def test_make_optimizer_unknown_raises():
    with pytest.raises(ValueError):
        make_optimizer("rmsprop", [np.zeros(2)], 0.1)


# ------------------------------------------------------ 6. activations and inits
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_no_overflow_for_huge_inputs(dtype):
    z = np.array([-1000.0, -50.0, -1.0, 0.0, 1.0, 50.0, 1000.0], dtype=dtype)
    # underflow of exp(-1000) to 0 is harmless; overflow / invalid / divide are not
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        s = activate("sigmoid", z)
    assert s.dtype == dtype
    assert np.all(np.isfinite(s)) and np.all((s >= 0) & (s <= 1))
    assert s[0] == 0.0 and s[-1] == 1.0 and s[3] == 0.5
    np.testing.assert_allclose(s[1:-1], sigmoid_ref(z[1:-1].astype(F64)), rtol=1e-6)
    # symmetric: sigmoid(-z) = 1 - sigmoid(z)
    np.testing.assert_allclose(s[::-1], 1 - s, atol=1e-7)


def test_other_activations_values():
    z = np.array([-2.0, -0.5, 0.0, 0.5, 2.0])
    np.testing.assert_array_equal(activate("relu", z), [0, 0, 0, 0.5, 2.0])
    np.testing.assert_allclose(activate("tanh", z), np.tanh(z))
    np.testing.assert_array_equal(activate("linear", z), z)


def test_unknown_names_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        activate("softplus", np.zeros(2))
    with pytest.raises(ValueError):
        activation_backward("softplus", np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError):
        Dense(np.zeros((2, 2)), np.zeros(2), "softplus")
    with pytest.raises(ValueError):
        Dense.create(rng, 2, 2, "softplus")
    with pytest.raises(ValueError):
        init_weights(rng, 2, 2, "lecun")
    with pytest.raises(ValueError):
        losses.compute("hinge", np.zeros((2, 2)), np.zeros(2, int))


def test_init_statistics():
    rng = np.random.default_rng(7)
    fan_in, fan_out = 200, 300
    he = init_weights(rng, fan_in, fan_out, "he", np.float32)
    assert he.shape == (fan_in, fan_out) and he.dtype == np.float32 and he.flags.c_contiguous
    std = np.sqrt(2.0 / fan_in)
    assert abs(he.std() / std - 1) < 0.03
    assert abs(he.mean()) < 0.03 * std
    # normal, not uniform: mass beyond 2 std ~ 4.6 %
    assert 0.03 < np.mean(np.abs(he) > 2 * std) < 0.06

    xa = init_weights(rng, fan_in, fan_out, "xavier", F64)
    assert xa.dtype == F64
    lim = np.sqrt(6.0 / (fan_in + fan_out))
    assert np.abs(xa).max() <= lim
    assert np.abs(xa).max() > 0.99 * lim                       # fills the range
    assert abs(xa.std() / (lim / np.sqrt(3)) - 1) < 0.03
    assert abs(xa.mean()) < 0.03 * lim

    d = Dense.create(rng, 4, 3, "tanh", "xavier", F64)
    assert d.W.dtype == F64 and d.b.dtype == F64
    np.testing.assert_array_equal(d.b, np.zeros(3))
    assert [p is q for p, q in zip(d.params, (d.W, d.b))] == [True, True]
    # LayerNode init is deterministic in (seed, index)
    s = make_spec(1, 3, 4, 3, "tanh", seed=9)
    np.testing.assert_array_equal(LayerNode(s, F64).dense.W, LayerNode(s, F64).dense.W)
    s2 = make_spec(2, 3, 4, 3, "tanh", seed=9)
    assert not np.array_equal(LayerNode(s, F64).dense.W, LayerNode(s2, F64).dense.W)


# --------------------------------------------------------------------- 7. metrics
def test_metrics_classification():
    out = np.array([[1.0, 2.0, 0.0],
                    [3.0, 0.0, 0.0],
                    [0.0, 0.0, 5.0],
                    [1.0, 0.0, 0.0]])
    labels = np.array([1, 0, 1, 2])                  # right, right, wrong, wrong
    assert losses.metrics("softmax_ce", out, labels) == (0.5, 0.5, 4)


def test_metrics_bits_sigmoid_bce():
    logits = np.array([[1.0, -1.0, 2.0],
                       [-1.0, -2.0, 3.0],            # first bit wrong
                       [0.5, 0.5, -0.5],
                       [0.0, -0.1, 0.1]])            # logit 0 predicts bit 0
    targets = np.array([[1, 0, 1],
                        [1, 0, 1],
                        [1, 1, 0],
                        [0, 0, 1]])
    bit_acc, row_acc, n = losses.metrics("sigmoid_bce", logits, targets)
    assert n == 4
    assert bit_acc == pytest.approx(11 / 12)
    assert row_acc == pytest.approx(3 / 4)
    # the threshold is on logits (0), not on probabilities (0.5)
    assert losses.metrics("sigmoid_bce", np.array([[0.3]]), np.array([[1]]))[:2] == (1.0, 1.0)


def test_metrics_bits_mse():
    probs = np.array([[0.9, 0.2], [0.3, 0.6], [0.51, 0.49]])
    targets = np.array([[1, 0], [1, 1], [1, 0]])
    bit_acc, row_acc, n = losses.metrics("mse", probs, targets)
    assert (bit_acc, row_acc, n) == (pytest.approx(5 / 6), pytest.approx(2 / 3), 3)


@pytest.mark.parametrize("sg,hidden,cond,last", [("linear", 0, True, False), ("linear", 0, False, False),
                                                 ("mlp", 0, True, False), ("mlp", 7, False, False),
                                                 ("lowrank", 0, True, False), ("lowrank", 0, False, False),
                                                 ("linear", 0, True, True)])
def test_param_count_matches_the_arrays(sg, hidden, cond, last):
    spec = LayerSpec(index=2 if last else 1, n_layers=3, fan_in=6, fan_out=5, activation="relu", init="he",
                     loss="softmax_ce", task="classification", n_out=3, optimizer="adam", lr=1e-3,
                     sg_model=sg, sg_hidden=hidden, sg_lr=1e-3, cond=cond, microbatches=1, seed=0)
    node = LayerNode(spec)
    assert spec.param_count() == sum(p.size for p in node.params().values())


# ------------------------------------------------------------ batch normalisation
def _bn_dense_case(activation: str, B: int = 7):
    """A float64 batch-normalised Dense layer with random W, gamma, beta and x; for relu every
    normalised pre-activation is at least 0.05 away from the kink."""
    for seed in range(200):
        rng = np.random.default_rng(100 + seed)
        d = Dense.create(rng, 5, 4, activation, "he", F64, batch_norm=True)
        d.bn.gamma[...] = rng.uniform(0.5, 1.5, 4)
        d.bn.beta[...] = rng.normal(0, 0.5, 4)
        x = rng.normal(0, 1, (B, 5))
        y, _ = d.bn.forward_train(x @ d.W, update=False)
        if activation != "relu" or (np.abs(y).min() > 0.05 and (y > 0).sum() >= B):
            return rng, d, x
    raise AssertionError("no well-conditioned relu case found")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_batchnorm_dense_grads_match_finite_differences(activation):
    rng, d, x = _bn_dense_case(activation)
    assert d.b is None and [p is q for p, q in zip(d.params, (d.W, d.bn.gamma, d.bn.beta))] == [True] * 3
    R = rng.normal(0, 1, (x.shape[0], 4))          # L = sum(h * R)  =>  dL/dh = R

    def f():            # training mode: the batch's own statistics (the running ones do not enter)
        return float((d.forward_train(x)[0] * R).sum())

    h, ctx = d.forward_train(x)
    (gW, ggamma, gbeta), gx = d.grads(x, h, R.copy(), ctx, need_input_grad=True)
    assert_grad(gW, numgrad(f, d.W), f"bn {activation} gW")
    assert_grad(ggamma, numgrad(f, d.bn.gamma), f"bn {activation} ggamma")
    assert_grad(gbeta, numgrad(f, d.bn.beta), f"bn {activation} gbeta")
    assert_grad(gx, numgrad(f, x), f"bn {activation} gx")
    grads2, gx2 = d.grads(x, h, R.copy(), ctx, need_input_grad=False)
    assert gx2 is None
    for a, b in zip(grads2, (gW, ggamma, gbeta)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="grads"):
        d.backward(x, h, R)


def test_batchnorm_running_statistics_and_evaluation():
    rng = np.random.default_rng(7)
    d = Dense.create(rng, 5, 4, "linear", "he", F64, batch_norm=True)
    d.bn.gamma[...] = [0.5, 1.0, 2.0, 1.5]
    d.bn.beta[...] = [0.1, -0.2, 0.3, 0.0]
    x1, x2 = rng.normal(1, 2, (2, 8, 5))
    mean, var = np.zeros(4), np.ones(4)
    for x in (x1, x2):
        h, _ = d.forward_train(x)
        z = x @ d.W
        # training output: the batch's own statistics (biased variance)
        np.testing.assert_allclose(h, (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5) * d.bn.gamma + d.bn.beta,
                                   rtol=1e-12, atol=1e-12)
        mean = 0.9 * mean + 0.1 * z.mean(0)
        var = 0.9 * var + 0.1 * z.var(0, ddof=1)       # running variance: unbiased
    np.testing.assert_allclose(d.bn.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(d.bn.var, var, rtol=1e-12)
    # evaluation: the running statistics, so each example's output is independent of its batch
    xe = rng.normal(0, 1, (6, 5))
    want = (xe @ d.W - mean) / np.sqrt(var + 1e-5) * d.bn.gamma + d.bn.beta
    np.testing.assert_allclose(d.forward(xe), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d.forward(xe[:1]), want[:1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d.bn.mean, mean, rtol=1e-12)          # evaluation changes nothing
    # a batch of one has no variance: the running variance keeps its value
    d.forward_train(xe[:1])
    np.testing.assert_allclose(d.bn.var, var, rtol=1e-12)


def test_batchnorm_keeps_float32():
    rng = np.random.default_rng(8)
    d = Dense.create(rng, 5, 4, "relu", "he", np.float32, batch_norm=True)
    x = rng.normal(0, 1, (6, 5)).astype(np.float32)
    h, ctx = d.forward_train(x)
    grads, gx = d.grads(x, h, np.ones_like(h), ctx)
    assert {a.dtype for a in [h, gx, d.forward(x), d.bn.mean, d.bn.var, *grads]} == {np.dtype(np.float32)}


def _bn_net(acts, seed, B, optimizer="sgd", lr=1.0, microbatches=1):
    K = len(acts)
    widths = (6, 5, 4, 3)
    nodes = [LayerNode(dataclasses.replace(
        make_spec(i, K, widths[i], widths[i + 1], acts[i], loss="softmax_ce", task="classification", n_out=3,
                  optimizer=optimizer, lr=lr, seed=seed, microbatches=microbatches), batch_norm=True), dtype=F64)
        for i in range(K)]
    rng = np.random.default_rng(seed + 1)
    for node in nodes[:-1]:
        node.dense.bn.gamma[...] = rng.uniform(0.5, 1.5, node.dense.bn.gamma.shape)
        node.dense.bn.beta[...] = rng.normal(0, 0.3, node.dense.bn.beta.shape)
    nodes[-1].dense.b[...] = rng.normal(0, 0.3, 3)
    return nodes, rng


def test_batchnorm_three_layer_backprop_gradients_match_finite_differences():
    """Through LayerNode's backprop arithmetic: the hidden layers normalise (W, gamma, beta
    updated by the optimizer), the last layer does not (W, b)."""
    nodes, rng = _bn_net(("tanh", "sigmoid", "linear"), 31, 9)
    assert [n.spec.has_bn for n in nodes] == [True, True, False]
    assert [n.dense.b is None for n in nodes] == [True, True, False]
    B = 9
    x = rng.normal(0, 1, (B, 6))
    y = rng.integers(0, 3, B)

    def f():            # the training-mode loss (batch statistics)
        h = x
        for node in nodes:
            h = node.dense.forward_train(h)[0]
        return losses.compute("softmax_ce", h, y)[0]

    L0 = f()
    numeric = [[numgrad(f, p) for p in n.dense.params] for n in nodes]
    before = [[p.copy() for p in n.dense.params] for n in nodes]
    h = x
    for node in nodes[:-1]:
        h, _, _ = node.bp_forward(0, h, y)
    _, g, metrics = nodes[-1].bp_forward(0, h, y)
    assert metrics["loss"] == pytest.approx(L0, rel=1e-12)
    for node in reversed(nodes[:-1]):
        g = node.bp_backward(0, g)
    names = (("W", "gamma", "beta"), ("W", "gamma", "beta"), ("W", "b"))
    for i, node in enumerate(nodes):
        assert node.updates == 1 and node.cache == {}
        for name, p0, p, num in zip(names[i], before[i], node.dense.params, numeric[i]):
            assert_grad(p0 - p, num, f"bn layer {i + 1} {name}")     # SGD, lr=1: update = -gradient


def test_batchnorm_dni_update_is_the_synthetic_gradient_through_bn():
    """dni_forward with batch normalisation applies exactly the gradient of <h, SG(h)/B>
    through the batch statistics: checked against finite differences of that surrogate."""
    node = LayerNode(dataclasses.replace(make_spec(1, 3, 5, 4, "tanh", lr=1.0, seed=4), batch_norm=True), dtype=F64)
    rng = np.random.default_rng(5)
    node.sg.A[...] = rng.normal(0, 0.5, node.sg.A.shape)    # a non-trivial SG
    node.sg.a[...] = rng.normal(0, 0.5, node.sg.a.shape)
    node.dense.bn.gamma[...] = rng.uniform(0.5, 1.5, 4)
    B = 6
    x = rng.normal(0, 1, (B, 5))
    h0, _ = node.dense.forward_train(x)
    G = node.sg.predict_keep(h0, None)[0] / B               # dL/dh the layer will use (fixed)

    def f():
        return float((node.dense.forward_train(x)[0] * G).sum())

    numeric = [numgrad(f, p) for p in node.dense.params]
    before = [p.copy() for p in node.dense.params]
    node.dni_forward(0, x, None)
    for name, p0, p, num in zip(("W", "gamma", "beta"), before, node.dense.params, numeric):
        assert_grad(p0 - p, num, f"bn dni {name}")


def test_batchnorm_param_count_and_params():
    for last in (False, True):
        s = dataclasses.replace(make_spec(2 if last else 1, 3, 6, 5, "relu"), batch_norm=True)
        node = LayerNode(s, F64)
        assert s.param_count() == sum(p.size for p in node.params().values())
        assert ("bn_mean" in node.params()) == (not last)
