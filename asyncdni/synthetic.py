"""Synthetic-gradient (SG) models M(h[, c]) -> estimate of dL/dh. numpy only.

Conventions
-----------
* ``h``: the layer's output activations (B, d); ``c``: optional conditioning (B, k), the
  one-hot labels or target bits for label-conditioned DNI (cDNI), or ``None``.
* The model predicts the *per-example* gradient ``B * dL/dh`` (L is the batch-mean loss), so
  its scale does not depend on the batch size; the layer divides the prediction by B.
* Output layers are initialised to zero (as in the DNI paper), so an untrained model predicts
  a zero gradient and training starts from "no update" rather than from noise.
* Training is regression with the summed-over-features, batch-mean squared error
  (``predict_keep`` / ``grads_from``). By default the layer predicts again at regression
  time, so the gradient is taken at the SG's current parameters. With
  ``train.sg_reuse_prediction`` it reuses the forward pass's prediction instead: one matmul
  less, exact under ``sequential`` (nothing updates the SG in between), but under ``async``
  a gradient at parameters a few updates old, which measurably costs accuracy.
"""
from __future__ import annotations

import numpy as np

from .nn import init_weights

SG_MODELS = ("linear", "mlp")


class SGModel:
    kind = "base"
    params: list[np.ndarray]

    def predict(self, h: np.ndarray, c: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def loss_and_grads(self, h, c, target):
        """MSE of predict(h, c) against target; returns (loss, grads aligned with params)."""
        pred, ctx = self.predict_keep(h, c)
        return self.grads_from(ctx, pred, target)

    def predict_keep(self, h, c):
        """predict(h, c) plus what the regression step needs, so that it need not predict again."""
        raise NotImplementedError

    def grads_from(self, ctx, pred, target):
        """(loss, grads) of the MSE regression, at the parameters that made ``pred``."""
        raise NotImplementedError

    def flops(self, batch: int) -> tuple[int, int]:
        """(prediction flops, update flops) for one batch."""
        raise NotImplementedError


def _mse(pred, target):
    B = pred.shape[0]
    d = pred - target
    return float(np.vdot(d, d) / B), d * (2.0 / B)


class LinearSG(SGModel):
    """g = h @ A + c @ C + a, all zero-initialised."""
    kind = "linear"

    def __init__(self, dim: int, cond_dim: int, rng: np.random.Generator, dtype=np.float32):
        self.A = np.zeros((dim, dim), dtype)
        self.a = np.zeros(dim, dtype)
        self.C = np.zeros((cond_dim, dim), dtype) if cond_dim else None
        self.params = [self.A, self.a] + ([self.C] if cond_dim else [])

    def predict(self, h, c):
        g = h @ self.A
        g += self.a
        if self.C is not None:
            g += c @ self.C
        return g

    def predict_keep(self, h, c):
        return self.predict(h, c), (h, c)

    def grads_from(self, ctx, pred, target):
        h, c = ctx
        loss, gd = _mse(pred, target)
        grads = [h.T @ gd, gd.sum(axis=0)]
        if self.C is not None:
            grads.append(c.T @ gd)
        return loss, grads

    def flops(self, batch):
        d = self.A.shape[0]
        k = 0 if self.C is None else self.C.shape[0]
        pred = 2 * batch * (d + k) * d
        return pred, 2 * batch * (d + k) * d


class MLPSG(SGModel):
    """g = relu(h @ A1 + c @ C1 + a1) @ A2 + a2, with A2 and a2 zero-initialised."""
    kind = "mlp"

    def __init__(self, dim: int, cond_dim: int, hidden: int, rng: np.random.Generator, dtype=np.float32):
        W1 = init_weights(rng, dim + cond_dim, hidden, "he", dtype)
        self.A1 = W1[:dim].copy()
        self.C1 = W1[dim:].copy() if cond_dim else None
        self.a1 = np.zeros(hidden, dtype)
        self.A2 = np.zeros((hidden, dim), dtype)
        self.a2 = np.zeros(dim, dtype)
        self.params = [self.A1, self.a1, self.A2, self.a2] + ([self.C1] if cond_dim else [])

    def _hidden(self, h, c):
        z = h @ self.A1
        z += self.a1
        if self.C1 is not None:
            z += c @ self.C1
        return np.maximum(z, 0, out=z)

    def predict(self, h, c):
        g = self._hidden(h, c) @ self.A2
        g += self.a2
        return g

    def predict_keep(self, h, c):
        u = self._hidden(h, c)
        pred = u @ self.A2
        pred += self.a2
        return pred, (h, c, u)

    def grads_from(self, ctx, pred, target):
        h, c, u = ctx
        loss, gd = _mse(pred, target)
        gA2 = u.T @ gd
        ga2 = gd.sum(axis=0)
        gu = gd @ self.A2.T
        gu *= (u > 0)
        grads = [h.T @ gu, gu.sum(axis=0), gA2, ga2]
        if self.C1 is not None:
            grads.append(c.T @ gu)
        return loss, grads

    def flops(self, batch):
        d, hid = self.A1.shape
        k = 0 if self.C1 is None else self.C1.shape[0]
        pred = 2 * batch * (d + k) * hid + 2 * batch * hid * d
        # update (prediction kept from the forward pass): dA2, du, dA1 (and dC1)
        return pred, 2 * batch * hid * d * 2 + 2 * batch * (d + k) * hid


def make_sg_model(kind: str, dim: int, cond_dim: int, hidden: int, rng, dtype=np.float32) -> SGModel:
    if kind == "linear":
        return LinearSG(dim, cond_dim, rng, dtype)
    if kind == "mlp":
        return MLPSG(dim, cond_dim, hidden or dim, rng, dtype)
    raise ValueError(f"unknown SG model {kind!r}; allowed: {', '.join(SG_MODELS)}")
