"""The torch stage backend in one process: models, SG models, TorchNode's arithmetic per
schedule against plain autograd, checkpoints as arrays. Tiny models, a few steps each."""
import copy
import math
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from asyncdni import schedules as S  # noqa: E402
from asyncdni.engine.reference import Runtime  # noqa: E402
from asyncdni.nodes import make_node  # noqa: E402
from asyncdni.numerics.layer import LayerNode, LayerSpec, NonFiniteError, StepError  # noqa: E402
from asyncdni.torch import pin_threads  # noqa: E402
from asyncdni.torch.models import ZOO, ModelError, build_stages, stage_shapes  # noqa: E402
from asyncdni.torch.node import StateError, TorchNode, make_optimizer  # noqa: E402
from asyncdni.torch.synthetic import make_sg, regression_loss  # noqa: E402
from tests.conftest import raises_one_line  # noqa: E402

pin_threads(1)          # one thread: the sums of the chain and of plain autograd run in one order

IMG = (1, 8, 8)          # tiny images: the cnn's stages are (32, 4, 4), (64, 2, 2), (10,)
B = 8


def spec(i, K=3, **kw) -> LayerSpec:
    base = dict(index=i, n_layers=K, fan_in=0, fan_out=0, activation="relu", init="he", loss="softmax_ce",
                task="classification", n_out=10, optimizer="adam", lr=1e-2, sg_model="linear", sg_hidden=0,
                sg_lr=1e-2, cond=False, microbatches=1, seed=3, backend="torch", model="cnn", sample_shape=IMG)
    base.update(kw)
    return LayerSpec(**base)


def chain(K=3, **kw) -> list:
    return [TorchNode(spec(i, K, **kw)) for i in range(K)]


def batches(n, shape=IMG, seed=0, n_out=10):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((B, math.prod(shape))).astype(np.float32), rng.integers(0, n_out, B))
            for _ in range(n)]


def run(nodes, schedule, data, boundaries=None, start=0):
    """Drive the nodes through the schedule's lock-step order, as engine/reference.py does
    (steps start, start + 1, ...; returns the losses)."""
    sched = S.get(schedule)
    rt = Runtime(nodes, sched)
    got = []
    stop = start + len(data)
    rt.run(S.lockstep(sched, len(nodes), start, stop, nodes[0].spec.microbatches, boundaries=boundaries or (stop,),
                      sg_every=nodes[0].spec.sg_every),
           batch_of=lambda s: data[s - start], on_metrics=lambda s, m: got.append(m["loss"]))
    return got


