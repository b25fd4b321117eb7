"""Datasets for asyncdni: synthetic binary addition, IDX (MNIST-style) files, and a
user's own arrays in .npz, .npy or .csv files.

Pure numpy + stdlib (never pickle: every np.load has allow_pickle=False).  Public API:

* :class:`DataError`, :class:`Dataset`
* :func:`binary_addition`, :func:`binary_addition_split`, :func:`bit_metrics`
* :func:`read_idx`, :func:`write_idx`, :func:`load_idx_dir`
* :func:`load_npz`, :func:`load_npy`, :func:`load_csv`, :func:`infer_format`, :func:`split_arrays`
* :class:`BatchStream`, :func:`eval_batches`, :func:`input_shape`
"""

from __future__ import annotations

import csv as _csv
import gzip as _gzip
import math
import operator
import os
import zipfile
import zlib
from dataclasses import dataclass, replace
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
    "load_npz",
    "load_npy",
    "load_csv",
    "infer_format",
    "split_arrays",
    "input_shape",
    "BatchStream",
    "eval_batches",
]

TASKS = ("classification", "bits", "regression")
TASK_CHOICES = ("auto", "classification", "regression")   # what a user's own labels may be read as
FORMATS = {".npz": "npz", ".npy": "npy", ".csv": "csv"}  # file suffix -> dataset kind

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


