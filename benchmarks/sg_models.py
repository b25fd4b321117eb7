"""Synthetic-gradient models compared on the MNIST split, in-process (no sockets).

The in-process sequential DNI order runs the engine's own ``LayerNode`` code; it is the
same math as the ``sequential`` schedule, and the ``async`` schedule's only difference is
the lag of the SG targets (see ``benchmarks/staleness.py``). 4 x 256 ReLU, batch 64, Adam
5e-4, SG lr 1e-3, cDNI, 10 epochs; test accuracy every 25 steps.

    python -m benchmarks.sg_models [--data DIR] [--epochs 10] [--seeds 0] [--models linear,mlp,...]

A model is ``linear`` or ``mlp[:LAYERSxHIDDEN]`` (``mlp`` alone: 1 x the layer width).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")     # one BLAS thread, like the workers (before numpy loads)

from asyncdni.engine.plan import load_datasets, make_plan  # noqa: E402
from asyncdni.engine.reference import train_reference  # noqa: E402

from benchmarks.mnist_accuracy import DEFAULT_DIR, mnist_config  # noqa: E402
from benchmarks.staleness import parse_seeds  # noqa: E402


def model_overrides(spec: str) -> dict:
    kind, _, shape = spec.partition(":")
    ov = {"train.sg_model": kind}
    if shape:
        layers, _, hidden = shape.partition("x")
        ov.update({"train.sg_layers": int(layers), "train.sg_hidden": int(hidden)})
    return ov


def steps_to(evals, target):
    for e in evals:
        if e["metric"] >= target:
            return e["step"]
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DIR))
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--models", default="linear,mlp,mlp:2x1024")
    ap.add_argument("--target", type=float, default=0.94)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"sg_models: skipped, no MNIST directory at {args.data}")
        return 0
    extra = dict(item.split("=", 1) for item in args.set)
    rows = []
    datasets = None
    for spec in args.models.split(","):
        for seed in parse_seeds(args.seeds):
            cfg = mnist_config(args.data, "sequential", args.epochs, **model_overrides(spec),
                               **{"train.seed": seed, "train.eval_every": 25}, **extra)
            datasets = datasets or load_datasets(cfg)
            plan = make_plan(cfg, datasets[0])
            t0 = time.perf_counter()
            res = train_reference(plan, "dni", datasets[0], seed, test=datasets[1], eval_every=25)
            row = {"model": spec, "seed": seed, "final": res.evals[-1]["metric"],
                   "best": max(e["metric"] for e in res.evals),
                   "steps_to_target": steps_to(res.evals, args.target), "train_time_s": res.train_time,
                   "wall_s": time.perf_counter() - t0}
            rows.append(row)
            print(f"{spec:12s} seed {seed}: final {100 * row['final']:.2f}%  best {100 * row['best']:.2f}%  "
                  f"steps to {100 * args.target:.0f}%: {row['steps_to_target']}  ({row['train_time_s']:.0f} s)",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
