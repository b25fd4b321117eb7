"""Steps to accuracy of the decoupling methods, in one process, deterministic: delayed true
gradients with fixed lags D_i = K-1-i (plain, with weight stashing, with the lr-by-delay
remedy) and local losses, against backprop, on the MNIST split.

    python -m benchmarks.decoupling [--data DIR] [--epochs 10] [--variants a,b,..] [--json OUT]

Each variant runs the reference's lock-step order (the arithmetic the workers run, without
the sockets), evaluating every 25 steps. Printed per variant: steps to 94%, final test
accuracy, the lowest test accuracy over the second half of training (late oscillation),
the observed delay per layer, peak stashed-weight memory, and for local losses each
auxiliary head's test accuracy.
"""
from __future__ import annotations

import argparse
import sys
import time

from asyncdni.engine import reference
from asyncdni import report
from asyncdni.engine.plan import load_datasets, make_plan
from benchmarks.mnist_accuracy import DEFAULT_DIR, mnist_config

VARIANTS = {
    "backprop": ("backprop", {}),
    "delayed": ("delayed_fixed", {}),
    "delayed+stash": ("delayed_fixed", {"train.stash_weights": True}),
    "delayed+lr_scale": ("delayed_fixed", {"train.delay_remedy": "lr_scale"}),
    "delayed+stash+lr_scale": ("delayed_fixed", {"train.stash_weights": True, "train.delay_remedy": "lr_scale"}),
    "local": ("local", {}),
}


def run_variant(data, name: str, epochs: float, target: float = 0.94, seed: int = 0) -> dict:
    schedule, extra = VARIANTS[name]
    cfg = mnist_config(data, schedule, epochs, **{"train.seed": seed, **extra})
    train, test = load_datasets(cfg)
    plan = make_plan(cfg, train)
    t0 = time.perf_counter()
    r = reference.train_reference(plan, schedule, train, seed, test=test, eval_every=25, eval_batch=2000)
    accs = [e["metric"] for e in r.evals]
    hit = [e["step"] for e in r.evals if e["metric"] >= target]
    nodes = r.nodes
    return {"variant": name, "schedule": schedule, "seed": seed, "steps_to_target": hit[0] if hit else None,
            "final": accs[-1], "late_min": min(accs[len(accs) // 2:]),
            "delay_mean": [n.delay_sum / n.delay_n if n.delay_n else None for n in nodes],
            "delay_max": [n.delay_max if n.delay_n else None for n in nodes],
            "stash_peak_mb": sum(n.stash_peak for n in nodes) / 2**20,
            "aux_test": reference.aux_metrics(nodes, test, in_shape=plan.in_shape) if any(n.aux is not None for n in nodes) else None,
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DIR))
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rows = []
    for name in [v.strip() for v in a.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            print(f"decoupling: unknown variant {name!r}; allowed: {', '.join(VARIANTS)}", file=sys.stderr)
            return 2
        r = run_variant(a.data, name, a.epochs, seed=a.seed)
        rows.append(r)
        aux = "" if r["aux_test"] is None else "  aux heads " + " ".join(
            f"{100 * x:.2f}%" for x in r["aux_test"] if x is not None)
        dl = " ".join("-" if m is None else f"{m:.2f}/{x}" for m, x in zip(r["delay_mean"], r["delay_max"]))
        print(f"{name:<24} steps to 94%: {r['steps_to_target'] or 'never':>5}  final {100 * r['final']:.2f}%  "
              f"late min {100 * r['late_min']:.2f}%  delay mean/max {dl}  stash {r['stash_peak_mb']:.2f} MB{aux}",
              flush=True)
    if a.json:
        report.write_json(a.json, {"decoupling": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
