"""Hostile local input (issue 12, defects 4-8): data files, settings, weights and
checkpoints that used to hang a run, trace back, or let NaN/Inf into the weights.

Each test names the defect it guards. Hangs are bounded: a command that would hang runs
in a subprocess with a timeout, so that on a broken build the test fails, not the suite.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import env_with_repo, raises_one_line
from asyncdni.engine import checkpoint as ck
from asyncdni import config as C
from asyncdni.engine.checkpoint import CheckpointError
from asyncdni.numerics.data import MAX_CLASSES, DataError, load_idx_dir, write_idx
from asyncdni.numerics.layer import LayerNode, LayerSpec, NonFiniteError
from asyncdni.numerics.optim import make_optimizer

DIGEST = "0123456789abcdef"


def _cli(tmp_path, *args, timeout=60):
    """``asyncdni train`` in a subprocess; a hang is a failure after ``timeout`` seconds."""
    proc = subprocess.Popen([sys.executable, "-m", "asyncdni.cli", "train", "--no-progress", *args], cwd=tmp_path,
                            env=env_with_repo(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"asyncdni train {' '.join(args)} still running after {timeout} s (hung)")
    return proc.returncode, err


def _one_line(rc, err, code, *needles):
    assert rc == code, (rc, err)
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def _idx_pair(d, images, labels):
    d.mkdir(exist_ok=True)
    write_idx(d / "train-images-idx3-ubyte", images)
    write_idx(d / "train-labels-idx1-ubyte", labels)
    return d


def _images(dtype=np.float32, n=40):
    return np.random.default_rng(0).random((n, 3, 4)).astype(dtype)


# ------------------------------------------------------------- 4. data checked at load
@pytest.mark.parametrize("bad,dtype,words", [
    (np.nan, np.float32, ("non-finite value nan",)),
    (np.inf, np.float32, ("non-finite value inf",)),
    (-np.inf, np.float64, ("non-finite value -inf",)),
    (1e300, np.float64, ("beyond float32",)),
])
def test_nonfinite_pixel_refused_at_load_naming_file_and_index(tmp_path, bad, dtype, words):
    img = _images(dtype)
    img[7, 2, 1] = bad
    d = _idx_pair(tmp_path / "data", img, np.arange(40, dtype=np.uint8) % 10)
    raises_one_line(DataError, load_idx_dir, d,
                    match_all=("train-images-idx3-ubyte", "index (7, 2, 1)", "sample 7", *words))


@pytest.mark.parametrize("label", [100000, 2**31 - 1, -3])
def test_label_out_of_range_refused_at_load_naming_file_and_index(tmp_path, label):
    labels = np.arange(40, dtype=np.int32) % 10
    labels[13] = label
    d = _idx_pair(tmp_path / "data", _images(), labels)
    raises_one_line(DataError, load_idx_dir, d,
                    match_all=("train-labels-idx1-ubyte", f"label {label} at index 13", str(MAX_CLASSES - 1)))


@pytest.mark.integration
@pytest.mark.usefixtures("no_leftover_processes")
def test_nan_pixel_and_huge_label_are_one_line_errors_not_hangs(tmp_path):
    img = _images()
    img[5, 0, 0] = np.nan
    d = _idx_pair(tmp_path / "nan", img, np.arange(40, dtype=np.uint8) % 10)
    rc, err = _cli(tmp_path, "--data-path", str(d), "--batch-size", "8", "--steps", "20",
                   "--fail-on-nonfinite", timeout=45)
    _one_line(rc, err, 2, "train-images-idx3-ubyte", "index (5, 0, 0)")
    labels = np.arange(40, dtype=np.int32) % 10
    labels[3] = 100000
    d = _idx_pair(tmp_path / "label", _images(), labels)
    rc, err = _cli(tmp_path, "--data-path", str(d), "--batch-size", "8", "--steps", "20", timeout=45)
    _one_line(rc, err, 2, "train-labels-idx1-ubyte", "label 100000 at index 3")


# ------------------------------------------------------------- 5. overflowing settings
@pytest.mark.parametrize("override,field", [
    ({"train.steps": "1000000000000000000"}, "train.steps"),
    ({"train.steps": "100000000000"}, "train.steps"),
    ({"model.width": "100000000000000000"}, "model.width"),
    ({"model.width": "100000"}, "model.width"),
    ({"model.widths": "8,100000000,8", "model.layers": "4"}, "model.widths"),
    ({"train.steps": "100000000000000000000"}, "train.steps"),     # beyond int64
    ({"train.epochs": "1e300"}, "train.epochs"),
    ({"train.eval_batch": "100000000000"}, "train.eval_batch"),
])
def test_sizes_checked_against_memory_and_limits_at_config_time(override, field):
    raises_one_line(C.ConfigError, C.build, None, override, match_all=(field,))


def test_idx_sizes_checked_again_in_the_plan(tmp_path, monkeypatch):
    """For IDX data the input width is known only after loading: make_plan checks again."""
    from asyncdni.engine.plan import make_plan
    d = _idx_pair(tmp_path / "data", _images(), np.arange(40, dtype=np.uint8) % 10)
    cfg = C.build(None, {"data.path": str(d), "data.dataset": "idx", "model.width": "64", "train.batch_size": "8"})
    train, _ = load_idx_dir(d)
    make_plan(cfg, train)
    monkeypatch.setattr(C, "available_memory", lambda: 10_000)       # a machine with 10 kB free
    raises_one_line(C.ConfigError, make_plan, cfg, train, match_all=("model.width", "memory available"))


@pytest.mark.integration
@pytest.mark.usefixtures("no_leftover_processes")
def test_overflowing_settings_do_not_hang(tmp_path):
    for args, field in ((("--steps", "1000000000000000000"), "train.steps"),
                        (("--width", "100000000000000000"), "model.width")):
        rc, err = _cli(tmp_path, *args, timeout=45)
        _one_line(rc, err, 2, field)


@pytest.mark.integration
@pytest.mark.usefixtures("no_leftover_processes")
def test_shutdown_closes_a_socket_left_by_a_failed_bind(tmp_path):
    """A failure after the control socket was created but before it was returned (here an
    option value no socket accepts) must end the run, not leave ctx.term() waiting forever."""
    code = textwrap.dedent("""
        from asyncdni import config as C
        from asyncdni.engine.coordinator import Coordinator
        cfg = C.build(None, {"train.steps": "5", "runtime.progress": False, "model.layers": "2",
                             "model.width": "8"})
        c = Coordinator(cfg)
        c.max_ctrl_message = 2**64
        try:
            c.run()
        except Exception as e:
            print("raised", type(e).__name__)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env_with_repo(),
                             capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the coordinator's shutdown hung after a failed bind")
    assert out.returncode == 0 and "raised" in out.stdout, out.stderr


