"""Schedules as data: one description per schedule that every part of the engine reads.

The layer worker, the feeder, the in-process reference, the planner (``model.make_plan``),
FLOP accounting (``layer.LayerNode.flops_per_batch``), the bench and the configuration all
read the :class:`Schedule` entries in :data:`TABLE`; none of them branches on a schedule's
name. A schedule says

* ``gradient``: which gradient a layer applies (see ``layer.ARITHMETIC``):
  ``synthetic`` (DNI: at once, from its SG model), ``true`` (backprop: at once, update-locked),
  ``delayed`` (the true gradient of step t, applied when it comes back, some steps late),
  ``local`` (at once, from the layer's own auxiliary classifier; nothing travels back);
* ``window``: steps in flight between the feeder and the end of the network:
  ``max_inflight`` (``train.max_inflight``), ``one`` (lock-step) or ``lag`` (just enough for
  the fixed lags, max D_i + 1);
* ``release``: what completes a step at the feeder: ``DONE`` (the last layer's loss), and
  for schedules whose gradient travels back, also ``ACK`` (layer 1 has applied it);
* ``hold_for_ack``: a layer holds its output until the layer above acknowledges the
  gradient it sent back (strictly one layer computing at a time);
* ``microbatches``: whether the batch is split into ``train.microbatches``;
* ``fixed_lag``: layer i applies the gradient of step t - D_i right after its forward of
  step t, D_i = ``lag_per_layer`` * (K-1-i) (1: PipeDream's 1F1B steady state),
  deterministically;
* ``parallelism``: the cost model's parallelism for the work bound: ``free`` (layers run
  concurrently: the measured layer balance), ``locked`` (1), ``microbatch`` (GPipe:
  K*M/(M+K-1));
* ``order``: the lock-step order of one step as typed actions per stage, which the
  in-process reference executes (:func:`lockstep`). Free-running schedules name the
  lock-step order that has their arithmetic.

Synthetic-gradient schedules come in two forms, by what trains a layer's SG model
(``train.sg_target``, :data:`SG_TARGETS`): ``bootstrap`` (the DNI paper's: the layer above
sends down its own SG prediction, backpropagated, at its forward) and ``propagate`` (the
layer above sends down the target that came back to *it*, backpropagated through it, when
it comes: the true gradient, a few steps late). :func:`get` gives the propagating form of
``async`` and ``sequential`` with that order, and ``sequential`` then ends a step with the
ACK of layer 1 instead of holding each output.

Adding a schedule: one :class:`Schedule` entry below, plus, if it applies a new kind of
gradient, its forward/backward arithmetic in ``layer.py`` (``ARITHMETIC`` and ``flops``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

SYNTHETIC, TRUE, DELAYED, LOCAL = "synthetic", "true", "delayed", "local"
GRADIENTS = (SYNTHETIC, TRUE, DELAYED, LOCAL)


# ----------------------------------------------------------------- actions
@dataclass(frozen=True)
class Action:
    """One unit of a lock-step order: stage ``stage`` runs ``op`` for ``step`` (micro-batch ``mb``).

    ``F``: forward (with whatever update the schedule makes at once, and the gradient it
    sends back); ``B``: the gradient from the stage above arrives and is applied.
    Printed as ``1F7`` (stage 1, forward, step 7) or ``1F7.2`` (micro-batch 2).
    """
    stage: int
    op: str          # "F" or "B"
    step: int
    mb: int = -1

    def __str__(self) -> str:
        return f"{self.stage}{self.op}{self.step}" + (f".{self.mb}" if self.mb >= 0 else "")


def _f(i, t, mb=-1):
    return Action(i, "F", t, mb)


def _b(i, t, mb=-1):
    return Action(i, "B", t, mb)


def order_dni(K: int, t: int, M: int = 1, lags=None) -> list[Action]:
    """Sequential DNI: layer i runs, then layer i-1 regresses its SG on i's input gradient."""
    out = [_f(0, t)]
    for i in range(1, K):
        out += [_f(i, t), _b(i - 1, t)]
    return out


def order_backprop(K: int, t: int, M: int = 1, lags=None) -> list[Action]:
    return [_f(i, t) for i in range(K)] + [_b(i, t) for i in range(K - 2, -1, -1)]


def order_dni_propagated(K: int, t: int, M: int = 1, lags=None) -> list[Action]:
    """Sequential DNI with propagated SG targets: every layer runs (updating from its SG),
    then from the top down each layer regresses its SG on the target from above and passes
    it down, backpropagated through itself: backprop's order of actions."""
    return order_backprop(K, t, M, lags)


def order_pipeline(K: int, t: int, M: int = 1, lags=None) -> list[Action]:
    """GPipe: every micro-batch forward, then every micro-batch backward, in micro-batch order."""
    out = [_f(i, t, j) for j in range(M) for i in range(K)]
    return out + [_b(i, t, j) for j in range(M) for i in range(K - 2, -1, -1)]


