"""One layer's state and its per-message arithmetic, independent of any transport.

A ``LayerNode`` owns a dense layer, its optimizer and (except for the last layer) its
synthetic-gradient model with its own optimizer. The worker process calls these methods
when messages arrive; ``reference.py`` calls the same methods in one process. Having one
implementation of the arithmetic is what makes the multi-process ``sequential`` and
``backprop`` schedules reproduce the in-process reference exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from asyncdni.numerics import losses
from asyncdni import schedules as S
from asyncdni.numerics.nn import Dense, init_weights
from asyncdni.numerics.optim import all_finite, lr_factor, make_optimizer  # noqa: F401 (all_finite: re-exported)
from asyncdni.numerics.synthetic import make_sg_model, param_count as sg_param_count

SG_LAG_BINS = 16      # SG-target lags counted one by one up to this; larger ones share the last bin
TARGET_NORM_DECAY = 0.99   # sg_clip, sg_damp: EMA factor of the running SG target / prediction norms (~100 steps)
TRUST_DECAY = 0.9          # sg_trust: EMA factor of the running cosine of predictions with targets (~10 targets)


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
    task: str             # "classification", "bits" or "regression"
    n_out: int            # classes, bits or regression targets (used for label conditioning)
    optimizer: str
    lr: float
    sg_model: str
    sg_hidden: int
    sg_lr: float
    cond: bool            # label-conditioned synthetic gradients (cDNI)
    microbatches: int     # micro-batches per step for the pipeline schedule
    seed: int
    sg_reuse: bool = False  # SG regression reuses the forward pass's prediction (one matmul less)
    schedule: str = "async"   # the schedules.TABLE entry whose arithmetic this layer runs
    stash: bool = False       # delayed: backward with the weights of the forward pass (weight stashing)
    delay_remedy: str = "none"  # delayed: "none" or "lr_scale" (lr / (1 + observed delay))
    aux_features: int = 0     # local: features the auxiliary classifier reads (0: no auxiliary head)
    sg_layers: int = 1      # hidden layers of the mlp SG model
    sg_stale_decay: float = 1.0   # weight of an SG target per step of lag (1: all equal; 0: stale ones dropped)
    batch_norm: bool = False  # hidden layers: h = act(BN(x @ W)) (the last layer never normalises)
    sg_rank: int = 64       # rank of the lowrank SG model
    sg_every: int = 1       # the SG model is regressed on steps that are a multiple of this only
    sg_clip: float = 0.0          # >0: layer step x min(1, sg_clip x running |SG target| / |SG prediction|)
    sg_damp: float = 0.0          # >0: SG step x min(1, sg_damp x running |SG target| / running |SG prediction|)^2
    sg_trust: bool = False        # layer step x max(0, running cosine of SG predictions with their targets)
    sg_target: str = "bootstrap"  # "propagate": a target that comes back is passed down, backpropagated
                                  # through this layer (sg_backward); "bootstrap": the SG prediction is, at the forward
    # torch stages (asyncdni/torch); the numpy node ignores all but weight_decay and the lr_* schedule
    backend: str = "numpy"        # "numpy" (LayerNode) or "torch" (asyncdni.torch.node.TorchNode)
    model: str = ""               # torch: a zoo name (mlp, cnn, resnet) or a builder "file.py:fn" / "pkg.module:fn"
    split: str = ""               # torch: where to cut the model into stages ("2,4" cut indices, or a stage count)
    sample_shape: tuple = ()      # torch: the dataset's per-sample input shape, e.g. (1, 28, 28)
    in_shape: tuple = ()          # torch: this stage's per-sample input shape (checked against the model)
    out_shape: tuple = ()         # torch: this stage's per-sample output shape (checked against the model)
    device: str = "cpu"           # torch: "cpu" or "cuda[:n]"
    weight_decay: float = 0.0     # decoupled weight decay of the layer's (stage's) optimizer
    lr_schedule: str = "constant"  # "constant", "cosine" (over total_steps) or "step" (both backends)
    lr_step_size: int = 0         # lr_schedule "step": updates between decays
    lr_gamma: float = 0.1         # lr_schedule "step": decay factor
    total_steps: int = 0          # lr_schedule "cosine": T_max in updates

    @property
    def gradient(self) -> str:
        return S.get(self.schedule).gradient

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_layers - 1

    @property
    def has_bn(self) -> bool:
        return self.batch_norm and not self.is_last

    @property
    def cond_dim(self) -> int:
        return self.n_out if self.cond else 0

    @property
    def has_aux(self) -> bool:
        """A hidden layer under a local-loss schedule has an auxiliary classifier."""
        return self.gradient == S.LOCAL and not self.is_last and self.aux_features > 0

    @property
    def aux_pool(self) -> int:
        """Average-pooling factor in front of the auxiliary classifier (1: none)."""
        return max(1, -(-self.fan_out // self.aux_features)) if self.aux_features else 1

    @property
    def aux_in(self) -> int:
        return -(-self.fan_out // self.aux_pool)

    @property
    def aux_loss(self) -> str:
        return {"classification": "softmax_ce", "regression": "mse"}.get(self.task, "sigmoid_bce")

    def param_count(self) -> int:
        """Scalars in this layer's parameters: the dense layer (with batch normalisation: W,
        gamma, beta and the running mean and variance) plus its SG model and auxiliary
        classifier, if any."""
        n = (self.fan_in + 1) * self.fan_out
        if self.has_bn:
            n += 3 * self.fan_out             # gamma and beta instead of b, running mean and variance
        if self.is_last:
            return n
        if self.has_aux:
            n += (self.aux_in + 1) * self.n_out
        return n + sg_param_count(self.sg_model, self.fan_out, self.cond_dim, self.sg_hidden, self.sg_layers,
                                  self.sg_rank)


def sends_gradient(spec: LayerSpec, step: int) -> bool:
    """Under a synthetic-gradient schedule, does this layer send the true gradient of
    ``step`` down? Only the layer below's SG regression uses it, and under ``sg_every`` n
    that regresses on steps that are multiples of n only: the other steps' gradient is
    neither computed nor sent (n-fold less backward traffic)."""
    return not spec.is_first and step % spec.sg_every == 0


def condition_vector(task: str, n_out: int, y: np.ndarray, dtype=np.float32) -> np.ndarray:
    """What a label-conditioned SG model sees of the targets: one-hot labels, or the targets
    themselves (the bits of a sum, the float targets of a regression)."""
    if task == "classification":
        out = np.zeros((y.shape[0], n_out), dtype)
        out[np.arange(y.shape[0]), y] = 1
        return out
    return y.astype(dtype, copy=False)


class AuxHead:
    """The auxiliary head of a hidden layer (local losses): ``logits = pool(h) @ A + a``; a
    classifier, or for regression a linear predictor of the targets (mse).

    ``pool(h)`` averages groups of ``pool`` neighbouring features (the last group padded
    with zeros), so a wide layer's head stays small; ``pool == 1`` is a plain linear head.
    """

    def __init__(self, dim: int, pool: int, n_out: int, rng: np.random.Generator, dtype=np.float32):
        self.dim, self.pool = dim, pool
        q = -(-dim // pool)
        self.A = init_weights(rng, q, n_out, "xavier", dtype)
        self.a = np.zeros(n_out, dtype)
        self.params = [self.A, self.a]

    def features(self, h: np.ndarray) -> np.ndarray:
        if self.pool == 1:
            return h
        B, q = h.shape[0], self.A.shape[0]
        pad = q * self.pool - self.dim
        if pad:
            h = np.concatenate([h, np.zeros((B, pad), h.dtype)], axis=1)
        return h.reshape(B, q, self.pool).mean(axis=2)

    def logits(self, h: np.ndarray) -> np.ndarray:
        z = self.features(h) @ self.A
        z += self.a
        return z

    def loss_and_grads(self, h: np.ndarray, y: np.ndarray, loss_name: str):
        """(loss, logits, [dA, da], dL/dh) of the head's loss on the layer's output h."""
        f = self.features(h)
        z = f @ self.A
        z += self.a
        loss, gz = losses.compute(loss_name, z, y)
        grads = [f.T @ gz, gz.sum(axis=0)]
        gf = gz @ self.A.T
        if self.pool == 1:
            return loss, z, grads, gf
        gh = np.repeat(gf, self.pool, axis=1)[:, :self.dim]
        gh *= h.dtype.type(1.0 / self.pool)
        return loss, z, grads, gh

    def flops(self, batch: int) -> int:
        q, n = self.A.shape
        return 3 * 2 * batch * q * n        # logits, head weight gradient, gradient into h


class NodeBookkeeping:
    """What every backend's node counts and decides the same way, whatever its arithmetic:
    the counters the worker reports, non-finite skips, the SG-target lag histogram and
    staleness weight, the sg_clip / sg_damp scales, the delayed schedules' delay statistics.
    ``LayerNode`` (numpy) and ``asyncdni.torch.node.TorchNode`` both build on it."""

    spec: LayerSpec
    fail_on_nonfinite: bool

    def _init_bookkeeping(self) -> None:
        self.nonfinite_skipped = 0       # updates (layer or SG) not applied because of NaN/Inf
        self.cache: dict[int, tuple | None] = {}
        self.version = 0                 # delayed: true gradients applied so far (the weights' version)
        self.delay_sum = 0               # delayed: sum / max / count of observed delays (versions)
        self.delay_max = 0
        self.delay_n = 0
        self.stash_bytes = 0             # delayed with weight stashing: bytes of stashed weights now / at peak
        self.stash_peak = 0
        self.aux_recent: list[float] = []   # local: the auxiliary head's recent training accuracy
        self.sg_recent: list[float] = []    # synthetic: recent SG regression losses
        self.fwd_steps = 0
        self.updates = 0
        self.sg_updates = 0
        self.sg_skipped = 0              # SG targets not regressed on (--sg-every)
        self.last_sg_loss = float("nan")
        self.last_fwd_step = -1          # newest step this layer has run forward (DNI)
        self.stale_dropped = 0           # SG targets discarded for their lag (sg_stale_decay 0)
        self.sg_lags = [0] * (SG_LAG_BINS + 1)   # SG targets by lag (forward steps run since): 0..BINS-1, BINS+
        self.target_norm = 0.0           # sg_clip: running norm of the SG targets received (0: none yet)
        self.sg_clipped = 0              # sg_clip: predictions scaled down
        self.pred_norm = 0.0             # sg_damp: running norm of the SG's forward predictions (0: none yet)
        self.sg_damped = 0               # sg_damp: SG updates taken with a reduced learning rate
        self.trust = 0.0                 # sg_trust: running cosine of the SG's predictions with their targets

    def _nonfinite(self, what: str) -> None:
        self.nonfinite_skipped += 1
        if self.fail_on_nonfinite:
            raise NonFiniteError(f"layer {self.spec.index + 1}: non-finite {what}; stopping (fail_on_nonfinite)")

    def target_weight(self, step: int) -> float | None:
        """Count an SG target's lag (forward steps run since ``step``) and return the weight
        ``sg_stale_decay`` gives it; None when a stale target is dropped (decay 0)."""
        lag = max(0, self.last_fwd_step - step)
        self.sg_lags[min(lag, SG_LAG_BINS)] += 1
        decay = self.spec.sg_stale_decay
        if decay == 1.0:
            return 1.0
        if lag and decay == 0.0:
            self.stale_dropped += 1
            return None
        return decay ** lag

    def clip_scale(self, n: float) -> float:
        """``sg_clip``: the factor (<= 1) by which the layer's step from an SG prediction of
        norm ``n`` is scaled: ``sg_clip`` x the running norm of the targets received
        (``target_norm``) over ``n`` (per-example scale, as the SG predicts it), at most 1; 1
        when off or before the first target. It scales the learning rate, not the gradient,
        which Adam's normalisation would undo."""
        k = self.spec.sg_clip
        if k <= 0 or self.target_norm <= 0:
            return 1.0
        cap = k * self.target_norm
        if not n > cap:                  # also a NaN prediction: left to the finiteness checks
            return 1.0
        self.sg_clipped += 1
        return cap / n

    def damp_scale(self) -> float:
        """``sg_damp``: the factor (<= 1) on the SG model's learning rate for its next update:
        (``sg_damp`` x running target norm / running prediction norm) squared when the SG's
        predictions have outgrown ``sg_damp`` times its targets, else 1 (and 1 when off or
        before both norms exist).

        Why: Adam moves every SG weight by about the SG learning rate per step whatever the
        size of the regression error, so once the true gradients have shrunk (the loss is
        small) the SG's own steps keep its predictions at a floor far above its targets:
        predictions that are mostly error, which under async staleness drive the layers off
        (README, "Stability under staleness"). Scaling the SG's step by how far its
        predictions exceed its targets brings that floor down with the targets."""
        k = self.spec.sg_damp
        if k <= 0 or self.target_norm <= 0 or self.pred_norm <= 0:
            return 1.0
        r = k * self.target_norm / self.pred_norm
        if not r < 1.0:
            return 1.0
        self.sg_damped += 1
        return r * r

    def trust_scale(self) -> float:
        """``sg_trust``: the factor (0..1) on the layer's learning rate for a step from its SG:
        the running cosine (``trust``) between the predictions the layer stepped on and the
        targets that later came back for them, 0 when they disagree; 1 when off.

        Why (docs/results/depth.md): a layer moves by about its learning rate per step under
        Adam whatever its gradient's quality, so a layer whose SG has not learned its targets
        (the lower layers of a deep net, whose targets are themselves synthetic) takes
        full-size steps in directions unrelated to the loss. The SG is zero-initialised, so a
        layer waits until its SG agrees with its targets."""
        return max(0.0, self.trust) if self.spec.sg_trust else 1.0

    def note_alignment(self, cos: float) -> None:
        """``sg_trust``: one target came back; ``cos`` is its cosine with the prediction the
        layer stepped on (0 for a zero prediction). A non-finite cosine is ignored."""
        if math.isfinite(cos):
            self.trust = TRUST_DECAY * self.trust + (1 - TRUST_DECAY) * cos

    def sg_backward(self, step: int, g):
        """Synthetic gradients: the target that came back for ``step`` trains the SG model.
        Under ``sg_target`` "propagate" it also goes down, backpropagated through this layer
        (the layer below's target; None from the first layer); under "bootstrap" nothing does
        (the gradient went down at the forward, from the SG's prediction)."""
        entry = self._pop_sg(step)
        self._sg_regress(step, g, entry)
        if self.spec.sg_target != "propagate" or self.spec.is_first:
            return None
        return self._propagate(entry, g)

    def sg_update(self, step: int, g) -> float:
        """Regress the SG model onto the target that came back for ``step`` (no gradient goes
        down: :meth:`sg_backward` does both); returns the regression loss (NaN when skipped).

        Under ``sg_every`` n > 1 only steps that are multiples of n are regressed on: the
        layer above neither computes nor sends the gradient of the others
        (:func:`sends_gradient`), and this layer keeps nothing for them."""
        return self._sg_regress(step, g, self._pop_sg(step))

    def _pop_sg(self, step: int):
        try:
            return self.cache.pop(step)
        except KeyError:
            raise StepError(f"layer {self.spec.index + 1}: gradient for step {step}, which is not in flight") from None

    def _propagates(self, step: int) -> bool:
        """Keep what the backward pass of ``step`` needs: under "propagate", a layer that has
        a layer below and will get a target for ``step``."""
        return self.spec.sg_target == "propagate" and not self.spec.is_first and step % self.spec.sg_every == 0

    def _delay(self, delay: int) -> None:
        self.version += 1
        self.delay_sum += delay
        self.delay_n += 1
        self.delay_max = max(self.delay_max, delay)

