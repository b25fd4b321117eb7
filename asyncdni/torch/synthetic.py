"""Synthetic-gradient (SG) models for torch stages, for activations of any shape.

The conventions are those of ``asyncdni.numerics.synthetic``:

* the model sees the stage's output ``h`` (detached) and, under cDNI, a condition ``c``
  (B, k): one-hot labels or the targets themselves (``layer.condition_vector``);
* it predicts the *per-example* gradient ``B * dL/dh`` (L: the batch-mean loss); the node
  divides by B;
* its output layer starts at zero (DNI paper), so the untrained model predicts zero;
* it is trained by regression with the summed-over-features, batch-mean squared error
  (:func:`regression_loss`).

Shapes: a feature map ``h`` (B, C, H, W) gets a convolutional model; ``c`` enters as k extra
constant channels (B, k, H, W). Any other shape is flattened to a vector (B, d) (and the
prediction reshaped back); ``c`` is concatenated to it. Kinds:

==========  =====================================  =========================================
kind        vectors (B, d)                         feature maps (B, C, H, W)
==========  =====================================  =========================================
linear      linear(d + k -> d), zero-init          conv 3x3 (C + k -> C, padding 1), zero-init
mlp         linear skip (zero-init) plus an MLP:   ``layers`` x [conv 3x3 (-> hidden), ReLU],
            ``layers`` x [linear(-> hidden),       then conv 3x3 (hidden -> C), zero-init
            ReLU], linear(hidden -> d, no bias),   (the DNI paper's conv SG, with 3x3 kernels)
            zero-init (numerics' MLPSG)
lowrank     (h V) U + c C + a, V orthonormal,      (not offered)
            U zero (numerics' LowRankSG)
==========  =====================================  =========================================

``hidden`` 0 means the feature width (d, or C).
"""
from __future__ import annotations

import math

import torch
from torch import nn

SG_KINDS = ("linear", "mlp", "lowrank")


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed-over-features, batch-mean squared error (numerics/synthetic.py ``_mse``)."""
    d = pred - target
    return (d * d).sum() / pred.shape[0]


def is_feature_map(shape: tuple) -> bool:
    return len(shape) == 3


class SGModel(nn.Module):
    """``forward(h, c)`` -> the predicted per-example gradient, shaped like ``h``."""

    def __init__(self, shape: tuple, cond_dim: int):
        super().__init__()
        self.shape = tuple(shape)
        self.cond_dim = cond_dim


class VectorSG(SGModel):
    def __init__(self, kind: str, shape: tuple, cond_dim: int, hidden: int = 0, layers: int = 1, rank: int = 64):
        super().__init__(shape, cond_dim)
        d = math.prod(shape)
        k = cond_dim
        self.kind = kind
        self.skip = None
        self.mlp = None
        self.V = None
        if kind == "lowrank":
            r = min(rank, d)
            q, _ = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64))
            self.V = nn.Parameter(q.to(torch.get_default_dtype()).contiguous())
            self.U = nn.Linear(r, d)
            nn.init.zeros_(self.U.weight)
            nn.init.zeros_(self.U.bias)
            self.C = nn.Linear(k, d, bias=False) if k else None
            if self.C is not None:
                nn.init.zeros_(self.C.weight)
            return
        self.skip = nn.Linear(d + k, d)
        nn.init.zeros_(self.skip.weight)
        nn.init.zeros_(self.skip.bias)
        if kind == "mlp":
            hid = hidden or d
            mods: list[nn.Module] = []
            width = d + k
            for _ in range(layers):
                lin = nn.Linear(width, hid)
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
                nn.init.zeros_(lin.bias)
                mods += [lin, nn.ReLU()]
                width = hid
            out = nn.Linear(hid, d, bias=False)
            nn.init.zeros_(out.weight)
            self.mlp = nn.Sequential(*mods, out)

    def forward(self, h: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        B = h.shape[0]
        v = h.reshape(B, -1)
        if self.V is not None:
            g = self.U(v @ self.V)
            if self.C is not None:
                g = g + self.C(c.to(g.dtype))
            return g.reshape(h.shape)
        z = v if c is None or not self.cond_dim else torch.cat([v, c.to(v.dtype)], dim=1)
        g = self.skip(z)
        if self.mlp is not None:
            g = g + self.mlp(z)
        return g.reshape(h.shape)


class ConvSG(SGModel):
    def __init__(self, kind: str, shape: tuple, cond_dim: int, hidden: int = 0, layers: int = 1):
        super().__init__(shape, cond_dim)
        C = shape[0]
        width = C + cond_dim
        mods: list[nn.Module] = []
        if kind == "mlp":
            hid = hidden or C
            for _ in range(layers):
                conv = nn.Conv2d(width, hid, 3, padding=1)
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                mods += [conv, nn.ReLU()]
                width = hid
        out = nn.Conv2d(width, C, 3, padding=1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*mods, out)
        self.kind = kind

    def forward(self, h: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if c is not None and self.cond_dim:
            B, _, H, W = h.shape
            h = torch.cat([h, c.to(h.dtype).reshape(B, -1, 1, 1).expand(B, c.shape[1], H, W)], dim=1)
        return self.net(h)


def make_sg(kind: str, shape: tuple, cond_dim: int = 0, hidden: int = 0, layers: int = 1, rank: int = 64) -> SGModel:
    """An SG model for per-sample activations of ``shape`` (see the module docstring)."""
    shape = tuple(int(s) for s in shape)
    if kind not in SG_KINDS:
        raise ValueError(f"unknown SG model {kind!r}; allowed: {', '.join(SG_KINDS)}")
    if kind == "mlp" and layers < 1:
        raise ValueError(f"an mlp SG model needs at least one hidden layer, got {layers}")
    if is_feature_map(shape):
        if kind == "lowrank":
            raise ValueError(f"the lowrank SG model works on vectors; this stage outputs feature maps {shape}: "
                             "use linear or mlp")
        return ConvSG(kind, shape, cond_dim, hidden, layers)
    return VectorSG(kind, shape, cond_dim, hidden, layers, rank)
