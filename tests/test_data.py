"""Tests for asyncdni.numerics.data (pure numpy, no network)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from asyncdni.numerics.data import (
    BatchStream,
    DataError,
    Dataset,
    binary_addition,
    binary_addition_split,
    bit_metrics,
    eval_batches,
    load_idx_dir,
    read_idx,
    write_idx,
)

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _decode(bits: np.ndarray) -> np.ndarray:
    """LSB-first 0/1 rows -> Python-int object array (exact for any width)."""
    out = np.zeros(bits.shape[0], dtype=object)
    for i in range(bits.shape[1]):
        out = out + bits[:, i].astype(np.int64).astype(object) * (1 << i)
    return out


def _assert_data_error(fn, *names):
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for name in names:
        assert os.fspath(name) in msg, (name, msg)
    return msg


# --------------------------------------------------------------------------- binary addition


@pytest.mark.parametrize("n_bits", [1, 4, 8, 31, 62])
def test_binary_addition_sums_are_correct(n_bits):
    ds = binary_addition(n_bits, 500, seed=3)
    assert isinstance(ds, Dataset)
    assert len(ds) == 500
    assert ds.task == "bits" and ds.n_out == n_bits + 1
    assert ds.x.shape == (500, 2 * n_bits) and ds.x.dtype == np.float32 and ds.x.flags.c_contiguous
    assert ds.y.shape == (500, n_bits + 1) and ds.y.dtype == np.float32 and ds.y.flags.c_contiguous
    assert set(np.unique(ds.x)) <= {0.0, 1.0} and set(np.unique(ds.y)) <= {0.0, 1.0}
    a = _decode(ds.x[:, :n_bits])
    b = _decode(ds.x[:, n_bits:])
    s = _decode(ds.y)
    assert all(ai + bi == si for ai, bi, si in zip(a, b, s))
    assert all(0 <= v < 2**n_bits for v in a) and all(0 <= v < 2**n_bits for v in b)


def test_binary_addition_lsb_first_hand_case():
    # With 1 bit, rows are exactly (a, b) -> (a+b) with 2 output bits LSB first.
    ds = binary_addition(1, 200, seed=0)
    for (a, b), (s0, s1) in zip(ds.x, ds.y):
        total = int(a) + int(b)
        assert (s0, s1) == (total & 1, total >> 1)
    # all four input combinations show up in 200 draws
    assert {tuple(r) for r in ds.x.astype(int)} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_binary_addition_uses_high_bits():
    ds = binary_addition(62, 200, seed=1)
    assert ds.x[:, 61].any() and ds.x[:, 123].any()


def test_binary_addition_determinism_and_seeds():
    a = binary_addition(8, 100, seed=7)
    b = binary_addition(8, 100, seed=7)
    c = binary_addition(8, 100, seed=8)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)


@pytest.mark.parametrize("n_bits,n", [(0, 10), (63, 10), (-1, 10), (8, 0), (8, -5)])
def test_binary_addition_validation(n_bits, n):
    with pytest.raises(DataError):
        binary_addition(n_bits, n, seed=0)


def test_binary_addition_split():
    tr, te = binary_addition_split(16, 300, 100, seed=5)
    assert len(tr) == 300 and len(te) == 100
    assert tr.n_out == te.n_out == 17
    assert not np.array_equal(tr.x[:100], te.x)
    tr2, te2 = binary_addition_split(16, 300, 100, seed=5)
    np.testing.assert_array_equal(tr.x, tr2.x)
    np.testing.assert_array_equal(te.y, te2.y)
    tr3, _ = binary_addition_split(16, 300, 100, seed=6)
    assert not np.array_equal(tr.x, tr3.x)
    for ds in (tr, te):
        assert all(p + q == r for p, q, r in zip(_decode(ds.x[:, :16]), _decode(ds.x[:, 16:]), _decode(ds.y)))


# --------------------------------------------------------------------------- bit_metrics


def test_bit_metrics_hand_cases():
    targets = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=np.float32)
    logits = np.array(
        [[2.0, -1.0, 0.5],   # all correct
         [-3.0, 0.1, -0.2],  # one wrong
         [1.0, 1.0, -1.0],   # one wrong
         [-1.0, 4.0, -9.0]],  # all correct
        dtype=np.float32,
    )
    m = bit_metrics(logits, targets)
    assert m == {"bit_acc": pytest.approx(10 / 12), "exact_acc": pytest.approx(0.5)}
    # logit exactly 0 counts as predicting 0
    assert bit_metrics(np.zeros((1, 2)), np.array([[0.0, 1.0]])) == {"bit_acc": 0.5, "exact_acc": 0.0}
    probs = np.array([[0.9, 0.2], [0.5, 0.51]])
    t = np.array([[1.0, 0.0], [1.0, 1.0]])
    mp = bit_metrics(probs, t, logits=False)
    assert mp["bit_acc"] == pytest.approx(0.75) and mp["exact_acc"] == pytest.approx(0.5)
    perfect = bit_metrics(targets * 2 - 1, targets)
    assert perfect == {"bit_acc": 1.0, "exact_acc": 1.0}
    assert bit_metrics(1 - targets * 2, targets) == {"bit_acc": 0.0, "exact_acc": 0.0}


def test_bit_metrics_shape_mismatch():
    with pytest.raises(DataError):
        bit_metrics(np.zeros((3, 4)), np.zeros((3, 5)))


# --------------------------------------------------------------------------- IDX read/write


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("shape", [(7,), (4, 3), (2, 3, 5), (2, 1, 2, 3)])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, shape, suffix):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is not None:
        arr = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        arr = (rng.standard_normal(shape) * 1e3).astype(dtype)
    path = tmp_path / f"a-idx{suffix}"
    write_idx(path, arr)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert back.shape == shape
    np.testing.assert_array_equal(back, arr)
    back[...] = 0  # result is writable


def test_idx_header_layout(tmp_path):
    arr = np.array([[1, 2, 3], [4, 5, 256]], dtype=np.int32)
    path = tmp_path / "x.idx"
    write_idx(path, arr)
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 2])
    assert raw[4:12] == (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    assert raw[12:16] == (1).to_bytes(4, "big") and raw[-4:] == (256).to_bytes(4, "big")
    assert len(raw) == 12 + 6 * 4


def test_idx_non_native_input_and_gzip_flag(tmp_path):
    arr = np.arange(6, dtype=">f8").reshape(2, 3)
    p = tmp_path / "big"
    write_idx(p, arr, gzip=True)
    assert p.read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_idx(p), arr)
    p2 = tmp_path / "plain.gz"
    write_idx(p2, arr, gzip=False)
    assert p2.read_bytes()[:2] == b"\x00\x00"
    np.testing.assert_array_equal(read_idx(p2), arr)


def test_idx_gzip_detected_by_magic_not_extension(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    plain = tmp_path / "plain"
    write_idx(plain, arr)
    hidden = tmp_path / "train-images-idx3-ubyte"  # gzip content, no .gz extension
    hidden.write_bytes(gzip.compress(plain.read_bytes()))
    np.testing.assert_array_equal(read_idx(hidden), arr)


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    _assert_data_error(lambda: write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64)), tmp_path / "x")


def _idx_bytes(code, dims, payload):
    return bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_errors(tmp_path, gz):
    def put(name, content):
        p = tmp_path / (name + (".gz" if gz else ""))
        p.write_bytes(gzip.compress(content) if gz else content)
        return p

    missing = tmp_path / "nope-idx"
    assert "no such file" in _assert_data_error(lambda: read_idx(missing), missing)

    p = put("short", b"\x00\x00")
    assert "shorter than" in _assert_data_error(lambda: read_idx(p), p)

    p = put("shortdims", bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big"))
    assert "shorter than" in _assert_data_error(lambda: read_idx(p), p)

    p = put("magic", b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    assert "magic" in _assert_data_error(lambda: read_idx(p), p)

    p = put("code", _idx_bytes(0x0A, [3], b"abc"))
    assert "dtype code" in _assert_data_error(lambda: read_idx(p), p)

    p = put("ndim0", bytes([0, 0, 8, 0]))
    assert "ndim" in _assert_data_error(lambda: read_idx(p), p)

    p = put("trunc", _idx_bytes(0x0C, [2, 3], b"\x00" * 23))
    assert "truncated" in _assert_data_error(lambda: read_idx(p), p)

    p = put("trailing", _idx_bytes(0x08, [2, 3], b"\x00" * 7))
    assert "trailing" in _assert_data_error(lambda: read_idx(p), p)

    # Absurd header: must be refused without trying to allocate it.
    p = put("huge", _idx_bytes(0x0E, [2**32 - 1, 2**32 - 1, 2**32 - 1], b"\x00" * 16))
    assert "bytes" in _assert_data_error(lambda: read_idx(p), p)

    # Header just below the limit but file tiny: truncated, not a MemoryError.
    p = put("big", _idx_bytes(0x08, [2**31], b"\x00" * 10))
    assert "truncated" in _assert_data_error(lambda: read_idx(p), p)


def test_read_idx_corrupt_gzip(tmp_path):
    good = gzip.compress(_idx_bytes(0x08, [1000], bytes(range(256)) * 3 + b"\x01" * 232))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good[: len(good) // 2])
    assert "gzip" in _assert_data_error(lambda: read_idx(cut), cut)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x1f\x8b" + b"\xff" * 40)
    assert "gzip" in _assert_data_error(lambda: read_idx(garbage), garbage)
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    bad = tmp_path / "flipped.gz"
    bad.write_bytes(bytes(flipped))
    _assert_data_error(lambda: read_idx(bad), bad)


def test_read_idx_directory_is_error(tmp_path):
    _assert_data_error(lambda: read_idx(tmp_path), tmp_path)


# --------------------------------------------------------------------------- load_idx_dir


def _write_pair(d: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz=False, style="mnist"):
    ext = ".gz" if gz else ""
    if style == "mnist":
        ip = d / f"{prefix}-images-idx{images.ndim}-ubyte{ext}"
        lp = d / f"{prefix}-labels-idx1-ubyte{ext}"
    else:
        ip = d / f"{prefix}-images.idx{images.ndim}-ubyte{ext}"
        lp = d / f"{prefix}-labels.idx1-ubyte{ext}"
    write_idx(ip, images)
    write_idx(lp, labels)
    return ip, lp


def _unique_images(n, shape, seed=0):
    """uint8 images whose first two pixels encode the row index (so rows are distinct)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = img.reshape(n, -1)
    flat[:, 0] = np.arange(n) % 256
    flat[:, 1] = np.arange(n) // 256
    return img