def order_delayed(K: int, t: int, M: int = 1, lags=None) -> list[Action]:
    """Fixed-lag delayed gradients: forward through all, then layer i applies the gradient
    of step t - D_i (those before the segment start are dropped by :func:`lockstep`)."""
    out = [_f(i, t) for i in range(K)]
    return out + [_b(i, t - lags[i]) for i in range(K - 2, -1, -1)]


def order_forward(K: int, t: int, M: int = 1, lags=None) -> list[Action]:
    """Local losses: forward only; every layer updates from its own loss during F."""
    return [_f(i, t) for i in range(K)]


# --------------------------------------------------------------- schedules
@dataclass(frozen=True)
class Schedule:
    name: str
    summary: str
    gradient: str
    window: str
    release: tuple[str, ...]
    parallelism: str
    order: Callable
    hold_for_ack: bool = False
    microbatches: bool = False
    fixed_lag: bool = False
    lag_per_layer: int = 1

    @property
    def sends_backward(self) -> bool:
        """Whether layers send gradients down the backward path."""
        return self.gradient != LOCAL

    @property
    def needs_ack(self) -> bool:
        return "ack" in self.release

    def window_size(self, max_inflight: int, K: int) -> int:
        return {"max_inflight": max_inflight, "one": 1, "lag": max(self.lags(K)) + 1}[self.window]

    def lags(self, K: int) -> tuple[int, ...]:
        """D_i: how many steps late layer i applies a true gradient under the fixed-lag order,
        ``lag_per_layer * (K-1-i)`` (1: PipeDream's 1F1B; 0: backprop's order); zero for
        schedules whose gradient is applied at once."""
        if self.gradient == DELAYED:
            return tuple(self.lag_per_layer * (K - 1 - i) for i in range(K))
        return (0,) * K


TABLE: dict[str, Schedule] = {s.name: s for s in (
    Schedule("async", "DNI, every layer free-running within the in-flight window",
             SYNTHETIC, "max_inflight", ("done",), "free", order_dni),
    Schedule("sequential", "DNI, strictly one layer computing at a time, in order",
             SYNTHETIC, "one", ("done",), "locked", order_dni, hold_for_ack=True),
    Schedule("backprop", "update-locked backprop through the workers",
             TRUE, "one", ("done", "ack"), "locked", order_backprop),
    Schedule("pipeline", "GPipe: M micro-batches, then one synchronous update",
             TRUE, "one", ("done", "ack"), "microbatch", order_pipeline, microbatches=True),
    Schedule("delayed", "true gradients applied when they come back, layers free-running within the window",
             DELAYED, "max_inflight", ("done", "ack"), "free", order_delayed),
    Schedule("delayed_fixed", "delayed true gradients with fixed lags D_i = K-1-i (1F1B), deterministic",
             DELAYED, "lag", ("done", "ack"), "free", order_delayed, fixed_lag=True),
    Schedule("local", "every hidden layer trains on its own auxiliary classifier; nothing travels back",
             LOCAL, "max_inflight", ("done",), "free", order_forward),
)}

NAMES = tuple(TABLE)
# what ``asyncdni bench`` runs by default, in its order: every schedule through the workers
# but delayed_fixed (the deterministic test form of delayed), then the in-process DNI run
# inprocess: the DNI math in one process; inprocess-backprop(-all): plain backprop in one
# process on 1 BLAS thread (-all: on every core), the baseline a user would pick instead
BENCH_ORDER = ("sequential", "async", "delayed", "local", "backprop", "pipeline", "inprocess",
               "inprocess-backprop", "inprocess-backprop-all")
BENCH_CHOICES = BENCH_ORDER + tuple(n for n in NAMES if n not in BENCH_ORDER)


SG_TARGETS = ("propagate", "bootstrap")   # what trains a layer's SG model (train.sg_target, resolved)
AUTO_PROPAGATE_DEPTH = 6    # train.sg_target "auto": propagated targets from this many stages on


def can_propagate(sched: "Schedule", sg_every: int) -> bool:
    """Whether propagated SG targets can run: not with ``sg_every`` > 1 under a schedule that
    holds for ACKs (a step whose SG is not regressed would have no backward pass to end it)."""
    return not (sched.hold_for_ack and sg_every > 1)


