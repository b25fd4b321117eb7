"""One layer's state and its per-message arithmetic, independent of any transport.

A ``LayerNode`` owns a dense layer, its optimizer and (except for the last layer) its
synthetic-gradient model with its own optimizer. The worker process calls these methods
when messages arrive; ``reference.py`` calls the same methods in one process. Having one
implementation of the arithmetic is what makes the multi-process ``sequential`` and
``backprop`` schedules reproduce the in-process reference exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import losses
from .nn import Dense
from .optim import all_finite, make_optimizer  # noqa: F401 (all_finite: re-exported)
from .synthetic import make_sg_model


class StepError(RuntimeError):
    """A message refers to a step this layer has no state for."""


class NonFiniteError(RuntimeError):
    """A loss, gradient or output was NaN or infinite and the run asked to stop on that."""


@dataclass(frozen=True)
class LayerSpec:
    index: int            # 0-based position in the network
    n_layers: int
    fan_in: int
    fan_out: int
    activation: str
    init: str
    loss: str             # loss of the network (used by the last layer only)
    task: str             # "classification" or "bits"
    n_out: int            # classes or bits (used for label conditioning)
    optimizer: str
    lr: float
    sg_model: str
    sg_hidden: int
    sg_lr: float
    cond: bool            # label-conditioned synthetic gradients (cDNI)
    microbatches: int     # micro-batches per step for the pipeline schedule
    seed: int
    sg_reuse: bool = False  # SG regression reuses the forward pass's prediction (one matmul less)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_layers - 1

    @property
    def cond_dim(self) -> int:
        return self.n_out if self.cond else 0

    def param_count(self) -> int:
        """Scalars in this layer's parameters: the dense layer plus its SG model, if any."""
        n = (self.fan_in + 1) * self.fan_out
        if self.is_last:
            return n
        d, k = self.fan_out, self.cond_dim
        if self.sg_model == "linear":
            return n + (d + 1 + k) * d
        h = self.sg_hidden or d
        return n + (d + k) * h + h + h * d + d


def condition_vector(task: str, n_out: int, y: np.ndarray, dtype=np.float32) -> np.ndarray:
    """What a label-conditioned SG model sees of the targets: one-hot labels or the target bits."""
    if task == "classification":
        out = np.zeros((y.shape[0], n_out), dtype)
        out[np.arange(y.shape[0]), y] = 1
        return out
    return y.astype(dtype, copy=False)