def test_load_idx_dir_single_pair_split(tmp_path):
    d = tmp_path / "digits"
    d.mkdir()
    n = 1000
    images = _unique_images(n, (4, 6))
    labels = (np.arange(n) % 7).astype(np.uint8)
    _write_pair(d, "t10k", images, labels, gz=True)
    tr, te = load_idx_dir(d, test_fraction=0.25, seed=3)
    assert (len(tr), len(te)) == (750, 250)
    for ds in (tr, te):
        assert ds.task == "classification" and ds.n_out == 7 and ds.name == "digits"
        assert ds.x.dtype == np.float32 and ds.x.shape[1:] == (1, 4, 6) and ds.x.flags.c_contiguous
        assert ds.sample_shape == (1, 4, 6) and ds.n_features == 24      # (N, H, W) images keep their shape
        assert ds.y.dtype == np.int64 and ds.y.ndim == 1
        assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
    # train + test recover all rows exactly once, with matching labels
    both_x = np.concatenate([tr.x, te.x]).reshape(n, -1)
    both_y = np.concatenate([tr.y, te.y])
    row_id = np.rint(both_x[:, 0] * 255).astype(int) + 256 * np.rint(both_x[:, 1] * 255).astype(int)
    assert sorted(row_id.tolist()) == list(range(n))
    order = np.argsort(row_id)
    np.testing.assert_array_equal(both_x[order], images.reshape(n, -1).astype(np.float32) / 255)
    np.testing.assert_array_equal(both_y[order], labels.astype(np.int64))
    # the test indices are the first round(N*f) of default_rng(seed).permutation(N)
    perm = np.random.default_rng(3).permutation(n)
    np.testing.assert_array_equal(row_id[len(tr):], perm[:250])
    np.testing.assert_array_equal(row_id[: len(tr)], perm[250:])
    # deterministic by seed, different with another seed
    tr2, _ = load_idx_dir(d, test_fraction=0.25, seed=3)
    np.testing.assert_array_equal(tr.x, tr2.x)
    tr3, _ = load_idx_dir(d, test_fraction=0.25, seed=4)
    assert not np.array_equal(tr.x, tr3.x)