def even_ranges(n: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous [start, stop) ranges covering 0..n, as equal as can be (the first
    ``n % k`` one longer): micro-batches of a batch, stages of a model's blocks."""
    base, extra = divmod(n, k)
    out, start = [], 0
    for j in range(k):
        stop = start + base + (1 if j < extra else 0)
        out.append((start, stop))
        start = stop
    return out


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

    x: float32, C-contiguous, shape (N, D) or, for images, (N, C, H, W); an (N, H, W) array
       becomes (N, 1, H, W). ``sample_shape`` is x's shape without N, ``n_features`` its size.
    y: classification -> int64 shape (N,); bits -> float32 shape (N, n_out) of 0/1;
       regression -> float32 shape (N, n_out) (n_out targets per row).
    """

    x: np.ndarray
    y: np.ndarray
    task: str
    n_out: int
    name: str
    # how the train/test split was made (SPLITS): "fraction" (held out of one set with
    # test_fraction and the data seed), "files" (separate test files or arrays), "generated"
    # (drawn apart: binary addition); "" when not said
    split: str = ""

    def __post_init__(self):
        if self.task not in TASKS:
            raise DataError(f"dataset {self.name!r}: task must be one of {TASKS}, got {self.task!r}")
        if not isinstance(self.x, np.ndarray) or self.x.ndim not in (2, 3, 4):
            raise DataError(f"dataset {self.name!r}: x must be a 2-D (N, D) or image (N, C, H, W) array")
        if self.x.ndim == 3:                           # (N, H, W): one channel
            object.__setattr__(self, "x", self.x[:, None])
        if not isinstance(self.y, np.ndarray) or len(self.y) != len(self.x):
            raise DataError(f"dataset {self.name!r}: x and y must have the same number of rows")
        if self.task == "classification" and self.y.ndim != 1:
            raise DataError(f"dataset {self.name!r}: classification y must be 1-D (N,)")
        if self.task == "bits" and (self.y.ndim != 2 or self.y.shape[1] != self.n_out):
            raise DataError(f"dataset {self.name!r}: bits y must have shape (N, n_out={self.n_out})")
        if self.task == "regression" and (self.y.ndim != 2 or self.y.shape[1] != self.n_out
                                          or self.y.dtype != np.float32):
            raise DataError(f"dataset {self.name!r}: regression y must be float32 of shape (N, n_out={self.n_out})")
        if self.n_out < 1:
            raise DataError(f"dataset {self.name!r}: n_out must be >= 1")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: (D,) or (C, H, W)."""
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def n_features(self) -> int:
        return math.prod(self.sample_shape)


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
    return replace(train, split="generated"), replace(test, split="generated")


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
    return np.ascontiguousarray(x, dtype=np.float32).reshape(_kept_shape(img.shape))


def _kept_shape(shape: tuple) -> tuple:
    """The array shape a dataset keeps for samples of ``shape`` (N first): (N,) -> (N, 1);
    (N, D) and (N, C, H, W) as they are; (N, H, W) -> (N, 1, H, W); more dims -> (N, D)."""
    n = shape[0]
    if len(shape) == 1:
        return (n, 1)
    if len(shape) == 3:
        return (n, 1, *shape[1:])
    if len(shape) in (2, 4):
        return tuple(shape)
    return (n, math.prod(shape[1:]))


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
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise _err(d, f"train images {pairs['train'][0].name} have shape {x_tr.shape[1:]} per sample "
                          f"but test images {pairs['test'][0].name} have {x_te.shape[1:]}")
    else:
        (split,) = loaded
        x_tr, y_tr, x_te, y_te = split_arrays(*loaded[split], tf, seed, pairs[split][0])

    n_out = max(int(y_tr.max()) + 1, int(y_te.max()) + 1, 2)
    name = d.resolve().name
    split = "files" if len(loaded) == 2 else "fraction"
    train = Dataset(x=x_tr, y=y_tr, task="classification", n_out=n_out, name=name, split=split)
    test = Dataset(x=x_te, y=y_te, task="classification", n_out=n_out, name=name, split=split)
    return train, test


def split_arrays(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, path):
    """One array set -> (x_train, y_train, x_test, y_test): the first round(N*test_fraction)
    indices of a permutation from default_rng(seed) are test, the rest train."""
    n = x.shape[0]
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n_test > n - 1:
        raise _err(path, f"splitting {n} samples with test_fraction={test_fraction} leaves an empty train or test set")
    perm = np.random.default_rng(seed).permutation(n)
    te_idx, tr_idx = perm[:n_test], perm[n_test:]
    return (np.ascontiguousarray(x[tr_idx]), np.ascontiguousarray(y[tr_idx]),
            np.ascontiguousarray(x[te_idx]), np.ascontiguousarray(y[te_idx]))


# --------------------------------------------------------------------------- a user's own arrays

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_NPZ_SINGLE = ("x", "y")
_NPZ_PAIRS = ("x_train", "y_train", "x_test", "y_test")


def infer_format(path) -> str:
    """The dataset kind of a path, from its suffix (any case): .npz -> "npz", .npy -> "npy",
    .csv -> "csv"; anything else -> "idx" (a directory of IDX files)."""
    return FORMATS.get(Path(os.fspath(path)).suffix.lower(), "idx")


def _check_file(path) -> Path:
    """A path that names a regular, non-empty file, or a DataError saying why not."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise _err(p, "no such file") from None
    except OSError as exc:
        raise _err(p, f"cannot read ({exc.strerror or exc})") from None
    if not p.is_file():
        raise _err(p, "is a directory, not a file" if p.is_dir() else "not a regular file")
    if st.st_size == 0:
        raise _err(p, "empty file (0 bytes)")
    return p


def _check_fraction(path, test_fraction) -> float:
    try:
        tf = float(test_fraction)
    except (TypeError, ValueError):
        raise _err(path, f"test_fraction must be a number in (0, 1), got {test_fraction!r}") from None
    if not 0.0 < tf < 1.0:
        raise _err(path, f"test_fraction must be in (0, 1), got {test_fraction!r}")
    return tf


def _check_task(task: str) -> str:
    if task not in TASK_CHOICES:
        raise DataError(f"task must be one of {', '.join(TASK_CHOICES)}, got {task!r}")
    return task


def _np_load(p: Path):
    """np.load without pickle: an ndarray (.npy) or an NpzFile (.npz); every failure one DataError."""
    try:
        with open(p, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise _err(p, f"cannot read ({exc.strerror or exc})") from None
    if head[:1] == b"\x80":
        raise _err(p, "is a Python pickle, not a .npy/.npz file: pickles are never loaded (save arrays with np.save or np.savez)")
    if head != _NPY_MAGIC and head[:4] not in _ZIP_MAGICS:
        raise _err(p, "not a NumPy .npy or .npz file (it starts with neither the .npy magic nor a zip header)")
    try:
        return np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise _err(p, _np_problem(exc)) from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise _err(p, f"unreadable or truncated .npy/.npz file ({type(exc).__name__}: {exc})") from None


def _np_problem(exc: Exception, what: str = "") -> str:
    msg = str(exc)
    if "pickle" in msg.lower() or "object arrays" in msg.lower():
        return (f"{what + ' is' if what else 'holds'} an object array (pickled Python objects); only numeric arrays "
                "are read, never pickle: save numbers (e.g. x.astype(np.float32))")
    return f"unreadable {what or '.npy data'} ({type(exc).__name__}: {msg})"


def _npz_array(z, p: Path, key: str) -> np.ndarray:
    try:
        return z[key]
    except ValueError as exc:
        raise _err(p, _np_problem(exc, f"array {key!r}")) from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise _err(p, f"array {key!r} is unreadable or truncated ({type(exc).__name__}: {exc})") from None


def _first_bad(mask: np.ndarray) -> int:
    """The row of the first True in a boolean array whose first axis is the row."""
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


def _features(a: np.ndarray, path, what: str = "x", at=None) -> np.ndarray:
    """A user's feature array -> float32, C-contiguous, in the shape a Dataset keeps
    (:func:`_kept_shape`). uint8 (image bytes) is scaled to [0, 1] as for IDX files; bool and
    integers become floats. Refused: non-numeric dtypes, no rows, no features, NaN or Inf."""
    if a.dtype.kind not in "biuf":
        raise _err(path, f"{what} is not numeric (dtype {a.dtype}); features must be numbers")
    if a.ndim == 0:
        raise _err(path, f"{what} is a single number, not an array of samples")
    if a.shape[0] == 0:
        raise _err(path, f"{what} holds no samples (N = 0)")
    if a.size == 0:
        raise _err(path, f"{what} has zero features per sample (shape {a.shape})")
    if a.dtype == np.uint8:
        x = a.astype(np.float32) / np.float32(255.0)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            x = a.astype(np.float32)
        if a.dtype.kind == "f" and not np.isfinite(x).all():
            bad = ~np.isfinite(x)
            i = _first_bad(bad)
            value = a[i][bad[i]].reshape(-1)[0]
            what_v = f"a non-finite value ({value})" if not np.isfinite(value) else f"the value {value} (beyond float32)"
            raise _err(path, f"{what} has {what_v} in {(at or _row)(i)}; features must be finite numbers")
    return np.ascontiguousarray(x.reshape(_kept_shape(a.shape)))


def _row(i: int) -> str:
    return f"row {i}"


def _whole(y: np.ndarray) -> bool:
    return bool(np.all(np.floor(y) == y))


def _targets(y: np.ndarray, path, task: str, what: str = "y", text: bool = False, at=None):
    """A user's labels -> (y, task, n_out or None): classification -> int64 (N,) class
    indices (n_out is settled over train and test together, so None here); regression ->
    float32 (N, T), n_out = T. ``task`` "auto": integer labels of one per row are classes,
    float labels regression targets; ``text`` (a CSV, which has no dtypes): float labels
    that are all whole numbers are classes too."""
    at = at or _row
    if y.dtype.kind not in "biuf":
        raise _err(path, f"labels {what} are not numeric (dtype {y.dtype})")
    if y.ndim == 0:
        raise _err(path, f"labels {what} are a single number, not one per sample")
    if y.ndim > 2:
        raise _err(path, f"labels {what} must have shape (N,) or (N, T), got {y.shape}")
    if y.ndim == 2 and y.shape[1] == 0:
        raise _err(path, f"labels {what} have zero targets per sample (shape {y.shape})")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        i = _first_bad(~np.isfinite(y))
        raise _err(path, f"labels {what} have a non-finite value ({y[i].reshape(-1)[~np.isfinite(y[i].reshape(-1))][0]}) "
                         f"in {at(i)}; targets must be finite numbers")
    one_per_row = y.ndim == 1 or y.shape[1] == 1
    integers = y.dtype.kind in "biu"
    inferred = task == "auto"
    if inferred:
        task = "classification" if one_per_row and (integers or (text and _whole(y))) else "regression"
    hint = " (or read them as numbers with --task regression)" if inferred else ""
    if task == "classification":
        if not one_per_row:
            raise _err(path, f"classification labels {what} must be one class per sample (shape (N,)), got {y.shape}")
        lab = y.reshape(-1)
        if not integers and not _whole(lab):
            i = int(np.flatnonzero(np.floor(lab) != lab)[0])
            raise _err(path, f"label {lab[i]:g} in {at(i)} is not a whole number: classification needs integer "
                             "class labels (use --task regression for numeric targets)")
        if lab.min() < 0:
            i = int(np.argmax(lab < 0))
            raise _err(path, f"label {lab[i]:g} in {at(i)} is negative: class labels must be 0..{MAX_CLASSES - 1}{hint}")
        if lab.max() >= MAX_CLASSES:
            i = int(np.argmax(lab >= MAX_CLASSES))
            raise _err(path, f"label {lab[i]:g} in {at(i)} is beyond the largest class index {MAX_CLASSES - 1}: "
                             f"at most {MAX_CLASSES} classes{hint}")
        return np.ascontiguousarray(lab.astype(np.int64)), task, None
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.ascontiguousarray(y.reshape(len(y), -1).astype(np.float32))
    if not np.isfinite(t).all():
        i = _first_bad(~np.isfinite(t))
        raise _err(path, f"labels {what} have a value beyond float32 in {at(i)}; targets must be finite float32 numbers")
    if t.shape[1] > MAX_CLASSES:
        raise _err(path, f"labels {what} have {t.shape[1]} targets per sample; at most {MAX_CLASSES}")
    return t, task, t.shape[1]


def _check_rows(x: np.ndarray, y: np.ndarray, names: tuple[str, str], path, single: bool = True) -> None:
    """x and y hold one row per sample, as many of each; a set to be split holds at least 2."""
    for a, what in zip((x, y), names):
        if a.ndim == 0:
            raise _err(path, f"{what} is a single number, not an array with one row per sample")
    if len(x) != len(y):
        raise _err(path, f"{names[0]} has {len(x)} rows but {names[1]} has {len(y)}; they must match one to one")
    if single and len(x) < 2:
        raise _err(path, f"{names[0]} and {names[1]} hold {len(x)} row(s); at least 2 are needed "
                         "(a training and a test sample)")


def _datasets(x_tr, y_tr, x_te, y_te, task: str, n_out, name: str, split: str) -> tuple[Dataset, Dataset]:
    if task == "classification":              # as for IDX: one output per class seen, at least 2
        n_out = max(int(y_tr.max()) + 1, int(y_te.max()) + 1, 2)
    return (Dataset(x=x_tr, y=y_tr, task=task, n_out=n_out, name=name, split=split),
            Dataset(x=x_te, y=y_te, task=task, n_out=n_out, name=name, split=split))


def _one_set(x, y, names, task, tf, seed, name, x_path, y_path=None, text=False, at=None):
    """One array set (x, y) -> (train, test), split with test_fraction and seed. ``at(i)``
    names row i in a message (default "row i")."""
    y_path = y_path or x_path
    _check_rows(x, y, names, y_path)
    x = _features(x, x_path, names[0], at)
    y, task, n_out = _targets(y, y_path, task, names[1], text=text, at=at)
    return _datasets(*split_arrays(x, y, tf, seed, x_path), task, n_out, name, "fraction")


def load_npz(path, task: str = "auto", test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """A .npz file with arrays ``x`` and ``y`` (split into train/test with test_fraction and
    seed, as :func:`split_arrays`), or ``x_train``, ``y_train``, ``x_test``, ``y_test``
    (used as they are). See :func:`_features` and :func:`_targets` for what x and y may be."""
    p = _check_file(path)
    tf = _check_fraction(p, test_fraction)
    _check_task(task)
    z = _np_load(p)
    if isinstance(z, np.ndarray):
        raise _err(p, "is a single .npy array, not a .npz archive: pass x and y as --data-path X.npy --labels-path Y.npy")
    with z:
        keys = set(z.files)
        single, pairs = set(_NPZ_SINGLE) <= keys, set(_NPZ_PAIRS) <= keys
        if single and pairs:
            raise _err(p, "ambiguous: holds both x, y and x_train, y_train, x_test, y_test; keep one set")
        if not single and not pairs:
            want = _NPZ_PAIRS if keys & {"x_train", "y_train", "x_test", "y_test"} else _NPZ_SINGLE
            missing = ", ".join(repr(k) for k in want if k not in keys)
            have = ", ".join(repr(k) for k in sorted(keys)) or "no arrays"
            raise _err(p, f"missing array {missing}: expected arrays named 'x' and 'y' (or x_train, y_train, "
                          f"x_test, y_test); the file holds {have}")
        arrays = {k: _npz_array(z, p, k) for k in (_NPZ_SINGLE if single else _NPZ_PAIRS)}
    if single:
        return _one_set(arrays["x"], arrays["y"], ("x", "y"), task, tf, seed, p.stem, p)
    _check_rows(arrays["x_train"], arrays["y_train"], ("x_train", "y_train"), p, single=False)
    _check_rows(arrays["x_test"], arrays["y_test"], ("x_test", "y_test"), p, single=False)
    x_tr, x_te = _features(arrays["x_train"], p, "x_train"), _features(arrays["x_test"], p, "x_test")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise _err(p, f"x_train has samples of shape {x_tr.shape[1:]} but x_test of shape {x_te.shape[1:]}")
    y_tr, task, n_out = _targets(arrays["y_train"], p, task, "y_train")
    y_te, _, n_te = _targets(arrays["y_test"], p, task, "y_test")
    if n_out != n_te:
        raise _err(p, f"y_train has {n_out} targets per sample but y_test has {n_te}")
    return _datasets(x_tr, y_tr, x_te, y_te, task, n_out, p.stem, "files")


def _npy_array(p: Path) -> np.ndarray:
    a = _np_load(p)
    if not isinstance(a, np.ndarray):
        a.close()
        raise _err(p, "is a .npz archive, not a .npy array: pass it alone as --data-path FILE.npz")
    return a


def load_npy(x_path, y_path, task: str = "auto", test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Features and labels in two .npy files with the same number of rows, split into
    train/test with test_fraction and seed."""
    px = _check_file(x_path)
    if not y_path:
        raise _err(px, "a .npy file holds one array: give the labels' .npy file as well (--labels-path)")
    py = _check_file(y_path)
    tf = _check_fraction(px, test_fraction)
    _check_task(task)
    x, y = _npy_array(px), _npy_array(py)
    if x.ndim and y.ndim and len(x) != len(y):
        raise _err(py, f"has {len(y)} rows but {os.fspath(px)} has {len(x)}; they must match one to one")
    return _one_set(x, y, ("x", "y"), task, tf, seed, px.stem, px, py)


# --------------------------------------------------------------------------- CSV files


def _number(cell: str) -> float | None:
    """A CSV cell as a float, accepting what np.loadtxt accepts (None: not a number)."""
    if "_" in cell:
        return None
    try:
        return float(cell)
    except ValueError:
        return None


def _blank(row: list) -> bool:
    return not row or (len(row) == 1 and not row[0].strip())


def _csv_rows(p: Path):
    """(line number, row) of each non-blank row, read with the csv module; decoding and
    csv errors become DataErrors naming the line."""
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = _csv.reader(f)
            try:
                for row in reader:
                    if not _blank(row):
                        yield reader.line_num, row
            except _csv.Error as exc:
                raise _err(p, f"line {reader.line_num}: not valid CSV ({exc})") from None
    except UnicodeDecodeError as exc:
        raise _err(p, f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except OSError as exc:
        raise _err(p, f"cannot read ({exc.strerror or exc})") from None


def _column_name(names, j: int) -> str:
    return f"column {j + 1} ({names[j]!r})" if names else f"column {j + 1}"


def _csv_problem(p: Path, header: bool, n_cols: int, names) -> DataError:
    """Find the first ragged row, non-numeric cell or non-finite number, by line and column."""
    rows = _csv_rows(p)
    first_line = None
    for line, row in rows:
        if first_line is None:
            first_line = line
            if header:
                continue
        if len(row) != n_cols:
            return _err(p, f"line {line} has {len(row)} fields but line {first_line} has {n_cols}; every row "
                           "needs the same number of comma-separated fields")
        for j, cell in enumerate(row):
            v = _number(cell.strip())
            if v is None:
                return _err(p, f"line {line}, {_column_name(names, j)}: {cell.strip()[:40]!r} is not a number "
                               "(every cell but the header's must be numeric)")
            if not math.isfinite(v):
                return _err(p, f"line {line}, {_column_name(names, j)}: {cell.strip()} is not a finite number "
                               "(NaN and Inf are refused)")
    return None


def _label_index(p: Path, label_column: str, names, n_cols: int) -> int:
    """The 0-based index of the label column: a header name, or an index (negative counts
    from the end); default (empty): the last column."""
    lc = str(label_column).strip()
    if not lc:
        return n_cols - 1
    if names and lc in names:
        return names.index(lc)
    try:
        j = int(lc)
    except ValueError:
        if names:
            shown = ", ".join(repr(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")
            raise _err(p, f"label column {lc!r} is not in the header ({shown})") from None
        raise _err(p, f"label column {lc!r}: the file has no header row (its first row is all numbers), "
                      f"so give the column's index, 0..{n_cols - 1}") from None
    if not -n_cols <= j < n_cols:
        raise _err(p, f"label column index {j} is out of range: the file has {n_cols} columns (0..{n_cols - 1})")
    return j % n_cols


def load_csv(path, label_column: str = "", task: str = "auto", test_fraction: float = 0.2,
             seed: int = 0) -> tuple[Dataset, Dataset]:
    """A CSV file of numbers, one sample per row: the label column (``label_column``: a header
    name or a 0-based index; default the last column) is y, every other column a float
    feature. The first row is a header when any of its cells is not a number. Split into
    train/test with test_fraction and seed. Labels that are all whole numbers are classes
    (``task`` "auto"), others regression targets."""
    import warnings
    p = _check_file(path)
    tf = _check_fraction(p, test_fraction)
    _check_task(task)
    first = next(_csv_rows(p), None)
    if first is None:
        raise _err(p, "holds no rows (only blank lines)")
    first_line, first_row = first
    header = any(_number(c.strip()) is None for c in first_row)
    names = [c.strip() for c in first_row] if header else None
    n_cols = len(first_row)
    label = _label_index(p, label_column, names, n_cols)
    if n_cols < 2:
        raise _err(p, "has a single column: it needs at least one feature column besides the label column")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")            # "input contained no data": checked below
            table = np.loadtxt(p, delimiter=",", dtype=np.float64, comments=None, quotechar='"', ndmin=2,
                               skiprows=first_line if header else first_line - 1, encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _err(p, f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except ValueError as exc:
        raise (_csv_problem(p, header, n_cols, names)
               or _err(p, f"cannot be read as numbers ({_one_line(exc)})")) from None
    if table.size and not np.isfinite(table).all():
        raise _csv_problem(p, header, n_cols, names) or _err(p, "holds NaN or Inf values")
    if table.shape[0] and table.shape[1] != n_cols:
        raise _csv_problem(p, header, n_cols, names) or _err(p, f"rows have {table.shape[1]} fields, "
                                                                f"the first has {n_cols}")
    if table.shape[0] < 2:
        raise _err(p, f"holds {table.shape[0]} data row(s){' below its header' if header else ''}; "
                      "at least 2 are needed (a training and a test sample)")
    label_name = _column_name(names, label)
    x = np.delete(table, label, axis=1)
    y = table[:, label]

    def at(i: int) -> str:                 # data row i -> its line in the file (blank lines skipped)
        for k, (line, _r) in enumerate(_csv_rows(p)):
            if k == i + header:
                return f"line {line}"
        return f"data row {i}"
    return _one_set(x, y, ("a feature column", f"in {label_name}"), task, tf, seed, p.stem, p, text=True, at=at)


# --------------------------------------------------------------------------- batching


def input_shape(dataset: Dataset, in_shape=None) -> tuple[int, ...]:
    """The per-sample shape in which a network's first layer takes ``dataset``'s samples:
    ``in_shape`` (a plan's ``in_shape``), which must hold exactly the dataset's
    ``n_features`` values; None: flat, ``(n_features,)`` (the numpy MLP's input)."""
    if in_shape is None:
        return (dataset.n_features,)
    shape = tuple(int(d) for d in in_shape)
    if not shape or any(d < 1 for d in shape) or math.prod(shape) != dataset.n_features:
        raise DataError(f"dataset {dataset.name!r}: samples of shape {dataset.sample_shape} "
                        f"({dataset.n_features} values) cannot be fed as shape {shape}")
    return shape


class BatchStream:
    """Reproducible shuffled mini-batches over epochs; drops the last partial batch of each epoch.
    Batches of x have shape (B, *in_shape) (see :func:`input_shape`; default (B, n_features))."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, in_shape=None):
        batch_size = _as_int(batch_size, "batch_size")
        n = len(dataset)
        if batch_size < 1 or batch_size > n:
            raise DataError(f"dataset {dataset.name!r}: batch_size must be in [1, {n}], got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = n // batch_size
        self.in_shape = input_shape(dataset, in_shape)
        self._x = np.ascontiguousarray(dataset.x, dtype=np.float32).reshape((n, *self.in_shape))
        self._y = dataset.y
        self._epoch: int | None = None
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of `epoch` (cached for the most recent epoch)."""
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            self._epoch = epoch
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        """The training-set rows of `step`'s batch (int64, distinct)."""
        step = _as_int(step, "step")
        if step < 0:
            raise DataError(f"dataset {self.dataset.name!r}: step must be >= 0, got {step}")
        epoch, k = divmod(step, self.steps_per_epoch)
        return np.ascontiguousarray(self.permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size], np.int64)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.indices(step)
        return np.ascontiguousarray(self._x[idx]), np.ascontiguousarray(self._y[idx])


def eval_batches(dataset: Dataset, batch_size: int, in_shape=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The whole dataset in order, in contiguous chunks of batch_size (the last may be
    smaller); x in the shape (rows, *in_shape) (see :func:`input_shape`)."""
    batch_size = _as_int(batch_size, "batch_size")
    if batch_size < 1:
        raise DataError(f"dataset {dataset.name!r}: batch_size must be >= 1, got {batch_size}")
    shape = input_shape(dataset, in_shape)
    x = np.ascontiguousarray(dataset.x, dtype=np.float32).reshape((len(dataset), *shape))
    y = dataset.y
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(dataset), batch_size)]