class LayerNode(NodeBookkeeping):
    def __init__(self, spec: LayerSpec, dtype=np.float32, fail_on_nonfinite: bool = False):
        self.spec = spec
        self.fail_on_nonfinite = fail_on_nonfinite
        self._init_bookkeeping()
        rng = np.random.default_rng([spec.seed, spec.index])
        self.dense = Dense.create(rng, spec.fan_in, spec.fan_out, spec.activation, spec.init, dtype,
                                  batch_norm=spec.has_bn)
        self.opt = make_optimizer(spec.optimizer, self.dense.params, spec.lr, spec.weight_decay)
        self.sg = None
        self.sg_opt = None
        if not spec.is_last and spec.sg_model != "none":
            self.sg = make_sg_model(spec.sg_model, spec.fan_out, spec.cond_dim, spec.sg_hidden, rng, dtype,
                                     spec.sg_layers, spec.sg_rank)
            self.sg_opt = make_optimizer(spec.optimizer, self.sg.params, spec.sg_lr)
        self.aux = None
        self.aux_opt = None
        if spec.has_aux:
            arng = np.random.default_rng([spec.seed, spec.index, 1])   # the dense/SG init stays the same
            self.aux = AuxHead(spec.fan_out, spec.aux_pool, spec.n_out, arng, dtype)
            self.aux_opt = make_optimizer(spec.optimizer, self.aux.params, spec.lr)
        self._fwd_name, self._bwd_name = ARITHMETIC[spec.gradient]
        self._acc: list | None = None   # pipeline gradient accumulator
        self._acc_count = 0

    # ----------------------------------------------------------------- helpers
    def _cond(self, y):
        s = self.spec
        return condition_vector(s.task, s.n_out, y, self.dense.W.dtype) if s.cond else None

    def _loss(self, out, y):
        loss, g = losses.compute(self.spec.loss, out, y)
        metric, metric2, n = losses.metrics(self.spec.loss, out, y, self.spec.task)
        return g, {"loss": loss, "metric": metric, "metric2": metric2, "n": n}

    def _apply(self, *grads, lr_scale: float = 1.0):
        """Apply a weight update (gradients in ``dense.params`` order: gW, gb, or gW, ggamma,
        gbeta with batch normalisation; learning rate times ``lr_scale``), unless a gradient or
        the updated weights are not finite: then nothing changes, and it is counted (or stops
        the run under fail_on_nonfinite)."""
        if not all_finite(*grads):
            self._nonfinite("weight gradient")
            return
        s = self.spec
        if s.lr_schedule != "constant":    # as torch's LR schedulers: a factor of the update count
            lr_scale *= lr_factor(s.lr_schedule, self.updates, s.total_steps, s.lr_step_size, s.lr_gamma)
        if not _scaled_step(self.opt, list(grads), lr_scale):   # the update overflowed: nothing was changed
            self._nonfinite("weight update (the new weights would not be finite)")
            return
        self.updates += 1

    # ------------------------------------------------- the schedule's arithmetic
    def forward(self, step: int, x: np.ndarray, y: np.ndarray, scale: float = 1.0):
        """The forward arithmetic of this layer's schedule (``ARITHMETIC``): returns
        (h or None for the last layer, the gradient to send down or None, metrics or None)."""
        fn = getattr(self, self._fwd_name)
        return fn(step, x, y) if scale == 1.0 else fn(step, x, y, scale)

    def backward(self, step: int, g: np.ndarray):
        """A gradient for ``step`` came back from the layer above: apply it the schedule's way;
        returns the gradient to send down, or None."""
        if self._bwd_name is None:
            raise StepError(f"layer {self.spec.index + 1}: gradient for step {step}, "
                            f"but schedule {self.spec.schedule} sends none back")
        return getattr(self, self._bwd_name)(step, g)

    def params(self) -> dict[str, np.ndarray]:
        bn = self.dense.bn
        if bn is None:
            out = {"W": self.dense.W, "b": self.dense.b}
        else:       # the running statistics too: evaluation needs them, and they must agree
            out = {"W": self.dense.W, "bn_gamma": bn.gamma, "bn_beta": bn.beta, "bn_mean": bn.mean, "bn_var": bn.var}
        if self.sg is not None:
            out.update({f"sg{i}": p for i, p in enumerate(self.sg.params)})
        if self.aux is not None:
            out.update({f"aux{i}": p for i, p in enumerate(self.aux.params)})
        return out

    def forward_only(self, x):
        """Inference: the layer's output (logits for the last layer), no state touched
        (batch normalisation uses its running statistics)."""
        return self.dense.forward(x)

    # --------------------------------------------------------------------- DNI
    def dni_forward(self, step: int, x: np.ndarray, y: np.ndarray):
        """Forward with an immediate update from the synthetic (or, last layer, true) gradient.

        Returns (h, g_in, metrics): h is None for the last layer; g_in (dL/dx) is None for
        the first layer; metrics is a dict for the last layer, else None.
        """
        h, bctx = self.dense.forward_train(x)
        B = x.shape[0]
        metrics = None
        lr_scale = 1.0
        if self.spec.is_last:
            gh, metrics = self._loss(h, y)
        elif self.sg is not None:
            c = self._cond(y)
            pred, ctx = self.sg.predict_keep(h, c)
            gh = pred * (1.0 / B)
            if self.spec.sg_clip > 0 or self.spec.sg_damp > 0:
                n = float(np.sqrt(np.vdot(pred, pred)))      # per-example scale, as the SG predicts it
                lr_scale = self.clip_scale(n)
                if self.spec.sg_damp > 0:
                    self.pred_norm = running_norm(self.pred_norm, n)
            lr_scale *= self.trust_scale()
            # --sg-every n: only every n-th step's target trains the SG model; the layer above
            # sends no gradient for the others (sends_gradient), so nothing is kept for them
            if step % self.spec.sg_every == 0:
                # "propagate": the backward pass of the target that will come back needs h and
                # the batch-norm context (taken with the weights as they are then)
                self.cache[step] = (ctx, pred, (h, bctx) if self._propagates(step) else None)
            else:
                self.sg_skipped += 1
            self.last_fwd_step = max(self.last_fwd_step, step)
        else:
            gh = None
        self.fwd_steps += 1
        if gh is None:      # no SG model: the layer is frozen, only passes activations on
            return h, None, None
        # the input gradient goes down now from the last layer (the loss's) and under "bootstrap"
        # (the SG's); under "propagate" a hidden layer sends it when its own target comes back
        now = self.spec.is_last or self.spec.sg_target != "propagate"
        grads, gx = self.dense.grads(x, h, gh, bctx, need_input_grad=now and sends_gradient(self.spec, step))
        self._apply(*grads, lr_scale=lr_scale)
        return (None if self.spec.is_last else h), gx, metrics

    def _propagate(self, entry, g: np.ndarray) -> np.ndarray:
        """"propagate": the target ``g`` (dL/dh) backpropagated through this layer, dL/dx,
        with its current weights (the forward's batch-norm statistics)."""
        h, bctx = entry[2]
        return self.dense.input_grad(h, g, bctx)

    def _sg_regress(self, step: int, g: np.ndarray, entry) -> float:
        if self.spec.sg_clip > 0 or self.spec.sg_damp > 0:     # in the SG's per-example scale (B x dL/dh)
            self.target_norm = running_norm(self.target_norm, float(np.sqrt(np.vdot(g, g))) * g.shape[0])
        ctx, pred, _back = entry
        if self.spec.sg_trust:                   # the prediction the layer stepped on, against its target
            self.note_alignment(cosine(pred, g))
        weight = self.target_weight(step)
        if weight is None:
            return float("nan")
        if not self.spec.sg_reuse:
            # the regression gradient at the SG's current parameters: under async the SG has
            # moved since it made ``pred`` (measured: reusing pred costs ~1.5 points on MNIST)
            pred, ctx = self.sg.predict_keep(ctx[0], ctx[1])
        loss, grads = self.sg.grads_from(ctx, pred, g * pred.shape[0])
        if not (np.isfinite(loss) and all_finite(*grads)):
            self._nonfinite("synthetic-gradient update")
            return loss
        if weight != 1.0:
            grads = [g_ * weight for g_ in grads]
        if not _scaled_step(self.sg_opt, grads, self.damp_scale()):
            self._nonfinite("synthetic-gradient update (the new SG weights would not be finite)")
            return loss
        self.sg_updates += 1
        self.last_sg_loss = loss
        recent(self.sg_recent, loss)
        return loss

    def drop_step(self, step: int) -> None:
        self.cache.pop(step, None)

    # ---------------------------------------------------------------- backprop
    def bp_forward(self, step: int, x: np.ndarray, y: np.ndarray, scale: float = 1.0):
        """Update-locked backprop, forward half. Non-last layers cache and return (h, None, None);
        the last layer computes the loss and its own gradient and returns (None, g_in, metrics).
        ``scale`` weights a micro-batch's gradient (micro-batch size / batch size)."""
        h, bctx = self.dense.forward_train(x)
        self.fwd_steps += 1
        if not self.spec.is_last:
            self.cache[step] = (x, h, bctx)
            return h, None, None
        gh, metrics = self._loss(h, y)
        if scale != 1.0:
            gh *= scale
        gx = self._backward_and_maybe_update(x, h, gh, bctx)
        return None, gx, metrics

    def bp_backward(self, step: int, g: np.ndarray):
        try:
            x, h, bctx = self.cache.pop(step)
        except KeyError:
            raise StepError(f"layer {self.spec.index + 1}: gradient for step {step}, which is not in flight") from None
        return self._backward_and_maybe_update(x, h, g, bctx)

    def _backward_and_maybe_update(self, x, h, gh, bctx=None):
        grads, gx = self.dense.grads(x, h, gh, bctx, need_input_grad=not self.spec.is_first)
        M = self.spec.microbatches
        if M <= 1:
            self._apply(*grads)
            return gx
        if self._acc is None:
            self._acc = grads
        else:
            for a, g in zip(self._acc, grads):
                a += g
        self._acc_count += 1
        if self._acc_count == M:
            self._apply(*self._acc)
            self._acc, self._acc_count = None, 0
        return gx

    # ---------------------------------------------------------------- delayed
    def delayed_forward(self, step: int, x: np.ndarray, y: np.ndarray):
        """Delayed true gradients, forward half: keep what the backward needs (with weight
        stashing, a copy of W (and BN's gamma) as used now); the last layer updates at once from the loss."""
        h, bctx = self.dense.forward_train(x)
        self.fwd_steps += 1
        if not self.spec.is_last:
            stash = None
            if self.spec.stash:
                bn = self.dense.bn
                stash = (self.dense.W.copy(), None if bn is None else bn.gamma.copy())
                self.stash_bytes += sum(a.nbytes for a in stash if a is not None)
                self.stash_peak = max(self.stash_peak, self.stash_bytes)
            self.cache[step] = (x, h, bctx, stash, self.version)
            return h, None, None
        gh, metrics = self._loss(h, y)
        grads, gx = self.dense.grads(x, h, gh, bctx, need_input_grad=not self.spec.is_first)
        self._apply(*grads)
        self._delay(0)
        return None, gx, metrics

    def delayed_backward(self, step: int, g: np.ndarray):
        """The true gradient of ``step`` arrives, some updates after its forward: apply it
        (learning rate divided by 1 + delay under the ``lr_scale`` remedy) and return the
        input gradient, taken with the stashed weights if stashing is on, else the current ones."""
        try:
            x, h, bctx, stash, v = self.cache.pop(step)
        except KeyError:
            raise StepError(f"layer {self.spec.index + 1}: gradient for step {step}, which is not in flight") from None
        Ws = gs = None
        if stash is not None:
            Ws, gs = stash
            self.stash_bytes -= sum(a.nbytes for a in stash if a is not None)
        delay = self.version - v
        grads, gx = self.dense.grads(x, h, g, bctx, need_input_grad=not self.spec.is_first, W=Ws, gamma=gs)
        self._apply(*grads, lr_scale=1.0 / (1 + delay) if self.spec.delay_remedy == "lr_scale" else 1.0)
        self._delay(delay)
        return gx

    # ------------------------------------------------------------------ local
    def local_forward(self, step: int, x: np.ndarray, y: np.ndarray):
        """Local losses: a hidden layer updates at once from its auxiliary classifier's
        gradient (and trains the head); the last layer from the real loss. Nothing goes down."""
        h, bctx = self.dense.forward_train(x)
        self.fwd_steps += 1
        metrics = None
        if self.spec.is_last:
            gh, metrics = self._loss(h, y)
        elif self.aux is not None:
            loss, z, grads, gh = self.aux.loss_and_grads(h, y, self.spec.aux_loss)
            if not (np.isfinite(loss) and all_finite(*grads)):
                self._nonfinite("auxiliary-head update")
            elif not self.aux_opt.step(grads):
                self._nonfinite("auxiliary-head update (the new head weights would not be finite)")
            recent(self.aux_recent, losses.metrics(self.spec.aux_loss, z, y, self.spec.task)[0])
        else:
            return h, None, None
        grads, _ = self.dense.grads(x, h, gh, bctx, need_input_grad=False)
        self._apply(*grads)
        return (None if self.spec.is_last else h), None, metrics

    def aux_logits(self, h: np.ndarray) -> np.ndarray:
        return self.aux.logits(h)

    @property
    def step_complete(self) -> bool:
        """True when no micro-batch gradient is waiting to be applied."""
        return self._acc_count == 0

    # ------------------------------------------------------------ accounting
    def flops_parts(self, batch: int, schedule: str | None = None) -> dict[str, float]:
        """Floating-point operations (a multiply-add counts 2) of this layer for one training
        batch under ``schedule`` (default: its own), by part: ``forward``; ``backward`` (the
        weight gradient, and the input gradient unless this is the first layer or the
        schedule sends none); ``sg_predict`` (the synthetic gradient, every step);
        ``sg_repredict`` and ``sg_update`` (the SG regression, averaged over steps: only
        every ``sg_every``-th step has one, and no re-prediction under ``sg_reuse``);
        ``aux`` (local losses' auxiliary head)."""
        s = self.spec
        gradient = S.get(schedule or s.schedule).gradient
        W = self.dense.W
        mm = 2 * batch * W.shape[0] * W.shape[1]
        out = {"forward": float(mm), "backward": float(mm), "sg_predict": 0.0, "sg_repredict": 0.0,
               "sg_update": 0.0, "aux": 0.0}
        if not s.is_first and gradient != S.LOCAL:
            out["backward"] += mm                 # input gradient (local losses send none)
        if gradient == S.SYNTHETIC and self.sg is not None:
            p, u = self.sg.flops(batch)
            out["sg_predict"] = float(p)
            out["sg_repredict"] = 0.0 if s.sg_reuse else p / s.sg_every
            out["sg_update"] = u / s.sg_every
        if gradient == S.LOCAL and not s.is_last and s.aux_features:
            q = -(-s.fan_out // max(1, -(-s.fan_out // s.aux_features)))
            out["aux"] = float(3 * 2 * batch * q * s.n_out)   # auxiliary head: logits, its weight gradient, dL/dh
        return out

    def flops_per_batch(self, batch: int, schedule: str | None = None) -> float:
        """The sum of :meth:`flops_parts`."""
        return sum(self.flops_parts(batch, schedule).values())


def _scaled_step(opt, grads: list, lr_scale: float) -> bool:
    """``opt.step(grads)`` with the learning rate times ``lr_scale`` for this one step (the
    rate is restored afterwards, also on an error). Scaling the rate, not the gradients:
    Adam's normalisation would undo the latter."""
    lr = opt.lr
    opt.lr = lr * lr_scale
    try:
        return opt.step(grads)
    finally:
        opt.lr = lr


def running_norm(old: float, n: float) -> float:
    """One EMA step (``TARGET_NORM_DECAY``) of a running norm; the first value sets it (``old``
    0: none yet); a non-finite ``n`` leaves it unchanged."""
    if not np.isfinite(n):
        return old
    return n if old <= 0 else TARGET_NORM_DECAY * old + (1 - TARGET_NORM_DECAY) * n


def cosine(a, b) -> float:
    """Cosine of two arrays (float64 accumulation); 0 when either is zero."""
    a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    den = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    return float(a64 @ b64) / den if den > 0 else 0.0


def recent(buf: list, v: float, n: int = 50) -> None:
    """Append ``v`` to a list of the ``n`` most recent values."""
    buf.append(float(v))
    if len(buf) > n:
        del buf[0]


# The arithmetic of each kind of gradient a schedule can apply (schedules.Schedule.gradient):
# LayerNode method names for the forward message and for a gradient coming back (None: none).
ARITHMETIC = {
    S.SYNTHETIC: ("dni_forward", "sg_backward"),
    S.TRUE: ("bp_forward", "bp_backward"),
    S.DELAYED: ("delayed_forward", "delayed_backward"),
    S.LOCAL: ("local_forward", None),
}
