"""Optimizers behind one interface: ``opt.step(grads)`` updates the bound params in place.

Every step is checked before anything changes. Each optimizer keeps, per parameter, an
upper bound of the largest magnitude in the parameter and in its own state (velocity,
moments). From the gradient's norm (one BLAS dot product, the only pass over the data
that the check adds) it bounds what the update can produce. If that bound stays below a
quarter of the dtype's largest value, the update cannot overflow and is applied, with
exactly the arithmetic it always had. Otherwise the bounds are recomputed exactly, and if
the update could still overflow (or the gradient is not finite, or too large to square),
``step`` returns False and nothing changes: not the parameters, not the optimizer's state,
not its step count. The caller counts that like a non-finite gradient. The bounds grow a
little with every step and are recomputed exactly when they reach the limit, so a run
whose weights stay far from the float range's edge never pays for more than the dot product.

Parameters must change only through ``step`` and ``load_state`` (which recomputes the
bounds); after writing them directly, call ``refresh_bounds()``.
"""
from __future__ import annotations

import math

import numpy as np

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "step")
_ROUND = 1 + 2.0 ** -20      # margin for the rounding of each float32/float64 operation in a step


def all_finite(*arrays) -> bool:
    """True if every element is finite (None is skipped). One BLAS dot product per array: a
    NaN or an infinity makes the sum of squares non-finite, and a dot product is far cheaper
    than np.isfinite(a).all() or even a.sum(). Only when it is not finite (which may also be
    an overflow of large finite values) is the array checked element by element, so large
    finite values are never taken for infinities."""
    for a in arrays:
        if a is not None and not math.isfinite(_sum_squares(a)) and not np.isfinite(a).all():
            return False
    return True


def _sum_squares(a: np.ndarray) -> float:
    f = a.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.dot(f, f))


def _norm(g: np.ndarray) -> float:
    """An upper bound of max|g|: its 2-norm; inf or nan if g is not finite or its squares overflow."""
    return math.sqrt(_sum_squares(g))


