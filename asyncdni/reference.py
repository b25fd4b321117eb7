"""In-process trainer of exactly the engine's arithmetic, no sockets.

Uses the same :class:`LayerNode` methods, in the order the multi-process ``sequential``,
``backprop`` and ``pipeline`` schedules impose, so a multi-process run with the same seed
ends with the same weights. ``dni`` here is the sequential DNI order; it is also the
single-process baseline that ``asyncdni bench`` reports.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import losses
from .data import BatchStream, Dataset, eval_batches
from .layer import LayerNode
from .model import Plan, microbatch_bounds


@dataclass
class ReferenceResult:
    nodes: list[LayerNode]
    losses: list[float] = field(default_factory=list)
    train_time: float = 0.0
    evals: list[dict] = field(default_factory=list)


def evaluate(nodes: list[LayerNode], loss_name: str, test: Dataset, batch: int) -> dict:
    tot_loss = tot_m = tot_m2 = 0.0
    n_all = 0
    for x, y in eval_batches(test, batch):
        h = x
        for node in nodes:
            h = node.forward_only(h)
        loss, _ = losses.compute(loss_name, h, y)
        m, m2, n = losses.metrics(loss_name, h, y)
        tot_loss += loss * n
        tot_m += m * n
        tot_m2 += m2 * n
        n_all += n
    return {"loss": tot_loss / n_all, "metric": tot_m / n_all, "metric2": tot_m2 / n_all, "n": n_all}


def train_step(nodes: list[LayerNode], schedule: str, step: int, x, y, microbatches: int = 1) -> dict:
    """One training step of the given schedule; returns the last layer's metrics."""
    if schedule in ("async", "sequential", "dni"):
        h = x
        metrics = None
        for i, node in enumerate(nodes):
            out, gx, m = node.dni_forward(step, h, y)
            if i > 0 and gx is not None:
                nodes[i - 1].sg_update(step, gx)
            h, metrics = out, m
        return metrics
    if schedule == "backprop":
        h = x
        for node in nodes[:-1]:
            h, _, _ = node.bp_forward(step, h, y)
        _, g, metrics = nodes[-1].bp_forward(step, h, y)
        for node in reversed(nodes[:-1]):
            g = node.bp_backward(step, g)
        return metrics
    if schedule == "pipeline":
        B = x.shape[0]
        agg = {"loss": 0.0, "metric": 0.0, "metric2": 0.0, "n": 0}
        grads = []
        bounds = microbatch_bounds(B, microbatches)
        for j, (a, b) in enumerate(bounds):           # all micro-batches forward
            mstep = step * microbatches + j
            h = x[a:b]
            for node in nodes[:-1]:
                h, _, _ = node.bp_forward(mstep, h, y[a:b])
            _, g, m = nodes[-1].bp_forward(mstep, h, y[a:b], scale=(b - a) / B)
            grads.append(g)
            for k in ("loss", "metric", "metric2"):
                agg[k] += m[k] * m["n"]
            agg["n"] += m["n"]
        for j, g in enumerate(grads):                 # then all backward, in micro-batch order
            mstep = step * microbatches + j
            for node in reversed(nodes[:-1]):
                g = node.bp_backward(mstep, g)
        return {k: (v / agg["n"] if k != "n" else v) for k, v in agg.items()}
    raise ValueError(f"unknown schedule {schedule!r}")


def train_reference(plan: Plan, schedule: str, train: Dataset, seed: int, steps: int | None = None,
                    test: Dataset | None = None, eval_every: int = 0, eval_batch: int = 1000) -> ReferenceResult:
    nodes = [LayerNode(s) for s in plan.specs]
    stream = BatchStream(train, plan.batch_size, seed)
    res = ReferenceResult(nodes)
    M = plan.specs[0].microbatches
    steps = plan.steps if steps is None else steps
    t0 = time.perf_counter()
    paused = 0.0
    for step in range(steps):
        x, y = stream.batch(step)
        m = train_step(nodes, schedule, step, x, y, M)
        res.losses.append(m["loss"])
        if test is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            p0 = time.perf_counter()
            ev = evaluate(nodes, plan.loss, test, eval_batch)
            paused += time.perf_counter() - p0
            ev.update(step=step + 1, train_time=time.perf_counter() - t0 - paused)
            res.evals.append(ev)
    res.train_time = time.perf_counter() - t0 - paused
    if test is not None:
        ev = evaluate(nodes, plan.loss, test, eval_batch)
        ev.update(step=steps, train_time=res.train_time)
        res.evals.append(ev)
    return res
