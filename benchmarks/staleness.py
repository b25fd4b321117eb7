"""In-process replay of DNI with delayed synthetic-gradient targets (no sockets).

The ``async`` schedule differs from ``sequential`` DNI in one way that matters for the
math: the SG target for step t (the gradient layer i+1 sends back) reaches layer i after
layer i has already run L more forward steps with its SG model. This replay runs the
engine's own ``LayerNode`` code in one process and holds every SG target back by a lag L
drawn per target from ``--lags`` (probabilities of L = 0, 1, 2, ...; the default is the
distribution measured at max-inflight 3: 27% / 58% / 15%). L = 0 everywhere is exactly the
in-process sequential reference.

Prints, per seed, the final test metrics and the largest drop (best accuracy so far minus
current accuracy, in points, over evaluations every ``--eval-every`` steps).

    python -m benchmarks.staleness --steps 8000 --seeds 0-9 --set model.activation=relu ...
"""
from __future__ import annotations

import argparse
import os
import sys
import time

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")     # one BLAS thread, like the workers (before numpy loads)

import numpy as np  # noqa: E402

from asyncdni import config
from asyncdni import report
from asyncdni.numerics.layer import LayerNode
from asyncdni.engine.plan import load_datasets, make_plan
from asyncdni.numerics.data import BatchStream
from asyncdni.engine.reference import evaluate

MEASURED_LAGS = (0.27, 0.58, 0.15)


def max_drop_pts(accs) -> float:
    """Largest fall below the running maximum, in points (accuracies as fractions)."""
    a = np.asarray(accs, float)
    return float(100 * (np.maximum.accumulate(a) - a).max()) if a.size else 0.0


def parse_seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def diagnose(nodes, loss_name, x, y) -> list[dict]:
    """Per non-last layer on one batch: cosine and norm ratio of the SG prediction against the
    true gradient (backprop through the current weights), and the fraction of dead units."""
    from asyncdni.numerics import losses
    from asyncdni.numerics.nn import activate
    xs, hs, ctxs = [x], [], []
    for node in nodes:
        d = node.dense
        if d.bn is None:
            h, ctx = d.forward(xs[-1]), None
        else:                       # the batch's statistics, as in training, running ones untouched
            z, ctx = d.bn.forward_train(xs[-1] @ d.W, update=False)
            h = activate(d.activation, z, inplace=True)
        hs.append(h)
        ctxs.append(ctx)
        xs.append(h)
    _, g = losses.compute(loss_name, hs[-1], y)
    out = []
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        if not node.spec.is_last:
            B = x.shape[0]
            pred = node.sg.predict(hs[i], node._cond(y)) / B
            cos = float(np.vdot(pred, g) / (np.linalg.norm(pred) * np.linalg.norm(g) + 1e-30))
            out.append({"layer": i + 1, "cos": cos, "norm_ratio": float(np.linalg.norm(pred) / (np.linalg.norm(g) + 1e-30)),
                        "dead": float((hs[i].max(axis=0) <= 0).mean()), "h_rms": float(np.sqrt((hs[i] ** 2).mean()))})
        _, g = node.dense.grads(xs[i], hs[i], g, ctxs[i])
    return out[::-1]


def replay(cfg, steps: int, lags, eval_every: int, lag_seed: int = 1234, datasets=None, keep_nodes: bool = False) -> dict:
    """``steps`` of DNI with SG targets delayed by lags drawn from ``lags``; with ``keep_nodes``
    the result holds the trained ``LayerNode``s too (``nodes``; not for JSON)."""
    train, test = datasets or load_datasets(cfg)
    plan = make_plan(cfg, train)
    from asyncdni.nodes import make_node
    nodes = [make_node(s) for s in plan.specs]       # numpy LayerNodes, or torch stages (model.model)
    stream = BatchStream(train, plan.batch_size, cfg.train.seed, in_shape=plan.in_shape)
    rng = np.random.default_rng([lag_seed, cfg.train.seed])
    probs = np.asarray(lags, float) / np.sum(lags)
    pending: dict[int, list] = {}          # deliver at the start of step s -> [(layer, step, g)]
    evals, diags = [], []

    def arrive(layer: int, t: int, g, now: int) -> None:
        """``layer``'s target for step ``t`` arrives at step ``now``; under sg_target
        "propagate" it goes on down from there (sg_backward)."""
        gd = nodes[layer].sg_backward(t, g)
        if gd is not None:
            send_down(layer - 1, t, gd, now)

    def send_down(layer: int, t: int, g, now: int) -> None:
        """``layer``'s target for step ``t``, sent at step ``now``, arrives after a drawn lag."""
        L = int(rng.choice(len(probs), p=probs))
        if L:                              # layer ``layer`` runs L more forward steps first
            pending.setdefault(now + L + 1, []).append((layer, t, g))
        else:
            arrive(layer, t, g, now)

    t0 = time.perf_counter()
    for step in range(steps):
        for layer, t, g in pending.pop(step, ()):
            arrive(layer, t, g, step)
        x, y = stream.batch(step)
        h = x
        for i, node in enumerate(nodes):
            out, gx, _m = node.dni_forward(step, h, y)
            if i > 0 and gx is not None:
                send_down(i - 1, step, gx, step)
            h = out
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            ev = evaluate(nodes, plan.loss, test, 1000, plan.in_shape)
            evals.append((step + 1, ev["metric"], ev["metric2"]))
            if all(isinstance(n, LayerNode) for n in nodes):        # the numpy MLP's diagnostics
                diags.append(diagnose(nodes, plan.loss, *stream.batch(0)))
    train_time = time.perf_counter() - t0
    acc = np.array([e[1] for e in evals])
    out = {"final": evals[-1][1], "final2": evals[-1][2], "max_drop_pts": max_drop_pts(acc),
           "min_after_90pct": float(acc[len(acc) // 10:].min()), "evals": evals, "diag": diags, "time_s": train_time}
    if keep_nodes:
        out["nodes"] = nodes
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--seeds", default="0-2")
    ap.add_argument("--lags", default=",".join(map(str, MEASURED_LAGS)),
                    help="probabilities of a lag of 0, 1, 2, ... steps (default: measured at max-inflight 3)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--json", help="write every run (with its evaluation curve) as JSON")
    args = ap.parse_args(argv)
    ov = dict(item.split("=", 1) for item in args.set)
    lags = [float(v) for v in args.lags.split(",")]
    rows = []
    for seed in parse_seeds(args.seeds):
        cfg = config.build(overrides={**ov, "train.seed": seed, "runtime.progress": False})
        r = replay(cfg, args.steps, lags, args.eval_every)
        r["seed"] = seed
        rows.append(r)
        print(f"seed {seed}: final {100 * r['final']:.2f}% / {100 * r['final2']:.2f}%  max drop "
              f"{r['max_drop_pts']:.2f} pts  ({r['time_s']:.0f} s)", flush=True)
    drops = [r["max_drop_pts"] for r in rows]
    print(f"{len(rows)} runs: max drop {max(drops):.2f} pts; runs with a drop > 2 pts: "
          f"{sum(d > 2 for d in drops)}; final {100 * min(r['final'] for r in rows):.2f}-"
          f"{100 * max(r['final'] for r in rows):.2f}%")
    if args.json:
        report.write_json(args.json, {"args": vars(args), "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
