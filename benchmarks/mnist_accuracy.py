"""MNIST accuracy benchmark (engine issue acceptance).

4-layer ReLU network of width 256, batch 64, Adam, 10 epochs on the 10,000 MNIST test
digits split 8,000 / 2,000 with a seed. Targets: label-conditioned DNI under `async`
>= 94% test accuracy; `backprop` >= 95%. Prints measured figures; exits 1 if a target
is missed, 0 otherwise (and skips with a message when the files are absent).

    python -m benchmarks.mnist_accuracy [--data DIR] [--epochs 10] [--json OUT]
    python -m benchmarks.mnist_accuracy --sg-models linear,mlp,mlp:2x1024   # SG models, async
    python -m benchmarks.mnist_accuracy --batch-norm [--seeds 0,1,2]          # BN study
    python -m benchmarks.mnist_accuracy --sg-models linear,mlp --batch-norm --seeds 0-2   # both tables, one run

With ``--sg-models`` it compares synthetic-gradient models instead (``linear`` or
``mlp[:LAYERSxHIDDEN]``), each under ``async`` through the workers with test accuracy every
25 steps: final accuracy and the first evaluated step at >= 94%.

With ``--batch-norm`` it measures batch normalisation instead: backprop, async cDNI and async
DNI without the label (``--no-cond``), each without and with BN, through the workers, test
accuracy every 25 steps; per run the final accuracy and the first evaluated step at >= 94%,
then per method the median over the seeds and the two gaps BN might narrow: DNI's steps to
94% over backprop's, and cDNI's final accuracy minus plain DNI's.
"""
from __future__ import annotations

import argparse
import sys
import statistics
from pathlib import Path

from asyncdni import config
from asyncdni.engine import coordinator
from asyncdni import report

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
    ap.add_argument("--batch-norm", action="store_true", help="measure batch normalisation instead")
    ap.add_argument("--seeds", default="0", help="--sg-models, --batch-norm: seeds (e.g. 0,1,2 or 0-2)")
    args = ap.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"mnist_accuracy: skipped, no MNIST directory at {args.data}")
        return 0
    if args.sg_models or args.batch_norm:     # both given: both tables from one run
        out = {}
        if args.sg_models:
            out["sg_models"] = sg_models(args)
        if args.batch_norm:
            out["batch_norm"] = batch_norm_study(args)
        if args.json:
            report.write_json(args.json, out)
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


def sg_models(args) -> list[dict]:
    """Each SG model under ``async`` through the workers, for every seed of ``--seeds``; then
    per model the median final accuracy and steps to 94% over the seeds."""
    from benchmarks.sg_models import model_overrides, steps_to
    from benchmarks.staleness import parse_seeds
    rows = []
    seeds = parse_seeds(args.seeds)
    specs = args.sg_models.split(",")
    for spec in specs:
        for seed in seeds:
            cfg = mnist_config(args.data, "async", args.epochs, **model_overrides(spec),
                               **{"train.eval_every": 25, "train.seed": seed})
            s = report.run_summary(coordinator.run(cfg))
            row = {"sg_model": spec, "seed": seed, "test_accuracy": s["test_metric"],
                   "steps_to_94": steps_to(s["evals"], 0.94), "best": max(e["metric"] for e in s["evals"]),
                   "train_time_s": s["train_time_s"], "samples_per_s": s["samples_per_s"]}
            rows.append(row)
            print(f"mnist async sg_model {spec:12s} seed {seed}: final {100 * row['test_accuracy']:.2f}%  "
                  f"best {100 * row['best']:.2f}%  steps to 94%: {row['steps_to_94']}  "
                  f"train {row['train_time_s']:.1f} s  {row['samples_per_s']:.0f} samples/s", flush=True)
    print(f"\nSG models under async, seeds {args.seeds} ({args.epochs:g} epochs, test accuracy every 25 steps):")
    print("\n".join(sg_table(rows, specs)), flush=True)
    return rows