# ------------------------------------------------------------- 6. non-finite weights
@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_update_with_non_finite_result_changes_nothing(name):
    rng = np.random.default_rng(0)
    params = [rng.normal(0, 1, (3, 4)).astype(np.float32), rng.normal(0, 1, 4).astype(np.float32)]
    opt = make_optimizer(name, params, 1e-2)
    for _ in range(3):                                       # some state to lose
        assert opt.step([rng.normal(0, 1, p.shape).astype(np.float32) for p in params]) is True
    before_p = [p.copy() for p in params]
    before_s = {k: np.array(v, copy=True) for k, v in opt.state().items()}
    opt.lr = 1e36 if name != "adam" else 1e38               # finite gradient, overflowing update
    huge = [np.full(p.shape, 1e30, np.float32) for p in params]
    assert opt.step(huge) is False
    for p, q in zip(params, before_p):
        np.testing.assert_array_equal(p, q)
    after = opt.state()
    assert set(after) == set(before_s)
    for k, v in before_s.items():
        np.testing.assert_array_equal(after[k], v)
    opt.lr = 1e-2
    assert opt.step([np.ones_like(p) for p in params]) is True and int(opt.state()["t"]) == 4


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_stale_bounds_are_recomputed_not_refused(name):
    """The check's magnitude bounds only grow between exact recomputations: a bound near the
    limit must lead to a recomputation and the update, not to a skipped step."""
    params = [np.ones((3, 4), np.float32)]
    opt = make_optimizer(name, params, 1e-2)
    opt._bp[0] = 1e38                                        # as if the bound had grown for ages
    before = params[0].copy()
    assert opt.step([np.ones((3, 4), np.float32)]) is True
    assert opt.t == 1 and not np.array_equal(params[0], before) and opt._bp[0] < 1e30


def test_optimizer_bounds_follow_a_restore():
    """Parameters written by a checkpoint restore: load_state recomputes the bounds, so an
    update that would overflow restored weights near the float32 limit is refused."""
    params = [np.zeros(4, np.float32)]
    opt = make_optimizer("sgd", params, 1e37)
    params[0][...] = 3.35e38                                 # finite, close to float32's 3.4e38
    opt.load_state({"t": np.array(5, np.int64)})
    assert opt.step([np.full(4, -1, np.float32)]) is False   # 3.35e38 + 1e37 would be inf
    assert (params[0] == np.float32(3.35e38)).all() and opt.t == 5


