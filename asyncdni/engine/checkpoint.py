"""Checkpoints: each layer process saves its own state; the coordinator commits them.

On-disk format
--------------
::

    ROOT/
      step-000000120/            one directory per checkpoint, named by the global step (9 digits)
        layer-1.npz ... layer-K.npz   one file per layer, written by that layer's process
        manifest.json             written LAST by the coordinator, atomically; its presence + valid checksums = complete

``layer-N.npz`` is a numpy ``.npz`` archive (a stored, uncompressed zip of ``.npy``
entries; never pickled, so it loads with ``allow_pickle=False``). The entries of a layer
file (see :func:`node_state`):

* ``W``, ``b``: the dense layer's weights and bias; with batch normalisation (a hidden
  layer of a ``model.batch_norm`` run) ``W`` and, instead of ``b``, ``bn.gamma``, ``bn.beta``
  (its parameters) and ``bn.mean``, ``bn.var`` (its running statistics, used at evaluation);
* ``opt.<k>``: the layer optimizer's state (``opt.t``, a 0-d int64 step count, then
  ``opt.m0``, ``opt.v0``, ... for Adam, ``opt.v0``, ... for momentum);
* ``sg.<i>``: the synthetic-gradient model's parameters, in ``SGModel.params`` order
  (absent for the last layer, which has no SG model);
* ``sgopt.<k>``: the SG optimizer's state, named as for ``opt.``;
* ``aux.<i>``, ``auxopt.<k>``: the auxiliary classifier of a hidden layer under ``local``
  (``AuxHead.params`` order) and its optimizer's state;
* ``counters``: int64 ``[fwd_steps, updates, sg_updates]``.

In-flight synthetic-gradient targets are not saved: a restored layer starts with no steps
in flight. ``manifest.json``::

    {"format": "asyncdni-checkpoint", "version": 1, "step": 120,
     "config_digest": "<RunConfig.digest()>", "n_layers": 4,
     "files": {"layer-1.npz": {"sha256": "<hex>", "bytes": 12345}, ...},
     "created": 1714000000.0, "extra": {...free JSON map...}}

The coordinator's ``extra`` holds ``schedule``, ``steps`` (of the run that wrote it),
``written_by``, ``config`` (``RunConfig.to_dict()`` of the configuration in force: what
``asyncdni eval`` rebuilds the layers from, and what names the field of a mismatch) and
``changes`` (what resumes changed so far: ``{"field", "old", "new", "step"}`` each).
Checkpoints written before these existed have none of them.

Every file (layer files and the manifest) is written to a hidden temporary file in the
same directory (``.<name>.<random>.tmp``), flushed, ``fsync``-ed, renamed over the final
name with ``os.replace`` and the directory is ``fsync``-ed, so a crash leaves either the
old file or the new one, never a partial file under the final name. A checkpoint
directory without a manifest is *incomplete* (a crash or a layer that never reported);
one whose manifest does not match its files is *corrupt*. :func:`find_latest` returns the
newest checkpoint that is neither, and says why it skipped each newer one.

``feeder.npz`` (written by the feeder) holds ``loss``, ``metric``, ``done_at`` (one float64
per step done), ``train_time``, ``time_to_target`` (0-d) and ``eval_<k>`` for each
:data:`FEEDER_EVAL_KEYS` (one per evaluation).

What reading refuses, each with a one-line :class:`CheckpointError`: anything that is not
a regular file (a FIFO would block, a device never ends), a manifest over
:data:`MAX_MANIFEST_BYTES` or nested too deeply for the JSON parser, and, once the
checksums match, content no run could have written: NaN or infinite numbers, a negative or
non-integer optimizer step count, negative counters, Adam second moments or running
variances of batch normalisation, a feeder file
without one of its entries or with the wrong shapes (:func:`check_layer_state`,
:func:`check_feeder_state`; :func:`restore_node` also checks every shape against the layer).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asyncdni import files

FORMAT = "asyncdni-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
FEEDER_FILE = "feeder.npz"
# what the feeder's file holds (worker.FeederWorker.checkpoint writes it)
FEEDER_SERIES = ("loss", "metric", "done_at")            # float64, one value per step done
FEEDER_SCALARS = ("train_time", "time_to_target")        # 0-d float64
FEEDER_EVAL_KEYS = ("step", "train_time", "loss", "metric", "metric2", "n")   # eval_<k>: one per evaluation


def evals_to_arrays(evals: list[dict]) -> dict:
    """The feeder's evaluations as the ``eval_<key>`` columns of its checkpoint (and its BYE)."""
    return {f"eval_{k}": np.array([e[k] for e in evals], np.float64) for k in FEEDER_EVAL_KEYS}


