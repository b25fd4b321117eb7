"""MNIST accuracy benchmark (engine issue acceptance).

4-layer ReLU network of width 256, batch 64, Adam, 10 epochs on the 10,000 MNIST test
digits split 8,000 / 2,000 with a seed. Targets: label-conditioned DNI under `async`
>= 94% test accuracy; `backprop` >= 95%. Prints measured figures; exits 1 if a target
is missed, 0 otherwise (and skips with a message when the files are absent).

    python -m benchmarks.mnist_accuracy [--data DIR] [--epochs 10] [--json OUT]
    python -m benchmarks.mnist_accuracy --sg-models linear,mlp,mlp:2x1024   # SG models, async

With ``--sg-models`` it compares synthetic-gradient models instead (``linear`` or
``mlp[:LAYERSxHIDDEN]``), each under ``async`` through the workers with test accuracy every
25 steps: final accuracy and the first evaluated step at >= 94%.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asyncdni import config, coordinator, report

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
TARGETS = {"async": 0.94, "backprop": 0.95}


def mnist_config(path, schedule, epochs=10.0, **extra):
    ov = {"data.dataset": "idx", "data.path": str(path), "data.test_fraction": 0.2, "data.seed": 0,
          "model.layers": 4, "model.width": 256, "model.activation": "relu",
          "train.batch_size": 64, "train.optimizer": "adam", "train.lr": 5e-4,
          "train.sg_lr": 1e-3, "train.cond": True, "train.epochs": epochs, "train.schedule": schedule,
          "runtime.progress": False}
    ov.update(extra)
    return config.build(overrides=ov)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DIR))
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--json", help="write the figures as JSON")
    ap.add_argument("--sg-models", default="", help="compare these SG models under async instead")
    args = ap.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"mnist_accuracy: skipped, no MNIST directory at {args.data}")
        return 0
    if args.sg_models:
        return sg_models(args)
    rows, ok = [], True
    for schedule in ("async", "backprop"):
        r = coordinator.run(mnist_config(args.data, schedule, args.epochs))
        s = report.run_summary(r)
        target = TARGETS[schedule]
        passed = s["test_metric"] >= target
        ok &= passed
        rows.append({"schedule": schedule, "test_accuracy": s["test_metric"], "target": target, "passed": passed,
                     "train_time_s": s["train_time_s"], "samples_per_s": s["samples_per_s"]})
        print(f"mnist {schedule:9s} test accuracy {100 * s['test_metric']:.2f}% (target >= {100 * target:.0f}%: "
              f"{'met' if passed else 'MISSED'})  train {s['train_time_s']:.1f} s  {s['samples_per_s']:.0f} samples/s",
              flush=True)
    if args.json:
        report.write_json(args.json, {"mnist_accuracy": rows})
    return 0 if ok else 1


def sg_models(args) -> int:
    from .sg_models import model_overrides, steps_to
    rows = []
    for spec in args.sg_models.split(","):
        cfg = mnist_config(args.data, "async", args.epochs, **model_overrides(spec), **{"train.eval_every": 25})
        s = report.run_summary(coordinator.run(cfg))
        row = {"sg_model": spec, "test_accuracy": s["test_metric"], "steps_to_94": steps_to(s["evals"], 0.94),
               "best": max(e["metric"] for e in s["evals"]), "train_time_s": s["train_time_s"],
               "samples_per_s": s["samples_per_s"]}
        rows.append(row)
        print(f"mnist async sg_model {spec:12s} final {100 * row['test_accuracy']:.2f}%  best {100 * row['best']:.2f}%  "
              f"steps to 94%: {row['steps_to_94']}  train {row['train_time_s']:.1f} s  {row['samples_per_s']:.0f} samples/s",
              flush=True)
    if args.json:
        report.write_json(args.json, {"sg_models": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