class LayerNode:
    def __init__(self, spec: LayerSpec, dtype=np.float32, fail_on_nonfinite: bool = False):
        self.spec = spec
        self.fail_on_nonfinite = fail_on_nonfinite
        self.nonfinite_skipped = 0       # updates (layer or SG) not applied because of NaN/Inf
        rng = np.random.default_rng([spec.seed, spec.index])
        self.dense = Dense.create(rng, spec.fan_in, spec.fan_out, spec.activation, spec.init, dtype)
        self.opt = make_optimizer(spec.optimizer, self.dense.params, spec.lr)
        self.sg = None
        self.sg_opt = None
        if not spec.is_last and spec.sg_model != "none":
            self.sg = make_sg_model(spec.sg_model, spec.fan_out, spec.cond_dim, spec.sg_hidden, rng, dtype)
            self.sg_opt = make_optimizer(spec.optimizer, self.sg.params, spec.sg_lr)
        self.cache: dict[int, tuple] = {}
        self._acc: list | None = None   # pipeline gradient accumulator
        self._acc_count = 0
        self.fwd_steps = 0
        self.updates = 0
        self.sg_updates = 0
        self.last_sg_loss = float("nan")

    # ----------------------------------------------------------------- helpers
    def _cond(self, y):
        s = self.spec
        return condition_vector(s.task, s.n_out, y, self.dense.W.dtype) if s.cond else None

    def _loss(self, out, y):
        loss, g = losses.compute(self.spec.loss, out, y)
        metric, metric2, n = losses.metrics(self.spec.loss, out, y)
        return g, {"loss": loss, "metric": metric, "metric2": metric2, "n": n}

    def _nonfinite(self, what: str) -> None:
        self.nonfinite_skipped += 1
        if self.fail_on_nonfinite:
            raise NonFiniteError(f"layer {self.spec.index + 1}: non-finite {what}; stopping (fail_on_nonfinite)")

    def _apply(self, gW, gb):
        """Apply a weight update, unless the gradient or the updated weights are not finite:
        then nothing changes, and it is counted (or stops the run under fail_on_nonfinite)."""
        if not all_finite(gW, gb):
            self._nonfinite("weight gradient")
            return
        if not self.opt.step([gW, gb]):     # the update itself overflowed: nothing was changed
            self._nonfinite("weight update (the new weights would not be finite)")
            return
        self.updates += 1

    def params(self) -> dict[str, np.ndarray]:
        out = {"W": self.dense.W, "b": self.dense.b}
        if self.sg is not None:
            out.update({f"sg{i}": p for i, p in enumerate(self.sg.params)})
        return out

    def forward_only(self, x):
        """Inference: the layer's output (logits for the last layer), no state touched."""
        return self.dense.forward(x)

    # --------------------------------------------------------------------- DNI
    def dni_forward(self, step: int, x: np.ndarray, y: np.ndarray):
        """Forward with an immediate update from the synthetic (or, last layer, true) gradient.

        Returns (h, g_in, metrics): h is None for the last layer; g_in (dL/dx) is None for
        the first layer; metrics is a dict for the last layer, else None.
        """
        h = self.dense.forward(x)
        B = x.shape[0]
        metrics = None
        if self.spec.is_last:
            gh, metrics = self._loss(h, y)
        elif self.sg is not None:
            c = self._cond(y)
            pred, ctx = self.sg.predict_keep(h, c)
            gh = pred * (1.0 / B)
            self.cache[step] = (ctx, pred)
        else:
            gh = None
        self.fwd_steps += 1
        if gh is None:      # no SG model: the layer is frozen, only passes activations on
            return h, None, None
        gW, gb, gx = self.dense.backward(x, h, gh, need_input_grad=not self.spec.is_first)
        self._apply(gW, gb)
        return (None if self.spec.is_last else h), gx, metrics

    def sg_update(self, step: int, g: np.ndarray) -> float:
        """Regress the SG model onto the gradient that the next layer sent back for ``step``."""
        try:
            ctx, pred = self.cache.pop(step)
        except KeyError:
            raise StepError(f"layer {self.spec.index + 1}: gradient for step {step}, which is not in flight") from None
        if not self.spec.sg_reuse:
            # the regression gradient at the SG's current parameters: under async the SG has
            # moved since it made ``pred`` (measured: reusing pred costs ~1.5 points on MNIST)
            pred, ctx = self.sg.predict_keep(ctx[0], ctx[1])
        loss, grads = self.sg.grads_from(ctx, pred, g * pred.shape[0])
        if not (np.isfinite(loss) and all_finite(*grads)):
            self._nonfinite("synthetic-gradient update")
            return loss
        if not self.sg_opt.step(grads):
            self._nonfinite("synthetic-gradient update (the new SG weights would not be finite)")
            return loss
        self.sg_updates += 1
        self.last_sg_loss = loss
        return loss

    def drop_step(self, step: int) -> None:
        self.cache.pop(step, None)

    # ---------------------------------------------------------------- backprop
    def bp_forward(self, step: int, x: np.ndarray, y: np.ndarray, scale: float = 1.0):
        """Update-locked backprop, forward half. Non-last layers cache and return (h, None, None);
        the last layer computes the loss and its own gradient and returns (None, g_in, metrics).
        ``scale`` weights a micro-batch's gradient (micro-batch size / batch size)."""
        h = self.dense.forward(x)
        self.fwd_steps += 1
        if not self.spec.is_last:
            self.cache[step] = (x, h)
            return h, None, None
        gh, metrics = self._loss(h, y)
        if scale != 1.0:
            gh *= scale
        gx = self._backward_and_maybe_update(x, h, gh)
        return None, gx, metrics

    def bp_backward(self, step: int, g: np.ndarray):
        try:
            x, h = self.cache.pop(step)
        except KeyError:
            raise StepError(f"layer {self.spec.index + 1}: gradient for step {step}, which is not in flight") from None
        return self._backward_and_maybe_update(x, h, g)

    def _backward_and_maybe_update(self, x, h, gh):
        gW, gb, gx = self.dense.backward(x, h, gh, need_input_grad=not self.spec.is_first)
        M = self.spec.microbatches
        if M <= 1:
            self._apply(gW, gb)
            return gx
        if self._acc is None:
            self._acc = [gW, gb]
        else:
            self._acc[0] += gW
            self._acc[1] += gb
        self._acc_count += 1
        if self._acc_count == M:
            self._apply(*self._acc)
            self._acc, self._acc_count = None, 0
        return gx

    @property
    def step_complete(self) -> bool:
        """True when no micro-batch gradient is waiting to be applied."""
        return self._acc_count == 0

    # ------------------------------------------------------------ accounting
    def flops_per_batch(self, batch: int, schedule: str) -> int:
        """Floating-point operations this layer performs for one training batch."""
        W = self.dense.W
        mm = 2 * batch * W.shape[0] * W.shape[1]
        f = mm                                   # forward
        f += mm                                  # weight gradient
        if not self.spec.is_first:
            f += mm                              # input gradient
        if schedule in ("async", "sequential") and self.sg is not None:
            p, u = self.sg.flops(batch)
            f += p + u + (0 if self.spec.sg_reuse else p)
        return f
