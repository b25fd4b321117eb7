"""Losses, each returning (mean loss over the batch, dLoss/dInput). numpy only."""
from __future__ import annotations

import math

import numpy as np

LOSSES = ("softmax_ce", "sigmoid_bce", "mse")


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray):
    """Mean cross-entropy of integer labels under softmax(logits); gradient wrt logits."""
    B = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    ez = np.exp(z)
    s = ez.sum(axis=1, keepdims=True)
    logp = z - np.log(s)
    idx = np.arange(B)
    loss = -logp[idx, labels].mean()
    g = ez / s
    g[idx, labels] -= 1
    g /= B
    return float(loss), g.astype(logits.dtype, copy=False)


def sigmoid_bce(logits: np.ndarray, targets: np.ndarray):
    """Mean (over batch, summed over outputs) binary cross-entropy with logits; stable form."""
    B = logits.shape[0]
    t = targets.astype(logits.dtype, copy=False)
    loss = (np.maximum(logits, 0) - logits * t + np.log1p(np.exp(-np.abs(logits)))).sum() / B
    p = np.empty_like(logits)
    pos = logits >= 0
    p[pos] = 1 / (1 + np.exp(-logits[pos]))
    e = np.exp(logits[~pos])
    p[~pos] = e / (1 + e)
    g = (p - t) / B
    return float(loss), g


def mse(pred: np.ndarray, target: np.ndarray):
    """Mean over the batch of the summed squared error; gradient wrt pred."""
    B = pred.shape[0]
    d = pred - target
    loss = float((d * d).sum() / B)
    return loss, (2.0 / B) * d


def compute(name: str, out: np.ndarray, target: np.ndarray):
    if name == "softmax_ce":
        return softmax_cross_entropy(out, target)
    if name == "sigmoid_bce":
        return sigmoid_bce(out, target)
    if name == "mse":
        return mse(out, target)
    raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSSES)}")


def metrics(name: str, out: np.ndarray, target: np.ndarray, task: str = "") -> tuple[float, float, int]:
    """(metric, metric2, n) of one batch: classification -> (accuracy, accuracy); bits ->
    (bit accuracy, exact-row accuracy); ``task == "regression"`` -> (RMSE, R² about this
    batch's own mean). Per-batch results combine over batches with :func:`combine`."""
    n = out.shape[0]
    if task == "regression":
        sse = float(np.square(out.astype(np.float64) - target).sum())
        return rmse(sse, n, _outputs(out)), r2(sse, sum_sq_dev(target)), n
    if name == "softmax_ce":
        acc = float((out.argmax(axis=1) == target).mean())
        return acc, acc, n
    thr = 0.0 if name == "sigmoid_bce" else 0.5
    ok = (out > thr) == (target > 0.5)
    return float(ok.mean()), float(ok.all(axis=1).mean()), n


def _outputs(a: np.ndarray) -> int:
    return int(np.prod(a.shape[1:], dtype=np.int64)) if a.ndim > 1 else 1


def sum_sq_dev(target: np.ndarray) -> float:
    """SST: the squared deviations of the targets from their mean, per output (column),
    summed over outputs; float64."""
    t = np.asarray(target, np.float64).reshape(len(target), -1)
    return float(np.square(t - t.mean(axis=0)).sum()) if len(t) else 0.0


def rmse(sse: float, n: int, n_outputs: int) -> float:
    """Root mean squared error over n rows of n_outputs targets; a NaN error (a diverged
    model) counts as infinite, so that the metric is always a number >= 0."""
    v = sse / (n * n_outputs)
    return math.sqrt(v) if v >= 0 else math.inf


def r2(sse: float, sst: float) -> float:
    """R² = 1 - SSE/SST; with constant targets (SST = 0): 1 for a perfect fit, else 0 (as
    scikit-learn does); a NaN error counts as infinite (R² = -inf)."""
    if not sse >= 0:
        sse = math.inf
    if sst > 0:
        return 1.0 - sse / sst
    return 1.0 if sse == 0 else 0.0


def combine(parts, task: str = "", n_outputs: int = 1, sst: float | None = None) -> dict:
    """Per-batch results ``{"loss", "metric", "metric2", "n"}`` -> one result over all their rows.

    Accuracies (classification, bits) and the loss are means weighted by n. Regression sums
    instead: the mse loss of a batch is its SSE / n, so sum(loss * n) is the SSE of all rows,
    and RMSE = sqrt(SSE / (N * outputs)) exactly; R² = 1 - SSE / ``sst``, the SST of the same
    rows about their own mean (the caller holds the targets: the test set). Without ``sst``
    R² is the n-weighted mean of the batches' own R² (the micro-batches of one training step)."""
    n = 0
    tot = {"loss": 0.0, "metric": 0.0, "metric2": 0.0}
    for p in parts:
        for k in tot:
            tot[k] += p[k] * p["n"]
        n += p["n"]
    out = {k: v / n for k, v in tot.items()}
    if task == "regression":
        sse = tot["loss"]
        out["metric"] = rmse(sse, n, n_outputs)
        if sst is not None:
            out["metric2"] = r2(sse, sst)
    out["n"] = n
    return out
