"""In-process trainer of exactly the engine's arithmetic, no sockets.

Runs the same :class:`LayerNode` methods in a schedule's lock-step order (a list of
typed actions per step from ``schedules.lockstep``, executed by :class:`Runtime`), so a
multi-process run of a deterministic schedule (``sequential``, ``backprop``,
``pipeline``, ``delayed_fixed``, ``local``) with the same seed ends with the same weights.
``dni`` here is the sequential DNI order; it is also the single-process baseline that
``asyncdni bench`` reports.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from asyncdni.numerics import losses
from asyncdni import schedules as S
from asyncdni.numerics.data import BatchStream, Dataset, eval_batches
from asyncdni.nodes import make_node
from asyncdni.numerics.layer import LayerNode
from asyncdni.engine.plan import Plan, microbatch_bounds
from asyncdni.wire import codec as WC


@dataclass
class ReferenceResult:
    nodes: list[LayerNode]
    losses: list[float] = field(default_factory=list)
    train_time: float = 0.0
    evals: list[dict] = field(default_factory=list)


def evaluate(nodes: list[LayerNode], loss_name: str, test: Dataset, batch: int, in_shape=None) -> dict:
    """Loss and metrics on ``test`` in batches of ``batch``, combined as the feeder combines
    the last layer's results (``losses.combine``; regression: R² about the test set's mean).
    ``in_shape``: the first layer's per-sample input shape (``Plan.in_shape``; None: flat)."""
    parts = []
    for x, y in eval_batches(test, batch, in_shape):
        h = x
        for node in nodes:
            h = node.forward_only(h)
        loss, _ = losses.compute(loss_name, h, y)
        m, m2, n = losses.metrics(loss_name, h, y, test.task)
        parts.append({"loss": loss, "metric": m, "metric2": m2, "n": n})
    sst = losses.sum_sq_dev(test.y) if test.task == "regression" else None
    return losses.combine(parts, test.task, test.n_out, sst)


ALIASES = {"dni": "sequential"}   # the in-process DNI baseline runs the sequential DNI order