def randomize(module, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def stage_tensors(nodes):
    return [{k: v.detach().clone() for k, v in n.stage.state_dict().items()} for n in nodes]


# ------------------------------------------------------------------ models
def test_zoo_models_chain_for_mnist_shapes():
    expect = {"mlp": 4, "cnn": 3, "resnet": 4}
    for name in ZOO:
        stages = build_stages(name, "", (1, 28, 28), 10, 0)
        shapes = stage_shapes(stages, (1, 28, 28), 10)
        assert len(stages) == expect[name]
        assert shapes[0][0] == (1, 28, 28) and shapes[-1][1] == (10,)
        for (_, out), (nxt, _) in zip(shapes, shapes[1:]):
            assert out == nxt
    assert stage_shapes(build_stages("cnn", "", (1, 28, 28), 10, 0), (1, 28, 28))[1] == ((32, 14, 14), (64, 7, 7))
    assert len(build_stages("mlp", "3", (784,), 10, 0)) == 3
    assert len(build_stages("resnet", "2", (3, 16, 16), 5, 0)) == 2
    assert len(build_stages("cnn", "1,", (1, 28, 28), 10, 0)) == 2


def test_build_is_seeded_whole_model():
    a = build_stages("cnn", "", IMG, 10, 7)
    b = build_stages("cnn", "", IMG, 10, 7)
    c = build_stages("cnn", "", IMG, 10, 8)
    for sa, sb in zip(a, b):
        for (k, va), vb in zip(sa.state_dict().items(), sb.state_dict().values()):
            assert torch.equal(va, vb), k
    assert not torch.equal(a[0][0].weight, c[0][0].weight)


BUILDERS = textwrap.dedent("""
    from torch import nn

    def as_list(sample_shape, n_out):
        d = 1
        for s in sample_shape:
            d *= s
        return [nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.ReLU()), nn.Linear(16, n_out)]

    def as_sequential(sample_shape, n_out):
        return nn.Sequential(nn.Flatten(), nn.Linear(sample_shape[0], 16), nn.ReLU(),
                             nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, n_out))

    def mismatched(sample_shape, n_out):
        return [nn.Linear(sample_shape[0], 20), nn.Linear(30, n_out)]

    def wrong_out(sample_shape, n_out):
        return [nn.Linear(sample_shape[0], 20), nn.Linear(20, n_out + 1)]

    def not_modules(sample_shape, n_out):
        return 42

    NOT_A_FUNCTION = 3
""")


@pytest.fixture
def builder_file(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(BUILDERS)
    return path


def test_user_builders_from_a_file_and_a_module(builder_file, monkeypatch):
    stages = build_stages(f"{builder_file}:as_list", "", (1, 4, 4), 3, 0)
    assert [s[1] for s in stage_shapes(stages, (1, 4, 4), 3)] == [(16,), (3,)]
    seq = build_stages(f"{builder_file}:as_sequential", "3,5", (12,), 3, 0)
    assert len(seq) == 3 and isinstance(seq[2], nn.Linear)
    assert [len(list(s.children())) for s in seq[:2]] == [3, 2]
    assert len(build_stages(f"{builder_file}:as_sequential", "3", (12,), 3, 0)) == 3
    assert len(build_stages(f"{builder_file}:as_sequential", "", (12,), 3, 0)) == 6   # one stage per child
    monkeypatch.syspath_prepend(str(builder_file.parent))
    assert len(build_stages("mymodel:as_sequential", "2", (12,), 3, 0)) == 2


def test_model_errors_are_one_line(builder_file, tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import torch\nx = 1 / 0\n")
    f = str(builder_file)
    cases = [
        (("nope.py:fn", "", (12,), 3), ["not found"]),
        ((f"{f}:missing", "", (12,), 3), ["has no function 'missing'"]),
        ((f"{f}:NOT_A_FUNCTION", "", (12,), 3), ["not a function"]),
        ((f"{bad}:fn", "", (12,), 3), [str(bad), "raised on import", "ZeroDivisionError"]),
        ((f"{f}:not_modules", "", (12,), 3), ["returned int"]),
        ((f"{f}:as_sequential", "2,9", (12,), 3), ["cut index 9 is out of range"]),
        ((f"{f}:as_sequential", "4,2", (12,), 3), ["strictly increasing"]),
        ((f"{f}:as_sequential", "1", (12,), 3), ["1 stage", "at least 2"]),
        ((f"{f}:as_sequential", "x", (12,), 3), ["expected a stage count"]),
        ((f"{f}:as_list", "2", (12,), 3), ["applies only to an nn.Sequential"]),
        ((f"{f}:mismatched", "", (12,), 3), ["stage 2 cannot take stage 1's output of shape (20,)"]),
        ((f"{f}:wrong_out", "", (12,), 3), ["expected (3,)"]),
        (("vgg", "", (12,), 3), ["not a zoo name"]),
        (("cnn", "", (784,), 10), ["needs image samples"]),
        (("no_such_pkg_xyz:fn", "", (12,), 3), ["cannot be imported", "No module named"]),
    ]
    for args, parts in cases:
        msg = raises_one_line(ModelError, build_stages, *args, 0, match_all=parts)
        assert "Traceback" not in msg


# -------------------------------------------------------------- SG models
SG_CASES = [((4,), "linear"), ((4,), "mlp"), ((4,), "lowrank"), ((2, 3, 3), "linear"), ((2, 3, 3), "mlp")]


@pytest.mark.parametrize("shape,kind", SG_CASES)
@pytest.mark.parametrize("cond", [0, 2])
def test_sg_models_start_at_zero_and_gradcheck(shape, kind, cond):
    torch.manual_seed(0)
    sg = make_sg(kind, shape, cond, hidden=3, layers=2, rank=2).double()
    h = torch.randn((2,) + shape, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, cond, dtype=torch.float64, requires_grad=True) if cond else None
    assert torch.equal(sg(h, c), torch.zeros_like(h))            # zero-initialised output layer
    randomize(sg, 0.5)
    names = [n for n, _ in sg.named_parameters()]

    def f(h, c, *ps):
        return functional_call(sg, dict(zip(names, ps)), (h, c))

    params = tuple(p.detach().clone().requires_grad_(True) for p in sg.parameters())
    assert torch.autograd.gradcheck(f, (h, c) + params)
    target = torch.randn_like(h)
    loss = regression_loss(sg(h, c), target)
    assert torch.allclose(loss, ((sg(h, c) - target) ** 2).sum() / 2)


def test_sg_on_feature_maps_with_conditioning_uses_label_channels():
    node = TorchNode(spec(0, schedule="sequential", cond=True))
    assert node.sg.net[-1].weight.shape[1] == 32 + 10
    (x, y), = batches(1)
    h, gx, m = node.forward(0, x, y)
    assert h.shape == (B, 32, 4, 4) and gx is None and m is None
    node.backward(0, np.ones_like(h) / B)
    assert node.sg_updates == 1 and np.isfinite(node.last_sg_loss)
    randomize(node.sg)
    hd = torch.from_numpy(h)
    c1 = F.one_hot(torch.zeros(B, dtype=torch.long), 10).float()
    c2 = F.one_hot(torch.ones(B, dtype=torch.long), 10).float()
    assert not torch.equal(node.sg(hd, c1), node.sg(hd, c2))


# ------------------------------------------------------- backprop / pipeline
def reference_training(stages, data, opt_name, lr, microbatches=1):
    """Plain end-to-end autograd on nn.Sequential(stages), one optimizer over everything."""
    model = nn.Sequential(*stages)
    # the optimizer the nodes use (torch.optim's fused kernel where there is one): element-wise,
    # so one optimizer over every stage does what one per stage does
    opt = make_optimizer(opt_name, model.parameters(), lr)
    for x, y in data:
        opt.zero_grad()
        xs, ys = np.array_split(x, microbatches), np.array_split(y, microbatches)
        for xm, ym in zip(xs, ys):
            out = model(torch.from_numpy(xm).reshape((-1,) + IMG))
            loss = F.cross_entropy(out, torch.from_numpy(ym).long())
            (loss * (len(xm) / len(x)) if microbatches > 1 else loss).backward()
        opt.step()
    return [{k: v.detach().clone() for k, v in s.state_dict().items()} for s in model]


@pytest.mark.parametrize("schedule,M", [("backprop", 1), ("pipeline", 2)])
def test_backprop_chain_equals_end_to_end_autograd_bitwise(schedule, M):
    data = batches(5)
    nodes = chain(schedule=schedule, microbatches=M)
    run(nodes, schedule, data)
    want = reference_training(build_stages("cnn", "", IMG, 10, 3), data, "adam", 1e-2, M)
    got = stage_tensors(nodes)
    # bitwise: each stage runs the same kernels on the same values in the same order as the
    # end-to-end graph (one thread; Adam is element-wise, so per-stage optimizers change nothing);
    # the pipeline accumulates micro-batch gradients in .grad in micro-batch order, as the
    # reference's successive backward calls do. BatchNorm's running statistics agree too.
    for g, w in zip(got, want):
        for k in w:
            assert torch.equal(g[k], w[k]), (schedule, k)
    assert [n.updates for n in nodes] == [5, 5, 5]


def test_pipeline_matches_full_batch_autograd_closely_without_batchnorm():
    """Without BatchNorm a micro-batched step is the full-batch step up to summation order:
    not bitwise (the full batch sums all rows in one matmul), so a tight tolerance."""
    data = batches(4, shape=(12,))
    nodes = chain(model="mlp", split="3", sample_shape=(12,), schedule="pipeline", microbatches=2, optimizer="sgd",
                  lr=0.05)
    run(nodes, "pipeline", data)
    model = nn.Sequential(*build_stages("mlp", "3", (12,), 10, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y).long()).backward()
        opt.step()
    for n, s in zip(nodes, model):
        for (k, a), b in zip(n.stage.state_dict().items(), s.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------------------------- DNI
def test_dni_update_uses_the_sg_prediction():
    node = TorchNode(spec(1, schedule="sequential", optimizer="sgd", lr=0.1))
    randomize(node.sg, 0.05)
    before = copy.deepcopy(node.stage)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, 32 * 4 * 4)).astype(np.float32)       # flattened input is accepted
    y = rng.integers(0, 10, B)
    h, gx, m = node.forward(0, x, y)
    xt = torch.from_numpy(x).reshape(B, 32, 4, 4).requires_grad_(True)
    href = before(xt)
    pred = node.sg(href.detach(), None)
    assert pred.abs().sum() > 0
    href.backward(pred.detach() * (1.0 / B))
    assert np.array_equal(h, href.detach().numpy()) and m is None
    assert np.array_equal(gx, xt.grad.numpy())
    for (k, p), q in zip(node.stage.named_parameters(), before.parameters()):
        assert torch.equal(p, q.add(q.grad, alpha=-0.1)), k            # SGD: p.add_(g, alpha=-lr)
    assert node.updates == 1 and 0 in node.cache


def test_sg_regression_moves_toward_the_target():
    """A fixed batch and a frozen stage (lr 0): the target, -h per example, is one a 3x3 conv
    can represent, and repeated regressions bring the SG's loss down."""
    node = TorchNode(spec(0, schedule="sequential", optimizer="sgd", lr=0.0, sg_model="mlp", sg_hidden=8,
                          sg_lr=3e-3))
    (x, y), = batches(1)
    g = None
    for step in range(30):
        h, _, _ = node.forward(step, x, y)
        g = -h / B if g is None else g
        node.backward(step, g)
    assert node.sg_updates == 30
    assert node.sg_recent[-1] < 0.5 * node.sg_recent[0]
    with pytest.raises(StepError):
        node.backward(99, g)


def test_sg_reuse_equals_repredicting_under_sequential():
    data = batches(3)
    a, b = chain(schedule="sequential", sg_model="mlp"), chain(schedule="sequential", sg_model="mlp", sg_reuse=True)
    run(a, "sequential", data)
    run(b, "sequential", data)
    for na, nb in zip(a, b):
        for (k, v), w in zip(na.params().items(), nb.params().values()):
            assert np.array_equal(v, w), k


def test_sg_options_count():
    nodes = chain(schedule="async", sg_every=2, sg_clip=0.5, sg_damp=0.5, sg_stale_decay=0.5)
    run(nodes, "async", batches(4))
    n = nodes[0]
    assert n.sg_skipped == 2 and n.sg_updates == 2 and n.target_norm > 0 and n.pred_norm > 0
    assert sum(n.sg_lags) == 2 and not n.cache


def test_sg_trust_scales_a_stage_step_and_tracks_the_cosine():
    """The numpy rule (tests/test_stability.py) on a torch stage: the step is the untrusted
    one times the trust; a target along the prediction the stage stepped on adds
    (1 - TRUST_DECAY) x cosine 1; what goes down is unchanged."""
    from asyncdni.numerics.layer import TRUST_DECAY
    (x, y), = batches(1)
    moves, sent, nodes = {}, {}, {}
    for t in (None, 0.25):
        n = TorchNode(spec(0, schedule="sequential", optimizer="sgd", lr=0.1, sg_trust=t is not None))
        randomize(n.sg, seed=1)
        if t is not None:
            n.trust = t
        before = [p.detach().clone() for p in n.stage.parameters()]
        _, sent[t], _ = n.dni_forward(0, x, y)
        moves[t] = [p.detach() - b for p, b in zip(n.stage.parameters(), before)]
        nodes[t] = n
    for a, b in zip(moves[0.25], moves[None]):
        torch.testing.assert_close(a, 0.25 * b, rtol=1e-5, atol=1e-7)
    assert sent[0.25] is None and sent[None] is None            # the first stage sends nothing down
    n = nodes[0.25]
    used = n.cache[0][4]
    n.sg_update(0, used.numpy() / B)
    assert n.trust == pytest.approx(TRUST_DECAY * 0.25 + (1 - TRUST_DECAY), rel=1e-9)
    assert nodes[None].cache[0][4] is None                      # off: nothing kept for it


# ------------------------------------------------------------------- delayed
def grads_at(stage, x, g):
    s = copy.deepcopy(stage)
    xt = torch.from_numpy(x).requires_grad_(True)
    s(xt).backward(torch.from_numpy(g))
    return [p.grad.clone() for p in s.parameters()], xt.grad.numpy()


@pytest.mark.parametrize("stash,remedy", [(True, "none"), (True, "lr_scale"), (False, "none")])
def test_delayed_gradient_weights(stash, remedy):
    lr = 0.1
    node = TorchNode(spec(1, model="mlp", split="3", sample_shape=(12,), schedule="delayed", optimizer="sgd", lr=lr,
                          stash=stash, delay_remedy=remedy))
    rng = np.random.default_rng(3)
    x0, x1 = (rng.standard_normal((B, 256)).astype(np.float32) for _ in range(2))
    g0, g1 = (rng.standard_normal((B, 256)).astype(np.float32) for _ in range(2))
    y = np.zeros(B, np.int64)
    P0 = copy.deepcopy(node.stage)
    node.forward(0, x0, y)
    node.forward(1, x1, y)
    G0, _ = grads_at(P0, x0, g0)
    gx0 = node.backward(0, g0)
    P1 = copy.deepcopy(node.stage)
    for p, p0, gr in zip(P1.parameters(), P0.parameters(), G0):
        assert torch.equal(p, p0.add(gr, alpha=-lr))                 # SGD: p.add_(g, alpha=-lr)
    G1, gx1_want = grads_at(P0 if stash else P1, x1, g1)     # stash: forward-time weights; else recompute now
    gx1 = node.backward(1, g1)
    step_lr = lr * (1.0 / 2) if remedy == "lr_scale" else lr      # delay 1
    for p, p1, gr in zip(node.stage.parameters(), P1.parameters(), G1):
        assert torch.equal(p, p1.add(gr, alpha=-step_lr))
    assert np.array_equal(gx1, gx1_want) and gx0.shape == (B, 256)
    assert (node.delay_n, node.delay_sum, node.delay_max, node.version) == (2, 1, 1, 2)
    nbytes = sum(p.numel() * 4 for p in node.stage.parameters())
    assert node.stash_peak == (2 * nbytes if stash else 0) and node.stash_bytes == 0


def test_delayed_without_stash_keeps_batchnorm_statistics_single():
    node = TorchNode(spec(0, schedule="delayed"))
    (x, y), = batches(1)
    h, _, _ = node.forward(0, x, y)
    bn = node.stage[1]
    mean = bn.running_mean.clone()
    node.backward(0, np.ones_like(h))
    assert torch.equal(bn.running_mean, mean) and int(bn.num_batches_tracked) == 1


# --------------------------------------------------------------------- local
def test_local_aux_head_trains_on_feature_maps_and_sends_nothing():
    node = TorchNode(spec(0, schedule="local", aux_features=16, lr=3e-3))
    assert isinstance(node.aux.linear, nn.Linear) and node.aux.linear.in_features == 32
    (x, y), = batches(1)

    def aux_loss():
        with torch.no_grad():
            node.stage.eval()
            z = node.aux(node.stage(torch.from_numpy(x).reshape((B,) + IMG)))
            node.stage.train()
            return F.cross_entropy(z, torch.from_numpy(y)).item()

    before = aux_loss()
    for step in range(10):
        h, gx, m = node.forward(step, x, y)
        assert gx is None and m is None and h.shape == (B, 32, 4, 4)
    assert aux_loss() < before and len(node.aux_recent) == 10 and node.updates == 10
    assert node.aux_logits(h).shape == (B, 10)
    with pytest.raises(StepError):
        node.backward(0, h)


# ------------------------------------------------------------- every schedule
@pytest.mark.parametrize("schedule", S.NAMES)
def test_every_schedule_runs(schedule):
    M = 2 if S.get(schedule).microbatches else 1
    nodes = chain(schedule=schedule, microbatches=M, aux_features=16, stash=schedule == "delayed")
    losses = run(nodes, schedule, batches(3), boundaries=(2, 3))
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert all(n.updates == 3 for n in nodes) and all(not n.cache and n.step_complete for n in nodes)
    assert nodes[0].nonfinite_skipped == 0
    if S.get(schedule).gradient == S.SYNTHETIC:
        assert [n.sg_updates for n in nodes] == [3, 3, 0]
    for n in nodes:
        parts = n.flops_parts(B)
        assert set(parts) == set(LayerNode.flops_parts(_numpy_node(), B)) and parts["forward"] > 0
        assert n.flops_per_batch(B) == sum(parts.values())


def _numpy_node():
    return LayerNode(LayerSpec(index=0, n_layers=2, fan_in=4, fan_out=4, activation="relu", init="he",
                               loss="softmax_ce", task="classification", n_out=3, optimizer="sgd", lr=0.1,
                               sg_model="linear", sg_hidden=0, sg_lr=0.1, cond=False, microbatches=1, seed=0))


def test_flops_are_measured():
    nodes = chain(model="mlp", split="3", sample_shape=(12,), schedule="backprop")
    assert nodes[0].flops_parts(B)["forward"] == 2 * B * 12 * 256
    assert nodes[0].flops_parts(B)["backward"] == 2 * B * 12 * 256            # first stage: no input gradient
    assert nodes[1].flops_parts(B)["backward"] == 2 * 2 * B * 256 * 256
    assert nodes[1].flops_parts(B, "local")["backward"] == 2 * B * 256 * 256
    assert nodes[0].flops_parts(B, "sequential")["sg_predict"] == 2 * B * 256 * 256


# ------------------------------------------------------------------ nonfinite
def test_nonfinite_gradient_is_skipped_or_stops():
    nodes = chain(schedule="backprop")
    data = batches(1)
    x, y = data[0]
    h, _, _ = nodes[0].forward(0, x, y)
    w = nodes[0].stage[0].weight.detach().clone()
    g = np.full(h.shape, np.nan, np.float32)
    nodes[0].backward(0, g)
    assert nodes[0].nonfinite_skipped == 1 and nodes[0].updates == 0
    assert torch.equal(nodes[0].stage[0].weight, w)
    stop = TorchNode(spec(0, schedule="backprop"), fail_on_nonfinite=True)
    stop.forward(0, x, y)
    raises_one_line(NonFiniteError, stop.backward, 0, g, match_all=["layer 1", "non-finite"])
    with pytest.raises(StepError):
        nodes[0].backward(5, g)


# ---------------------------------------------------------------- checkpoints
CKPT = dict(schedule="sequential", sg_model="mlp", cond=True, sg_clip=2.0, sg_damp=1.0, sg_trust=True, lr_schedule="cosine",
            total_steps=10, weight_decay=1e-3, optimizer="adamw")


def test_checkpoint_roundtrip_continues_identically():
    data = batches(4)
    a = chain(**CKPT)
    run(a, "sequential", data[:3])
    fresh = chain(**CKPT)
    for n, f in zip(a, fresh):
        assert n.state_layout() == f.state_layout()               # eager optimizer state: a stable layout
        st = n.state_arrays()
        assert set(st) == set(n.state_layout())
        assert all(isinstance(v, np.ndarray) for v in st.values())
        f.load_state_arrays(st)
    assert "opt.0.weight.exp_avg_sq" in a[0].state_arrays() and "sched" in a[0].state_arrays()
    assert fresh[0].updates == 3 and fresh[0].opt.param_groups[0]["lr"] == a[0].opt.param_groups[0]["lr"]
    la = run(a, "sequential", [data[3]], start=3)
    lb = run(fresh, "sequential", [data[3]], start=3)
    assert la == lb
    for n, f in zip(a, fresh):
        for (k, v), w in zip(n.params().items(), f.params().values()):
            assert np.array_equal(v, w), k
        sa, sb = n.state_arrays(), f.state_arrays()
        for k in sa:
            assert np.array_equal(sa[k], sb[k]), k


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam", "adamw"])
def test_state_layout_is_stable_for_every_optimizer(opt):
    fresh, trained = chain(optimizer=opt, schedule="backprop"), chain(optimizer=opt, schedule="backprop")
    run(trained, "backprop", batches(1))
    for f, t in zip(fresh, trained):
        assert f.state_layout() == t.state_layout()
        assert {k: v.dtype for k, v in t.state_arrays().items()} == {k: d for k, (_, d) in f.state_layout().items()}


def test_checkpoint_refuses_a_nan_and_a_partial_pipeline_step():
    node = TorchNode(spec(0, schedule="sequential"))
    st = node.state_arrays()
    w = node.stage[0].weight.detach().clone()
    st["stage.0.weight"] = st["stage.0.weight"].copy()
    st["stage.0.weight"].reshape(-1)[3] = np.nan
    raises_one_line(StateError, node.load_state_arrays, st, match_all=["'stage.0.weight'", "nan"])
    assert torch.equal(node.stage[0].weight, w)
    st = node.state_arrays()
    st["counters"] = st["counters"].copy()
    st["counters"][0] = -1
    raises_one_line(StateError, node.load_state_arrays, st, match_all=["'counters'", "negative"])
    del st["counters"]
    raises_one_line(StateError, node.load_state_arrays, st, match_all=["no 'counters'"])
    pipe = chain(schedule="pipeline", microbatches=2)
    (x, y), = batches(1)
    h, _, _ = pipe[0].forward(0, x[:4], y[:4])
    pipe[0].forward(1, x[4:], y[4:])
    pipe[0].backward(0, np.zeros_like(h))
    raises_one_line(StateError, pipe[0].state_arrays, match_all=["partly accumulated"])


# ---------------------------------------------------------------- the rest
def test_forward_only_restores_modes_and_statistics():
    node = TorchNode(spec(0, schedule="backprop"))
    (x, _), = batches(1)
    bn = node.stage[1]
    mean = bn.running_mean.clone()
    h = node.forward_only(x)
    assert h.shape == (B, 32, 4, 4) and h.dtype == np.float32 and h.flags.c_contiguous
    assert node.stage.training and bn.training and torch.equal(bn.running_mean, mean)
    assert np.array_equal(node.forward_only(x.reshape((B,) + IMG)), h)
    with pytest.raises(ValueError, match="expected"):
        node.forward_only(np.zeros((B, 5), np.float32))


def test_params_and_shapes_and_spec_normalisation():
    s = spec(1, sample_shape=[1, 8, 8], in_shape=[32, 4, 4])          # lists, as msgpack delivers tuples
    node = TorchNode(s)
    assert node.spec.sample_shape == IMG and node.in_shape == (32, 4, 4) and node.out_shape == (64, 2, 2)
    assert node.fan_in == 512 and node.fan_out == 256
    p = node.params()
    assert "stage.0.weight" in p and "stage.1.running_mean" in p and any(k.startswith("sg.") for k in p)
    assert node.param_count() == sum(a.size for a in p.values())
    with pytest.raises(ValueError, match="in_shape"):
        TorchNode(spec(1, in_shape=(3, 3, 3)))


def test_make_node_by_backend():
    assert isinstance(make_node(_numpy_node().spec), LayerNode)
    assert isinstance(make_node(spec(0)), TorchNode)
    with pytest.raises(ValueError, match="unknown backend"):
        make_node(spec(0, backend="jax"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_stage_matches_cpu():
    (x, y), = batches(1)
    a = TorchNode(spec(0, schedule="backprop"))
    b = TorchNode(spec(0, schedule="backprop", device="cuda"))
    ha, _, _ = a.forward(0, x, y)
    hb, _, _ = b.forward(0, x, y)
    assert isinstance(hb, np.ndarray)
    np.testing.assert_allclose(ha, hb, rtol=1e-4, atol=1e-4)
    ga, gb = a.backward(0, np.ones_like(ha)), b.backward(0, np.ones_like(hb))
    assert ga is None and gb is None
    for (k, v), w in zip(a.params().items(), b.params().values()):
        np.testing.assert_allclose(v, w, rtol=1e-3, atol=1e-4, err_msg=k)