def resolve_sg_target(sg_target: str, n_layers: int, cond: bool, sched: "Schedule | None" = None,
                      sg_every: int = 1) -> str:
    """``train.sg_target`` as it applies to a network of ``n_layers`` stages: "auto" is
    "propagate" for plain DNI (no label: bootstrapped targets compound fastest) and for
    networks of :data:`AUTO_PROPAGATE_DEPTH` or more stages, where bootstrapped targets
    break; "bootstrap" otherwise, whose fresher targets train shallow networks faster
    (docs/results/depth.md), and where propagation cannot run (``sg_every`` > 1 under a
    schedule that holds for ACKs)."""
    if sg_target != "auto":
        return sg_target
    if sched is not None and not can_propagate(sched, sg_every):
        return "bootstrap"
    return "propagate" if (not cond or n_layers >= AUTO_PROPAGATE_DEPTH) else "bootstrap"


def resolve_sg_clip(sg_clip: float, sg_target: str) -> float:
    """``train.sg_clip`` as it applies: negative is "auto", 0.5 with propagated targets (they
    are staler: 1 let a 6-layer net collapse) and 1 with bootstrapped ones."""
    if sg_clip >= 0:
        return sg_clip
    return 0.5 if sg_target == "propagate" else 1.0


def get(name: str, sg_target: str = "bootstrap") -> Schedule:
    """The schedule ``name``; under ``sg_target`` "propagate" a synthetic-gradient schedule's
    propagating form (the module's docstring)."""
    try:
        sched = TABLE[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(NAMES)}") from None
    if sg_target not in SG_TARGETS:
        raise ValueError(f"unknown SG target {sg_target!r}; allowed: {', '.join(SG_TARGETS)}")
    if sg_target == "bootstrap" or sched.gradient != SYNTHETIC:
        return sched
    release = ("done", "ack") if sched.hold_for_ack else sched.release
    return replace(sched, order=order_dni_propagated, release=release, hold_for_ack=False)


def pause_points(start: int, steps: int, eval_every: int, checkpoint_every: int):
    """Steps at which the feeder drains the pipeline (evaluation, checkpoints) and the end."""
    def is_pause(step: int) -> bool:
        if step >= steps:
            return True
        return step > start and ((eval_every and step % eval_every == 0) or
                                 (checkpoint_every and step % checkpoint_every == 0))
    return is_pause


def lockstep(sched: Schedule, K: int, start: int, stop: int, M: int = 1, boundaries=(),
             sg_every: int = 1) -> list[list[Action]]:
    """The lock-step order of steps [start, stop) as ticks (one per step) of actions.

    At each boundary (a drain point: evaluation, checkpoint, the end) every gradient still
    owed is applied before the next step, in step order, as the workers do. Under a
    synthetic-gradient schedule with ``sg_every`` n, only steps that are multiples of n send
    a gradient back (``layer.sends_gradient``): the others have no ``B`` actions.
    """
    lags = sched.lags(K)
    cuts = sorted({b for b in boundaries if start < b < stop} | {stop})
    ticks: list[list[Action]] = []
    seg = start
    skip = sched.gradient == SYNTHETIC and sg_every > 1
    for cut in cuts:
        for t in range(seg, cut):
            if skip and t % sg_every:
                ticks.append([a for a in sched.order(K, t, M, lags) if a.op == "F"])
                continue
            ticks.append([a for a in sched.order(K, t, M, lags) if a.op == "F" or a.step >= seg])
        if sched.gradient == DELAYED:
            drain = [_b(i, s) for s in range(seg, cut) for i in range(K - 2, -1, -1) if s + lags[i] >= cut]
            if drain:
                ticks.append(drain)
        seg = cut
    return ticks


class ScheduleError(RuntimeError):
    """An action of a lock-step order could not run; the message holds the order's grid."""


def format_grid(ticks: list[list[Action]], K: int, failed: Action | None = None, first_tick: int = 0,
                context: int = 6) -> str:
    """The order as a step x layer grid (one row per tick), the failed action in [brackets]
    (after torch.distributed.pipelining's ``_format_pipeline_order``)."""
    rows = []
    fail_row = None
    for r, tick in enumerate(ticks):
        cells = []
        for i in range(K):
            acts = [(f"[{a}]" if a == failed else str(a)) for a in tick if a.stage == i]
            cells.append(" ".join(acts) or ".")
        if failed is not None and failed in tick:
            fail_row = r
        rows.append(cells)
    lo, hi = 0, len(rows)
    if fail_row is not None:
        lo, hi = max(0, fail_row - context), min(len(rows), fail_row + context + 1)
    width = max([len(c) for row in rows[lo:hi] for c in row] + [8])
    head = "tick  " + " ".join(f"{'layer ' + str(i + 1):<{width}}" for i in range(K))
    lines = [head]
    if lo > 0:
        lines.append("  ...")
    for r in range(lo, hi):
        mark = "  <- failed here" if r == fail_row else ""
        lines.append(f"{first_tick + r:>4}  " + " ".join(f"{c:<{width}}" for c in rows[r]) + mark)
    if hi < len(rows):
        lines.append("  ...")
    return "\n".join(lines)
