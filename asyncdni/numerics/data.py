"""Datasets for asyncdni: synthetic binary addition and IDX (MNIST-style) files.

Pure numpy + stdlib.  Public API:

* :class:`DataError`, :class:`Dataset`
* :func:`binary_addition`, :func:`binary_addition_split`, :func:`bit_metrics`
* :func:`read_idx`, :func:`write_idx`, :func:`load_idx_dir`
* :class:`BatchStream`, :func:`eval_batches`
"""

from __future__ import annotations

import gzip as _gzip
import math
import operator
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "Dataset",
    "binary_addition",
    "binary_addition_split",
    "bit_metrics",
    "read_idx",
    "write_idx",
    "load_idx_dir",
    "BatchStream",
    "eval_batches",
]

TASKS = ("classification", "bits")

# IDX dtype code -> big-endian numpy dtype
_IDX_CODES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# native dtype -> IDX dtype code (for writing)
_IDX_CODE_OF = {dt.newbyteorder("="): code for code, dt in _IDX_CODES.items()}

# Refuse headers whose data would need more than this many bytes.
MAX_IDX_BYTES = 2**34
# Labels are class indices 0 .. MAX_CLASSES-1: the last layer has one output per class, and
# a label-conditioned SG model one input per class, so a stray huge label would make the
# network huge. A label beyond this is a damaged file, refused at load.
MAX_CLASSES = 10_000

_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """Bad/missing dataset; message names the file and the problem, one line."""


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _err(path, problem: str) -> DataError:
    return DataError(_one_line(f"{os.fspath(path)}: {problem}"))


def _as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise DataError(f"{what} must be an integer, got {value!r}") from None


# --------------------------------------------------------------------------- Dataset


@dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory dataset.

    x: float32, C-contiguous, shape (N, D).
    y: classification -> int64 shape (N,); bits -> float32 shape (N, n_out) of 0/1.
    """

    x: np.ndarray
    y: np.ndarray
    task: str
    n_out: int
    name: str

    def __post_init__(self):
        if self.task not in TASKS:
            raise DataError(f"dataset {self.name!r}: task must be one of {TASKS}, got {self.task!r}")
        if not isinstance(self.x, np.ndarray) or self.x.ndim != 2:
            raise DataError(f"dataset {self.name!r}: x must be a 2-D array (N, D)")
        if not isinstance(self.y, np.ndarray) or len(self.y) != len(self.x):
            raise DataError(f"dataset {self.name!r}: x and y must have the same number of rows")
        if self.task == "classification" and self.y.ndim != 1:
            raise DataError(f"dataset {self.name!r}: classification y must be 1-D (N,)")
        if self.task == "bits" and (self.y.ndim != 2 or self.y.shape[1] != self.n_out):
            raise DataError(f"dataset {self.name!r}: bits y must have shape (N, n_out={self.n_out})")
        if self.n_out < 1:
            raise DataError(f"dataset {self.name!r}: n_out must be >= 1")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.x.shape[1])


# --------------------------------------------------------------------------- binary addition


def _to_bits(values: np.ndarray, n_bits: int) -> np.ndarray:
    shifts = np.arange(n_bits, dtype=np.int64)
    return ((values[:, None] >> shifts) & 1).astype(np.float32)


def _binary_addition(n_bits, n_samples, seed_material, name: str) -> Dataset:
    n_bits = _as_int(n_bits, "n_bits")
    n_samples = _as_int(n_samples, "n_samples")
    if not 1 <= n_bits <= 62:
        raise DataError(f"binary_addition: n_bits must be in [1, 62], got {n_bits}")
    if n_samples < 1:
        raise DataError(f"binary_addition: n_samples must be >= 1, got {n_samples}")
    rng = np.random.default_rng(seed_material)
    a = rng.integers(0, 2**n_bits, size=n_samples, dtype=np.int64)
    b = rng.integers(0, 2**n_bits, size=n_samples, dtype=np.int64)
    x = np.ascontiguousarray(np.concatenate([_to_bits(a, n_bits), _to_bits(b, n_bits)], axis=1))
    y = np.ascontiguousarray(_to_bits(a + b, n_bits + 1))
    return Dataset(x=x, y=y, task="bits", n_out=n_bits + 1, name=name)


def binary_addition(n_bits: int, n_samples: int, seed: int) -> Dataset:
    """Random n_bits-bit additions a+b.

    x = bits of a then bits of b (LSB first), float32 (N, 2*n_bits);
    y = bits of a+b (LSB first), float32 (N, n_bits+1).
    """
    return _binary_addition(n_bits, n_samples, seed, f"binary_addition_{n_bits}")


def binary_addition_split(n_bits: int, n_train: int, n_test: int, seed: int) -> tuple[Dataset, Dataset]:
    """Train/test binary-addition sets from independent streams default_rng([seed, 0]) / [seed, 1].

    The two sets are drawn independently, so (for small n_bits) they may share (a, b) pairs.
    """
    train = _binary_addition(n_bits, n_train, [seed, 0], f"binary_addition_{n_bits}")
    test = _binary_addition(n_bits, n_test, [seed, 1], f"binary_addition_{n_bits}")
    return train, test


def bit_metrics(pred_logits_or_probs_bits: np.ndarray, targets: np.ndarray, logits: bool = True) -> dict:
    """{"bit_acc": fraction of bits correct, "exact_acc": fraction of rows with every bit correct}.

    Predictions are thresholded at logits > 0 (or probs > 0.5 when logits=False);
    targets are 0/1 (thresholded at 0.5). Rows are along axis 0.
    """
    pred = np.asarray(pred_logits_or_probs_bits)
    tgt = np.asarray(targets)
    if pred.shape != tgt.shape:
        raise DataError(f"bit_metrics: predictions shape {pred.shape} != targets shape {tgt.shape}")
    if pred.ndim < 1 or pred.shape[0] == 0 or pred.size == 0:
        raise DataError(f"bit_metrics: need at least one row of bits, got shape {pred.shape}")
    pred_bits = pred > 0 if logits else pred > 0.5
    correct = pred_bits == (tgt > 0.5)
    rows = correct.reshape(correct.shape[0], -1)
    return {"bit_acc": float(rows.mean()), "exact_acc": float(rows.all(axis=1).mean())}


# --------------------------------------------------------------------------- IDX files


def _read_exact(f, n: int) -> bytes:
    """Read up to n bytes (fewer only at EOF), looping over short reads."""
    chunks = []
    remaining = n
    while remaining > 0:
        chunk = f.read(min(remaining, 1 << 26))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_idx_stream(f, path, plain_size: int | None) -> np.ndarray:
    header = _read_exact(f, 4)
    if len(header) < 4:
        raise _err(path, f"file shorter than the IDX header ({len(header)} bytes, need at least 4)")
    if header[0] != 0 or header[1] != 0:
        raise _err(path, f"bad IDX magic: first two bytes are {header[:2].hex()} (expected 0000)")
    code, ndim = header[2], header[3]
    if code not in _IDX_CODES:
        raise _err(path, f"bad IDX magic: unknown dtype code 0x{code:02x}")
    if ndim == 0:
        raise _err(path, "bad IDX magic: ndim is 0")
    dim_bytes = _read_exact(f, 4 * ndim)
    if len(dim_bytes) < 4 * ndim:
        raise _err(path, f"file shorter than the IDX header ({4 + len(dim_bytes)} bytes, need {4 + 4 * ndim} for {ndim} dims)")
    dims = tuple(int.from_bytes(dim_bytes[4 * i:4 * i + 4], "big") for i in range(ndim))
    dtype = _IDX_CODES[code]
    expected = math.prod(dims) * dtype.itemsize
    if expected > MAX_IDX_BYTES:
        raise _err(path, f"IDX header dims {dims} would need {expected} bytes (limit {MAX_IDX_BYTES}); refusing")
    header_len = 4 + 4 * ndim
    if plain_size is not None and plain_size != header_len + expected:
        actual = plain_size - header_len
        kind = "truncated" if actual < expected else "trailing extra bytes"
        raise _err(path, f"data length mismatch ({kind}): header {dims} {dtype.name} needs {expected} bytes, file has {actual}")
    data = _read_exact(f, expected)
    if len(data) < expected:
        raise _err(path, f"data length mismatch (truncated): header {dims} {dtype.name} needs {expected} bytes, file has {len(data)}")
    if f.read(1):
        raise _err(path, f"data length mismatch (trailing extra bytes): header {dims} {dtype.name} needs {expected} bytes, file has more")
    arr = np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))
    return arr.reshape(dims)


def read_idx(path) -> np.ndarray:
    """Read an IDX file (plain or gzip, detected by magic bytes) into a native-endian array."""
    p = Path(path)
    if not p.exists():
        raise _err(p, "no such file")
    if not p.is_file():
        raise _err(p, "not a regular file")
    try:
        with open(p, "rb") as raw:
            is_gz = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if not is_gz:
                return _read_idx_stream(raw, p, os.fstat(raw.fileno()).st_size)
            try:
                with _gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                    return _read_idx_stream(gz, p, None)
            except (EOFError, zlib.error, _gzip.BadGzipFile) as exc:
                raise _err(p, f"unreadable/corrupt gzip data ({type(exc).__name__}: {exc})") from None
    except DataError:
        raise
    except OSError as exc:
        raise _err(p, f"cannot read ({exc.strerror or exc})") from None


def write_idx(path, array: np.ndarray, gzip: bool | None = None) -> None:
    """Write `array` as an IDX file; gzip-compressed if `gzip` (default: path ends with .gz)."""
    p = Path(path)
    arr = np.asarray(array)
    code = _IDX_CODE_OF.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise _err(p, f"cannot write dtype {arr.dtype} as IDX (supported: uint8, int8, int16, int32, float32, float64)")
    if not 1 <= arr.ndim <= 255:
        raise _err(p, f"cannot write a {arr.ndim}-D array as IDX (need 1..255 dims)")
    if any(d >= 2**32 for d in arr.shape):
        raise _err(p, f"dimension too large for IDX: {arr.shape}")
    if gzip is None:
        gzip = str(p).lower().endswith(".gz")
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = np.ascontiguousarray(arr, dtype=_IDX_CODES[code]).tobytes()
    if gzip:
        with open(p, "wb") as raw, _gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            gz.write(header)
            gz.write(payload)
    else:
        with open(p, "wb") as f:
            f.write(header)
            f.write(payload)


# --------------------------------------------------------------------------- IDX directories

_SPLIT_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}


def _find_one(directory: Path, files: list[str], prefixes, kind: str) -> Path | None:
    wanted = tuple(f"{pre}-{kind}" for pre in prefixes)
    hits = sorted(name for name in files if name.lower().startswith(wanted))
    if len(hits) > 1:
        raise _err(directory, f"ambiguous: several files match {'/'.join(w + '*' for w in wanted)}: {', '.join(hits)}")
    return directory / hits[0] if hits else None


def _load_images(path: Path) -> np.ndarray:
    img = read_idx(path)
    n = img.shape[0]
    if n == 0:
        raise _err(path, "images file holds no samples (N = 0)")
    flat = img.reshape(n, -1) if img.ndim > 1 else img.reshape(n, 1)
    if flat.shape[1] == 0:
        raise _err(path, f"images have zero features (shape {img.shape})")
    if img.dtype == np.uint8:
        x = flat.astype(np.float32) / np.float32(255.0)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            x = flat.astype(np.float32)
        if not np.isfinite(np.add.reduce(x, axis=None)) and not np.isfinite(x).all():
            i = int(np.flatnonzero(~np.isfinite(x))[0])
            value = img.reshape(-1)[i]
            what = f"non-finite value {value}" if not np.isfinite(value) else f"value {value} (beyond float32)"
            at = tuple(int(v) for v in np.unravel_index(i, img.shape))
            raise _err(path, f"{what} at index {at[0] if len(at) == 1 else at} (sample {i // flat.shape[1]}); "
                             "images must hold finite numbers")
    return np.ascontiguousarray(x, dtype=np.float32)


def _load_labels(path: Path, n_images: int, images_path: Path) -> np.ndarray:
    lab = read_idx(path)
    if lab.ndim != 1:
        raise _err(path, f"labels must be a 1-D array, got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise _err(path, f"labels must be integers, got dtype {lab.dtype}")
    if lab.shape[0] != n_images:
        raise _err(path, f"has {lab.shape[0]} labels but images file {os.fspath(images_path)} has {n_images} images")
    bad = np.flatnonzero((lab < 0) | (lab >= MAX_CLASSES))
    if bad.size:
        i = int(bad[0])
        raise _err(path, f"label {int(lab[i])} at index {i} is not a class index: labels must be "
                         f"0..{MAX_CLASSES - 1} (at most {MAX_CLASSES} classes)")
    return np.ascontiguousarray(lab.astype(np.int64))


def load_idx_dir(directory, test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Load a classification dataset from a directory of IDX files (MNIST layout).

    Uses train-* and t10k-*/test-* pairs when both exist; with exactly one pair,
    splits it with a permutation from default_rng(seed): the first
    round(N*test_fraction) permuted indices are test, the rest train.
    """
    d = Path(directory)
    if not d.exists():
        raise _err(d, "no such directory")
    if not d.is_dir():
        raise _err(d, "not a directory")
    try:
        tf = float(test_fraction)
    except (TypeError, ValueError):
        raise _err(d, f"test_fraction must be a number in (0, 1), got {test_fraction!r}") from None
    if not 0.0 < tf < 1.0:
        raise _err(d, f"test_fraction must be in (0, 1), got {test_fraction!r}")
    try:
        files = sorted(e.name for e in os.scandir(d) if e.is_file())
    except OSError as exc:
        raise _err(d, f"cannot list directory ({exc.strerror or exc})") from None

    pairs: dict[str, tuple[Path, Path]] = {}
    for split, prefixes in _SPLIT_PREFIXES.items():
        img = _find_one(d, files, prefixes, "images")
        lab = _find_one(d, files, prefixes, "labels")
        if img is not None and lab is None:
            raise _err(d, f"found images file {img.name} but its labels file ({'/'.join(p + '-labels*' for p in prefixes)}) is missing")
        if lab is not None and img is None:
            raise _err(d, f"found labels file {lab.name} but its images file ({'/'.join(p + '-images*' for p in prefixes)}) is missing")
        if img is not None:
            pairs[split] = (img, lab)

    if not pairs:
        looked = ", ".join(f"{p}-{k}*" for ps in _SPLIT_PREFIXES.values() for p in ps for k in ("images", "labels"))
        raise _err(d, f"no IDX image/label pair found (looked for {looked}, case-insensitive)")

    loaded = {}
    for split, (img_path, lab_path) in pairs.items():
        x = _load_images(img_path)
        y = _load_labels(lab_path, x.shape[0], img_path)
        loaded[split] = (x, y)

    if len(loaded) == 2:
        (x_tr, y_tr), (x_te, y_te) = loaded["train"], loaded["test"]
        if x_tr.shape[1] != x_te.shape[1]:
            raise _err(d, f"train images {pairs['train'][0].name} have {x_tr.shape[1]} features "
                          f"but test images {pairs['test'][0].name} have {x_te.shape[1]}")
    else:
        (split,) = loaded
        x, y = loaded[split]
        n = x.shape[0]
        n_test = int(round(n * tf))
        if n_test < 1 or n_test > n - 1:
            raise _err(pairs[split][0], f"splitting {n} samples with test_fraction={tf} leaves an empty train or test set")
        perm = np.random.default_rng(seed).permutation(n)
        te_idx, tr_idx = perm[:n_test], perm[n_test:]
        x_tr, y_tr = np.ascontiguousarray(x[tr_idx]), np.ascontiguousarray(y[tr_idx])
        x_te, y_te = np.ascontiguousarray(x[te_idx]), np.ascontiguousarray(y[te_idx])

    n_out = max(int(y_tr.max()) + 1, int(y_te.max()) + 1, 2)
    name = d.resolve().name
    train = Dataset(x=x_tr, y=y_tr, task="classification", n_out=n_out, name=name)
    test = Dataset(x=x_te, y=y_te, task="classification", n_out=n_out, name=name)
    return train, test


