"""A torch stage: the same node interface as ``numerics.layer.LayerNode``, on any ``nn.Module``.

``TorchNode(spec)`` builds the whole model (``models.build_stages``, seeded, so that every
process gets the same initial weights), keeps stage ``spec.index``, and runs the arithmetic
of the spec's schedule (``layer.ARITHMETIC``: the method names are LayerNode's) with
autograd, ``torch.optim`` and ``torch.optim.lr_scheduler``:

* ``synthetic`` (DNI): ``dni_forward`` updates the stage at once from its SG model's
  prediction (``h.backward(pred / B)``); ``sg_backward`` regresses the SG model onto the
  gradient that came back. Under ``sg_target`` "bootstrap" the forward sends ``dL/dx`` of
  the prediction down; under "propagate" ``sg_backward`` sends the target that came back
  down, through the stage's forward recomputed as ``delayed`` without stash does.
* ``true`` (backprop, pipeline): ``bp_forward`` keeps the autograd graph per step (micro-step
  under pipeline) and ``bp_backward`` runs ``h.backward(g)``; gradients accumulate in
  ``.grad`` over ``spec.microbatches`` micro-batches (``scale`` weighting each one's loss at
  the last stage), then one optimizer step.
* ``delayed``: with ``spec.stash`` the forward runs through ``torch.func.functional_call``
  on detached copies of the parameters (the stash), so the gradient that comes back later
  is taken at the forward-time weights and then applied to the live ones. Without stash the
  forward keeps only its input (and the RNG state), and the backward *recomputes* the
  forward with the current weights (BatchNorm's running statistics are not updated twice:
  the recomputation runs on copies of the buffers). This differs from the numpy node
  without stash, which takes the weight gradient from the forward-time activations and
  only the input gradient with the current weights; recomputing is what autograd allows
  without keeping a graph whose weights have since been changed in place.
* ``local``: the stage and its auxiliary head train on the head's loss; nothing goes down.

Arrays in and out are numpy float32 (the wire format). Inputs may be (B, *in_shape) or
(B, prod(in_shape)); outputs are (B, *out_shape) and input gradients (B, *in_shape), numpy
views of the CPU tensors' memory. A stage must not modify its input in place: the input
tensor shares the memory of the message it came in.

Skipped updates: a non-finite gradient, or one so large that the optimizer's step could
overflow (``_step``), changes nothing and is counted in ``nonfinite_skipped`` (or raises
``NonFiniteError`` under ``fail_on_nonfinite``). A gradient for a step that is not in flight
raises ``StepError``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from asyncdni import schedules as S
from asyncdni.numerics import losses
from asyncdni.numerics.layer import (ARITHMETIC, LayerSpec, NodeBookkeeping, StepError, condition_vector, recent, sends_gradient,
                                     running_norm)
from asyncdni.torch.models import build_stages, stage_shapes
from asyncdni.torch.synthetic import is_feature_map, make_sg, regression_loss

# Messages arrive as read-only numpy views of the socket's frames; torch warns once that it
# cannot mark a tensor read-only. Nothing here writes an input in place.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "step")
MOMENTUM = 0.9
# int64 "counters" entry of the checkpoint state, in this order
COUNTERS = ("fwd_steps", "updates", "sg_updates", "sg_skipped", "nonfinite_skipped", "stale_dropped",
            "sg_clipped", "sg_damped", "version", "delay_sum", "delay_max", "delay_n")
GRAD_LIMIT = 1e18          # a gradient element beyond this is refused (its square overflows Adam's float32 moment)


class StateError(ValueError):
    """A checkpoint state cannot be loaded into (or taken from) this node (one line)."""


class AuxHead(nn.Module):
    """The auxiliary classifier of a hidden stage (local losses). Feature maps: global average
    pooling, flatten, linear (C -> n_out). Vectors: groups of ``pool`` neighbouring features
    averaged (the last group padded with zeros, as numerics' AuxHead), then linear."""

    def __init__(self, shape: tuple, n_out: int, aux_features: int):
        super().__init__()
        self.fmap = is_feature_map(shape)
        if self.fmap:
            self.pool, q = 1, shape[0]
        else:
            d = math.prod(shape)
            self.pool = max(1, -(-d // aux_features)) if aux_features else 1
            q = -(-d // self.pool)
            self.d, self.q = d, q
        self.linear = nn.Linear(q, n_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B = h.shape[0]
        if self.fmap:
            return self.linear(F.adaptive_avg_pool2d(h, 1).reshape(B, -1))
        v = h.reshape(B, -1)
        if self.pool > 1:
            pad = self.q * self.pool - self.d
            if pad:
                v = F.pad(v, (0, pad))
            v = v.reshape(B, self.q, self.pool).mean(dim=2)
        return self.linear(v)


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """sgd, momentum (SGD, momentum 0.9), adam (L2 weight decay), adamw (decoupled), with
    their state created at once (see :func:`init_optimizer_state`)."""
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        opt = _fused(torch.optim.SGD, params, lr=lr, weight_decay=weight_decay)
    elif name == "momentum":
        opt = _fused(torch.optim.SGD, params, lr=lr, momentum=MOMENTUM, weight_decay=weight_decay)
    elif name == "adam":
        opt = _fused(torch.optim.Adam, params, lr=lr, weight_decay=weight_decay)
    elif name == "adamw":
        opt = _fused(torch.optim.AdamW, params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {name!r}; allowed for torch stages: {', '.join(OPTIMIZERS)}")
    init_optimizer_state(opt, name)
    return opt


def _fused(cls, params, **kw) -> torch.optim.Optimizer:
    """The optimizer's fused implementation where this torch has one for these parameters
    (CPU Adam/AdamW/SGD since torch 2.4: one kernel per step instead of a loop of tensor ops,
    measured: 1.1x the samples/s of a 4-stage MLP pipeline in one process), else the plain one. The same
    arithmetic up to rounding; every process of a run makes the same choice."""
    if params:
        try:
            return cls(params, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass
    return cls(params, **kw)


def init_optimizer_state(opt: torch.optim.Optimizer, name: str) -> None:
    """Create the optimizer's per-parameter state now, as its first step would (zeros, step 0),
    so that the checkpoint layout of a fresh node is that of a trained one. The first step
    then computes what a lazily initialised optimizer computes (0 * beta + g == g)."""
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if name == "momentum":
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif name in ("adam", "adamw"):
                st["step"] = torch.tensor(0.0, dtype=step_dtype)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def make_lr_scheduler(spec: LayerSpec, opt: torch.optim.Optimizer):
    """None (constant), CosineAnnealingLR(T_max=total_steps) or StepLR(lr_step_size, lr_gamma)."""
    kind = spec.lr_schedule
    if kind == "constant":
        return None
    if kind == "cosine":
        if spec.total_steps < 1:
            raise ValueError("lr_schedule cosine needs total_steps >= 1")
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.total_steps)
    if kind == "step":
        if spec.lr_step_size < 1:
            raise ValueError("lr_schedule step needs lr_step_size >= 1")
        return torch.optim.lr_scheduler.StepLR(opt, step_size=spec.lr_step_size, gamma=spec.lr_gamma)
    raise ValueError(f"unknown lr_schedule {kind!r}; allowed: {', '.join(LR_SCHEDULES)}")


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A contiguous numpy view of a CPU tensor's memory (a copy only off the CPU or if strided)."""
    return t.detach().contiguous().cpu().numpy()


def loss_and_grad_target(name: str, out: torch.Tensor, y: np.ndarray) -> torch.Tensor:
    """The batch-mean loss of ``numerics.losses``: softmax_ce (integer labels), sigmoid_bce
    (summed over outputs), mse (summed squared error), each averaged over the batch."""
    B = out.shape[0]
    if name == "softmax_ce":
        return F.cross_entropy(out, torch.as_tensor(np.asarray(y), device=out.device).long())
    t = torch.as_tensor(np.asarray(y), device=out.device).to(out.dtype).reshape(out.shape)
    if name == "sigmoid_bce":
        return F.binary_cross_entropy_with_logits(out, t, reduction="sum") / B
    if name == "mse":
        d = out - t
        return (d * d).sum() / B
    raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(losses.LOSSES)}")


def _absmax(tensors: list) -> float:
    """The largest magnitude in any of the tensors (inf or nan if one is not finite): one
    fused pass where torch has get_total_norm (2.6+), else one reduction per tensor."""
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if total_norm is not None:
        return float(total_norm(tensors, norm_type=math.inf, foreach=True))
    return float(torch.stack([t.abs().amax().to(torch.float64) for t in tensors]).amax())


class TorchNode(NodeBookkeeping):
    """One torch stage and its per-message arithmetic (see the module docstring)."""

    def __init__(self, spec: LayerSpec, fail_on_nonfinite: bool = False):
        sample_shape = tuple(int(s) for s in spec.sample_shape)
        spec = replace(spec, sample_shape=sample_shape, in_shape=tuple(int(s) for s in spec.in_shape),
                       out_shape=tuple(int(s) for s in spec.out_shape))
        self.fail_on_nonfinite = fail_on_nonfinite
        self.device = torch.device(spec.device or "cpu")
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
            # deterministic mode also fills every new tensor with NaN, a debugging aid that
            # costs a memory pass per allocation (5% of a 4-stage MLP pipeline step, measured);
            # no kernel used here reads memory it did not write
            try:
                import torch.utils.deterministic as deterministic
                deterministic.fill_uninitialized_memory = False
            except ImportError:           # torch before 2.1 has no such switch (and no fill)
                pass
        stages = build_stages(spec.model, spec.split, sample_shape, spec.n_out, spec.seed)
        if len(stages) != spec.n_layers or not 0 <= spec.index < len(stages):
            raise ValueError(f"layer {spec.index + 1}: the spec says {spec.n_layers} stages, "
                             f"but model {spec.model!r} with split {spec.split!r} has {len(stages)}")
        in_shape, out_shape = stage_shapes(stages, sample_shape, spec.n_out)[spec.index]
        for what, given, got in (("in_shape", spec.in_shape, in_shape), ("out_shape", spec.out_shape, out_shape)):
            if given and given != got:
                raise ValueError(f"layer {spec.index + 1}: spec {what} {given}, but the model's stage has {got}")
        self.spec = spec = replace(spec, in_shape=in_shape, out_shape=out_shape)
        self.in_shape, self.out_shape = in_shape, out_shape
        self.stage = stages[spec.index].to(self.device)
        self.stage.train()
        del stages
        self._dtype = next((p.dtype for p in self.stage.parameters()), torch.get_default_dtype())
        self._np_dtype = numpy_dtype(self._dtype)

        # the SG model and auxiliary head from their own seed: the stage's init stays the same
        torch.manual_seed(int(spec.seed) * 7919 + 1000 + spec.index)
        self.sg = None
        self.sg_opt = None
        if not spec.is_last and spec.sg_model != "none" and spec.gradient == S.SYNTHETIC:
            self.sg = make_sg(spec.sg_model, out_shape, spec.cond_dim, spec.sg_hidden, spec.sg_layers,
                              spec.sg_rank).to(device=self.device, dtype=self._dtype)
            self.sg_opt = make_optimizer(spec.optimizer, self.sg.parameters(), spec.sg_lr)
        self.aux = None
        self.aux_opt = None
        if spec.has_aux:
            self.aux = AuxHead(out_shape, spec.n_out, spec.aux_features).to(device=self.device, dtype=self._dtype)
            self.aux_opt = make_optimizer(spec.optimizer, self.aux.parameters(), spec.lr)
        self.opt = make_optimizer(spec.optimizer, self.stage.parameters(), spec.lr, spec.weight_decay)
        self.lr_sched = make_lr_scheduler(spec, self.opt)
        # this stage's own RNG stream (dropout and the like), swapped in around each message,
        # so that in-process stages draw what separate processes draw
        torch.manual_seed(int(spec.seed) * 7919 + 2000 + spec.index)
        self._rng = torch.get_rng_state()
        self._flops = None

        self._fwd_name, self._bwd_name = ARITHMETIC[spec.gradient]
        self._init_bookkeeping()
        self.sg_version = 0              # SG updates applied (sg_reuse: is the forward's graph still current?)
        self._acc_count = 0              # pipeline: micro-batch gradients accumulated in .grad

    # ----------------------------------------------------------------- helpers
    @property
    def fan_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def fan_out(self) -> int:
        return math.prod(self.out_shape)

    def param_count(self) -> int:
        """Scalars in the stage, its SG model and auxiliary head: parameters and buffers (as
        LayerSpec.param_count counts BatchNorm's running statistics)."""
        return sum(t.numel() for t in self._modules_state().values())

    def _tensor(self, a: np.ndarray, shape: tuple, what: str, grad: bool = False) -> torch.Tensor:
        """(B, *shape) tensor on the device from a numpy (B, *shape) or (B, prod(shape)) array,
        sharing its memory on the CPU when the dtype already agrees."""
        a = np.asarray(a)
        if a.dtype != self._np_dtype:
            a = a.astype(self._np_dtype)
        B = a.shape[0] if a.ndim else 0
        if a.shape[1:] != shape:
            if a.ndim < 1 or math.prod(a.shape[1:]) != math.prod(shape):
                raise ValueError(f"layer {self.spec.index + 1}: {what} of shape {a.shape}, "
                                 f"expected (batch, {', '.join(map(str, shape))}) or (batch, {math.prod(shape)})")
        t = torch.from_numpy(a)
        if a.shape[1:] != shape:
            t = t.reshape((B,) + shape)
        t = t.to(self.device)
        if grad:
            t.requires_grad_(True)
        return t

    def _input(self, x, grad: bool = False) -> torch.Tensor:
        return self._tensor(x, self.in_shape, "input", grad)

    def _cond(self, y):
        s = self.spec
        if not s.cond:
            return None
        return torch.from_numpy(condition_vector(s.task, s.n_out, np.asarray(y), self._np_dtype)).to(self.device)

    def _loss(self, out: torch.Tensor, y):
        loss = loss_and_grad_target(self.spec.loss, out, y)
        metric, metric2, n = losses.metrics(self.spec.loss, to_numpy(out), np.asarray(y))
        return loss, {"loss": loss.detach().item(), "metric": metric, "metric2": metric2, "n": n}

    @staticmethod
    def _grad_of(x: torch.Tensor) -> np.ndarray:
        g = x.grad
        return to_numpy(torch.zeros_like(x) if g is None else g)

    def _step(self, opt: torch.optim.Optimizer, lr_scale: float = 1.0) -> str | None:
        """One optimizer step (learning rate times ``lr_scale`` for this step only; scaling the
        rate, not the gradient, which Adam would undo), then the gradients are cleared. Refused,
        with nothing changed, if a gradient is not finite or so large that the step could
        overflow: returns why (None: applied). torch's optimizers update in place, so the
        overflow test comes first, from the largest gradient and parameter magnitudes: the
        step moves a parameter by at most lr x (10 x (|g| + wd |p|)) (momentum's running sum)
        or lr x 100 (Adam's normalised step, bias correction included)."""
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None and p.numel()]
        reason = None
        if params:
            with torch.no_grad():
                gmax, pmax = _absmax([p.grad for p in params]), _absmax(params)
            if not math.isfinite(gmax):
                reason = "gradient"
            else:
                lr = max(g["lr"] for g in opt.param_groups) * lr_scale
                wd = max(g.get("weight_decay", 0.0) for g in opt.param_groups)
                limit = min(float(torch.finfo(p.dtype).max) for p in params) / 4
                bound = pmax * (1 + lr * wd) + lr * max(10 * (gmax + wd * pmax), 100.0)
                if gmax >= GRAD_LIMIT or not bound < limit:
                    reason = "update (the new weights could overflow)"
            if reason is None:
                lrs = [g["lr"] for g in opt.param_groups]
                if lr_scale != 1.0:
                    for g in opt.param_groups:
                        g["lr"] = g["lr"] * lr_scale
                try:
                    opt.step()
                finally:
                    for g, lr0 in zip(opt.param_groups, lrs):
                        g["lr"] = lr0
        opt.zero_grad(set_to_none=True)
        return reason

    def _update(self, lr_scale: float = 1.0) -> bool:
        """Apply the stage's accumulated gradient (then step the LR schedule), or count why not."""
        reason = self._step(self.opt, lr_scale)
        if reason is not None:
            self._nonfinite(f"weight {reason}")
            return False
        self.updates += 1
        if self.lr_sched is not None:
            self.lr_sched.step()
        return True

    def _swap_rng(self) -> torch.Tensor:
        outer = torch.get_rng_state()
        torch.set_rng_state(self._rng)
        return outer

    def _restore_rng(self, outer: torch.Tensor) -> None:
        self._rng = torch.get_rng_state()
        torch.set_rng_state(outer)

    # ------------------------------------------------- the schedule's arithmetic
    def forward(self, step: int, x: np.ndarray, y: np.ndarray, scale: float = 1.0):
        """The forward arithmetic of this stage's schedule (``layer.ARITHMETIC``): returns
        (h or None for the last stage, the gradient to send down or None, metrics or None)."""
        fn = getattr(self, self._fwd_name)
        outer = self._swap_rng()
        try:
            return fn(step, x, y) if scale == 1.0 else fn(step, x, y, scale)
        finally:
            self._restore_rng(outer)

    def backward(self, step: int, g: np.ndarray):
        """A gradient for ``step`` came back from the stage above: apply it the schedule's way;
        returns the gradient to send down, or None."""
        if self._bwd_name is None:
            raise StepError(f"layer {self.spec.index + 1}: gradient for step {step}, "
                            f"but schedule {self.spec.schedule} sends none back")
        outer = self._swap_rng()
        try:
            return getattr(self, self._bwd_name)(step, g)
        finally:
            self._restore_rng(outer)

    def _restore_modes(self, modules, modes) -> None:
        for m, t in zip(modules, modes):
            m.training = t

    def forward_only(self, x: np.ndarray) -> np.ndarray:
        """Inference: eval mode (BatchNorm's running statistics), no_grad, numpy out (logits for
        the last stage); the training modes are restored afterwards."""
        mods = list(self.stage.modules())
        modes = [m.training for m in mods]
        self.stage.eval()
        try:
            with torch.no_grad():
                return to_numpy(self.stage(self._input(x)))
        finally:
            self._restore_modes(mods, modes)

    def aux_logits(self, h: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return to_numpy(self.aux(self._tensor(h, self.out_shape, "activations")))

    def params(self) -> dict[str, np.ndarray]:
        """Every parameter and buffer of the stage, SG model and auxiliary head, as numpy views
        (``stage.<name>``, ``sg.<name>``, ``aux.<name>``: their state_dict names)."""
        return {k: to_numpy(v) for k, v in self._modules_state().items()}

    def _modules_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, mod in (("stage", self.stage), ("sg", self.sg), ("aux", self.aux)):
            if mod is not None:
                for k, v in mod.state_dict(keep_vars=True).items():
                    out[f"{prefix}.{k}"] = v
        return out

    # --------------------------------------------------------------------- DNI
    def dni_forward(self, step: int, x: np.ndarray, y: np.ndarray):
        """Forward with an immediate update from the synthetic (or, last stage, true) gradient.
        Returns (h, g_in, metrics): h None for the last stage, g_in None for the first."""
        s = self.spec
        if not s.is_last and self.sg is None:        # no SG model: frozen, only passes activations on
            with torch.no_grad():
                h = self.stage(self._input(x))
            self.fwd_steps += 1
            return to_numpy(h), None, None
        # --sg-every: the layer below regresses on this step. The input gradient goes down now
        # from the last stage and under "bootstrap"; under "propagate" a hidden stage sends it
        # when its own target comes back (sg_backward)
        send = sends_gradient(s, step) and (s.is_last or s.sg_target != "propagate")
        rng = torch.get_rng_state() if self._propagates(step) else None   # the forward's dropout masks
        xt = self._input(x, grad=send)
        h = self.stage(xt)
        self.fwd_steps += 1
        metrics = None
        lr_scale = 1.0
        if s.is_last:
            loss, metrics = self._loss(h, y)
            loss.backward()
        else:
            hd = h.detach()
            c = self._cond(y)
            keep = step % s.sg_every == 0
            pred_graph = None
            if keep and s.sg_reuse:
                pred_graph = self.sg(hd, c)
                pred = pred_graph.detach()
            else:
                with torch.no_grad():
                    pred = self.sg(hd, c)
            if s.sg_clip > 0 or s.sg_damp > 0:
                n = float(torch.linalg.vector_norm(pred))    # per-example scale, as the SG predicts it
                lr_scale = self.clip_scale(n)
                if s.sg_damp > 0:
                    self.pred_norm = running_norm(self.pred_norm, n)
            lr_scale *= self.trust_scale()
            # sg_trust keeps the prediction the layer steps on, to compare with its target
            if keep:
                self.cache[step] = (hd, c, pred_graph, self.sg_version, pred if s.sg_trust else None,
                                    None if rng is None else (x, rng))
            else:                                   # the layer above sends no gradient for it
                self.sg_skipped += 1
            self.last_fwd_step = max(self.last_fwd_step, step)
            h.backward(pred * (1.0 / h.shape[0]))
        gx = self._grad_of(xt) if send else None
        self._update(lr_scale)
        return (None if s.is_last else to_numpy(h)), gx, metrics

    def _propagate(self, entry, g: np.ndarray) -> np.ndarray:
        """"propagate": the target ``g`` (dL/dh) backpropagated through this stage, dL/dx. The
        forward's graph cannot serve (the optimizer has changed the weights it saved in
        place), so the stage runs its forward again on the kept input with its current
        weights, as ``delayed`` without stash does: on copies of its buffers (batch norm's
        running statistics are updated once) and with the forward's RNG state (dropout: the
        forward's masks). No weight gradient is left behind."""
        x, rng = entry[5]
        xt = self._input(x, grad=True)
        buffers = {n: b.clone() for n, b in self.stage.named_buffers()}
        outer = torch.get_rng_state()
        torch.set_rng_state(rng)
        try:
            with torch.enable_grad():
                h = functional_call(self.stage, buffers, (xt,))
                (gx,) = torch.autograd.grad(h, xt, self._tensor(g, self.out_shape, "gradient"))
        finally:
            torch.set_rng_state(outer)
        return to_numpy(gx)

    def _sg_regress(self, step: int, g: np.ndarray, entry) -> float:
        """Regress the SG model onto the gradient that came back for ``step`` (LayerNode.sg_update:
        sg_every, sg_stale_decay, sg_clip/sg_damp norms, sg_reuse). Under ``sg_reuse`` the
        forward's prediction graph is reused only while no SG update came in between (always
        under sequential); otherwise torch cannot take the gradient at the older SG weights
        without a copy of them, so it predicts again with the current ones."""
        s = self.spec
        gt = self._tensor(g, self.out_shape, "gradient")
        B = gt.shape[0]
        if s.sg_clip > 0 or s.sg_damp > 0:         # in the SG's per-example scale (B x dL/dh)
            self.target_norm = running_norm(self.target_norm, float(torch.linalg.vector_norm(gt)) * B)
        hd, c, pred_graph, version, used, _x = entry
        if used is not None:                     # sg_trust: the prediction the layer stepped on, against its target
            self.note_alignment(float(torch.nn.functional.cosine_similarity(
                used.double().flatten(), gt.double().flatten(), dim=0, eps=1e-300)))
        weight = self.target_weight(step)
        if weight is None:
            return float("nan")
        pred = pred_graph if pred_graph is not None and version == self.sg_version else self.sg(hd, c)
        loss = regression_loss(pred, gt * B)
        value = loss.detach().item()
        if not math.isfinite(value):
            self.sg_opt.zero_grad(set_to_none=True)
            self._nonfinite("synthetic-gradient update")
            return value
        (loss * weight if weight != 1.0 else loss).backward()
        reason = self._step(self.sg_opt, self.damp_scale())
        if reason is not None:
            self._nonfinite(f"synthetic-gradient {reason}")
            return value
        self.sg_updates += 1
        self.sg_version += 1
        self.last_sg_loss = value
        recent(self.sg_recent, value)
        return value

    def drop_step(self, step: int) -> None:
        entry = self.cache.pop(step, None)
        if self.spec.gradient == S.DELAYED and entry is not None and entry[2] is not None:
            self.stash_bytes -= _nbytes(entry[2])

    # ---------------------------------------------------------------- backprop
    def bp_forward(self, step: int, x: np.ndarray, y: np.ndarray, scale: float = 1.0):
        """Update-locked backprop, forward half. Non-last stages keep the graph and return
        (h, None, None); the last stage backpropagates its loss (times ``scale``, a micro-batch's
        share of the batch) and returns (None, g_in, metrics)."""
        s = self.spec
        xt = self._input(x, grad=not s.is_first)
        h = self.stage(xt)
        self.fwd_steps += 1
        if not s.is_last:
            self.cache[step] = (xt, h)
            return to_numpy(h), None, None
        loss, metrics = self._loss(h, y)
        (loss * scale if scale != 1.0 else loss).backward()
        gx = None if s.is_first else self._grad_of(xt)
        self._accumulate_or_update()
        return None, gx, metrics

    def bp_backward(self, step: int, g: np.ndarray):
        try:
            xt, h = self.cache.pop(step)
        except KeyError:
            raise StepError(f"layer {self.spec.index + 1}: gradient for step {step}, which is not in flight") from None
        h.backward(self._tensor(g, self.out_shape, "gradient"))
        gx = None if self.spec.is_first else self._grad_of(xt)
        self._accumulate_or_update()
        return gx

    def _accumulate_or_update(self) -> None:
        M = self.spec.microbatches
        if M <= 1:
            self._update()
            return
        self._acc_count += 1                      # the gradient stays accumulated in .grad
        if self._acc_count == M:
            self._update()
            self._acc_count = 0

    @property
    def step_complete(self) -> bool:
        """True when no micro-batch gradient is waiting to be applied."""
        return self._acc_count == 0

    # ---------------------------------------------------------------- delayed
    def delayed_forward(self, step: int, x: np.ndarray, y: np.ndarray):
        """Delayed true gradients, forward half (see the module docstring for stash and
        recompute); the last stage updates at once from the loss."""
        s = self.spec
        if s.is_last:
            xt = self._input(x, grad=not s.is_first)
            loss, metrics = self._loss(self.stage(xt), y)
            self.fwd_steps += 1
            loss.backward()
            gx = None if s.is_first else self._grad_of(xt)
            self._update()
            self._delay(0)
            return None, gx, metrics
        if s.stash:
            stash = {n: (p.detach().clone().requires_grad_(True) if p.requires_grad else p)
                     for n, p in self.stage.named_parameters()}
            xt = self._input(x, grad=not s.is_first)
            h = functional_call(self.stage, stash, (xt,))
            self.stash_bytes += _nbytes(stash)
            self.stash_peak = max(self.stash_peak, self.stash_bytes)
            self.cache[step] = (xt, h, stash, self.version)
        else:
            rng = torch.get_rng_state()
            xt = self._input(x)
            with torch.no_grad():
                h = self.stage(xt)
            self.cache[step] = (xt, rng, None, self.version)
        self.fwd_steps += 1
        return to_numpy(h), None, None

    def delayed_backward(self, step: int, g: np.ndarray):
        """The true gradient of ``step`` arrives, some updates after its forward: apply it
        (learning rate divided by 1 + delay under the ``lr_scale`` remedy) and return the input
        gradient: with stash both at the forward-time weights, without stash at the current ones."""
        try:
            xt, h_or_rng, stash, v = self.cache.pop(step)
        except KeyError:
            raise StepError(f"layer {self.spec.index + 1}: gradient for step {step}, which is not in flight") from None
        gt = self._tensor(g, self.out_shape, "gradient")
        if stash is not None:
            h_or_rng.backward(gt)
            for n, p in self.stage.named_parameters():
                if p.requires_grad:
                    p.grad = stash[n].grad
            self.stash_bytes -= _nbytes(stash)
        else:
            xt = xt.detach().requires_grad_(not self.spec.is_first)
            buffers = {n: b.clone() for n, b in self.stage.named_buffers()}   # BN statistics: updated once
            outer = torch.get_rng_state()
            torch.set_rng_state(h_or_rng)                                    # dropout: the forward's masks
            try:
                h = functional_call(self.stage, buffers, (xt,))
            finally:
                torch.set_rng_state(outer)
            h.backward(gt)
        gx = None if self.spec.is_first else self._grad_of(xt)
        delay = self.version - v
        self._update(lr_scale=1.0 / (1 + delay) if self.spec.delay_remedy == "lr_scale" else 1.0)
        self._delay(delay)
        return gx

    # ------------------------------------------------------------------ local
    def local_forward(self, step: int, x: np.ndarray, y: np.ndarray):
        """Local losses: a hidden stage updates at once from its auxiliary head's loss (and
        trains the head); the last stage from the real loss. Nothing goes down."""
        s = self.spec
        xt = self._input(x)
        self.fwd_steps += 1
        if s.is_last:
            loss, metrics = self._loss(self.stage(xt), y)
            loss.backward()
            self._update()
            return None, None, metrics
        if self.aux is None:
            with torch.no_grad():
                return to_numpy(self.stage(xt)), None, None
        h = self.stage(xt)
        z = self.aux(h)
        loss = loss_and_grad_target(s.aux_loss, z, y)
        loss.backward()
        reason = self._step(self.aux_opt)
        if reason is not None:
            self._nonfinite(f"auxiliary-head {reason}")
        recent(self.aux_recent, losses.metrics(s.aux_loss, to_numpy(z), np.asarray(y))[0])
        self._update()
        return to_numpy(h), None, None

    # ------------------------------------------------------------ accounting
    def _measure_flops(self) -> tuple[float, float, float]:
        """Per-sample forward FLOPs of the stage, of its SG model and of its auxiliary head
        (torch.utils.flop_counter: matmuls and convolutions, a multiply-add counts 2), measured
        once in eval mode under no_grad on a batch of 2. The SG model and head are measured on
        throwaway copies when this node has none (another schedule's accounting)."""
        if self._flops is not None:
            return self._flops
        s = self.spec
        n = 2
        x = torch.zeros((n,) + self.in_shape, dtype=self._dtype, device=self.device)
        mods = list(self.stage.modules())
        modes = [m.training for m in mods]
        self.stage.eval()
        try:
            with torch.no_grad():
                with FlopCounterMode(display=False) as fc:
                    h = self.stage(x)
                fwd = fc.get_total_flops() / n
                sgf = auxf = 0.0
                if not s.is_last and s.sg_model != "none":
                    rng = torch.get_rng_state()
                    sg = self.sg or make_sg(s.sg_model, self.out_shape, s.cond_dim, s.sg_hidden, s.sg_layers,
                                            s.sg_rank).to(device=self.device, dtype=self._dtype)
                    aux = self.aux or AuxHead(self.out_shape, s.n_out, s.aux_features or 256).to(
                        device=self.device, dtype=self._dtype)
                    torch.set_rng_state(rng)
                    c = torch.zeros((n, s.cond_dim), dtype=self._dtype, device=self.device) if s.cond else None
                    with FlopCounterMode(display=False) as fc:
                        sg(h, c)
                    sgf = fc.get_total_flops() / n
                    with FlopCounterMode(display=False) as fc:
                        aux(h)
                    auxf = fc.get_total_flops() / n
        finally:
            self._restore_modes(mods, modes)
        self._flops = (float(fwd), float(sgf), float(auxf))
        return self._flops

    def flops_parts(self, batch: int, schedule: str | None = None) -> dict[str, float]:
        """LayerNode.flops_parts for a torch stage: ``forward`` measured (``_measure_flops``);
        ``backward`` the weight gradients (~1x forward) plus the input gradient (~1x) unless this
        is the first stage or the schedule sends none, plus the recomputed forward under delayed
        without stash; ``sg_predict``, ``sg_repredict`` (per sg_every, none under sg_reuse) and
        ``sg_update`` (~1x the SG's forward for a one-layer SG, 2x with hidden layers); ``aux``
        (local losses: 3x the head's forward, as numerics counts it)."""
        s = self.spec
        gradient = S.get(schedule or s.schedule).gradient
        fwd, sgf, auxf = self._measure_flops()
        f = fwd * batch
        out = {"forward": f, "backward": f, "sg_predict": 0.0, "sg_repredict": 0.0, "sg_update": 0.0, "aux": 0.0}
        if not s.is_first and gradient != S.LOCAL:
            out["backward"] += f
        if gradient == S.DELAYED and not s.stash and not s.is_last:
            out["backward"] += f
        if gradient == S.SYNTHETIC and not s.is_last and s.sg_model != "none":
            p = sgf * batch
            out["sg_predict"] = p
            out["sg_repredict"] = 0.0 if s.sg_reuse else p / s.sg_every
            out["sg_update"] = p * (2 if s.sg_model == "mlp" else 1) / s.sg_every
        if gradient == S.LOCAL and not s.is_last and s.aux_features:
            out["aux"] = 3 * auxf * batch
        return out

    def flops_per_batch(self, batch: int, schedule: str | None = None) -> float:
        return sum(self.flops_parts(batch, schedule).values())

    # ------------------------------------------------------------ checkpoints
    def _opt_items(self):
        """(entry name, tensor) of each optimizer's per-parameter state, by parameter name."""
        for prefix, opt, mod in (("opt", self.opt, self.stage), ("sgopt", self.sg_opt, self.sg),
                                 ("auxopt", self.aux_opt, self.aux)):
            if opt is None:
                continue
            for pname, p in mod.named_parameters():
                st = opt.state.get(p, {})
                for key in sorted(st):
                    yield f"{prefix}.{pname}.{key}", st[key]

    def _opts(self):
        return [(p, o) for p, o in (("opt", self.opt), ("sgopt", self.sg_opt), ("auxopt", self.aux_opt))
                if o is not None]

    def _state_items(self) -> dict:
        """name -> tensor or numpy array of everything :meth:`state_arrays` holds."""
        out: dict = dict(self._modules_state())
        for name, v in self._opt_items():
            out[name] = v if isinstance(v, torch.Tensor) else np.asarray(v)
        for prefix, opt in self._opts():
            out[f"{prefix}.lr"] = np.array([g["lr"] for g in opt.param_groups], dtype=np.float64)
        if self.lr_sched is not None:
            out["sched"] = np.array([self.lr_sched.last_epoch, self.lr_sched._step_count], dtype=np.int64)
        out["counters"] = np.array([getattr(self, c) for c in COUNTERS], dtype=np.int64)
        out["lags"] = np.array(self.sg_lags, dtype=np.int64)
        out["norms"] = np.array([self.target_norm, self.pred_norm], dtype=np.float64)
        if self.spec.sg_trust:
            out["sgtrust"] = np.array([self.trust], dtype=np.float64)
        out["rng"] = self._rng.numpy()
        return out

    def state_layout(self) -> dict[str, tuple[tuple, np.dtype]]:
        """name -> (shape, dtype) of every entry of :meth:`state_arrays`; the same for a fresh
        node and a trained one of the same spec (optimizer state is created at construction)."""
        out = {}
        for k, v in self._state_items().items():
            if isinstance(v, torch.Tensor):
                out[k] = (tuple(v.shape), numpy_dtype(v.dtype))
            else:
                out[k] = (tuple(v.shape), v.dtype)
        return out

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to continue training exactly, as name -> numpy copies: the stage's,
        SG model's and head's state_dict (``stage.*``, ``sg.*``, ``aux.*``), each optimizer's
        per-parameter state (``opt.<param>.<key>``, ``sgopt.*``, ``auxopt.*``: exp_avg,
        exp_avg_sq, step, momentum_buffer) and learning rates (``opt.lr``...), the LR schedule
        (``sched``: last_epoch, step count), ``counters`` (int64, :data:`COUNTERS`), ``lags``,
        ``norms`` (float64: the sg_clip/sg_damp running norms), ``sgtrust`` (under sg_trust) and ``rng`` (uint8: the stage's
        own torch CPU generator state). No pickle: arrays only.
        Must be taken between steps (no partly accumulated pipeline step)."""
        if self._acc_count:
            raise StateError(f"layer {self.spec.index + 1}: a pipeline step is partly accumulated "
                             f"({self._acc_count} of {self.spec.microbatches} micro-batches); checkpoint between steps")
        out = {}
        for k, v in self._state_items().items():
            out[k] = v.detach().cpu().numpy().copy() if isinstance(v, torch.Tensor) else np.array(v, copy=True)
        return out

    def load_state_arrays(self, d: dict) -> None:
        """Load :meth:`state_arrays` output (keys, shapes and dtypes already checked by the
        caller against :meth:`state_layout`; checked again here, with the values: floats finite,
        counts and learning rates non-negative). Nothing changes unless all of it is valid.
        In-flight steps and any pipeline accumulation are dropped."""
        who = f"layer {self.spec.index + 1}"
        layout = self.state_layout()
        for key, (shape, dtype) in layout.items():
            if key not in d:
                raise StateError(f"{who}: checkpoint state has no {key!r}")
            a = np.asarray(d[key])
            if a.shape != shape or a.dtype != dtype:
                raise StateError(f"{who}: {key!r} is {a.dtype}{list(a.shape)}, expected {np.dtype(dtype)}{list(shape)}")
        extra = sorted(set(d) - set(layout))
        if extra:
            raise StateError(f"{who}: checkpoint state has unexpected entries {', '.join(extra)}")
        for key in layout:
            a = np.asarray(d[key])
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                i = int(np.flatnonzero(~np.isfinite(a))[0])
                raise StateError(f"{who}: checkpoint entry {key!r} holds {a.reshape(-1)[i]} at flat index {i}")
            if key == "sgtrust" and (np.abs(a) > 1).any():
                raise StateError(f"{who}: checkpoint entry 'sgtrust' (a running cosine) is outside -1..1")
            if _counts(key) and a.size and (a < 0).any():
                raise StateError(f"{who}: checkpoint entry {key!r} holds a negative value ({a.min()})")
        items = self._state_items()
        with torch.no_grad():
            for key, t in items.items():
                if isinstance(t, torch.Tensor):
                    t.copy_(torch.from_numpy(np.array(d[key])).to(t.device))
        for prefix, opt in self._opts():
            for g, lr in zip(opt.param_groups, np.asarray(d[f"{prefix}.lr"]).tolist()):
                g["lr"] = lr
        # a constant learning rate is the spec's: a resumed run may change it (train.lr); under
        # an LR schedule the scheduler's own rate is resumed (config.resume_changes refuses a
        # changed lr there). The auxiliary head's is always spec.lr, unscheduled
        for opt in ((self.opt,) if self.lr_sched is None else ()) + ((self.aux_opt,) if self.aux_opt else ()):
            for g in opt.param_groups:
                g["lr"] = float(self.spec.lr)
        if self.lr_sched is not None:
            self.lr_sched.last_epoch, self.lr_sched._step_count = (int(v) for v in np.asarray(d["sched"]))
            self.lr_sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        for name, v in zip(COUNTERS, np.asarray(d["counters"]).tolist()):
            setattr(self, name, int(v))
        self.sg_lags = [int(v) for v in np.asarray(d["lags"])]
        self.target_norm, self.pred_norm = (float(v) for v in np.asarray(d["norms"]))
        if self.spec.sg_trust:
            self.trust = float(np.asarray(d["sgtrust"])[0])
        self._rng = torch.from_numpy(np.array(d["rng"], dtype=np.uint8))
        self.cache.clear()
        self.stash_bytes = 0
        self._acc_count = 0
        for _, opt in self._opts():
            opt.zero_grad(set_to_none=True)
        self.stage.zero_grad(set_to_none=True)


def _counts(key: str) -> bool:
    """Whether a state entry holds counts or rates, which cannot be negative."""
    return (key in ("sched", "counters", "lags", "norms") or key.endswith((".lr", ".step", ".num_batches_tracked")))


def _nbytes(stash: dict) -> int:
    return sum(t.numel() * t.element_size() for t in stash.values() if t.requires_grad)