class Runtime:
    """Executes a lock-step order (``schedules.lockstep``) on in-process ``LayerNode``s.

    Mailboxes stand in for the sockets: an ``F`` action takes its input from the stage
    below (the feeder for stage 0) and leaves its output for the stage above and its
    gradient for the stage below; a ``B`` action takes the gradient the stage above left.
    An action whose input is missing, or that fails, raises :class:`ScheduleError` with the
    order printed as a step x layer grid and the failing action marked.
    """

    def __init__(self, nodes: list[LayerNode], sched: S.Schedule, wire: tuple = ("fp32", "fp32", True),
                 n_train: int = 0):
        self.nodes = nodes
        self.sched = sched
        self.K = len(nodes)
        self.M = nodes[0].spec.microbatches
        self.fwd: dict = {}
        self.bwd: dict = {}
        self.metrics: dict[int, list] = {}
        # the links' codecs, as the workers apply them: activations between stages (not the
        # feeder's input), gradients with one error feedback per sending stage
        self.fwd_codec, delta = WC.parse_wire(wire[0])
        self.bwd_codec = WC.parse(wire[1])
        self.feedback = [WC.ErrorFeedback(self.bwd_codec) if wire[2] else None for _ in nodes]
        # aq:CODEC: each link's two ends, the sender's history and the receiver's
        self.hist = [(WC.DeltaHistory(self.fwd_codec, n_train), WC.DeltaHistory(self.fwd_codec, n_train))
                     for _ in nodes] if delta else None

    def through_fwd(self, i: int, h, ids=None):
        """Stage ``i``'s activations, as stage ``i + 1`` reconstructs them."""
        c = self.fwd_codec
        if not c.lossy:
            return h
        h = np.ascontiguousarray(h, np.float32)
        if self.hist is None:
            return c.decode(c.encode(h), h.shape[1:])
        if ids is None:
            raise ValueError("aq: the reference needs each batch's sample ids (batch_of returning x, y, ids)")
        send, recv = self.hist[i]
        return recv.decode(c.decode(send.encode(h, ids), h.shape[1:]), ids)

    def through_bwd(self, i: int, k: int, g):
        """Stage ``i``'s gradient for (micro-)step ``k``, as the stage below receives it."""
        c = self.bwd_codec
        if not c.lossy:
            return g
        g = np.ascontiguousarray(g, np.float32)
        fb = self.feedback[i]
        return c.decode(fb.encode(g, k % self.M) if fb is not None else c.encode(g), g.shape[1:])

    def key(self, a: S.Action) -> int:
        """The node's step id: micro-steps ``step * M + mb`` under micro-batching."""
        return a.step * self.M + a.mb if a.mb >= 0 else a.step

    def feed(self, step: int, x, y, ids=None) -> None:
        if self.M == 1:
            self.fwd[(0, step)] = (x, y, 1.0, ids)
            return
        B = x.shape[0]
        for j, (a, b) in enumerate(microbatch_bounds(B, self.M)):
            self.fwd[(0, step * self.M + j)] = (x[a:b], y[a:b], (b - a) / B, None if ids is None else ids[a:b])

    def run(self, ticks: list[list[S.Action]], first_tick: int = 0, batch_of=None, on_metrics=None) -> None:
        """Execute ``ticks`` in order. ``batch_of(step) -> (x, y)`` feeds stage 0 when a step's
        first forward comes up; ``on_metrics(step, metrics)`` gets each step's loss after its tick."""
        for tick in ticks:
            if batch_of is not None:
                for step in sorted({a.step for a in tick if a.op == "F" and a.stage == 0}):
                    self.feed(step, *batch_of(step))
            for a in tick:
                try:
                    self.execute(a)
                except Exception as e:
                    grid = S.format_grid(ticks, self.K, failed=a, first_tick=first_tick)
                    raise S.ScheduleError(f"schedule {self.sched.name}: action {a} failed: "
                                          f"{type(e).__name__}: {e}\n{grid}") from e
            if on_metrics is not None:
                for step in sorted(self.metrics):
                    on_metrics(step, self.step_metrics(step))

    def execute(self, a: S.Action) -> None:
        i, k = a.stage, self.key(a)
        node = self.nodes[i]
        if a.op == "F":
            if (i, k) not in self.fwd:
                raise KeyError(f"no input for stage {i} step {k}: the stage below has not run its forward")
            x, y, scale, ids = self.fwd.pop((i, k))
            h, gd, m = node.forward(k, x, y, scale)
            if h is not None and i + 1 < self.K:
                self.fwd[(i + 1, k)] = (self.through_fwd(i, h, ids), y, scale, ids)
            if gd is not None and i > 0:
                self.bwd[(i - 1, k)] = self.through_bwd(i, k, gd)
            if m is not None:
                self.metrics.setdefault(a.step, []).append(m)
            return
        if (i, k) not in self.bwd:
            raise KeyError(f"no gradient for stage {i} step {k}: the stage above has not sent it")
        gd = node.backward(k, self.bwd.pop((i, k)))
        if gd is not None and i > 0:
            self.bwd[(i - 1, k)] = self.through_bwd(i, k, gd)

    def step_metrics(self, step: int) -> dict:
        ms = self.metrics.pop(step)
        if len(ms) == 1:
            return ms[0]
        spec = self.nodes[-1].spec                  # as the last worker combines its micro-batches
        return losses.combine(ms, spec.task, spec.n_out)


def train_step(nodes: list[LayerNode], schedule: str, step: int, x, y, microbatches: int = 1) -> dict:
    """One training step of the given schedule's lock-step order; returns the last layer's
    metrics. (Fixed-lag orders owe gradients across steps: use :func:`train_reference`.)"""
    sched = S.get(ALIASES.get(schedule, schedule), nodes[0].spec.sg_target)
    rt = Runtime(nodes, sched)
    rt.feed(step, x, y)
    rt.run(S.lockstep(sched, len(nodes), step, step + 1, rt.M, sg_every=nodes[0].spec.sg_every))
    return rt.step_metrics(step)