def _absmax(a: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    hi, lo = float(a.max()), float(a.min())
    return max(hi, -lo) if math.isfinite(hi) and math.isfinite(lo) else math.inf


class Optimizer:
    name = "base"

    def __init__(self, params: list[np.ndarray], lr: float, weight_decay: float = 0.0):
        self.params = params
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)   # decoupled: p *= 1 - lr x weight_decay before each step
        self.t = 0
        self._limit = [float(np.finfo(p.dtype).max) / 4 for p in params]
        self._bp = [0.0] * len(params)          # bound of max|param|
        self.refresh_bounds()

    # ------------------------------------------------------------ the check
    def refresh_bounds(self) -> None:
        """Exact magnitude bounds of every parameter and state array (one pass over each)."""
        for i in range(len(self.params)):
            self._refresh(i)

    def _refresh(self, i: int) -> None:
        self._bp[i] = _absmax(self.params[i])

    def _bounds(self, i: int, G: float) -> tuple:
        """Bounds after a step with a gradient of norm G: (bound of the parameter, ...state)."""
        raise NotImplementedError

    def _check(self, grads) -> list | None:
        """The new bounds of every parameter, or None if the step could overflow."""
        out = []
        for i, g in enumerate(grads):
            G = _norm(g)
            b = self._bounds(i, G)
            if not all(x < self._limit[i] for x in b):
                self._refresh(i)                 # the bounds may just have grown stale
                b = self._bounds(i, G)
                if not all(x < self._limit[i] for x in b):
                    return None
            out.append(b)
        return out

    def step(self, grads: list[np.ndarray]) -> bool:
        """Apply one update; False (and nothing changed) if its result could be non-finite."""
        new = self._check(grads)
        if new is None:
            return False
        self.t += 1
        if self.weight_decay:
            # decoupled weight decay (Loshchilov & Hutter; torch's AdamW, and SGD's L2 term):
            # a shrink by a factor in [0, 1) (validation keeps lr x weight_decay below 1), so
            # the magnitude bounds just checked still hold
            shrink = 1.0 - self.lr * self.weight_decay
            for p in self.params:
                p *= p.dtype.type(shrink)
        self._apply(grads)
        self._set_bounds(new)
        return True

    def _apply(self, grads) -> None:
        raise NotImplementedError

    def _set_bounds(self, new) -> None:
        for i, b in enumerate(new):
            self._bp[i] = b[0]

    # ---------------------------------------------------------- checkpoints
    def state(self) -> dict[str, np.ndarray]:
        """Named state arrays (for checkpoints); ``t`` included as a 0-d array."""
        return {"t": np.array(self.t, dtype=np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.t = int(state["t"])
        self.refresh_bounds()


class SGD(Optimizer):
    name = "sgd"

    def __init__(self, params, lr, weight_decay=0.0):
        super().__init__(params, lr, weight_decay)
        self._tmp = [np.empty_like(p) for p in params]

    def _bounds(self, i, G):
        return ((self._bp[i] + self.lr * G) * _ROUND,)

    def _apply(self, grads):
        for p, g, tmp in zip(self.params, grads, self._tmp):
            np.multiply(g, self.lr, out=tmp)
            p -= tmp


class Momentum(Optimizer):
    name = "momentum"

    def __init__(self, params, lr, beta=0.9, weight_decay=0.0):
        self.beta = beta
        self.v = [np.zeros_like(p) for p in params]
        self._bv = [0.0] * len(params)          # bound of max|v|
        super().__init__(params, lr, weight_decay)
        self._tmp = [np.empty_like(p) for p in params]

    def _refresh(self, i):
        super()._refresh(i)
        self._bv[i] = _absmax(self.v[i])

    def _bounds(self, i, G):
        bv = (self.beta * self._bv[i] + G) * _ROUND
        return ((self._bp[i] + self.lr * bv) * _ROUND, bv)

    def _set_bounds(self, new):
        super()._set_bounds(new)
        for i, b in enumerate(new):
            self._bv[i] = b[1]

    def _apply(self, grads):
        for p, g, v, tmp in zip(self.params, grads, self.v, self._tmp):
            v *= self.beta
            v += g
            np.multiply(v, self.lr, out=tmp)
            p -= tmp

    def state(self):
        s = super().state()
        s.update({f"v{i}": v for i, v in enumerate(self.v)})
        return s

    def load_state(self, state):
        for i, v in enumerate(self.v):
            v[...] = state[f"v{i}"]
        super().load_state(state)


class Adam(Optimizer):
    name = "adam"

    def __init__(self, params, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.b1, self.b2, self.eps = beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self._bm = [0.0] * len(params)          # bounds of max|m| and max v
        self._bv = [0.0] * len(params)
        super().__init__(params, lr, weight_decay)
        self._tmp = [np.empty_like(p) for p in params]

    def _refresh(self, i):
        super()._refresh(i)
        self._bm[i] = _absmax(self.m[i])
        self._bv[i] = _absmax(self.v[i])

    def _step_size(self, t: int):
        return self.lr * np.sqrt(1 - self.b2 ** t) / (1 - self.b1 ** t)   # np.float64, as it always was

    def _bounds(self, i, G):
        b1, b2 = self.b1, self.b2
        bm = (b1 * self._bm[i] + (1 - b1) * G) * _ROUND
        bv = (b2 * self._bv[i] + (1 - b2) * (G * G)) * _ROUND       # also bounds g*g itself
        # |m / (sqrt(v) + eps)| <= max|m| / eps, as v >= 0
        bp = (self._bp[i] + float(self._step_size(self.t + 1)) * bm / self.eps) * _ROUND
        return (bp, bm, bv, G * G)

    def _set_bounds(self, new):
        super()._set_bounds(new)
        for i, b in enumerate(new):
            self._bm[i], self._bv[i] = b[1], b[2]

    def _apply(self, grads):
        # In place with one scratch buffer per parameter: for a 1024x1024 float32 weight this
        # is memory-bound, and fresh temporaries (7 per step before) cost more than the matmuls.
        b1, b2 = self.b1, self.b2
        a = self._step_size(self.t)
        for p, g, m, v, tmp in zip(self.params, grads, self.m, self.v, self._tmp):
            np.multiply(g, 1 - b1, out=tmp)
            m *= b1
            m += tmp
            np.multiply(g, g, out=tmp)
            tmp *= 1 - b2
            v *= b2
            v += tmp
            np.sqrt(v, out=tmp)
            tmp += self.eps
            np.divide(m, tmp, out=tmp)
            tmp *= a
            p -= tmp

    def state(self):
        s = super().state()
        s.update({f"m{i}": m for i, m in enumerate(self.m)})
        s.update({f"v{i}": v for i, v in enumerate(self.v)})
        return s

    def load_state(self, state):
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            m[...] = state[f"m{i}"]
            v[...] = state[f"v{i}"]
        super().load_state(state)


def make_optimizer(name: str, params: list[np.ndarray], lr: float, weight_decay: float = 0.0) -> Optimizer:
    """``adamw`` is Adam with decoupled weight decay; ``weight_decay`` applies the same
    decoupled decay under every optimizer (0: none)."""
    if name == "sgd":
        return SGD(params, lr, weight_decay)
    if name == "momentum":
        return Momentum(params, lr, weight_decay=weight_decay)
    if name in ("adam", "adamw"):
        return Adam(params, lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def lr_factor(schedule: str, t: int, total: int, step_size: int = 0, gamma: float = 0.1) -> float:
    """The learning-rate multiplier after ``t`` updates, as torch.optim.lr_scheduler computes
    it in closed form: ``constant`` 1; ``cosine`` (CosineAnnealingLR, eta_min 0, T_max
    ``total``) 0.5 (1 + cos(pi min(t, total) / total)); ``step`` (StepLR) gamma ** (t // step_size)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(t, total) / max(1, total)))
    if schedule == "step":
        return gamma ** (t // max(1, step_size))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
