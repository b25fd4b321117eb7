"""Synthetic-gradient (SG) models M(h[, c]) -> estimate of dL/dh. numpy only.

Conventions
-----------
* ``h``: the layer's output activations (B, d); ``c``: optional conditioning (B, k), the
  one-hot labels or target bits for label-conditioned DNI (cDNI), or ``None``.
* The model predicts the *per-example* gradient ``B * dL/dh`` (L is the batch-mean loss), so
  its scale does not depend on the batch size; the layer divides the prediction by B.
* Output layers are initialised to zero (as in the DNI paper), so an untrained model predicts
  a zero gradient rather than noise. That is *not* "no update" under Adam: Adam divides by
  the gradient's running RMS, so the first small non-zero predictions, after the first SG
  regression steps, already move the layer by about the learning rate per step, and scaling
  the SG output changes nothing. Only plain SGD turns a near-zero prediction into a
  near-zero step.
* Training is regression with the summed-over-features, batch-mean squared error
  (``predict_keep`` / ``grads_from``). By default the layer predicts again at regression
  time, so the gradient is taken at the SG's current parameters. With
  ``train.sg_reuse_prediction`` it reuses the forward pass's prediction instead: one matmul
  less, exact under ``sequential`` (nothing updates the SG in between), but under ``async``
  a gradient at parameters a few updates old, which measurably costs accuracy.
"""
from __future__ import annotations

import numpy as np

from asyncdni.numerics.nn import init_weights

SG_MODELS = ("linear", "mlp", "lowrank")


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
    """g = h @ A + c @ C + a  +  MLP(h, c): a linear skip (exactly the linear SG) plus an MLP.

    The MLP has ``layers`` ReLU hidden layers of width ``hidden``; the first one sees
    ``h @ W[0] + c @ C1 + b[0]``, and its output layer ``Wo`` has no bias (the skip's ``a``
    is the bias). The skip and ``Wo`` start at zero, so an untrained model predicts zero,
    and at the start it learns as the linear SG does (the MLP joins in as ``Wo`` moves off
    zero). Initialisation: ``W[0]`` He over the activation's fan-in (d); ``C1`` He over the
    label's own fan-in (k), so that the label enters the hidden layer at the scale of the
    activation, not at ~1/5 of it as a slice of one He draw over (d + k) inputs would give;
    deeper ``W[i]`` He over ``hidden``.

    ``params`` order: A, a, [C], then W[0], b[0], [C1], then W[i], b[i] for i >= 1, then Wo.
    """
    kind = "mlp"

    def __init__(self, dim: int, cond_dim: int, hidden: int, rng: np.random.Generator, dtype=np.float32,
                 layers: int = 1):
        if layers < 1:
            raise ValueError(f"an mlp SG model needs at least one hidden layer, got {layers}")
        self.A = np.zeros((dim, dim), dtype)
        self.a = np.zeros(dim, dtype)
        self.C = np.zeros((cond_dim, dim), dtype) if cond_dim else None
        self.W = [init_weights(rng, dim, hidden, "he", dtype)]
        self.b = [np.zeros(hidden, dtype)]
        self.C1 = init_weights(rng, cond_dim, hidden, "he", dtype) if cond_dim else None
        for _ in range(layers - 1):
            self.W.append(init_weights(rng, hidden, hidden, "he", dtype))
            self.b.append(np.zeros(hidden, dtype))
        self.Wo = np.zeros((hidden, dim), dtype)
        self.params = [self.A, self.a] + ([self.C] if cond_dim else [])
        self.params += [self.W[0], self.b[0]] + ([self.C1] if cond_dim else [])
        for W, b in zip(self.W[1:], self.b[1:]):
            self.params += [W, b]
        self.params.append(self.Wo)

    def _hiddens(self, h, c):
        z = h @ self.W[0]
        z += self.b[0]
        if self.C1 is not None:
            z += c @ self.C1
        us = [np.maximum(z, 0, out=z)]
        for W, b in zip(self.W[1:], self.b[1:]):
            z = us[-1] @ W
            z += b
            us.append(np.maximum(z, 0, out=z))
        return us

    def _out(self, h, c, u):
        g = h @ self.A
        g += self.a
        if self.C is not None:
            g += c @ self.C
        g += u @ self.Wo
        return g

    def predict(self, h, c):
        return self._out(h, c, self._hiddens(h, c)[-1])

    def predict_keep(self, h, c):
        us = self._hiddens(h, c)
        return self._out(h, c, us[-1]), (h, c, us)

    def grads_from(self, ctx, pred, target):
        h, c, us = ctx
        loss, gd = _mse(pred, target)
        skip = [h.T @ gd, gd.sum(axis=0)] + ([c.T @ gd] if self.C is not None else [])
        gWo = us[-1].T @ gd
        gu = gd @ self.Wo.T
        hidden = []                      # (gW, gb) from the last hidden layer down
        for i in range(len(self.W) - 1, -1, -1):
            gu *= (us[i] > 0)
            below = us[i - 1] if i > 0 else h
            hidden.append((below.T @ gu, gu.sum(axis=0)))
            if i > 0:
                gu = gu @ self.W[i].T
        hidden.reverse()
        grads = skip + list(hidden[0]) + ([c.T @ gu] if self.C1 is not None else [])
        for gW, gb in hidden[1:]:
            grads += [gW, gb]
        grads.append(gWo)
        return loss, grads

    def flops(self, batch):
        d = self.A.shape[0]
        k = 0 if self.C is None else self.C.shape[0]
        hid = self.Wo.shape[0]
        deep = len(self.W) - 1
        skip = 2 * batch * (d + k) * d
        mlp = 2 * batch * (d + k) * hid + deep * 2 * batch * hid * hid + 2 * batch * hid * d
        # update (prediction kept): skip grads; dWo and du; per deeper layer dW and du; dW[0] (and dC1)
        upd = skip + 2 * 2 * batch * hid * d + deep * 2 * 2 * batch * hid * hid + 2 * batch * (d + k) * hid
        return skip + mlp, upd