def test_adam_infinite_second_moment_is_refused():
    """g*g overflows float32 while g is finite: Adam's step would be 0 and leave v = inf."""
    params = [np.zeros(4, np.float32)]
    opt = make_optimizer("adam", params, 1e-3)
    assert opt.step([np.full(4, 1e20, np.float32)]) is False
    assert all(np.isfinite(v).all() for v in opt.state().values()) and opt.t == 0


def _node(optimizer="sgd", lr=1e30, fail=False, index=0, n_layers=2):
    spec = LayerSpec(index=index, n_layers=n_layers, fan_in=4 if index == 0 else 3, fan_out=3, activation="linear",
                     init="he", loss="softmax_ce", task="classification", n_out=3, optimizer=optimizer, lr=lr,
                     sg_model="linear", sg_hidden=0, sg_lr=lr, cond=True, microbatches=1, seed=0)
    return LayerNode(spec, np.float32, fail_on_nonfinite=fail)


def test_layer_skips_and_counts_an_update_that_would_overflow():
    node = _node(lr=1e38)
    W, b = node.dense.W.copy(), node.dense.b.copy()
    x = np.full((2, 4), 1e3, np.float32)
    gh = np.full((2, 3), 1e3, np.float32)
    gW, gb, _ = node.dense.backward(x, node.dense.forward(x), gh, need_input_grad=False)
    node._apply(gW, gb)
    assert node.nonfinite_skipped == 1 and node.updates == 0
    np.testing.assert_array_equal(node.dense.W, W)
    np.testing.assert_array_equal(node.dense.b, b)
    strict = _node(lr=1e38, fail=True)
    with pytest.raises(NonFiniteError, match="weight update"):
        strict._apply(gW, gb)


@pytest.mark.parametrize("optimizer,lr", [("sgd", "1000"), ("sgd", "1e30"), ("momentum", "100"),
                                          ("adam", "1e30")])
@pytest.mark.slow                   # an in-process training run per case
def test_diverging_run_saves_finite_weights(tmp_path, optimizer, lr):
    """The issue's runs, in process (the same LayerNode code as the workers): every layer's
    weights, SG model and optimizer state stay finite, and the skips are counted."""
    from asyncdni.engine.plan import load_datasets, make_plan
    from asyncdni.engine.reference import train_reference
    cfg = C.build(None, {"train.optimizer": optimizer, "train.lr": lr, "train.steps": "400",
                         "train.schedule": "sequential", "model.activation": "relu"})   # tanh would saturate
    train, _ = load_datasets(cfg)
    with np.errstate(all="ignore"):
        res = train_reference(make_plan(cfg, train), "sequential", train, cfg.train.seed)
    for node in res.nodes:
        state = ck.node_state(node)
        ck.check_layer_state(f"layer {node.spec.index + 1}", state)      # what a resume would accept
    assert sum(n.nonfinite_skipped for n in res.nodes) > 0


@pytest.mark.integration
@pytest.mark.usefixtures("no_leftover_processes")
def test_diverging_multiprocess_run_checkpoints_finite_weights(tmp_path):
    ckdir = tmp_path / "ck"
    rc, err = _cli(tmp_path, "--optimizer", "sgd", "--lr", "1e30", "--steps", "100", "--checkpoint-every", "100",
                   "--checkpoint-dir", str(ckdir), timeout=90)
    assert rc == 0, err
    c = ck.validate(ck.step_dir(ckdir, 100), None, 4)          # every file's content checked too
    for i in range(4):
        state = c.read_layer(i)
        assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")


def _layer_checkpoint(root, step, mutate=None, n_layers=2):
    """A real checkpoint of ``n_layers`` LayerNodes (and a feeder file), optionally damaged."""
    d = ck.step_dir(root, step)
    files = {}
    for i in range(n_layers):
        state = ck.node_state(_node(optimizer="adam", lr=1e-3, index=i, n_layers=n_layers))
        if mutate is not None:
            mutate(i, state)
        files[ck.layer_file(i)] = ck.write_arrays(d / ck.layer_file(i), state)
    feeder = {"loss": np.zeros(step), "metric": np.zeros(step), "done_at": np.zeros(step),
              "train_time": np.array(1.0), "time_to_target": np.array(np.nan),
              **{f"eval_{k}": np.zeros(2) for k in ck.FEEDER_EVAL_KEYS}}
    if mutate is not None:
        mutate("feeder", feeder)
    files[ck.FEEDER_FILE] = ck.write_arrays(d / ck.FEEDER_FILE, feeder)
    ck.write_manifest(root, step, DIGEST, n_layers, files)
    return d