def test_load_idx_dir_train_only_pair_also_splits(tmp_path):
    _write_pair(tmp_path, "train", _unique_images(50, (3,)), np.arange(50, dtype=np.uint8) % 2, style="dots")
    tr, te = load_idx_dir(tmp_path)
    assert (len(tr), len(te)) == (40, 10)
    assert tr.n_out == 2


def test_load_idx_dir_uses_train_and_test_pairs(tmp_path):
    tr_img = _unique_images(30, (5, 7), seed=1)
    te_img = _unique_images(12, (5, 7), seed=2)
    tr_lab = np.arange(30, dtype=np.uint8) % 3
    te_lab = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5], dtype=np.uint8)
    _write_pair(tmp_path, "train", tr_img, tr_lab)
    _write_pair(tmp_path, "t10k", te_img, te_lab, gz=True)
    tr, te = load_idx_dir(tmp_path, seed=99)
    assert (len(tr), len(te)) == (30, 12)
    assert tr.x.shape == (30, 1, 5, 7) and te.x.shape == (12, 1, 5, 7)  # (N, 5, 7): one channel
    np.testing.assert_array_equal(tr.x, tr_img[:, None].astype(np.float32) / 255)
    np.testing.assert_array_equal(te.x, te_img[:, None].astype(np.float32) / 255)
    np.testing.assert_array_equal(tr.y, tr_lab)
    np.testing.assert_array_equal(te.y, te_lab)
    assert tr.n_out == te.n_out == 6  # max label over both splits + 1


