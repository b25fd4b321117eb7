"""Dense layer math: activations, initialisation, forward and backward (numpy only).

Shapes: inputs are row-major batches ``x: (B, fan_in)``; weights ``W: (fan_in, fan_out)``,
bias ``b: (fan_out,)``; ``h = act(x @ W + b)``. Every array keeps the dtype of the
parameters (float32 in training, float64 in gradient checks).
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


class Dense:
    """One fully connected layer ``h = act(x @ W + b)``."""

    def __init__(self, W: np.ndarray, b: np.ndarray, activation: str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        self.W = W
        self.b = b
        self.activation = activation

    @classmethod
    def create(cls, rng, fan_in, fan_out, activation, init="he", dtype=np.float32) -> "Dense":
        return cls(init_weights(rng, fan_in, fan_out, init, dtype), np.zeros(fan_out, dtype), activation)

    @property
    def params(self) -> list[np.ndarray]:
        return [self.W, self.b]

    def forward(self, x: np.ndarray) -> np.ndarray:
        z = x @ self.W
        z += self.b
        return activate(self.activation, z, inplace=True)

    def backward(self, x: np.ndarray, h: np.ndarray, gh: np.ndarray, need_input_grad: bool = True,
                 W: np.ndarray | None = None):
        """Return (gW, gb, gx) for upstream gradient gh = dL/dh; gx is None when not needed.
        ``W``: the weights to take gx with (a stashed copy), default the current ones."""
        gz = activation_backward(self.activation, h, gh)
        gW = x.T @ gz
        gb = gz.sum(axis=0)
        gx = gz @ (self.W if W is None else W).T if need_input_grad else None
        return gW, gb, gx

    def flops_forward(self, batch: int) -> int:
        return 2 * batch * self.W.shape[0] * self.W.shape[1]
