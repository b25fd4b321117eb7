"""Tests for asyncdni.engine.checkpoint: atomic npz files, LayerNode state, manifests, recovery, pruning."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from tests.conftest import raises_one_line
from asyncdni.engine import checkpoint as ck
from asyncdni.engine.checkpoint import CheckpointError
from asyncdni.numerics.layer import LayerNode, LayerSpec

DIGEST = "0123456789abcdef"


def _raises(fn, *args, match_all=(), **kwargs) -> str:
    """Call fn, expect CheckpointError with a one-line message containing every item."""
    return raises_one_line(CheckpointError, fn, *args, match_all=match_all, **kwargs)


def _listing(d):
    return sorted(p.name for p in d.iterdir())


# ------------------------------------------------------------------- names
def test_names():
    assert ck.FORMAT == "asyncdni-checkpoint" and ck.VERSION == 1
    assert ck.step_dir("/r", 120).as_posix() == "/r/step-000000120"
    assert ck.step_dir("/r", 0).name == "step-000000000"
    assert ck.layer_file(0) == "layer-1.npz"
    assert ck.layer_file(11) == "layer-12.npz"
    with pytest.raises(ValueError):
        ck.step_dir("/r", -1)
    with pytest.raises(ValueError):
        ck.layer_file(-1)
    assert issubclass(CheckpointError, RuntimeError)


# ------------------------------------------------------------------ arrays
def _sample_arrays():
    rng = np.random.default_rng(0)
    return {
        "W": rng.standard_normal((4, 3)).astype(np.float32),
        "b": np.arange(3, dtype=np.float64),
        "opt.t": np.array(7, dtype=np.int64),           # 0-d
        "scalar_f": np.array(2.5, dtype=np.float32),    # 0-d float
        "counters": np.array([1, 2, 3], dtype=np.int64),
        "mask": np.array([True, False, True]),
        "small": np.array([[1, 2], [3, 4]], dtype=np.int8),
        "half": np.array([0.5, -1.0], dtype=np.float16),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((3, 2))),
        "text": np.array(["ab", "c"]),
    }


def test_round_trip_dtypes(tmp_path):
    arrays = _sample_arrays()
    path = tmp_path / "sub" / "dir" / "layer-1.npz"        # parents are created
    entry = ck.write_arrays(path, arrays)
    assert path.is_file()
    assert entry["bytes"] == path.stat().st_size
    import hashlib
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    back = ck.read_arrays(path, expected=entry)
    assert set(back) == set(arrays)
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype, k
        assert back[k].shape == a.shape, k
        assert np.array_equal(back[k], a), k
        assert back[k].flags.writeable and not isinstance(back[k], np.memmap)
    assert back["opt.t"].shape == () and int(back["opt.t"]) == 7
    # no temp files left behind
    assert _listing(path.parent) == ["layer-1.npz"]
    # it is a plain npz: numpy itself reads it without pickle
    with np.load(path, allow_pickle=False) as z:
        assert np.array_equal(z["W"], arrays["W"])


def test_same_arrays_same_bytes(tmp_path):
    a = ck.write_arrays(tmp_path / "a.npz", _sample_arrays())
    b = ck.write_arrays(tmp_path / "b.npz", _sample_arrays())
    assert a == b


def test_returned_arrays_are_copies(tmp_path):
    path = tmp_path / "x.npz"
    entry = ck.write_arrays(path, {"W": np.ones((2, 2), np.float32)})
    back = ck.read_arrays(path, entry)
    back["W"][0, 0] = 5.0
    assert ck.read_arrays(path, entry)["W"][0, 0] == 1.0


def test_replace_existing_file(tmp_path):
    path = tmp_path / "layer-1.npz"
    ck.write_arrays(path, {"W": np.zeros(3)})
    e2 = ck.write_arrays(path, {"W": np.ones(3), "b": np.ones(1)})
    back = ck.read_arrays(path, e2)
    assert set(back) == {"W", "b"} and np.array_equal(back["W"], np.ones(3))
    assert _listing(tmp_path) == ["layer-1.npz"]


def test_crash_during_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "layer-1.npz"
    old = ck.write_arrays(path, {"W": np.zeros(3)})
    old_bytes = path.read_bytes()

    def boom(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(CheckpointError, match="cannot write .*layer-1.npz: simulated crash"):
        ck.write_arrays(path, {"W": np.ones(1000)})
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert np.array_equal(ck.read_arrays(path, old)["W"], np.zeros(3))
    assert _listing(tmp_path) == ["layer-1.npz"]          # temp file cleaned up


def test_crash_during_write_leaves_no_final_file(tmp_path, monkeypatch):
    path = tmp_path / "layer-2.npz"
    seen = []
    real_write_array = np.lib.format.write_array

    def half_write(fp, arr, *a, **kw):
        # the temp file exists while writing, hidden, in the same directory
        seen.extend(p.name for p in tmp_path.iterdir())
        real_write_array(fp, arr, *a, **kw)
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(np.lib.format, "write_array", half_write)
    with pytest.raises(KeyboardInterrupt):
        ck.write_arrays(path, {"W": np.ones(10), "b": np.ones(2)})
    monkeypatch.undo()
    assert seen and all(n.startswith(".") and n.endswith(".tmp") for n in seen)
    assert not path.exists()
    assert _listing(tmp_path) == []


def test_write_rejects_object_and_bad_names(tmp_path):
    path = tmp_path / "x.npz"
    _raises(ck.write_arrays, path, {"o": np.array([{"a": 1}], dtype=object)}, match_all=("x.npz", "object"))
    _raises(ck.write_arrays, path, {"a/b": np.zeros(1)}, match_all=("x.npz", "a/b"))
    _raises(ck.write_arrays, path, {"": np.zeros(1)}, match_all=("x.npz",))
    assert not path.exists()
    # names that would clash with np.savez's own arguments are fine
    e = ck.write_arrays(path, {"file": np.zeros(1), "allow_pickle": np.ones(1)})
    assert set(ck.read_arrays(path, e)) == {"file", "allow_pickle"}


def test_read_errors(tmp_path):
    path = tmp_path / "layer-2.npz"
    entry = ck.write_arrays(path, {"W": np.arange(100, dtype=np.float64)})
    data = path.read_bytes()

    _raises(ck.read_arrays, tmp_path / "layer-9.npz", match_all=("layer-9.npz", "missing"))

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    _raises(ck.read_arrays, path, entry, match_all=("layer-2.npz", "checksum mismatch"))

    path.write_bytes(data[:-10])
    _raises(ck.read_arrays, path, entry, match_all=("layer-2.npz", "size mismatch"))
    _raises(ck.read_arrays, path, match_all=("layer-2.npz", "cannot be loaded"))   # unchecked: load fails

    path.write_bytes(b"not a zip at all")
    _raises(ck.read_arrays, path, match_all=("layer-2.npz",))

    np.save(tmp_path / "plain.npy", np.zeros(3))
    _raises(ck.read_arrays, tmp_path / "plain.npy", match_all=("plain.npy", "not an npz"))


def test_read_refuses_pickled_arrays(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, o=np.array([{"a": 1}], dtype=object))    # written with pickle by numpy itself
    _raises(ck.read_arrays, path, match_all=("evil.npz", "cannot be loaded"))


# -------------------------------------------------------------- node state
BASE_SPEC = LayerSpec(index=1, n_layers=3, fan_in=6, fan_out=5, activation="relu", init="he",
                      loss="softmax_ce", task="classification", n_out=3, optimizer="adam", lr=1e-2,
                      sg_model="linear", sg_hidden=0, sg_lr=1e-2, cond=True, microbatches=1, seed=0)


def _dni_step(node, step, rng):
    s = node.spec
    x = rng.standard_normal((8, s.fan_in)).astype(np.float32)
    y = rng.integers(0, s.n_out, 8)
    node.dni_forward(step, x, y)
    if node.sg is not None and step in node.cache:     # --sg-every: only the regressed steps get a gradient
        node.sg_update(step, rng.standard_normal((8, s.fan_out)).astype(np.float32) * 0.1)


def _all_state(node):
    return ck.node_state(node)


def _assert_same_node(a, b):
    sa, sb = _all_state(a), _all_state(b)
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert np.array_equal(sa[k], sb[k]), k


def _assert_differ(a, b):
    sa, sb = _all_state(a), _all_state(b)
    assert not all(np.array_equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("changes", [
    {},                                                    # adam + linear SG (conditioned)
    {"sg_model": "mlp", "sg_hidden": 7},                   # mlp SG
    {"sg_model": "lowrank", "sg_rank": 3},                 # low-rank SG (its random V is state too)
    {"sg_model": "lowrank", "sg_rank": 2, "sg_every": 2},  # ... regressed every other step
    {"optimizer": "momentum"},                             # momentum
    {"optimizer": "sgd", "sg_model": "mlp", "cond": False},
    {"index": 2},                                          # last layer: no SG
    {"batch_norm": True},                                  # batch normalisation: gamma, beta, running stats
    {"batch_norm": True, "index": 2},                      # the last layer does not normalise
])
def test_restore_continues_exactly(tmp_path, changes):
    spec = dataclasses.replace(BASE_SPEC, **changes)
    a = LayerNode(spec)
    rng = np.random.default_rng(42)
    for step in range(4):
        _dni_step(a, step, rng)
    assert not a.cache

    state = ck.node_state(a)
    dense_keys = {"W", "bn.gamma", "bn.beta", "bn.mean", "bn.var"} if spec.has_bn else {"W", "b"}
    expected_keys = dense_keys | {"counters"} | {f"opt.{k}" for k in a.opt.state()}
    if spec.is_last:
        assert a.sg is None
        assert not any(k.startswith(("sg.", "sgopt.")) for k in state)
    else:
        expected_keys |= {f"sg.{i}" for i in range(len(a.sg.params))}
        expected_keys |= {f"sgopt.{k}" for k in a.sg_opt.state()}
    assert set(state) == expected_keys
    assert state["counters"].dtype == np.int64
    assert state["counters"].tolist() == [a.fwd_steps, a.updates, a.sg_updates]
    assert int(state["opt.t"]) == 4

    # node_state returns copies: stepping A later does not change the saved state
    path = tmp_path / ck.layer_file(spec.index)
    entry = ck.write_arrays(path, state)

    b = LayerNode(dataclasses.replace(spec, seed=123))
    _assert_differ(a, b)
    b.cache[99] = "stale"                                 # in-flight steps are dropped on restore
    ck.restore_node(b, ck.read_arrays(path, entry))
    assert b.cache == {}
    _assert_same_node(a, b)
    assert (b.fwd_steps, b.updates, b.sg_updates) == (a.fwd_steps, a.updates, a.sg_updates)

    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    for step in range(4, 7):
        _dni_step(a, step, rng_a)
        _dni_step(b, step, rng_b)
    _assert_same_node(a, b)
    assert b.opt.t == a.opt.t == 7
    # the optimizer still updates the node's own parameter arrays (restore was in place)
    assert b.opt.params[0] is b.dense.W
    if spec.has_bn:
        assert b.opt.params[1] is b.dense.bn.gamma and b.opt.params[2] is b.dense.bn.beta
        assert not np.array_equal(state["bn.mean"], 0) and not np.array_equal(state["bn.var"], 1)
    if b.sg is not None:
        assert all(p is q for p, q in zip(b.sg_opt.params, b.sg.params))
    # and A moved on from the saved state, which stayed as it was
    assert not np.array_equal(a.dense.W, state["W"])


def test_node_state_is_a_copy():
    a = LayerNode(BASE_SPEC)
    rng = np.random.default_rng(0)
    _dni_step(a, 0, rng)
    state = ck.node_state(a)
    saved = {k: v.copy() for k, v in state.items()}
    _dni_step(a, 1, rng)
    for k in state:
        assert np.array_equal(state[k], saved[k]), k


def test_restore_errors():
    a = LayerNode(BASE_SPEC)
    state = ck.node_state(a)
    b = LayerNode(dataclasses.replace(BASE_SPEC, seed=5))
    W_before = b.dense.W.copy()

    bad = dict(state)
    del bad["opt.m0"]
    _raises(ck.restore_node, b, bad, match_all=("layer 2", "opt.m0"))

    bad = dict(state, W=np.zeros((6, 4), np.float32))
    _raises(ck.restore_node, b, bad, match_all=("layer 2", "'W'", "(6, 4)", "(6, 5)"))

    bad = dict(state, **{"sg.0": np.zeros((4, 4), np.float32)})
    _raises(ck.restore_node, b, bad, match_all=("sg.0", "(4, 4)", "(5, 5)"))

    bad = dict(state, b=state["b"].astype(np.float64))
    _raises(ck.restore_node, b, bad, match_all=("'b'", "float64", "float32"))

    # a checkpoint from a layer with an SG model does not fit the last layer (no SG)
    last = LayerNode(dataclasses.replace(BASE_SPEC, index=2))
    _raises(ck.restore_node, last, state, match_all=("layer 3", "unexpected", "sg.0"))
    # an unconditioned SG has no C matrix: missing key
    uncond = LayerNode(dataclasses.replace(BASE_SPEC, cond=False))
    _raises(ck.restore_node, uncond, state, match_all=("unexpected", "sg.2"))
    # nothing was changed by the failed restores
    assert np.array_equal(b.dense.W, W_before)


def test_restore_refuses_bad_batchnorm_state():
    spec = dataclasses.replace(BASE_SPEC, batch_norm=True)
    a = LayerNode(spec)
    rng = np.random.default_rng(3)
    for step in range(2):
        _dni_step(a, step, rng)
    state = ck.node_state(a)
    b = LayerNode(dataclasses.replace(spec, seed=9))
    before = ck.node_state(b)
    bad = dict(state, **{"bn.var": np.ones(4, np.float32)})
    _raises(ck.restore_node, b, bad, match_all=("layer 2", "'bn.var'", "(4,)", "(5,)"))
    bad = dict(state)
    del bad["bn.mean"]
    _raises(ck.restore_node, b, bad, match_all=("layer 2", "bn.mean"))
    nan = state["bn.mean"].copy()
    nan[2] = np.nan
    _raises(ck.restore_node, b, dict(state, **{"bn.mean": nan}), match_all=("non-finite", "'bn.mean'"))
    inf = state["bn.gamma"].copy()
    inf[0] = np.inf
    _raises(ck.restore_node, b, dict(state, **{"bn.gamma": inf}), match_all=("non-finite", "'bn.gamma'"))
    _raises(ck.restore_node, b, dict(state, **{"bn.var": -state["bn.var"]}),
            match_all=("bn.var", "negative"))
    # a layer with batch normalisation does not fit one without, nor the other way round
    _raises(ck.restore_node, LayerNode(BASE_SPEC), state, match_all=("no 'b'",))
    _raises(ck.restore_node, b, ck.node_state(LayerNode(BASE_SPEC)), match_all=("no 'bn.gamma'",))
    after = ck.node_state(b)                                # nothing was changed by the failed restores
    assert all(np.array_equal(before[k], after[k]) for k in before)
    ck.restore_node(b, state)
    _assert_same_node(a, b)


def test_node_state_refuses_partial_pipeline_step():
    spec = dataclasses.replace(BASE_SPEC, microbatches=2)
    node = LayerNode(spec)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    h, _, _ = node.bp_forward(0, x, None)
    node.bp_backward(0, np.ones_like(h))
    _raises(ck.node_state, node, match_all=("layer 2", "between steps"))
    h, _, _ = node.bp_forward(1, x, None)
    node.bp_backward(1, np.ones_like(h))
    assert node.step_complete
    ck.node_state(node)


# ------------------------------------------------------------ manifests
def _make_checkpoint(root, step, n_layers=3, digest=DIGEST, extra=None, commit=True):
    d = ck.step_dir(root, step)
    files = {}
    for i in range(n_layers):
        name = ck.layer_file(i)
        files[name] = ck.write_arrays(d / name, {"W": np.full((2, 3), step + i, np.float32),
                                                 "counters": np.array([step, step, 0], np.int64)})
    if commit:
        ck.write_manifest(root, step, digest, n_layers, files, extra)
    return d


def test_manifest_contents(tmp_path):
    d = _make_checkpoint(tmp_path, 120, extra={"data_cursor": 7, "note": "x"}, commit=False)
    files = {ck.layer_file(i): {"sha256": ck._sha256_file(d / ck.layer_file(i)),
                                "bytes": (d / ck.layer_file(i)).stat().st_size} for i in range(3)}
    path = ck.write_manifest(tmp_path, 120, DIGEST, 3, files, {"data_cursor": 7})
    assert path == tmp_path / "step-000000120" / "manifest.json"
    m = json.loads(path.read_text())
    assert m["format"] == "asyncdni-checkpoint" and m["version"] == 1
    assert m["step"] == 120 and m["config_digest"] == DIGEST and m["n_layers"] == 3
    assert m["files"] == files
    assert isinstance(m["created"], float) and m["extra"] == {"data_cursor": 7}
    assert _listing(d) == ["layer-1.npz", "layer-2.npz", "layer-3.npz", "manifest.json"]

    c = ck.validate(d, DIGEST, 3)
    assert c == ck.Checkpoint(step=120, directory=d, config_digest=DIGEST, n_layers=3,
                              files=files, extra={"data_cursor": 7})
    assert c.layer_path(1) == d / "layer-2.npz"
    assert np.array_equal(ck.read_arrays(c.layer_path(1), c.files["layer-2.npz"])["W"],
                          np.full((2, 3), 121, np.float32))
    assert np.array_equal(c.read_layer(2)["W"], np.full((2, 3), 122, np.float32))
    assert ck.validate(d, None, None).step == 120


def test_write_manifest_refuses_inconsistent(tmp_path):
    d = _make_checkpoint(tmp_path, 5, commit=False)
    files = {ck.layer_file(i): {"sha256": ck._sha256_file(d / ck.layer_file(i)),
                                "bytes": (d / ck.layer_file(i)).stat().st_size} for i in range(3)}
    _raises(ck.write_manifest, tmp_path, 5, DIGEST, 4, files, match_all=("layer-4.npz",))
    bad = dict(files, **{"layer-1.npz": dict(files["layer-1.npz"], bytes=1)})
    _raises(ck.write_manifest, tmp_path, 5, DIGEST, 3, bad, match_all=("layer-1.npz", "bytes"))
    bad = dict(files, **{"../evil.npz": files["layer-1.npz"]})
    _raises(ck.write_manifest, tmp_path, 5, DIGEST, 3, bad, match_all=("invalid file name",))
    _raises(ck.write_manifest, tmp_path, 5, DIGEST, 3, files, {"x": object()}, match_all=("JSON",))
    assert not (d / "manifest.json").exists()
    # atomic: a crash before the rename leaves no manifest and no temp file
    real = os.replace
    try:
        os.replace = lambda a, b: (_ for _ in ()).throw(OSError("crash"))
        with pytest.raises(CheckpointError, match="cannot write .*manifest.json"):
            ck.write_manifest(tmp_path, 5, DIGEST, 3, files)
    finally:
        os.replace = real
    assert _listing(d) == ["layer-1.npz", "layer-2.npz", "layer-3.npz"]
    _raises(ck.validate, d, DIGEST, 3, match_all=("incomplete",))


def _corrupt_cases():
    def truncate(d):
        p = d / "layer-2.npz"
        p.write_bytes(p.read_bytes()[:-7])

    def flip(d):
        p = d / "layer-2.npz"
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0x01
        p.write_bytes(bytes(b))

    def delete_layer(d):
        (d / "layer-3.npz").unlink()

    def delete_manifest(d):
        (d / "manifest.json").unlink()

    def garbage_manifest(d):
        (d / "manifest.json").write_text("{not json")

    def edit(**kv):
        def f(d):
            m = json.loads((d / "manifest.json").read_text())
            for k, v in kv.items():
                if v is KeyError:
                    del m[k]
                else:
                    m[k] = v
            (d / "manifest.json").write_text(json.dumps(m))
        return f

    def drop_entry(d):
        m = json.loads((d / "manifest.json").read_text())
        del m["files"]["layer-2.npz"]
        (d / "manifest.json").write_text(json.dumps(m))

    return [
        ("truncate", truncate, ("layer-2.npz", "size mismatch")),
        ("flip", flip, ("layer-2.npz", "checksum mismatch")),
        ("delete_layer", delete_layer, ("layer-3.npz", "missing")),
        ("delete_manifest", delete_manifest, ("step-000000010", "incomplete")),
        ("garbage_manifest", garbage_manifest, ("manifest.json", "not valid JSON")),
        ("array_manifest", lambda d: (d / "manifest.json").write_text("[1, 2]"), ("manifest.json", "not a JSON object")),
        ("wrong_format", edit(format="something-else"), ("manifest.json", "format")),
        ("wrong_version", edit(version=2), ("manifest.json", "version 2", "newer")),
        ("missing_key", edit(n_layers=KeyError), ("manifest.json", "missing key", "n_layers")),
        ("wrong_type", edit(step="10"), ("manifest.json", "'step'")),
        ("bad_files", edit(files=[]), ("manifest.json", "'files'")),
        ("step_mismatch", edit(step=11), ("step-000000010", "step in manifest (11)", "directory name (10)")),
        ("no_entry", drop_entry, ("step-000000010", "layer-2.npz")),
    ]


@pytest.mark.parametrize("name,corrupt,words", _corrupt_cases(), ids=[c[0] for c in _corrupt_cases()])
def test_validate_detects_corruption(tmp_path, name, corrupt, words):
    d = _make_checkpoint(tmp_path, 10)
    ck.validate(d, DIGEST, 3)
    corrupt(d)
    _raises(ck.validate, d, DIGEST, 3, match_all=words)


def test_validate_checks_run_identity(tmp_path):
    d = _make_checkpoint(tmp_path, 10)
    _raises(ck.validate, d, "ffffffffffffffff", 3,
            match_all=("step-000000010", "made by a different configuration", DIGEST, "ffffffffffffffff"))
    _raises(ck.validate, d, DIGEST, 4, match_all=("step-000000010", "3 layers", "4"))
    _raises(ck.validate, tmp_path / "step-000000011", DIGEST, 3, match_all=("step-000000011", "not a directory"))
    renamed = tmp_path / "copy-of-step"
    d.rename(renamed)
    _raises(ck.validate, renamed, DIGEST, 3, match_all=("copy-of-step", "name"))


def test_find_latest(tmp_path):
    _make_checkpoint(tmp_path, 10)
    _make_checkpoint(tmp_path, 20)
    c, skipped = ck.find_latest(tmp_path, DIGEST, 3)
    assert c.step == 20 and skipped == []

    # newer ones: corrupt, incomplete, another configuration
    d30 = _make_checkpoint(tmp_path, 30)
    p = d30 / "layer-1.npz"
    b = bytearray(p.read_bytes())
    b[-5] ^= 0xFF
    p.write_bytes(bytes(b))
    _make_checkpoint(tmp_path, 40, commit=False)
    _make_checkpoint(tmp_path, 50, digest="ffffffffffffffff")
    # noise that must be ignored
    (tmp_path / "step-000000060.tmp").mkdir()
    (tmp_path / ".step-000000070").mkdir()
    (tmp_path / "step-00000008").mkdir()                 # not 9 digits
    (tmp_path / "step-000000090").write_text("a file")   # not a directory
    (tmp_path / "notes.txt").write_text("hi")

    c, skipped = ck.find_latest(tmp_path, DIGEST, 3)
    assert c.step == 20 and c.directory == tmp_path / "step-000000020"
    assert len(skipped) == 3
    assert "step-000000050" in skipped[0] and "different configuration" in skipped[0]
    assert "step-000000040" in skipped[1] and "incomplete" in skipped[1]
    assert "step-000000030" in skipped[2] and "layer-1.npz" in skipped[2] and "checksum mismatch" in skipped[2]
    assert all("\n" not in s for s in skipped)

    # without a digest, 50 is the latest
    assert ck.find_latest(tmp_path, None, None)[0].step == 50
    # a different layer count: none valid
    msg = _raises(ck.find_latest, tmp_path, DIGEST, 4, match_all=(str(tmp_path), "no usable checkpoint"))
    for s in ("step-000000050", "step-000000040", "step-000000030", "step-000000020", "step-000000010"):
        assert s in msg


def test_find_latest_empty_and_missing(tmp_path):
    _raises(ck.find_latest, tmp_path / "nope", DIGEST, 3, match_all=("nope", "does not exist"))
    _raises(ck.find_latest, tmp_path, DIGEST, 3, match_all=("no checkpoints in", str(tmp_path)))
    _make_checkpoint(tmp_path, 1, commit=False)
    _raises(ck.find_latest, tmp_path, DIGEST, 3, match_all=("no usable checkpoint", "incomplete"))


def test_high_step_numbers_sort_numerically(tmp_path):
    _make_checkpoint(tmp_path, 999_999_999, n_layers=1)
    _make_checkpoint(tmp_path, 1_000_000_000, n_layers=1)
    assert ck.step_dir(tmp_path, 1_000_000_000).name == "step-1000000000"
    assert ck.find_latest(tmp_path, DIGEST, 1)[0].step == 1_000_000_000


# ------------------------------------------------------------------ prune
def test_prune(tmp_path):
    for s in (10, 20, 30, 40):
        _make_checkpoint(tmp_path, s, n_layers=2)
    _make_checkpoint(tmp_path, 5, n_layers=2, commit=False)     # old incomplete
    _make_checkpoint(tmp_path, 25, n_layers=2, commit=False)    # incomplete between complete ones
    d15 = _make_checkpoint(tmp_path, 15, n_layers=2)            # old corrupt
    (d15 / "layer-2.npz").unlink()
    _make_checkpoint(tmp_path, 50, n_layers=2, commit=False)    # newer than all complete: in progress
    (tmp_path / "unrelated").mkdir()

    deleted = ck.prune(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["step-000000025", "step-000000020", "step-000000015",
                                         "step-000000010", "step-000000005"]
    assert _listing(tmp_path) == ["step-000000030", "step-000000040", "step-000000050", "unrelated"]
    assert ck.find_latest(tmp_path, DIGEST, 2)[0].step == 40
    assert ck.prune(tmp_path, keep=2) == []

    # keep < 1 still never deletes the newest complete checkpoint
    deleted = ck.prune(tmp_path, keep=0)
    assert [p.name for p in deleted] == ["step-000000030"]
    assert _listing(tmp_path) == ["step-000000040", "step-000000050", "unrelated"]
    assert ck.find_latest(tmp_path, DIGEST, 2)[0].step == 40


def test_prune_counts_other_configurations_as_complete(tmp_path):
    _make_checkpoint(tmp_path, 1, digest="aaaa")
    _make_checkpoint(tmp_path, 2, digest="bbbb")
    deleted = ck.prune(tmp_path, keep=1)
    assert [p.name for p in deleted] == ["step-000000001"]


def test_prune_without_complete_deletes_nothing(tmp_path):
    _make_checkpoint(tmp_path, 1, commit=False)
    _make_checkpoint(tmp_path, 2, commit=False)
    assert ck.prune(tmp_path, keep=1) == []
    assert _listing(tmp_path) == ["step-000000001", "step-000000002"]
    _raises(ck.prune, tmp_path / "missing", 1, match_all=("missing",))


def test_prune_leaves_other_configurations_alone(tmp_path):
    def fake(step, digest):
        d = ck.step_dir(tmp_path, step)
        files = {ck.layer_file(0): ck.write_arrays(d / ck.layer_file(0), {"x": np.arange(3)})}
        ck.write_manifest(tmp_path, step, digest, 1, files)
    for step in (800, 900, 1000):
        fake(step, "other")
    fake(100, "mine")
    assert ck.prune(tmp_path, 3, "mine") == []
    assert ck.validate(ck.step_dir(tmp_path, 100), "mine", 1).step == 100
    assert {p.name for p in tmp_path.iterdir()} == {"step-000000100", "step-000000800", "step-000000900",
                                                    "step-000001000"}
    fake(200, "mine")
    fake(300, "mine")
    fake(400, "mine")
    deleted = ck.prune(tmp_path, 3, "mine")
    assert [p.name for p in deleted] == ["step-000000100"]
    assert ck.has_checkpoints(tmp_path) and not ck.has_checkpoints(tmp_path / "nope")
