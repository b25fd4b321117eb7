"""MNIST accuracy benchmark (engine issue acceptance).

4-layer ReLU network of width 256, batch 64, Adam, 10 epochs on the 10,000 MNIST test
digits split 8,000 / 2,000 with a seed. Targets: label-conditioned DNI under `async`
>= 94% test accuracy; `backprop` >= 95%. Prints measured figures; exits 1 if a target
is missed, 0 otherwise (and skips with a message when the files are absent).

    python -m benchmarks.mnist_accuracy [--data DIR] [--epochs 10] [--json OUT]
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
    args = ap.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"mnist_accuracy: skipped, no MNIST directory at {args.data}")
        return 0
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


if __name__ == "__main__":
    sys.exit(main())
