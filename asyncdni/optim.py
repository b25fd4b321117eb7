"""Optimizers behind one interface: ``opt.step(grads)`` updates the bound params in place."""
from __future__ import annotations

import numpy as np

OPTIMIZERS = ("sgd", "momentum", "adam")


class Optimizer:
    name = "base"

    def __init__(self, params: list[np.ndarray], lr: float):
        self.params = params
        self.lr = float(lr)
        self.t = 0

    def step(self, grads: list[np.ndarray]) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """Named state arrays (for checkpoints); ``t`` included as a 0-d array."""
        return {"t": np.array(self.t, dtype=np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.t = int(state["t"])


class SGD(Optimizer):
    name = "sgd"

    def __init__(self, params, lr):
        super().__init__(params, lr)
        self._tmp = [np.empty_like(p) for p in params]

    def step(self, grads):
        self.t += 1
        for p, g, tmp in zip(self.params, grads, self._tmp):
            np.multiply(g, self.lr, out=tmp)
            p -= tmp


class Momentum(Optimizer):
    name = "momentum"

    def __init__(self, params, lr, beta=0.9):
        super().__init__(params, lr)
        self.beta = beta
        self.v = [np.zeros_like(p) for p in params]
        self._tmp = [np.empty_like(p) for p in params]

    def step(self, grads):
        self.t += 1
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
        super().load_state(state)
        for i, v in enumerate(self.v):
            v[...] = state[f"v{i}"]


class Adam(Optimizer):
    name = "adam"

    def __init__(self, params, lr, beta1=0.9, beta2=0.999, eps=1e-8):
        super().__init__(params, lr)
        self.b1, self.b2, self.eps = beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self._tmp = [np.empty_like(p) for p in params]

    def step(self, grads):
        # In place with one scratch buffer per parameter: for a 1024x1024 float32 weight this
        # is memory-bound, and fresh temporaries (7 per step before) cost more than the matmuls.
        self.t += 1
        b1, b2 = self.b1, self.b2
        a = self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
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
        super().load_state(state)
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            m[...] = state[f"m{i}"]
            v[...] = state[f"v{i}"]


def make_optimizer(name: str, params: list[np.ndarray], lr: float) -> Optimizer:
    if name == "sgd":
        return SGD(params, lr)
    if name == "momentum":
        return Momentum(params, lr)
    if name == "adam":
        return Adam(params, lr)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
