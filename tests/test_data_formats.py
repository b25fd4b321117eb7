"""A user's own data: .npz, .npy and .csv files, images that keep their shape, the
regression task (RMSE and R² over uneven batches), and one clear line for every bad input."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from asyncdni import config
from asyncdni.config import ConfigError
from asyncdni.engine import reference
from asyncdni.engine.plan import load_datasets, make_plan
from asyncdni.numerics import losses
from asyncdni.numerics.data import (MAX_CLASSES, BatchStream, DataError, Dataset, eval_batches, infer_format,
                                    load_csv, load_npy, load_npz)
from asyncdni.numerics.layer import LayerNode, condition_vector
from asyncdni.wire import protocol as P
from tests.conftest import env_with_repo, raises_one_line


def _linear(n=200, d=5, t=1, seed=0, noise=0.05):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    w = rng.standard_normal((d, t))
    y = x @ w + noise * rng.standard_normal((n, t))
    return x, (y[:, 0] if t == 1 else y)


def _write_csv(path, x, y, header=True, names=None):
    d = x.shape[1]
    names = names or [f"f{i}" for i in range(d)] + ["target"]
    lines = [",".join(names)] if header else []
    lines += [",".join(f"{v:.6g}" for v in row) + f",{t:.6g}" for row, t in zip(x, y)]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- formats


def test_npz_loads_splits_and_is_deterministic(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 4))
    x[:, 0] = np.arange(50)                        # a row id, to follow rows through the split
    y = np.arange(50) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    tr, te = load_npz(tmp_path / "d.npz", test_fraction=0.2, seed=5)
    assert (len(tr), len(te)) == (40, 10) and tr.task == te.task == "classification" and tr.n_out == 3
    assert tr.x.dtype == np.float32 and tr.y.dtype == np.int64 and tr.name == "d"
    ids = np.concatenate([tr.x[:, 0], te.x[:, 0]]).astype(int)
    assert sorted(ids) == list(range(50))
    np.testing.assert_array_equal(np.concatenate([tr.y, te.y]), ids % 3)     # rows stay whole
    perm = np.random.default_rng(5).permutation(50)                          # the IDX split, reused
    np.testing.assert_array_equal(te.x[:, 0].astype(int), perm[:10])
    tr2, _ = load_npz(tmp_path / "d.npz", test_fraction=0.2, seed=5)
    np.testing.assert_array_equal(tr.x, tr2.x)


def test_npz_with_its_own_train_and_test_arrays(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "s.npz", x_train=rng.random((30, 3)), y_train=np.arange(30) % 4,
             x_test=rng.random((7, 3)), y_test=np.arange(7) % 6)
    tr, te = load_npz(tmp_path / "s.npz")
    assert (len(tr), len(te)) == (30, 7) and tr.n_out == te.n_out == 6


def test_images_keep_their_shape_and_are_fed_flat_or_shaped(tmp_path):
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (20, 6, 5), dtype=np.uint8)           # (N, H, W) bytes
    np.savez(tmp_path / "img.npz", x=imgs, y=np.arange(20) % 2)
    tr, te = load_npz(tmp_path / "img.npz")
    assert tr.x.shape == (16, 1, 6, 5) and tr.sample_shape == (1, 6, 5) and tr.n_features == 30
    assert tr.x.min() >= 0 and tr.x.max() <= 1                         # bytes scaled as for IDX
    xb, _ = BatchStream(tr, 4, seed=0).batch(0)
    assert xb.shape == (4, 30) and xb.flags.c_contiguous              # the numpy MLP: flat
    xs, _ = BatchStream(tr, 4, seed=0, in_shape=(1, 6, 5)).batch(0)
    np.testing.assert_array_equal(xs.reshape(4, -1), xb)              # the same samples, shaped
    assert [x.shape for x, _ in eval_batches(te, 3, in_shape=(1, 6, 5))] == [(3, 1, 6, 5), (1, 1, 6, 5)]
    raises_one_line(DataError, BatchStream, tr, 4, 0, in_shape=(7, 5), match_all=("(1, 6, 5)", "(7, 5)"))
    # (N, C, H, W) stays as it is; a Dataset given (N, H, W) adds the channel
    np.savez(tmp_path / "rgb.npz", x=rng.random((10, 3, 4, 4)).astype(np.float32), y=np.arange(10) % 2)
    assert load_npz(tmp_path / "rgb.npz")[0].sample_shape == (3, 4, 4)
    ds = Dataset(x=np.zeros((5, 2, 3), np.float32), y=np.zeros(5, np.int64), task="classification", n_out=2, name="d")
    assert ds.x.shape == (5, 1, 2, 3) and ds.n_features == 6


def test_plan_in_shape_is_flat_for_the_numpy_mlp(tmp_path):
    np.savez(tmp_path / "img.npz", x=np.random.default_rng(0).random((40, 5, 4)), y=np.arange(40) % 3)
    cfg = config.build(overrides={"data.path": str(tmp_path / "img.npz"), "train.batch_size": 8, "model.layers": 2,
                                  "model.width": 8, "train.schedule": "backprop"})
    train, test = load_datasets(cfg)
    plan = make_plan(cfg, train)
    assert plan.in_shape == (20,) and plan.in_dim == 20 and plan.specs[0].fan_in == 20
    r = reference.train_reference(plan, "backprop", train, 0, steps=3, test=test)   # fed (B, 20)
    assert r.evals[-1]["n"] == len(test)


def test_npy_pair_regression_and_multi_target(tmp_path):
    x, y = _linear(n=60, t=3)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    tr, te = load_npy(tmp_path / "x.npy", tmp_path / "y.npy")
    assert tr.task == "regression" and tr.n_out == 3 and tr.y.shape == (48, 3) and tr.y.dtype == np.float32
    np.save(tmp_path / "y1.npy", y[:, 0])
    tr, _ = load_npy(tmp_path / "x.npy", tmp_path / "y1.npy")
    assert tr.task == "regression" and tr.n_out == 1 and tr.y.shape == (48, 1)


def test_csv_header_label_column_and_layout(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text('\ufeff"a", b ,y\r\n1,2,0\r\n\r\n3, 4 ,1\r\n"5",6,0\r\n7,8,1\r\n9,10,1\r\n\r\n')
    tr, te = load_csv(p)                              # BOM, quotes, spaces, CRLF, blank lines
    assert tr.task == "classification" and tr.n_out == 2 and tr.sample_shape == (2,) and len(tr) + len(te) == 5
    rows = {tuple(r) for r in np.concatenate([tr.x, te.x]).tolist()}
    assert rows == {(1, 2), (3, 4), (5, 6), (7, 8), (9, 10)}
    for col in ("a", "0", "-3"):                       # by name, by index, from the end
        tr, te = load_csv(p, label_column=col)
        assert sorted(np.concatenate([tr.y, te.y]).tolist()) == [1, 3, 5, 7, 9] and tr.task == "classification"
    q = _write_csv(tmp_path / "nohdr.csv", np.array([[1.5, 2.0], [3.0, 4.0], [5.0, 6.5]]), [0.25, 1.0, 2.0],
                   header=False)
    tr, te = load_csv(q, label_column="1")
    assert tr.task == "regression" and len(tr) + len(te) == 3 and tr.x.shape[1] == 2


@pytest.mark.parametrize("kind,labels,task,want", [
    ("npz", np.array([0, 2, 1, 2] * 5), "auto", "classification"),          # integer dtype
    ("npz", np.array([0., 2., 1., 2.] * 5), "auto", "regression"),           # float dtype: numbers
    ("npz", np.array([0., 2., 1., 2.] * 5), "classification", "classification"),
    ("npz", np.array([0, 2, 1, 2] * 5), "regression", "regression"),
    ("npz", np.array([[0], [2], [1], [2]] * 5), "auto", "classification"),   # (N, 1) integers
    ("csv", np.array([0., 2., 1., 2.] * 5), "auto", "classification"),       # CSV: whole numbers are classes
    ("csv", np.array([0., 2.5, 1., 2.] * 5), "auto", "regression"),
    ("csv", np.array([0., 2., 1., 2.] * 5), "regression", "regression"),
])
def test_task_inference(tmp_path, kind, labels, task, want):
    x = np.random.default_rng(0).random((20, 3))
    if kind == "npz":
        np.savez(tmp_path / "d.npz", x=x, y=labels)
        tr, te = load_npz(tmp_path / "d.npz", task=task)
    else:
        tr, te = load_csv(_write_csv(tmp_path / "d.csv", x, labels), task=task)
    assert tr.task == te.task == want
    assert tr.n_out == (3 if want == "classification" else 1)


def test_dataset_kind_follows_the_suffix(tmp_path):
    assert [infer_format(p) for p in ("a.npz", "B.NPY", "c.csv", "dir", "x.idx", "data.csv.gz")] == \
        ["npz", "npy", "csv", "idx", "idx", "idx"]
    assert config.build(overrides={"data.path": "a.csv"}).data.dataset == "csv"
    assert config.build(overrides={"data.path": "d"}).data.dataset == "idx"
    assert config.build(overrides={"data.path": "a.npy", "data.labels_path": "b.npy"}).data.dataset == "npy"
    assert config.build(overrides={"data.path": "a.npz", "data.dataset": "npz"}).data.dataset == "npz"
    (tmp_path / "r.toml").write_text('[data]\npath = "f.npz"\ntask = "regression"\n')
    cfg = config.build(str(tmp_path / "r.toml"))
    assert (cfg.data.dataset, cfg.data.task) == ("npz", "regression")
    from asyncdni import cli
    args = cli.make_parser().parse_args(["train", "--data-path", "t.csv", "--label-column", "price", "--task",
                                         "regression"])
    ov = cli.overrides_from_args(args)
    assert ov["data.dataset"] == "csv" and ov["data.label_column"] == "price" and ov["data.task"] == "regression"
    # new fields at their defaults leave the digest (and so older checkpoints) as they were
    for f in ("labels_path", "label_column", "task"):
        assert config.DIGEST_OMIT_AT_DEFAULT[f"data.{f}"] == getattr(config.DataConfig(), f)
    assert config.build(overrides={"data.path": "a.csv"}).digest() != config.build(
        overrides={"data.path": "a.csv", "data.task": "regression"}).digest()


@pytest.mark.parametrize("ov,needle", [
    ({"data.dataset": "npy", "data.path": "x.npy"}, "data.labels_path: required"),
    ({"data.dataset": "csv"}, "data.path: required"),
    ({"data.path": "a.csv", "data.labels_path": "y.npy"}, "data.labels_path: only for"),
    ({"data.path": "a.npz", "data.label_column": "3"}, "data.label_column: only for"),
    ({"data.path": "a.csv", "data.task": "bits"}, "data.task: 'bits' is not one of"),
    ({"data.task": "regression"}, "data.task: regression needs data of your own"),
    ({"data.path": "d", "data.task": "regression"}, "data.task: regression needs data of your own"),
])
def test_config_refuses_data_fields_that_do_not_fit(ov, needle):
    raises_one_line(ConfigError, config.build, overrides=ov, match_all=(needle,))


# --------------------------------------------------------------------------- bad input, one line each


def _npz(**arrays):
    return lambda p: np.savez(p, **arrays)


def _text(s: str | bytes):
    return lambda p: p.write_bytes(s if isinstance(s, bytes) else s.encode())


def _pickle_npy(p):
    np.save(p, np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)


def _real_pickle(p):
    import pickle
    p.write_bytes(pickle.dumps([1, 2, 3]))


X4 = np.arange(8.0).reshape(4, 2)
BAD = [
    # (name, file maker or None for a missing file, loader kwargs, substrings of the message)
    ("missing.npz", None, {}, ("missing.npz", "no such file")),
    ("empty.npz", _text(b""), {}, ("empty.npz", "empty file")),
    ("empty.csv", _text(b""), {}, ("empty.csv", "empty file")),
    ("blank.csv", _text("\n\n  \n"), {}, ("blank.csv", "no rows")),
    ("noy.npz", _npz(x=X4), {}, ("noy.npz", "missing array 'y'", "'x'")),
    ("nox.npz", _npz(y=np.arange(4)), {}, ("nox.npz", "missing array 'x'")),
    ("half.npz", _npz(x_train=X4, y_train=np.arange(4), x_test=X4), {}, ("half.npz", "missing array 'y_test'")),
    ("both.npz", _npz(x=X4, y=np.arange(4), x_train=X4, y_train=np.arange(4), x_test=X4, y_test=np.arange(4)), {},
     ("both.npz", "ambiguous")),
    ("objx.npz", _npz(x=np.array([None] * 4, dtype=object), y=np.arange(4)), {}, ("objx.npz", "'x'", "object array")),
    ("objy.npz", _npz(x=X4, y=np.array(["a", 1, None, 2], dtype=object)), {}, ("objy.npz", "'y'", "never pickle")),
    ("pickle.npz", _real_pickle, {}, ("pickle.npz", "pickle", "never loaded")),
    ("text.npz", _text("x,y\n1,2\n"), {}, ("text.npz", "not a NumPy .npy or .npz file")),
    ("trunc.npz", lambda p: (np.savez(p, x=X4, y=np.arange(4)), p.write_bytes(p.read_bytes()[:60])), {},
     ("trunc.npz",)),
    ("strx.npz", _npz(x=np.array([["a", "b"]] * 4), y=np.arange(4)), {}, ("strx.npz", "x is not numeric", "<U1")),
    ("cplx.npz", _npz(x=X4 + 1j, y=np.arange(4)), {}, ("cplx.npz", "x is not numeric")),
    ("stry.npz", _npz(x=X4, y=np.array(["a", "b", "c", "d"])), {}, ("stry.npz", "labels y are not numeric")),
    ("nanx.npz", _npz(x=np.array([[1.0, 2], [3, np.nan], [4, 5], [6, 7]]), y=np.arange(4)), {},
     ("nanx.npz", "non-finite value (nan)", "row 1")),
    ("infy.npz", _npz(x=X4, y=np.array([0.5, 1.5, -np.inf, 2])), {}, ("infy.npz", "non-finite value (-inf)", "row 2")),
    ("big.npz", _npz(x=np.array([[1e300, 1], [1, 1], [1, 1], [1, 1]]), y=np.arange(4)), {},
     ("big.npz", "beyond float32", "row 0")),
    ("rows.npz", _npz(x=X4, y=np.arange(5)), {}, ("rows.npz", "x has 4 rows but y has 5")),
    ("one.npz", _npz(x=X4[:1], y=np.arange(1)), {}, ("one.npz", "1 row(s)", "at least 2")),
    ("scalar.npz", _npz(x=np.float64(3.0), y=np.arange(4)), {}, ("scalar.npz", "x is a single number")),
    ("neg.npz", _npz(x=X4, y=np.array([0, 1, -3, 1])), {}, ("neg.npz", "label -3 in row 2 is negative")),
    ("many.npz", _npz(x=X4, y=np.array([0, 1, MAX_CLASSES, 1])), {},
     ("many.npz", f"label {MAX_CLASSES} in row 2", f"at most {MAX_CLASSES} classes", "--task regression")),
    ("frac.npz", _npz(x=X4, y=np.array([0, 1.5, 2, 1])), {"task": "classification"},
     ("frac.npz", "label 1.5 in row 1 is not a whole number")),
    ("multi.npz", _npz(x=X4, y=np.ones((4, 2), np.int64)), {"task": "classification"},
     ("multi.npz", "one class per sample")),
    ("ragged.csv", _text("a,b,c\n1,2,3\n4,5\n6,7,8\n"), {}, ("ragged.csv", "line 3 has 2 fields but line 1 has 3")),
    ("cell.csv", _text("a,b,c\n1,2,3\n4,five,6\n7,8,9\n"), {}, ("cell.csv", "line 3, column 2 ('b')", "'five'")),
    ("cellnohdr.csv", _text("1,2,3\n4,5,6\n7,8,x9\n"), {}, ("cellnohdr.csv", "line 3, column 3", "'x9'")),
    ("emptycell.csv", _text("a,b,c\n1,,3\n4,5,6\n"), {}, ("emptycell.csv", "line 2, column 2 ('b')")),
    ("nancsv.csv", _text("a,b,c\n1,2,3\n4,nan,6\n7,8,9\n"), {}, ("nancsv.csv", "line 3, column 2", "not a finite")),
    ("infcsv.csv", _text("a,b,c\n1,2,3\n4,5,inf\n"), {}, ("infcsv.csv", "line 3, column 3 ('c')", "not a finite")),
    ("name.csv", _text("a,b,c\n1,2,3\n4,5,6\n"), {"label_column": "price"},
     ("name.csv", "label column 'price' is not in the header", "'a'")),
    ("index.csv", _text("a,b,c\n1,2,3\n4,5,6\n"), {"label_column": "3"},
     ("index.csv", "label column index 3 is out of range", "3 columns")),
    ("noheader.csv", _text("1,2,3\n4,5,6\n"), {"label_column": "c"}, ("noheader.csv", "no header row")),
    ("onecol.csv", _text("a\n1\n2\n"), {}, ("onecol.csv", "single column")),
    ("hdronly.csv", _text("a,b\n"), {}, ("hdronly.csv", "0 data row(s)", "at least 2")),
    ("onerow.csv", _text("a,b\n1,2\n"), {}, ("onerow.csv", "1 data row(s)")),
    ("negcsv.csv", _text("a,y\n1,0\n2,-1\n3,1\n"), {}, ("negcsv.csv", "label -1 in line 3 is negative")),
    ("fraccsv.csv", _text("a,y\n1,0\n2,0.5\n3,1\n"), {"task": "classification"},
     ("fraccsv.csv", "label 0.5 in line 3 is not a whole number")),
    ("latin1.csv", _text(b"a,b\n1,2\n3,\xe9\n"), {}, ("latin1.csv", "not UTF-8")),
]


def _loader(name: str):
    return {"npz": load_npz, "csv": load_csv}[name.rsplit(".", 1)[1]]


@pytest.mark.parametrize("name,make,kw,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_data_error_line(tmp_path, name, make, kw, needles):
    p = tmp_path / name
    if make is not None:
        make(p)
    before = sorted(tmp_path.iterdir())
    raises_one_line(DataError, _loader(name), p, **kw, match_all=needles)
    assert sorted(tmp_path.iterdir()) == before                  # nothing written


def test_bad_npy_pairs(tmp_path):
    x, y = _linear(n=10)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "y9.npy", y[:9])
    np.savez(tmp_path / "z.npz", x=x, y=y)
    np.save(tmp_path / "obj.npy", np.array([None] * 10, dtype=object), allow_pickle=True)
    raises_one_line(DataError, load_npy, tmp_path / "x.npy", tmp_path / "y9.npy", match_all=("y9.npy", "9 rows", "10"))
    raises_one_line(DataError, load_npy, tmp_path / "x.npy", tmp_path / "nope.npy", match_all=("nope.npy", "no such file"))
    raises_one_line(DataError, load_npy, tmp_path / "x.npy", tmp_path / "z.npz", match_all=("z.npz", ".npz archive"))
    raises_one_line(DataError, load_npy, tmp_path / "obj.npy", tmp_path / "y.npy", match_all=("obj.npy", "object array"))
    raises_one_line(DataError, load_npy, tmp_path / "x.npy", "", match_all=("x.npy", "--labels-path"))
    raises_one_line(DataError, load_npz, tmp_path / "x.npy", match_all=("x.npy", "not a .npz archive"))
    raises_one_line(DataError, load_npz, tmp_path, match_all=("directory",))


@pytest.mark.slow
def test_cli_bad_data_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b,y\n1,2,0\n3,oops,1\n")
    proc = subprocess.run([sys.executable, "-m", "asyncdni.cli", "train", "--data-path", "bad.csv", "--no-progress"],
                          cwd=tmp_path, env=env_with_repo(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "asyncdni: error: bad.csv: line 3, column 2 ('b'): 'oops' is not a number "
        "(every cell but the header's must be numeric)"]
    assert proc.stdout == ""


# --------------------------------------------------------------------------- regression


def test_regression_metrics_over_uneven_batches_equal_the_whole_set():
    rng = np.random.default_rng(7)
    n, t = 103, 3
    target = (rng.standard_normal((n, t)) * [1, 10, 0.1] + [5, -3, 0]).astype(np.float32)
    pred = (target + rng.standard_normal((n, t)) * 0.5).astype(np.float32)
    sse = float(np.square(pred.astype(np.float64) - target).sum())
    sst = float(np.square(target - target.astype(np.float64).mean(axis=0)).sum())
    rmse, r2 = math.sqrt(sse / (n * t)), 1 - sse / sst
    parts, start = [], 0
    for size in (10, 37, 1, 55):                       # uneven, one of a single row
        p, y = pred[start:start + size], target[start:start + size]
        loss, _ = losses.compute("mse", p, y)
        m, m2, k = losses.metrics("mse", p, y, "regression")
        parts.append({"loss": loss, "metric": m, "metric2": m2, "n": k})
        start += size
    got = losses.combine(parts, "regression", t, losses.sum_sq_dev(target))
    assert got["n"] == n
    assert got["metric"] == pytest.approx(rmse, rel=1e-5) and got["metric2"] == pytest.approx(r2, rel=1e-5)
    assert got["loss"] == pytest.approx(sse / n, rel=1e-5)
    # the per-batch mean of each batch's own R² is not the test set's R²
    assert abs(sum(p["metric2"] * p["n"] for p in parts) / n - r2) > 1e-3
    whole = losses.metrics("mse", pred, target, "regression")
    assert whole[:2] == pytest.approx((rmse, r2), rel=1e-5)
    # constant targets: R² is 1 for a perfect fit, else 0; a NaN error reads as infinitely bad
    assert losses.r2(0.0, 0.0) == 1.0 and losses.r2(1.0, 0.0) == 0.0
    assert losses.rmse(float("nan"), 3, 1) == math.inf and losses.r2(float("nan"), 2.0) == -math.inf


def test_reference_evaluation_does_not_depend_on_the_eval_batch(tmp_path):
    x, y = _linear(n=150, t=2)
    np.savez(tmp_path / "r.npz", x=x, y=y)
    cfg = config.build(overrides={"data.path": str(tmp_path / "r.npz"), "train.batch_size": 16, "model.layers": 2,
                                  "model.width": 8, "train.schedule": "backprop"})
    train, test = load_datasets(cfg)
    plan = make_plan(cfg, train)
    nodes = reference.train_reference(plan, "backprop", train, 0, steps=20).nodes
    a = reference.evaluate(nodes, plan.loss, test, 7, plan.in_shape)
    b = reference.evaluate(nodes, plan.loss, test, 1000, plan.in_shape)
    assert a["n"] == b["n"] == 30
    for k in ("loss", "metric", "metric2"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k


def _regression_dataset(n=64, d=4, t=2):
    x, y = _linear(n=n, d=d, t=t)
    return Dataset(x=x.astype(np.float32), y=y.astype(np.float32), task="regression", n_out=t, name="reg")


def test_make_plan_for_regression():
    train = _regression_dataset()
    cfg = config.build(overrides={"train.batch_size": 8, "model.layers": 3, "model.width": 8})
    plan = make_plan(cfg, train)
    assert plan.loss == "mse" and plan.task == "regression" and plan.n_out == 2
    assert plan.specs[-1].activation == "linear" and plan.specs[-1].fan_out == 2
    assert plan.specs[0].aux_loss == "mse"
    for loss in ("softmax_ce", "sigmoid_bce"):
        raises_one_line(ConfigError, make_plan, config.build(overrides={"train.loss": loss, "train.batch_size": 8}),
                        train, match_all=("train.loss", loss, "regression targets"))
    raises_one_line(ConfigError, make_plan, config.build(overrides={"train.target_accuracy": 0.9,
                                                                    "train.batch_size": 8}),
                    train, match_all=("train.target_accuracy", "regression"))
    # the bits task keeps its sigmoid last layer under mse
    from asyncdni.numerics.data import binary_addition
    bits = make_plan(config.build(overrides={"train.loss": "mse"}), binary_addition(4, 256, 0))
    assert bits.specs[-1].activation == "sigmoid"


def test_regression_conditions_on_the_targets_and_trains_every_arithmetic():
    train = _regression_dataset(n=64)
    y = train.y[:8]
    np.testing.assert_array_equal(condition_vector("regression", 2, y), y)
    for schedule in ("async", "backprop", "local"):
        cfg = config.build(overrides={"train.batch_size": 8, "model.layers": 3, "model.width": 8,
                                      "train.schedule": schedule, "train.aux_features": 4})
        plan = make_plan(cfg, train)
        nodes = [LayerNode(s) for s in plan.specs]
        assert nodes[0].sg is None or nodes[0].sg.params[0].shape[0] in (8 + 2, 8)   # cond: 2 target inputs
        r = reference.train_reference(plan, "dni" if schedule == "async" else schedule, train, 0, steps=5,
                                      nodes=nodes)
        assert len(r.losses) == 5 and all(np.isfinite(r.losses))
        if schedule == "local":
            assert all(len(n.aux_recent) == 5 for n in nodes[:-1])     # RMSE of the aux heads
            assert reference.aux_metrics(nodes, train, 16)[0] >= 0


def test_in_process_regression_learns():
    x, y = _linear(n=800, d=6, seed=4)
    ds = Dataset(x=x.astype(np.float32), y=y.astype(np.float32)[:, None], task="regression", n_out=1, name="lin")
    cfg = config.build(overrides={"train.batch_size": 32, "model.layers": 3, "model.width": 32, "train.lr": 3e-3,
                                  "train.schedule": "backprop"})
    plan = make_plan(cfg, ds)
    r = reference.train_reference(plan, "backprop", ds, 0, steps=300, test=ds)
    assert r.evals[-1]["metric2"] > 0.95 and r.evals[-1]["metric"] < 0.3 * y.std()


def test_report_labels_regression_metrics():
    from asyncdni import report
    assert report.metric_names("regression") == ("RMSE", "R²")
    assert report.metric_names("classification") == ("accuracy", "accuracy")
    assert report.format_metric("regression", 0.123456) == "0.1235"
    assert report.format_metric("classification", 0.5) == "50.00%"
    extra = report.layer_extras([{"layer": 1, "aux_train_metric": 0.25}], "regression")
    assert extra == ["layer 1: aux head train RMSE 0.25"]


# --------------------------------------------------------------------------- wire


def _result(kind, **fields):
    """A DONE / EVAL_RESULT as a peer could send it (encode itself refuses what no task allows)."""
    import msgpack
    base = {"loss": 1.0, "n": 4, **({"eid": 0} if kind == P.EVAL_RESULT else {})}
    return [msgpack.packb({"v": P.PROTOCOL_VERSION, "k": kind, "s": 0, "a": [], "f": base | fields})]


@pytest.mark.parametrize("kind", [P.DONE, P.EVAL_RESULT])
def test_metric_ranges_follow_the_task(kind):
    acc, reg = P.result_expect(regression=False), P.result_expect(regression=True)
    P.decode(_result(kind, metric=0.5, metric2=1.0), expect=acc)
    P.decode(_result(kind, metric=3.5, metric2=-2.0), expect=reg)           # an RMSE, a poor R²
    P.decode(_result(kind, metric=math.inf, metric2=-math.inf), expect=reg)  # a diverged model is still a number
    for frames, expect in [(_result(kind, metric=3.5, metric2=0.5), acc), (_result(kind, metric=0.5, metric2=-0.1), acc),
                           (_result(kind, metric=0.5, metric2=1.5), reg), (_result(kind, metric=-1.0, metric2=0.5), reg)]:
        with pytest.raises(P.ProtocolError) as ei:
            P.decode(frames, expect=expect)
        assert ei.value.reason == "range"
    with pytest.raises(P.ProtocolError):                                     # NaN is never a metric
        P.decode(_result(kind, metric=float("nan"), metric2=0.5), expect=reg)


def test_layer_expectations_for_shaped_input_and_targets():
    fwd, _ = P.layer_expect(12, 8, classes=None, targets=2, batch=4, eval_batch=8, in_shape=(3, 2, 2))
    x, y = np.zeros((4, 3, 2, 2), np.float32), np.full((4, 2), 123.5, np.float32)
    P.decode(P.encode(P.FWD, 0, (x, y)), expect=fwd)                         # regression targets: any finite
    for bad in (np.zeros((4, 12), np.float32), np.zeros((4, 3, 4), np.float32)):
        with pytest.raises(P.ProtocolError) as ei:
            P.decode(P.encode(P.FWD, 0, (bad, y)), expect=fwd)
        assert ei.value.reason == "shape"
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(P.encode(P.FWD, 0, (x, y.astype(np.float64))), expect=fwd)
    assert ei.value.reason == "dtype"
    bad_y = y.copy()
    bad_y[1, 1] = np.inf
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(P.encode(P.FWD, 0, (x, bad_y)), expect=fwd, check_finite=True)
    assert ei.value.reason == "nonfinite"
    bits, _ = P.layer_expect(6, 8, classes=None, targets=2, batch=4, eval_batch=8, target_range=(0.0, 1.0))
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(P.encode(P.FWD, 0, (np.zeros((4, 6), np.float32), np.full((4, 2), 2.0, np.float32))), expect=bits)
    assert ei.value.reason == "range"


# --------------------------------------------------------------------------- end to end, real workers


def _e2e(**ov):
    return config.build(overrides={"runtime.progress": False, "model.layers": 3, "model.width": 64, **ov})


@pytest.mark.parametrize("schedule", ["async", "backprop"])
@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_leftover_processes")
def test_csv_regression_learns_through_the_workers(tmp_path, schedule):
    from asyncdni import report
    from asyncdni.engine import coordinator
    x, y = _linear(n=2000, d=8, seed=11, noise=0.1)
    path = _write_csv(tmp_path / "lin.csv", x, y)
    cfg = _e2e(**{"data.path": str(path), "train.steps": 300, "train.lr": 2e-3, "train.sg_lr": 3e-3, "train.schedule": schedule})
    r = coordinator.run(cfg)
    assert r.plan.task == "regression" and r.plan.loss == "mse" and r.plan.widths == (8, 64, 64, 1)
    ev = r.final_eval
    assert ev["n"] == 400 and ev["metric2"] > 0.9, ev            # R² on the test set
    assert ev["metric"] < 0.35 * y.std()                          # RMSE, in the targets' units
    train, test = load_datasets(cfg)                              # the same weights untrained: nowhere near
    untrained = reference.train_reference(make_plan(cfg, train), "backprop", train, 0, steps=0, test=test)
    assert untrained.evals[-1]["metric2"] < 0.5
    text = report.format_summary(report.run_summary(r))
    assert "test RMSE" in text and "test R²" in text and "accuracy" not in text


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_leftover_processes")
def test_npz_images_classify_through_the_workers(tmp_path):
    from asyncdni.engine import coordinator
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    images = (rng.random((600, 4, 5)) * 60).astype(np.uint8)
    images[np.arange(600), labels, 0] = 255                       # learnable: a bright pixel per class
    np.savez(tmp_path / "img.npz", x=images, y=labels)
    cfg = _e2e(**{"data.path": str(tmp_path / "img.npz"), "train.steps": 300, "train.lr": 3e-3,
                  "model.width": 32, "train.schedule": "backprop"})
    r = coordinator.run(cfg)
    assert r.plan.in_shape == (20,) and r.plan.n_out == 3 and r.plan.task == "classification"
    assert r.final_eval["n"] == 120 and r.final_eval["metric"] > 0.8
    assert sum(sum(L["rejected"].values()) for L in r.layers) == 0


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.parametrize("schedule,ref_schedule", [("pipeline", "pipeline"), ("sequential", "dni")])
def test_regression_over_sockets_matches_the_in_process_reference(tmp_path, schedule, ref_schedule):
    """Two targets, micro-batches, uneven evaluation batches: the workers' weights, per-step
    losses and test RMSE / R² are the reference's."""
    from asyncdni.engine import coordinator
    x, y = _linear(n=300, d=5, t=2, seed=3)
    np.savez(tmp_path / "r.npz", x=x, y=y)
    cfg = _e2e(**{"data.path": str(tmp_path / "r.npz"), "train.steps": 30, "model.width": 16,
                  "train.schedule": schedule, "train.microbatches": 3, "train.eval_batch": 23, "train.seed": 2})
    r = coordinator.run(cfg)
    train, test = load_datasets(cfg)
    ref = reference.train_reference(make_plan(cfg, train), ref_schedule, train, cfg.train.seed, test=test,
                                    eval_batch=cfg.train.eval_batch)
    for i, node in enumerate(ref.nodes):
        for name, want in node.params().items():
            assert np.allclose(r.params[i][name], want, rtol=1e-5, atol=1e-6), (i, name)
    assert np.allclose(ref.losses, r.series["loss"], rtol=1e-5)
    for k in ("loss", "metric", "metric2"):
        assert r.final_eval[k] == pytest.approx(ref.evals[-1][k], rel=1e-4), k
    assert r.final_eval["n"] == 60