# --------------------------------------------------------------------------- batching


class BatchStream:
    """Reproducible shuffled mini-batches over epochs; drops the last partial batch of each epoch."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int):
        batch_size = _as_int(batch_size, "batch_size")
        n = len(dataset)
        if batch_size < 1 or batch_size > n:
            raise DataError(f"dataset {dataset.name!r}: batch_size must be in [1, {n}], got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = n // batch_size
        self._x = np.ascontiguousarray(dataset.x, dtype=np.float32)
        self._y = dataset.y
        self._epoch: int | None = None
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of `epoch` (cached for the most recent epoch)."""
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            self._epoch = epoch
        return self._perm

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        step = _as_int(step, "step")
        if step < 0:
            raise DataError(f"dataset {self.dataset.name!r}: step must be >= 0, got {step}")
        epoch, k = divmod(step, self.steps_per_epoch)
        idx = self.permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        return np.ascontiguousarray(self._x[idx]), np.ascontiguousarray(self._y[idx])


def eval_batches(dataset: Dataset, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The whole dataset in order, in contiguous chunks of batch_size (the last may be smaller)."""
    batch_size = _as_int(batch_size, "batch_size")
    if batch_size < 1:
        raise DataError(f"dataset {dataset.name!r}: batch_size must be >= 1, got {batch_size}")
    x = np.ascontiguousarray(dataset.x, dtype=np.float32)
    y = dataset.y
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(dataset), batch_size)]
