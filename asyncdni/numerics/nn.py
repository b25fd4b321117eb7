"""Dense layer math: activations, initialisation, forward and backward (numpy only).

Shapes: inputs are row-major batches ``x: (B, fan_in)``; weights ``W: (fan_in, fan_out)``,
bias ``b: (fan_out,)``; ``h = act(x @ W + b)``. With batch normalisation (:class:`BatchNorm`)
the layer is ``h = act(BN(x @ W))``, BN's ``beta`` taking the bias's place. Every array keeps
the dtype of the parameters (float32 in training, float64 in gradient checks).
"""
from __future__ import annotations

import numpy as np

ACTIVATIONS = ("sigmoid", "relu", "tanh", "linear")
INITS = ("he", "xavier")


def activate(name: str, z: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Apply an activation; with ``inplace`` the result may overwrite ``z``."""
    if name == "relu":
        return np.maximum(z, 0, out=z if inplace else None)
    if name == "tanh":
        return np.tanh(z, out=z if inplace else None)
    if name == "sigmoid":
        # split on sign so that exp never overflows
        out = np.empty_like(z)
        pos = z >= 0
        out[pos] = 1 / (1 + np.exp(-z[pos]))
        ez = np.exp(z[~pos])
        out[~pos] = ez / (1 + ez)
        return out
    if name == "linear":
        return z
    raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")


def activation_backward(name: str, h: np.ndarray, gh: np.ndarray) -> np.ndarray:
    """dL/dz from dL/dh, using only the activation's output h."""
    if name == "relu":
        return gh * (h > 0)
    if name == "tanh":
        return gh * (1 - h * h)
    if name == "sigmoid":
        return gh * h * (1 - h)
    if name == "linear":
        return gh
    raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")


def init_weights(rng: np.random.Generator, fan_in: int, fan_out: int, scheme: str,
                 dtype=np.float32) -> np.ndarray:
    """He (normal, std sqrt(2/fan_in)) or Xavier/Glorot (uniform, limit sqrt(6/(fan_in+fan_out)))."""
    if scheme == "he":
        w = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
    elif scheme == "xavier":
        lim = np.sqrt(6.0 / (fan_in + fan_out))
        w = rng.uniform(-lim, lim, (fan_in, fan_out))
    else:
        raise ValueError(f"unknown init {scheme!r}; allowed: {', '.join(INITS)}")
    return np.ascontiguousarray(w, dtype=dtype)


BN_EPS = 1e-5          # added to the variance before the square root
BN_MOMENTUM = 0.9      # running = momentum * running + (1 - momentum) * batch statistic


class BatchNorm:
    """Batch normalisation of a layer's pre-activations, per feature:
    ``y = gamma * (z - mean) / sqrt(var + eps) + beta``.

    In training (:meth:`forward_train`) mean and var are the batch's (biased variance), and
    the running statistics move towards them (the unbiased variance, ``B / (B - 1)``, as in
    the usual implementations); at evaluation (:meth:`forward_eval`) the running ones are
    used, so the output of one example does not depend on the rest of its batch. ``gamma``
    and ``beta`` are parameters (the layer's optimizer updates them); the running mean and
    variance are state, updated only by training forwards.
    """

    def __init__(self, dim: int, dtype=np.float32, momentum: float = BN_MOMENTUM, eps: float = BN_EPS):
        self.gamma = np.ones(dim, dtype)
        self.beta = np.zeros(dim, dtype)
        self.mean = np.zeros(dim, dtype)
        self.var = np.ones(dim, dtype)
        self.momentum = momentum
        self.eps = eps

    @property
    def params(self) -> list[np.ndarray]:
        return [self.gamma, self.beta]

    def forward_train(self, z: np.ndarray, update: bool = True):
        """(y, ctx) with the batch's statistics; ``ctx`` is what :meth:`backward` needs.
        With ``update`` (default) the running statistics move towards the batch's."""
        B = z.shape[0]
        mu = z.mean(axis=0)
        zc = z - mu
        var = np.einsum("ij,ij->j", zc, zc) / z.dtype.type(B)
        inv = 1 / np.sqrt(var + z.dtype.type(self.eps))
        xhat = zc
        xhat *= inv
        y = xhat * self.gamma
        y += self.beta
        if update:
            m = z.dtype.type(self.momentum)
            self.mean *= m
            self.mean += (1 - m) * mu
            if B > 1:                       # one example has no variance to learn from
                self.var *= m
                self.var += (1 - m) * z.dtype.type(B / (B - 1)) * var
        return y, (xhat, inv)

    def forward_eval(self, z: np.ndarray) -> np.ndarray:
        scale = self.gamma / np.sqrt(self.var + z.dtype.type(self.eps))
        y = z - self.mean
        y *= scale
        y += self.beta
        return y

    def backward(self, ctx, gy: np.ndarray, gamma: np.ndarray | None = None):
        """(dL/dz, dL/dgamma, dL/dbeta) from dL/dy through the batch statistics of ``ctx``;
        ``gamma``: the scale to take dL/dz with (a stashed copy), default the current one."""
        xhat, inv = ctx
        B = gy.shape[0]
        ggamma = np.einsum("ij,ij->j", gy, xhat)
        gbeta = gy.sum(axis=0)
        g = self.gamma if gamma is None else gamma
        gz = gy * gy.dtype.type(B)
        gz -= gbeta
        gz -= xhat * ggamma
        gz *= (g * inv) / gy.dtype.type(B)
        return gz, ggamma, gbeta


class Dense:
    """One fully connected layer ``h = act(x @ W + b)``, or with batch normalisation
    ``h = act(BN(x @ W))`` (no bias: BN's ``beta`` is it, and ``b`` is None)."""

    def __init__(self, W: np.ndarray, b: np.ndarray | None, activation: str, bn: BatchNorm | None = None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        self.W = W
        self.b = None if bn is not None else b
        self.bn = bn
        self.activation = activation

    @classmethod
    def create(cls, rng, fan_in, fan_out, activation, init="he", dtype=np.float32,
               batch_norm: bool = False) -> "Dense":
        W = init_weights(rng, fan_in, fan_out, init, dtype)
        if batch_norm:
            return cls(W, None, activation, BatchNorm(fan_out, dtype))
        return cls(W, np.zeros(fan_out, dtype), activation)

    @property
    def params(self) -> list[np.ndarray]:
        """What the optimizer updates: [W, b], or [W, gamma, beta] with batch normalisation."""
        return [self.W, self.b] if self.bn is None else [self.W, *self.bn.params]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Inference (batch normalisation with the running statistics); nothing changes."""
        z = x @ self.W
        if self.bn is None:
            z += self.b
        else:
            z = self.bn.forward_eval(z)
        return activate(self.activation, z, inplace=True)

    def forward_train(self, x: np.ndarray):
        """(h, ctx) for a training step: batch normalisation with the batch's statistics
        (and the running ones updated); ``ctx`` goes to :meth:`grads`. Without batch
        normalisation this is :meth:`forward`, and ``ctx`` is None."""
        if self.bn is None:
            return self.forward(x), None
        y, ctx = self.bn.forward_train(x @ self.W)
        return activate(self.activation, y, inplace=True), ctx

    def grads(self, x: np.ndarray, h: np.ndarray, gh: np.ndarray, ctx=None, need_input_grad: bool = True,
              W: np.ndarray | None = None, gamma: np.ndarray | None = None):
        """(gradients in :attr:`params` order, gx) for upstream gh = dL/dh; gx is None when not
        needed. ``ctx``: from :meth:`forward_train`. ``W``, ``gamma``: the weights to take gx with
        (stashed copies), default the current ones."""
        gz = activation_backward(self.activation, h, gh)
        if self.bn is None:
            out = [x.T @ gz, gz.sum(axis=0)]
        else:
            gz, ggamma, gbeta = self.bn.backward(ctx, gz, gamma)
            out = [x.T @ gz, ggamma, gbeta]
        gx = gz @ (self.W if W is None else W).T if need_input_grad else None
        return out, gx

    def input_grad(self, h: np.ndarray, gh: np.ndarray, ctx=None) -> np.ndarray:
        """dL/dx only, for upstream gh = dL/dh, with the current weights (``ctx``: the batch-norm
        context of the forward, from :meth:`forward_train`)."""
        gz = activation_backward(self.activation, h, gh)
        if self.bn is not None:
            gz = self.bn.backward(ctx, gz)[0]
        return gz @ self.W.T

    def backward(self, x: np.ndarray, h: np.ndarray, gh: np.ndarray, need_input_grad: bool = True,
                 W: np.ndarray | None = None):
        """Return (gW, gb, gx) for upstream gradient gh = dL/dh; gx is None when not needed.
        ``W``: the weights to take gx with (a stashed copy), default the current ones.
        Without batch normalisation only (with it, use :meth:`grads`)."""
        if self.bn is not None:
            raise ValueError("Dense.backward: a batch-normalised layer needs grads() with its forward's ctx")
        (gW, gb), gx = self.grads(x, h, gh, None, need_input_grad, W)
        return gW, gb, gx

    def flops_forward(self, batch: int) -> int:
        return 2 * batch * self.W.shape[0] * self.W.shape[1]