def train_reference(plan: Plan, schedule: str, train: Dataset, seed: int, steps: int | None = None,
                    test: Dataset | None = None, eval_every: int = 0, eval_batch: int = 1000,
                    boundaries=(), start: int = 0, nodes: list[LayerNode] | None = None) -> ReferenceResult:
    """Train ``steps`` steps in the schedule's lock-step order. ``boundaries``: further steps
    at which the workers drain the pipeline (checkpoints); evaluations drain too. ``start``
    and ``nodes``: continue from a state (a resumed run)."""
    sched = S.get(ALIASES.get(schedule, schedule), plan.specs[0].sg_target)
    nodes = [make_node(s) for s in plan.specs] if nodes is None else nodes
    stream = BatchStream(train, plan.batch_size, seed, in_shape=plan.in_shape)
    res = ReferenceResult(nodes)
    M = plan.specs[0].microbatches
    steps = plan.steps if steps is None else steps
    evals = [s for s in range(start + 1, steps) if eval_every and s % eval_every == 0] if test is not None else []
    cuts = sorted({b for b in boundaries if start < b < steps} | set(evals) | {steps})
    rt = Runtime(nodes, sched, plan.wire, plan.n_train)
    t0 = time.perf_counter()
    paused = 0.0
    seg = start
    for cut in cuts:
        rt.run(S.lockstep(sched, len(nodes), seg, cut, M, sg_every=plan.specs[0].sg_every), first_tick=seg,
               batch_of=lambda s: (*stream.batch(s), stream.indices(s)),
               on_metrics=lambda step, m: res.losses.append(m["loss"]))
        if cut in evals:
            p0 = time.perf_counter()
            ev = evaluate(nodes, plan.loss, test, eval_batch, plan.in_shape)
            paused += time.perf_counter() - p0
            ev.update(step=cut, train_time=time.perf_counter() - t0 - paused)
            res.evals.append(ev)
        seg = cut
    res.train_time = time.perf_counter() - t0 - paused
    if test is not None:
        ev = evaluate(nodes, plan.loss, test, eval_batch, plan.in_shape)
        ev.update(step=steps, train_time=res.train_time)
        res.evals.append(ev)
    return res


def aux_evaluate(plan: Plan, params: list[dict], test: Dataset, batch: int = 1000) -> list[float | None]:
    """Test-set metric of each layer's auxiliary classifier (local losses) from the final
    parameters of a run (``RunResult.params``); None for layers without one."""
    nodes = [make_node(s) for s in plan.specs]
    if not any(n.aux is not None for n in nodes):
        return [None] * len(nodes)
    for node, p in zip(nodes, params):
        for name, arr in node.params().items():
            arr[...] = p[name]
    return aux_metrics(nodes, test, batch, plan.in_shape)


def aux_metrics(nodes: list[LayerNode], test: Dataset, batch: int = 1000, in_shape=None) -> list[float | None]:
    """Test-set metric of each layer's auxiliary head (accuracy; regression: RMSE); None
    for layers without one."""
    parts: list[list] = [[] for _ in nodes]
    for x, y in eval_batches(test, batch, in_shape):
        h = x
        for i, node in enumerate(nodes):
            h = node.forward_only(h)
            if node.aux is not None:
                m, m2, n = losses.metrics(node.spec.aux_loss, node.aux_logits(h), y, test.task)
                loss = losses.compute(node.spec.aux_loss, node.aux_logits(h), y)[0] if test.task == "regression" else 0.0
                parts[i].append({"loss": loss, "metric": m, "metric2": m2, "n": n})
    return [losses.combine(parts[i], test.task, test.n_out)["metric"] if node.aux is not None else None
            for i, node in enumerate(nodes)]