def _set(key, value, which=0):
    def f(i, state):
        if i == which:
            if value is KeyError:
                del state[key]
            else:
                state[key] = value(state[key]) if callable(value) else value
    return f


@pytest.mark.parametrize("mutate,words", [
    (_set("W", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, np.nan, a)), ("'W'", "nan", "non-finite")),
    (_set("sg.0", lambda a: a + np.inf), ("'sg.0'", "inf")),
    (_set("opt.m0", lambda a: a * np.nan), ("'opt.m0'",)),
    (_set("opt.t", np.array(-5, np.int64)), ("'opt.t'", "-5", "impossible optimizer state")),
    (_set("sgopt.t", np.array(2.5)), ("'sgopt.t'", "impossible optimizer state")),
    (_set("opt.v0", lambda a: a - 1), ("'opt.v0'", "negative", "impossible optimizer state")),
    (_set("counters", np.array([1, -2, 0], np.int64)), ("'counters'",)),
    (_set("loss", KeyError, "feeder"), ("feeder.npz", "'loss'")),
    (_set("eval_n", KeyError, "feeder"), ("feeder.npz", "'eval_n'")),
    (_set("metric", np.zeros(3), "feeder"), ("feeder.npz", "'metric'", "shape")),
    (_set("train_time", np.array(np.inf), "feeder"), ("feeder.npz", "'train_time'")),
])
def test_checkpoint_content_refused_and_older_one_used(tmp_path, mutate, words):
    good = _layer_checkpoint(tmp_path, 10)
    bad = _layer_checkpoint(tmp_path, 20, mutate)            # checksums match: only the content is wrong
    msg = raises_one_line(CheckpointError, ck.validate, bad, DIGEST, 2, match_all=words)
    found, skipped = ck.find_latest(tmp_path, DIGEST, 2)
    assert found.directory == good and skipped == [msg]
    # the only checkpoint: one line, naming the reason
    only = tmp_path / "only"
    only.mkdir()
    _layer_checkpoint(only, 20, mutate)
    raises_one_line(CheckpointError, ck.find_latest, only, DIGEST, 2, match_all=("no usable checkpoint", *words))


def test_restore_node_refuses_non_finite_and_impossible_state():
    node = _node(optimizer="adam", lr=1e-3)
    state = ck.node_state(node)
    for key, value, words in [("W", np.full_like(state["W"], np.inf), ("'W'", "inf")),
                              ("opt.t", np.array(-1, np.int64), ("'opt.t'", "impossible")),
                              ("sgopt.v0", -np.ones_like(state["sgopt.v0"]), ("'sgopt.v0'", "negative"))]:
        bad = dict(state, **{key: value})
        raises_one_line(CheckpointError, ck.restore_node, _node(optimizer="adam", lr=1e-3), bad,
                        match_all=("layer 1", *words))
    fresh = _node(optimizer="adam", lr=1e-3)
    ck.restore_node(fresh, state)                            # the intact state still loads


def test_feeder_evaluations_round_trip_through_their_checkpoint_columns():
    """checkpoint.py owns the feeder file's evaluation columns, written and read back by the same pair."""
    assert ck.evals_from_arrays(ck.evals_to_arrays([{"step": 5, "train_time": 1.5, "loss": 0.5, "metric": 0.9,
                                                       "metric2": 0.9, "n": 100}]))[0]["step"] == 5


# ------------------------------------------------------------- 7. one line, exit 2
@pytest.mark.integration
@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.parametrize("args,needle", [
    (("--seed", "-1"), "train.seed"),
    (("--data-seed", "-1"), "data.seed"),
    (("--steps", "100000000000"), "train.steps"),
    (("--width", "100000"), "model.width"),
])
def test_user_mistakes_are_one_line_exit_2(tmp_path, args, needle):
    rc, err = _cli(tmp_path, *args, timeout=45)
    _one_line(rc, err, 2, needle)


@pytest.mark.integration
@pytest.mark.usefixtures("no_leftover_processes")
def test_label_2_31_and_non_utf8_config_are_one_line_exit_2(tmp_path):
    labels = np.arange(40, dtype=np.int32) % 10
    labels[0] = 2**31 - 1
    d = _idx_pair(tmp_path / "data", _images(), labels)
    rc, err = _cli(tmp_path, "--data-path", str(d), "--batch-size", "8", timeout=45)
    _one_line(rc, err, 2, "train-labels-idx1-ubyte", f"label {2**31 - 1} at index 0")
    cfg = tmp_path / "bad.toml"
    cfg.write_bytes(b"[model]\nlayers = 2\n# \xff\xfe caf\xe9\n")
    rc, err = _cli(tmp_path, "--config", str(cfg), timeout=45)
    _one_line(rc, err, 2, "bad.toml", "not UTF-8")