def sg_table(rows, specs) -> list[str]:
    """Markdown table: per SG model the median (range) final accuracy and median steps to 94%
    (only where every seed reached it), and the median samples/s."""
    lines = ["| SG model | final test accuracy, median (range) | steps to 94%, median (range) | samples/s, median |",
             "|---|---|---|---|"]
    for spec in specs:
        rs = [r for r in rows if r["sg_model"] == spec]
        if not rs:
            continue
        acc = [r["test_accuracy"] for r in rs]
        reached = [r["steps_to_94"] for r in rs if r["steps_to_94"] is not None]
        steps = (f"{_median(reached):g} ({min(reached)}-{max(reached)})" if len(reached) == len(rs)
                 else f"not reached in {len(rs) - len(reached)} of {len(rs)} runs")
        lines.append(f"| {spec} | {100 * _median(acc):.2f}% ({100 * min(acc):.2f}-{100 * max(acc):.2f}) | {steps} | "
                     f"{_median([r['samples_per_s'] for r in rs]):.0f} |")
    return lines


# method -> (schedule, label-conditioned SG)
BN_METHODS = {"backprop": ("backprop", True), "async cDNI": ("async", True), "async DNI (no cond)": ("async", False)}


def _median(values):
    return statistics.median(values) if values else None


def bn_configs(data, epochs, seeds):
    """(method, batch_norm, seed, config) of every run of the batch-normalisation study."""
    return [(method, bn, seed, mnist_config(data, schedule, epochs, **{
                "train.cond": cond, "model.batch_norm": bn, "train.seed": seed, "train.eval_every": 25}))
            for method, (schedule, cond) in BN_METHODS.items() for bn in (False, True) for seed in seeds]


def bn_table(rows) -> list[str]:
    """The study's summary lines (a Markdown table, then the no-cond gaps) from its rows:
    medians over the seeds; steps to 94% only where every seed reached it."""
    summary = {}
    for method in BN_METHODS:
        for bn in (False, True):
            rs = [r for r in rows if r["method"] == method and r["batch_norm"] == bn]
            if not rs:
                continue
            reached = [r["steps_to_94"] for r in rs if r["steps_to_94"] is not None]
            summary[(method, bn)] = {
                "final": _median([r["test_accuracy"] for r in rs]),
                "lo": min(r["test_accuracy"] for r in rs), "hi": max(r["test_accuracy"] for r in rs),
                "steps": _median(reached) if len(reached) == len(rs) else None,
                "missed": len(rs) - len(reached), "runs": len(rs)}
    lines = [("| method | BN | final test accuracy, median (range) | steps to 94%, median | "
              "steps to 94% / backprop's |"), "|---|---|---|---|---|"]
    for (method, bn), v in summary.items():
        bp = summary.get(("backprop", bn), {}).get("steps")
        st = v["steps"]
        ratio = f"{st / bp:.2f}x" if st is not None and bp and method != "backprop" else ""
        steps = f"{st:g}" if st is not None else f"not reached in {v['missed']} of {v['runs']} runs"
        lines.append(f"| {method} | {'on' if bn else 'off'} | {100 * v['final']:.2f}% "
                     f"({100 * v['lo']:.2f}-{100 * v['hi']:.2f}) | {steps} | {ratio} |")
    for bn in (False, True):
        c, d = summary.get(("async cDNI", bn)), summary.get(("async DNI (no cond)", bn))
        if c and d:
            lines.append(f"no-cond gap (cDNI final - plain DNI final, medians), BN {'on' if bn else 'off'}: "
                         f"{100 * (c['final'] - d['final']):.2f} points")
    return lines


def batch_norm_study(args) -> list[dict]:
    from benchmarks.sg_models import steps_to
    from benchmarks.staleness import parse_seeds
    rows = []
    for method, bn, seed, cfg in bn_configs(args.data, args.epochs, parse_seeds(args.seeds)):
        s = report.run_summary(coordinator.run(cfg))
        row = {"method": method, "batch_norm": bn, "seed": seed, "test_accuracy": s["test_metric"],
               "best": max(e["metric"] for e in s["evals"]), "steps_to_94": steps_to(s["evals"], 0.94),
               "train_time_s": s["train_time_s"], "samples_per_s": s["samples_per_s"]}
        rows.append(row)
        print(f"mnist {method:20s} bn {'on ' if bn else 'off'} seed {seed}: final "
              f"{100 * row['test_accuracy']:.2f}%  best {100 * row['best']:.2f}%  steps to 94%: "
              f"{row['steps_to_94']}  ({row['samples_per_s']:.0f} samples/s)", flush=True)
    print(f"\nbatch normalisation, seeds {args.seeds} (4 x 256 relu, batch 64, Adam 5e-4, SG lr 1e-3, "
          f"{args.epochs:g} epochs, window 3, test accuracy every 25 steps):")
    print("\n".join(bn_table(rows)), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
