"""Losses, each returning (mean loss over the batch, dLoss/dInput). numpy only."""
from __future__ import annotations

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


def metrics(name: str, out: np.ndarray, target: np.ndarray) -> tuple[float, float, int]:
    """(metric, metric2, n): classification -> (accuracy, accuracy); bits -> (bit accuracy, exact-row accuracy)."""
    n = out.shape[0]
    if name == "softmax_ce":
        acc = float((out.argmax(axis=1) == target).mean())
        return acc, acc, n
    thr = 0.0 if name == "sigmoid_bce" else 0.5
    ok = (out > thr) == (target > 0.5)
    return float(ok.mean()), float(ok.all(axis=1).mean()), n