def test_config_file_that_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "cfg.toml"
    os.mkfifo(fifo)
    raises_one_line(C.ConfigError, C.build, str(fifo), {}, match_all=("cfg.toml", "not a regular file"))
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 100_000)
    raises_one_line(C.ConfigError, C.build, str(deep), {}, match_all=("deep.toml", "invalid TOML"))


# ------------------------------------------------------------- 8. resume input
def _in_subprocess(code: str, timeout: float, memory_bytes: int = 3 << 30):
    """Run ``code`` in a child with an address-space limit and a timeout: a read that never
    ends must fail this test, not exhaust the machine. Returns its stdout."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    try:
        out = subprocess.run([sys.executable, "-c", code], env=env_with_repo(), capture_output=True, text=True,
                             timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"timed out after {timeout} s (hung)")
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _find_latest_code(root):
    return textwrap.dedent(f"""
        from asyncdni.engine import checkpoint as ck
        found, skipped = ck.find_latest({str(root)!r}, {DIGEST!r}, 2)
        print(found.step)
        print(skipped[0])
    """)


@pytest.mark.parametrize("damage", ["nested", "fifo", "dev_zero", "huge"])
@pytest.mark.slow                   # a subprocess per case
def test_damaged_manifest_skipped_with_one_line(tmp_path, damage):
    _layer_checkpoint(tmp_path, 10)
    bad = _layer_checkpoint(tmp_path, 20)
    m = bad / "manifest.json"
    m.unlink()
    if damage == "nested":
        m.write_text("[" * 100_000)
        words = ("manifest.json", "nested too deeply")
    elif damage == "fifo":
        os.mkfifo(m)
        words = ("manifest.json", "not a regular file")
    elif damage == "dev_zero":
        m.symlink_to("/dev/zero")
        words = ("manifest.json", "not a regular file")
    else:
        with open(m, "wb") as f:
            f.truncate(ck.MAX_MANIFEST_BYTES + 10)           # sparse: no disk used
        words = ("manifest.json", "larger than")
    out = _in_subprocess(_find_latest_code(tmp_path), timeout=30).splitlines()
    assert out[0] == "10", out
    assert all(w in out[1] for w in words), out


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
@pytest.mark.slow                   # a subprocess per case
def test_layer_file_that_is_a_fifo_or_device_is_refused(tmp_path, kind):
    d = _layer_checkpoint(tmp_path, 10)
    p = d / "layer-2.npz"
    p.unlink()
    if kind == "fifo":
        os.mkfifo(p)
    else:
        p.symlink_to("/dev/zero")
    code = textwrap.dedent(f"""
        from asyncdni.engine import checkpoint as ck
        for fn in (lambda: ck.read_arrays({str(p)!r}), lambda: ck.validate({str(d)!r})):
            try:
                fn()
            except ck.CheckpointError as e:
                print(e)
    """)
    out = _in_subprocess(code, timeout=30).splitlines()
    assert len(out) == 2 and all("layer-2.npz" in line for line in out), out
    assert "not a regular file" in out[0], out


@pytest.mark.integration
@pytest.mark.usefixtures("no_leftover_processes")
def test_resume_falls_back_past_a_feeder_file_without_loss(tmp_path):
    """End to end: a checkpoint whose feeder.npz lacks 'loss' (checksum updated to match) is
    skipped with its reason, and the run resumes from the older one."""
    ckdir = tmp_path / "ck"
    base = ("--layers", "2", "--width", "16", "--schedule", "sequential", "--checkpoint-dir", str(ckdir),
            "--checkpoint-every", "20", "--keep-checkpoints", "5")
    rc, err = _cli(tmp_path, *base, "--steps", "40", timeout=90)
    assert rc == 0, err
    d = ck.step_dir(ckdir, 40)
    state = ck.read_arrays(d / ck.FEEDER_FILE)
    del state["loss"]
    entry = ck.write_arrays(d / ck.FEEDER_FILE, state)
    m = json.loads((d / "manifest.json").read_text())
    m["files"][ck.FEEDER_FILE] = entry
    (d / "manifest.json").write_text(json.dumps(m))
    base = tuple(a for a in base if a != str(ckdir) and a != "--checkpoint-dir")
    rc, err = _cli(tmp_path, *base, "--steps", "60", "--resume", str(ckdir), timeout=90)
    assert rc == 0, err
    assert "skipping checkpoint" in err and "'loss'" in err and "resuming from step 20" in err, err