def evals_from_arrays(arrays: dict) -> list[dict]:
    cols = [arrays[f"eval_{k}"] for k in FEEDER_EVAL_KEYS]
    return [{k: (int(v) if k in ("step", "n") else float(v)) for k, v in zip(FEEDER_EVAL_KEYS, row)}
            for row in zip(*cols)]
MAX_MANIFEST_BYTES = 16 << 20   # a manifest is a few hundred bytes per layer; more is not one of ours

_STEP_RE = re.compile(r"^step-(\d{9,})$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)   # fixed entry timestamps: same arrays -> same bytes -> same sha256


class CheckpointError(RuntimeError):
    """One-line message naming the checkpoint directory/file and the problem."""


def _one_line(s) -> str:
    return " ".join(str(s).split())


# -------------------------------------------------------------------- names
def step_dir(root, step: int) -> Path:
    """``ROOT/step-000000120``."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
    return Path(root) / f"step-{int(step):09d}"


def layer_file(index: int) -> str:
    """0-based layer index -> ``layer-1.npz``."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"layer index must be a non-negative integer, got {index!r}")
    return f"layer-{int(index) + 1}.npz"


def _parse_step_name(name: str) -> int | None:
    """Step of a canonical checkpoint directory name, else None."""
    m = _STEP_RE.match(name)
    if m is None:
        return None
    step = int(m.group(1))
    return step if f"step-{step:09d}" == name else None


# ------------------------------------------------------------ atomic writes
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return                      # platforms that cannot open directories
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, rename over ``path``, fsync the dir.
    An OS failure (no such directory, no space, no permission) is a one-line CheckpointError."""
    path = Path(path)
    try:
        _atomic_write_os(path, write)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {_one_line(e.strerror or e)}") from None


def _atomic_write_os(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(path, write)
    _fsync_dir(path.parent)


def _open_regular(path: Path):
    """``path`` opened for reading if it is a regular file (after symlinks); one-line errors.
    Never blocks (a FIFO is refused, not waited on) and never opens a device for reading."""
    try:
        return files.open_regular(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except files.NotRegularFile as e:
        if e.is_dir:
            raise CheckpointError(f"{path}: is a directory, not a file") from None
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket); refusing to read it") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read: {_one_line(e.strerror or e)}") from None


def _read_regular(path: Path, limit: int | None = None) -> bytes:
    """The content of a regular file. With ``limit``, at most limit + 1 bytes are read, so
    that the caller sees that there was more without reading a huge file whole."""
    with _open_regular(path) as f:
        try:
            return f.read() if limit is None else f.read(limit + 1)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read: {_one_line(e.strerror or e)}") from None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with _open_regular(path) as f:
        try:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read: {_one_line(e.strerror or e)}") from None
    return h.hexdigest()


# ------------------------------------------------------------------- arrays
def _check_key(path, key) -> None:
    if not isinstance(key, str) or not key or any(c in key for c in "/\\\0") or not key.isprintable():
        raise CheckpointError(f"{path}: invalid array name {key!r} (want a plain non-empty name)")


def write_arrays(path, arrays: dict) -> dict:
    """Atomically write ``arrays`` (name -> array) as an npz archive at ``path``.

    Returns ``{"sha256": <hex of the file's bytes>, "bytes": <size>}``, the manifest entry.
    Object arrays are refused (they would need pickle).
    """
    path = Path(path)
    prepared = {}
    for key, value in arrays.items():
        _check_key(path, key)
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise CheckpointError(f"{path}: array {key!r} has object dtype, which cannot be saved without pickle")
        prepared[key] = arr

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, arr in prepared.items():
                info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = 0o644 << 16
                with zf.open(info, "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, arr, allow_pickle=False)

    _atomic_write(path, write)
    return {"sha256": _sha256_file(path), "bytes": path.stat().st_size}


def _check_bytes(path: Path, data: bytes, expected: dict) -> None:
    want_size, want_sha = expected.get("bytes"), expected.get("sha256")
    if want_size is not None and len(data) != want_size:
        raise CheckpointError(f"{path}: size mismatch (corrupt or truncated): {len(data)} bytes, manifest says {want_size}")
    if want_sha is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != want_sha:
            raise CheckpointError(f"{path}: checksum mismatch (corrupt): sha256 {got[:12]}..., manifest says {str(want_sha)[:12]}...")


def _read_file(path: Path, expected: dict | None = None) -> bytes:
    """A regular file's bytes; with a manifest entry, no more than one byte past its size."""
    size = expected.get("bytes") if expected is not None else None
    return _read_regular(path, size if isinstance(size, int) and not isinstance(size, bool) else None)


def read_arrays(path, expected: dict | None = None) -> dict:
    """Load an npz written by :func:`write_arrays`; returns name -> array (owned, writable copies).

    With ``expected`` (a manifest entry ``{"sha256", "bytes"}``) the size and checksum are
    verified first, on the same bytes that are then loaded.
    """
    path = Path(path)
    data = _read_file(path, expected)
    if expected is not None:
        _check_bytes(path, data, expected)
    return _load_npz(path, data)


def _load_npz(path: Path, data: bytes) -> dict:
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:   # zipfile.BadZipFile, ValueError (pickled/bad header), EOFError, OSError, ...
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: not an npz archive")
    out = {}
    try:
        with loaded:
            for key in loaded.files:
                arr = loaded[key]
                out[key] = arr if arr.flags.owndata and arr.flags.writeable else np.array(arr)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {_one_line(e)})") from None
    return out


# --------------------------------------------------------------- node state
def _running_norms(node) -> dict[str, str]:
    """Entry name -> ``LayerNode`` attribute of the running norms in this layer's state: the SG
    targets' under ``sg_clip`` or ``sg_damp`` (entry ``sgclip``, the name from when only
    ``sg_clip`` used it), the SG predictions' under ``sg_damp``, and the running cosine under
    ``sg_trust``. Each is one float64."""
    clip, damp = getattr(node.spec, "sg_clip", 0.0) > 0, getattr(node.spec, "sg_damp", 0.0) > 0
    trust = getattr(node.spec, "sg_trust", False)
    return {**({"sgclip": "target_norm"} if clip or damp else {}), **({"sgdamp": "pred_norm"} if damp else {}),
            **({"sgtrust": "trust"} if trust else {})}


def _expected_layout(node) -> dict:
    """name -> (shape, dtype) of every entry :func:`node_state` writes for this node."""
    if hasattr(node, "state_layout"):        # a torch stage describes its own arrays
        return {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in node.state_layout().items()}
    out = {k: (v.shape, v.dtype) for k, v in _dense_arrays(node).items()}
    for k, v in node.opt.state().items():
        v = np.asarray(v)
        out[f"opt.{k}"] = (v.shape, v.dtype)
    if node.sg is not None:
        for i, p in enumerate(node.sg.params):
            out[f"sg.{i}"] = (p.shape, p.dtype)
        for k, v in node.sg_opt.state().items():
            v = np.asarray(v)
            out[f"sgopt.{k}"] = (v.shape, v.dtype)
        for key in _running_norms(node):
            out[key] = ((1,), np.dtype(np.float64))
    if getattr(node, "aux", None) is not None:
        for i, p in enumerate(node.aux.params):
            out[f"aux.{i}"] = (p.shape, p.dtype)
        for k, v in node.aux_opt.state().items():
            v = np.asarray(v)
            out[f"auxopt.{k}"] = (v.shape, v.dtype)
    out["counters"] = ((3,), np.dtype(np.int64))
    return out


def _dense_arrays(node) -> dict:
    """The dense layer's entries: ``W`` and ``b``, or ``W`` and ``bn.*`` with batch normalisation."""
    bn = getattr(node.dense, "bn", None)
    if bn is None:
        return {"W": node.dense.W, "b": node.dense.b}
    return {"W": node.dense.W, "bn.gamma": bn.gamma, "bn.beta": bn.beta, "bn.mean": bn.mean, "bn.var": bn.var}


def node_state(node) -> dict:
    """Everything needed to continue training a ``LayerNode`` exactly, as name -> array copies.

    Must be taken between steps: a half-accumulated pipeline step cannot be saved.
    """
    if not node.step_complete:
        raise CheckpointError(f"layer {node.spec.index + 1}: a pipeline step is partly accumulated "
                              f"({node.spec.microbatches} micro-batches a step); checkpoint between steps")
    if hasattr(node, "state_arrays"):        # a torch stage: state_dicts as arrays (never pickled)
        return node.state_arrays()
    out = {k: v.copy() for k, v in _dense_arrays(node).items()}
    out.update({f"opt.{k}": np.array(v, copy=True) for k, v in node.opt.state().items()})
    if node.sg is not None:
        out.update({f"sg.{i}": p.copy() for i, p in enumerate(node.sg.params)})
        out.update({f"sgopt.{k}": np.array(v, copy=True) for k, v in node.sg_opt.state().items()})
        for key, attr in _running_norms(node).items():
            out[key] = np.array([getattr(node, attr)], dtype=np.float64)
    if getattr(node, "aux", None) is not None:
        out.update({f"aux.{i}": p.copy() for i, p in enumerate(node.aux.params)})
        out.update({f"auxopt.{k}": np.array(v, copy=True) for k, v in node.aux_opt.state().items()})
    out["counters"] = np.array([node.fwd_steps, node.updates, node.sg_updates], dtype=np.int64)
    return out


WIRE_PREFIX = "wire."       # a layer file's link state (the error feedback of its gradient codec)


def wire_state(state: dict) -> dict:
    """The link state in a layer's checkpoint state, without its prefix (``ErrorFeedback.load``)."""
    n = len(WIRE_PREFIX)
    return {k[n:]: np.asarray(v) for k, v in state.items() if k.startswith(WIRE_PREFIX)}


def with_wire_state(state: dict, feedback, hist_out=None, hist_in=None) -> dict:
    """``state`` (:func:`node_state`) with the link state of a layer: the error-feedback
    residuals of ``feedback`` (``ef<k>``) and the activation histories it sends from and
    receives into (``aqsend``, ``aqrecv``); each may be None."""
    if feedback is not None:
        state.update({WIRE_PREFIX + k: v for k, v in feedback.state().items()})
    for hist, name in ((hist_out, "aqsend"), (hist_in, "aqrecv")):
        if hist is not None:
            state.update({WIRE_PREFIX + k: v for k, v in hist.state(name).items()})
    return state


def restore_node(node, state: dict) -> None:
    """Load :func:`node_state` output into an already constructed ``LayerNode`` of the same spec.

    Everything is checked (every key present, no unexpected key, shapes and dtypes equal)
    before anything is changed; then parameters and optimizer state are overwritten in
    place (the optimizers hold references to the parameter arrays). In-flight steps
    (``node.cache``) and any pipeline accumulation are dropped.
    """
    who = f"layer {node.spec.index + 1}"
    state = {k: v for k, v in state.items() if not k.startswith(WIRE_PREFIX)}   # the link's, not the node's
    layout = _expected_layout(node)
    for key, (shape, dtype) in layout.items():
        if key not in state:
            raise CheckpointError(f"{who}: checkpoint state has no {key!r} (expected shape {tuple(shape)})")
        got = np.asarray(state[key])
        if got.shape != tuple(shape):
            raise CheckpointError(f"{who}: {key!r} has shape {got.shape}, expected {tuple(shape)}")
        if got.dtype != dtype:
            raise CheckpointError(f"{who}: {key!r} has dtype {got.dtype}, expected {np.dtype(dtype)}")
    extra = sorted(set(state) - set(layout))
    if extra:
        raise CheckpointError(f"{who}: checkpoint state has unexpected entries {', '.join(extra)} "
                              "(saved from a layer with a different spec?)")
    check_layer_state(who, state)
    if hasattr(node, "load_state_arrays"):   # a torch stage loads its own checked arrays
        try:
            node.load_state_arrays({k: np.asarray(v) for k, v in state.items()})
        except ValueError as e:
            raise CheckpointError(f"{who}: {e}") from None
        return
    counters = np.asarray(state["counters"])

    for k, v in _dense_arrays(node).items():
        v[...] = state[k]
    node.opt.load_state({k[len("opt."):]: np.asarray(v) for k, v in state.items() if k.startswith("opt.")})
    if node.sg is not None:
        for i, p in enumerate(node.sg.params):
            p[...] = state[f"sg.{i}"]
        node.sg_opt.load_state({k[len("sgopt."):]: np.asarray(v) for k, v in state.items() if k.startswith("sgopt.")})
        for key, attr in _running_norms(node).items():
            setattr(node, attr, float(np.asarray(state[key])[0]))
    if getattr(node, "aux", None) is not None:
        for i, p in enumerate(node.aux.params):
            p[...] = state[f"aux.{i}"]
        node.aux_opt.load_state({k[len("auxopt."):]: np.asarray(v) for k, v in state.items() if k.startswith("auxopt.")})
    node.fwd_steps, node.updates, node.sg_updates = (int(c) for c in counters)
    node.cache.clear()
    if hasattr(node, "_acc"):
        node._acc, node._acc_count = None, 0


def _nonfinite_entry(arrays: dict) -> str | None:
    """Name and first bad index of the first float array holding a NaN or an infinity."""
    for key, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            i = int(np.flatnonzero(~np.isfinite(a))[0])
            at = np.unravel_index(i, a.shape) if a.ndim > 1 else i
            return f"{key!r} holds {a.reshape(-1)[i]} at index {at}"
    return None


def _step_count_ok(v) -> bool:
    v = np.asarray(v)
    return v.shape == () and v.dtype.kind in "iu" and int(v) >= 0


def check_layer_state(where, state: dict) -> None:
    """What any layer file must satisfy, whatever the layer's spec: finite numbers, optimizer
    step counts that are non-negative integers, non-negative counters. One-line errors."""
    bad = _nonfinite_entry(state)
    if bad:
        raise CheckpointError(f"{where}: non-finite weights or optimizer state: {bad}")
    for key in ("opt.t", "sgopt.t", "auxopt.t"):
        if key in state and not _step_count_ok(state[key]):
            raise CheckpointError(f"{where}: impossible optimizer state: {key!r} must be a non-negative "
                                  f"integer step count, got {np.asarray(state[key]).tolist()!r:.60}")
    if "counters" in state:
        c = np.asarray(state["counters"])
        # 3 for a numpy layer, more for a torch stage: the layer's own layout fixes the length
        if c.ndim != 1 or not 3 <= c.size <= 64 or c.dtype.kind not in "iu" or (c < 0).any():
            raise CheckpointError(f"{where}: 'counters' must be 3 to 64 non-negative integers, got {c.tolist()!r:.60}")
    for key in ("sgclip", "sgdamp"):
        if key in state and (np.asarray(state[key]) < 0).any():
            raise CheckpointError(f"{where}: impossible state: {key!r} (a running norm) is negative")
    if "sgtrust" in state and (np.abs(np.asarray(state["sgtrust"])) > 1).any():
        raise CheckpointError(f"{where}: impossible state: 'sgtrust' (a running cosine) is outside -1..1")
    for key, v in state.items():          # Adam's second moment is a running mean of squares
        if key.startswith(("opt.v", "sgopt.v", "auxopt.v")) and f"{key.split('.')[0]}.m0" in state and (np.asarray(v) < 0).any():
            raise CheckpointError(f"{where}: impossible optimizer state: Adam's {key!r} has negative entries")
    if "bn.var" in state and (np.asarray(state["bn.var"]) < 0).any():
        raise CheckpointError(f"{where}: impossible batch-normalisation state: 'bn.var' (a running variance) "
                              "has negative entries")


def check_feeder_state(where, state: dict, step: int) -> None:
    """The feeder's file of a checkpoint at ``step``: every entry present, with the shape the
    feeder reads back (a history of ``step`` values, one row per evaluation)."""
    want = FEEDER_SERIES + FEEDER_SCALARS + tuple(f"eval_{k}" for k in FEEDER_EVAL_KEYS)
    missing = [k for k in want if k not in state]
    if missing:
        raise CheckpointError(f"{where}: feeder state has no {', '.join(map(repr, missing))}")
    for k in want:
        if np.asarray(state[k]).dtype.kind != "f":
            raise CheckpointError(f"{where}: feeder state {k!r} is not floating point")
    for k in FEEDER_SERIES:
        if state[k].shape != (step,):
            raise CheckpointError(f"{where}: feeder state {k!r} has shape {state[k].shape}, expected ({step},)")
    for k in FEEDER_SCALARS:
        if state[k].shape != ():
            raise CheckpointError(f"{where}: feeder state {k!r} has shape {state[k].shape}, expected a scalar")
    if not (math.isfinite(float(state["train_time"])) and float(state["train_time"]) >= 0):
        raise CheckpointError(f"{where}: feeder state 'train_time' is {float(state['train_time'])}")
    n = {state[f"eval_{k}"].shape for k in FEEDER_EVAL_KEYS}
    if len(n) != 1 or len(next(iter(n))) != 1:
        raise CheckpointError(f"{where}: feeder state's evaluations have mismatched shapes {sorted(n)}")


# ----------------------------------------------------------------- manifest
def _check_file_entry(where: str, name, entry) -> None:
    if (not isinstance(name, str) or not name or name == MANIFEST or name.startswith(".")
            or any(c in name for c in "/\\\0") or name in (".", "..") or not name.isprintable()):
        raise CheckpointError(f"{where}: invalid file name {name!r} in manifest")
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: manifest entry for {name} is not an object")
    sha, size = entry.get("sha256"), entry.get("bytes")
    if not isinstance(sha, str) or not _SHA_RE.match(sha):
        raise CheckpointError(f"{where}: manifest entry for {name} has no valid 'sha256' (64 lowercase hex digits)")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise CheckpointError(f"{where}: manifest entry for {name} has no valid 'bytes' (a non-negative integer)")


def write_manifest(root, step, config_digest, n_layers, files: dict, extra: dict | None = None,
                   *, verify: bool = True) -> Path:
    """Commit checkpoint ``step``: atomically write ``ROOT/step-.../manifest.json``; returns its path.

    ``files`` maps file name -> the entry :func:`write_arrays` returned and must cover
    ``layer-1.npz`` .. ``layer-<n_layers>.npz`` (more files are allowed). With ``verify``
    (default) every listed file must exist in the step directory with the listed size
    (checksums are not recomputed here; :func:`validate` does that).
    """
    directory = step_dir(root, step)
    where = str(directory)
    if not isinstance(config_digest, str):
        raise CheckpointError(f"{where}: config digest must be a string, got {config_digest!r}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
        raise CheckpointError(f"{where}: n_layers must be a positive integer, got {n_layers!r}")
    files = {name: {"sha256": e.get("sha256"), "bytes": e.get("bytes")} if isinstance(e, dict) else e
             for name, e in files.items()}
    for name, entry in files.items():
        _check_file_entry(where, name, entry)
    missing = [layer_file(i) for i in range(int(n_layers)) if layer_file(i) not in files]
    if missing:
        raise CheckpointError(f"{where}: cannot commit, no entry for {', '.join(missing)}")
    if verify:
        for name, entry in files.items():
            p = directory / name
            try:
                size = p.stat().st_size
            except OSError:
                raise CheckpointError(f"{p}: cannot commit, file is missing") from None
            if size != entry["bytes"]:
                raise CheckpointError(f"{p}: cannot commit, file has {size} bytes, entry says {entry['bytes']}")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise CheckpointError(f"{where}: manifest 'extra' must be a dict, got {type(extra).__name__}")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "config_digest": config_digest,
        "n_layers": int(n_layers),
        "files": files,
        "created": time.time(),
        "extra": extra,
    }
    try:
        text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: manifest 'extra' is not JSON-serialisable: {_one_line(e)}") from None
    path = directory / MANIFEST
    _atomic_write(path, lambda f: f.write(text.encode()))
    return path


@dataclass(frozen=True)
class Checkpoint:
    step: int
    directory: Path
    config_digest: str
    n_layers: int
    files: dict
    extra: dict
    created: float = field(default=0.0, compare=False)

    def layer_path(self, index) -> Path:
        return self.directory / layer_file(index)

    def read_layer(self, index) -> dict:
        """The layer's arrays, size and checksum verified against the manifest."""
        name = layer_file(index)
        return read_arrays(self.directory / name, self.files[name])


def _int_field(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory}: not a directory")
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint {directory}: incomplete (no {MANIFEST})")
    raw = _read_regular(path, MAX_MANIFEST_BYTES)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes, not a manifest")
    try:
        m = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(m, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    if m.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {m.get('format')!r}, expected {FORMAT!r}")
    version = m.get("version")
    if not _int_field(version) or version != VERSION:
        newer = " (written by a newer asyncdni?)" if _int_field(version) and version > VERSION else ""
        raise CheckpointError(f"{path}: version {version!r} is not supported, expected {VERSION}{newer}")
    types = {"step": "a non-negative integer", "config_digest": "a string", "n_layers": "a positive integer",
             "files": "an object", "created": "a number", "extra": "an object"}
    missing = [k for k in types if k not in m]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {', '.join(missing)}")
    ok = {
        "step": _int_field(m["step"]) and m["step"] >= 0,
        "config_digest": isinstance(m["config_digest"], str),
        "n_layers": _int_field(m["n_layers"]) and m["n_layers"] >= 1,
        "files": isinstance(m["files"], dict),
        "created": isinstance(m["created"], (int, float)) and not isinstance(m["created"], bool)
                   and math.isfinite(m["created"]),
        "extra": isinstance(m["extra"], dict),
    }
    for k, good in ok.items():
        if not good:
            raise CheckpointError(f"{path}: {k!r} must be {types[k]}, got {m[k]!r:.60}")
    for name, entry in m["files"].items():
        _check_file_entry(str(path), name, entry)
    return m


def _digests(config_digest) -> tuple[str, ...] | None:
    """None, or the digests accepted: one string, or several (a configuration's current and
    legacy digest, ``RunConfig.digests``)."""
    if config_digest is None:
        return None
    return (config_digest,) if isinstance(config_digest, str) else tuple(config_digest)


def validate(directory, config_digest: str | tuple[str, ...] | None = None, n_layers: int | None = None,
             verify_files: bool = True, explain=None) -> Checkpoint:
    """Check that ``directory`` holds a complete, intact checkpoint (of this configuration).

    ``config_digest`` (one digest, or a tuple of those accepted) / ``n_layers`` of None are
    not checked. Raises :class:`CheckpointError` with a one-line reason. With ``verify_files``
    every file's size and sha256 are verified; without, only the manifest and the files'
    presence and sizes (cheap: for a worker that reads and verifies just its own file, or for
    pruning). ``explain(extra)``: on a digest mismatch, why (from the configuration the
    manifest's ``extra`` records), e.g. "model.width is 256 in the checkpoint, 128 here";
    None falls back to the digests.
    """
    directory = Path(directory)
    m = _read_manifest(directory)
    where = f"checkpoint {directory}"
    name_step = _parse_step_name(directory.name)
    if name_step is None:
        raise CheckpointError(f"{where}: directory name is not step-<9 digits>")
    if m["step"] != name_step:
        raise CheckpointError(f"{where}: step in manifest ({m['step']}) does not match the directory name ({name_step})")
    digests = _digests(config_digest)
    if digests is not None and m["config_digest"] not in digests:
        why = explain(m["extra"]) if explain is not None else None
        raise CheckpointError(f"{where}: made by a different configuration ("
                              + (why or f"config digest {m['config_digest']}, this run {digests[0]}") + ")")
    if n_layers is not None and m["n_layers"] != n_layers:
        raise CheckpointError(f"{where}: has {m['n_layers']} layers, this run has {n_layers}")
    files = m["files"]
    missing = [layer_file(i) for i in range(m["n_layers"]) if layer_file(i) not in files]
    if missing:
        raise CheckpointError(f"{where}: manifest lists no entry for {', '.join(missing)}")
    for name in sorted(files, key=lambda n: (len(n), n)):
        p = directory / name
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{p}: missing (listed in the manifest)") from None
        except OSError as e:
            raise CheckpointError(f"{p}: cannot be read: {_one_line(e.strerror or e)}") from None
        if size != files[name]["bytes"]:
            raise CheckpointError(f"{p}: size mismatch (corrupt or truncated): {size} bytes, "
                                  f"manifest says {files[name]['bytes']}")
        if not verify_files:
            continue
        data = _read_file(p, files[name])
        _check_bytes(p, data, files[name])
        if name == FEEDER_FILE:
            check_feeder_state(p, _load_npz(p, data), m["step"])
        elif name.startswith("layer-"):
            check_layer_state(p, _load_npz(p, data))
    return Checkpoint(step=m["step"], directory=directory, config_digest=m["config_digest"],
                      n_layers=m["n_layers"], files=files, extra=m["extra"], created=float(m["created"]))


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Canonically named checkpoint directories in ``root``, newest first."""
    out = []
    for entry in root.iterdir():
        step = _parse_step_name(entry.name)
        if step is not None and entry.is_dir():
            out.append((step, entry))
    out.sort(key=lambda t: t[0], reverse=True)
    return out


def _check_root(root) -> Path:
    root = Path(root)
    if not root.exists():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} is not a directory")
    return root


def has_checkpoints(root) -> bool:
    """Whether ``root`` exists and holds any checkpoint directory, complete or not."""
    root = Path(root)
    return root.is_dir() and bool(_step_dirs(root))


def find_latest(root, config_digest: str | tuple[str, ...] | None = None, n_layers: int | None = None,
                explain=None) -> tuple[Checkpoint, list[str]]:
    """The newest valid checkpoint under ``root`` and the reasons each newer one was skipped
    (``config_digest``, ``explain``: as for :func:`validate`)."""
    root = _check_root(root)
    candidates = _step_dirs(root)
    if not candidates:
        raise CheckpointError(f"no checkpoints in {root}")
    skipped = []
    for _step, directory in candidates:
        try:
            return validate(directory, config_digest, n_layers, explain=explain), skipped
        except CheckpointError as e:
            skipped.append(_one_line(e))
    raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(skipped))


def prune(root, keep: int, config_digest: str | tuple[str, ...] | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (``keep`` < 1 counts as 1), and
    every incomplete or corrupt directory older than the newest complete one.

    With ``config_digest`` (one, or a tuple of those that are this configuration's), only
    checkpoints of that configuration count and are deleted; others in the same directory
    are left alone. Completeness is judged from the manifest
    and file sizes, not by re-hashing every kept checkpoint on every commit.

    Directories newer than the newest complete checkpoint are left alone (one may be being
    written). A directory's manifest is removed first, so an interrupted prune never leaves
    a half-deleted directory that looks complete. Returns the deleted paths, newest first.
    """
    root = _check_root(root)
    keep = max(1, int(keep))
    complete_seen = 0
    deleted = []
    digests = _digests(config_digest)
    for _step, directory in _step_dirs(root):
        if digests is not None:
            try:
                if _read_manifest(directory)["config_digest"] not in digests:
                    continue        # another configuration's checkpoint: not ours to delete
            except CheckpointError:
                pass
        try:
            validate(directory, verify_files=False)
            ok = True
        except CheckpointError:
            ok = False
        if ok:
            complete_seen += 1
            if complete_seen <= keep:
                continue
        elif complete_seen == 0:
            continue                # newer than every complete checkpoint: maybe in progress
        try:
            (directory / MANIFEST).unlink()
        except FileNotFoundError:
            pass
        shutil.rmtree(directory)
        deleted.append(directory)
    if deleted:
        _fsync_dir(root)
    return deleted