class LowRankSG(SGModel):
    """g = (h @ V) @ U + c @ C + a: a rank-``r`` linear model plus the label term (cDNI).

    Cost per sample: the prediction ``4 d r`` (plus ``2 k d`` for the label term) against
    the linear model's ``2 d^2``, and the same ratio for the update, so at ``r << d`` the
    synthetic gradient costs a small fraction of the layer's own ``6 d^2``.

    Initialisation, so that the untrained model predicts zero (as the linear one does) and
    still learns from the first step: ``U``, ``C`` and ``a`` start at zero; ``V`` starts
    as a random ``d x r`` matrix with orthonormal columns (QR of a Gaussian). Then
    ``z = h @ V`` is the projection of ``h`` onto a random ``r``-dimensional subspace,
    its components at the scale of ``h``'s own, and the regression gradient of ``U``,
    ``z.T @ dg``, is non-zero from the first step: ``U`` learns a linear regression on
    random features of ``h``. ``V``'s gradient, ``h.T @ (dg @ U.T)``, is zero while ``U``
    is, so ``V`` starts moving once ``U`` has (and then turns the subspace towards the
    directions that predict the gradient). The opposite choice (``V`` zero, ``U`` random)
    would give ``V`` a gradient at once but leave the prediction confined to a fixed
    random subspace of the output until ``U`` moves; zero in ``U`` keeps both ends free.

    ``params`` order: U, V, a, [C].
    """
    kind = "lowrank"

    def __init__(self, dim: int, cond_dim: int, rank: int, rng: np.random.Generator, dtype=np.float32):
        if rank < 1:
            raise ValueError(f"a lowrank SG model needs rank >= 1, got {rank}")
        r = min(rank, dim)
        q, _ = np.linalg.qr(rng.standard_normal((dim, r)))
        self.V = np.ascontiguousarray(q, dtype=dtype)
        self.U = np.zeros((r, dim), dtype)
        self.a = np.zeros(dim, dtype)
        self.C = np.zeros((cond_dim, dim), dtype) if cond_dim else None
        self.params = [self.U, self.V, self.a] + ([self.C] if cond_dim else [])

    def _out(self, z, c):
        g = z @ self.U
        g += self.a
        if self.C is not None:
            g += c @ self.C
        return g

    def predict(self, h, c):
        return self._out(h @ self.V, c)

    def predict_keep(self, h, c):
        z = h @ self.V
        return self._out(z, c), (h, c, z)

    def grads_from(self, ctx, pred, target):
        h, c, z = ctx
        loss, gd = _mse(pred, target)
        gz = gd @ self.U.T
        grads = [z.T @ gd, h.T @ gz, gd.sum(axis=0)]
        if self.C is not None:
            grads.append(c.T @ gd)
        return loss, grads

    def flops(self, batch):
        r, d = self.U.shape
        k = 0 if self.C is None else self.C.shape[0]
        pred = 2 * batch * d * r * 2 + 2 * batch * k * d           # z = hV, zU, cC
        upd = 2 * batch * r * d * 3 + 2 * batch * k * d            # dU, dz, dV, dC
        return pred, upd


def param_count(kind: str, dim: int, cond_dim: int, hidden: int, layers: int = 1, rank: int = 64) -> int:
    """Scalars in an SG model of this shape (without building it)."""
    d, k = dim, cond_dim
    if kind == "linear":
        return (d + 1 + k) * d
    if kind == "lowrank":
        return 2 * min(rank, d) * d + (1 + k) * d
    h = hidden or d
    return (d + 1 + k) * d + (d + k) * h + h + (layers - 1) * (h * h + h) + h * d


def make_sg_model(kind: str, dim: int, cond_dim: int, hidden: int, rng, dtype=np.float32,
                  layers: int = 1, rank: int = 64) -> SGModel:
    if kind == "linear":
        return LinearSG(dim, cond_dim, rng, dtype)
    if kind == "mlp":
        return MLPSG(dim, cond_dim, hidden or dim, rng, dtype, layers)
    if kind == "lowrank":
        return LowRankSG(dim, cond_dim, rank, rng, dtype)
    raise ValueError(f"unknown SG model {kind!r}; allowed: {', '.join(SG_MODELS)}")