def test_load_idx_dir_case_insensitive_test_prefix_and_float_images(tmp_path):
    img = np.linspace(-2, 3, 4 * 6, dtype=np.float32).reshape(4, 6)
    write_idx(tmp_path / "TRAIN-Images.idx", img)
    write_idx(tmp_path / "Train-LABELS.idx", np.zeros(4, dtype=np.int32))
    write_idx(tmp_path / "test-images.idx.gz", img[:2].astype(np.float64))
    write_idx(tmp_path / "test-labels.idx.gz", np.zeros(2, dtype=np.int16))
    tr, te = load_idx_dir(tmp_path)
    np.testing.assert_array_equal(tr.x, img)  # non-uint8: float32 as is, not scaled
    assert te.x.dtype == np.float32 and len(te) == 2
    assert tr.n_out == 2  # at least 2 even if only label 0 appears


def test_load_idx_dir_errors(tmp_path):
    missing = tmp_path / "absent"
    _assert_data_error(lambda: load_idx_dir(missing), missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _assert_data_error(lambda: load_idx_dir(empty), empty)
    assert "train-images*" in msg and "t10k-labels*" in msg

    # images without labels
    d = tmp_path / "nolabels"
    d.mkdir()
    write_idx(d / "t10k-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8))
    msg = _assert_data_error(lambda: load_idx_dir(d), "t10k-images-idx3-ubyte")
    assert "labels" in msg and "missing" in msg

    # labels without images
    d = tmp_path / "noimages"
    d.mkdir()
    write_idx(d / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    msg = _assert_data_error(lambda: load_idx_dir(d), "train-labels-idx1-ubyte")
    assert "images" in msg and "missing" in msg

    # count mismatch names both files
    d = tmp_path / "mismatch"
    d.mkdir()
    ip, lp = _write_pair(d, "t10k", np.zeros((5, 2, 2), np.uint8), np.zeros(4, np.uint8))
    _assert_data_error(lambda: load_idx_dir(d), ip, lp)

    # bad test_fraction
    ok = tmp_path / "ok"
    ok.mkdir()
    _write_pair(ok, "t10k", _unique_images(20, (2,)), np.arange(20, dtype=np.uint8) % 3)
    for bad in (0, 1, -0.1, 1.5, float("nan")):
        assert "test_fraction" in _assert_data_error(lambda: load_idx_dir(ok, test_fraction=bad), ok)

    # negative labels / non-1-D labels / float labels
    for name, lab in [("neg", np.array([0, -1, 2], np.int8)),
                      ("twod", np.zeros((3, 1), np.uint8)),
                      ("flt", np.zeros(3, np.float32))]:
        d = tmp_path / name
        d.mkdir()
        _, lp = _write_pair(d, "t10k", np.zeros((3, 2), np.uint8), lab)
        _assert_data_error(lambda: load_idx_dir(d), lp)

    # corrupt file inside directory propagates a DataError naming it
    d = tmp_path / "corrupt"
    d.mkdir()
    ip, _ = _write_pair(d, "t10k", np.zeros((3, 2), np.uint8), np.zeros(3, np.uint8))
    ip.write_bytes(ip.read_bytes() + b"\x00")
    _assert_data_error(lambda: load_idx_dir(d), ip)


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"MNIST files not present at {MNIST_DIR}")
def test_real_mnist():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists() or not (MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip(f"MNIST t10k files not present in {MNIST_DIR}")
    tr, te = load_idx_dir(MNIST_DIR, test_fraction=0.2, seed=0)
    assert (len(tr), len(te)) == (8000, 2000)
    for ds in (tr, te):
        assert ds.x.dtype == np.float32 and ds.x.shape[1:] == (1, 28, 28) and ds.x.flags.c_contiguous
        assert ds.n_features == 784
        assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
        assert ds.y.dtype == np.int64 and ds.y.min() >= 0 and ds.y.max() <= 9
        assert ds.n_out == 10 and ds.task == "classification"
    assert set(np.unique(tr.y)) == set(range(10))
    assert tr.x.max() == 1.0  # uint8 255 -> 1.0
    raw = read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    assert raw.shape == (10000, 28, 28) and raw.dtype == np.uint8


# --------------------------------------------------------------------------- batching


def _indexed_dataset(n=103, d=3):
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], d, axis=1)
    y = np.arange(n, dtype=np.int64) % 5
    return Dataset(x=x, y=y, task="classification", n_out=5, name="idx")


def test_batch_stream_epochs_are_permutations():
    ds = _indexed_dataset()
    bs = BatchStream(ds, batch_size=10, seed=1)
    assert bs.steps_per_epoch == 10  # 103 // 10, last partial batch dropped
    orders = []
    for epoch in range(3):
        seen = []
        for k in range(bs.steps_per_epoch):
            x, y = bs.batch(epoch * bs.steps_per_epoch + k)
            assert x.shape == (10, 3) and x.dtype == np.float32 and x.flags.c_contiguous
            assert y.shape == (10,) and y.dtype == np.int64 and y.flags.c_contiguous
            ids = x[:, 0].astype(int)
            np.testing.assert_array_equal(y, ids % 5)  # x and y stay aligned
            seen.extend(ids.tolist())
        assert len(seen) == 100 and len(set(seen)) == 100  # each index at most once
        expected = np.random.default_rng([1, epoch]).permutation(103)[:100]
        np.testing.assert_array_equal(seen, expected)
        orders.append(seen)
    assert orders[0] != orders[1] and orders[1] != orders[2]


def test_batch_stream_full_cover_when_divisible():
    ds = _indexed_dataset(n=60)
    bs = BatchStream(ds, batch_size=12, seed=0)
    ids = np.concatenate([bs.batch(s)[0][:, 0] for s in range(bs.steps_per_epoch)]).astype(int)
    assert sorted(ids.tolist()) == list(range(60))


def test_batch_stream_determinism_and_random_access():
    ds = binary_addition(8, 257, seed=0)
    a = BatchStream(ds, 16, seed=42)
    b = BatchStream(ds, 16, seed=42)
    c = BatchStream(ds, 16, seed=43)
    seq = [a.batch(s) for s in range(3 * a.steps_per_epoch + 5)]
    # random access (jumping across epochs, backwards too) equals sequential access
    for s in [40, 0, 17, 33, 16, 2, 50, 15, 16]:
        xb, yb = b.batch(s)
        np.testing.assert_array_equal(xb, seq[s][0])
        np.testing.assert_array_equal(yb, seq[s][1])
        assert yb.dtype == np.float32 and yb.shape == (16, 9)
    assert not np.array_equal(c.batch(0)[0], seq[0][0])
    # returned arrays are copies: mutating them does not affect the dataset or later batches
    x0, _ = a.batch(0)
    x0[...] = -1
    np.testing.assert_array_equal(a.batch(0)[0], seq[0][0])


def test_batch_stream_validation():
    ds = _indexed_dataset(n=10)
    for bad in (0, -1, 11):
        with pytest.raises(DataError):
            BatchStream(ds, bad, seed=0)
    bs = BatchStream(ds, 10, seed=0)
    assert bs.steps_per_epoch == 1
    with pytest.raises(DataError):
        bs.batch(-1)


def test_eval_batches():
    ds = _indexed_dataset(n=23)
    batches = eval_batches(ds, 5)
    assert [len(x) for x, _ in batches] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), ds.x)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), ds.y)
    assert all(x.flags.c_contiguous and y.flags.c_contiguous for x, y in batches)
    assert len(eval_batches(ds, 100)) == 1
    with pytest.raises(DataError):
        eval_batches(ds, 0)


def test_dataset_basics():
    ds = _indexed_dataset(n=7)
    assert len(ds) == 7
    with pytest.raises(AttributeError):      # dataclasses.FrozenInstanceError
        ds.name = "other"  # frozen
    with pytest.raises(DataError):
        Dataset(x=np.zeros((3, 2), np.float32), y=np.zeros(4, np.int64), task="classification", n_out=2, name="bad")
    with pytest.raises(DataError):
        Dataset(x=np.zeros((3, 2), np.float32), y=np.zeros(3, np.int64), task="regression", n_out=2, name="bad")
