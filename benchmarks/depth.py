"""Depth x method x {batch norm, none}: the DNI paper's Table 1 on this engine's arithmetic.

Fully connected nets of ``--depths`` weight layers (width 256, ReLU, Adam 5e-4, SG lr 1e-3,
linear SG, batch 64), trained for ``--epochs`` on each dataset of ``--datasets``:

* ``mnist``: the MNIST split (``../shared/data/mnist``, the 10,000 test-set digits, 20% held
  out); skipped with one line when the files are absent;
* ``digits``: scikit-learn's bundled 8x8 digits (1,797), 20% held out; skipped with one
  line when scikit-learn is not installed.

Methods: ``backprop`` (the in-process lock-step reference), and the synthetic-gradient
methods under ``async`` staleness through the in-process replay of
:mod:`benchmarks.staleness` (the engine's own ``LayerNode``; each SG target held back, on
each link it crosses, by a lag drawn from the distribution measured through the workers at
window 3): ``cdni`` and ``dni`` at the engine's defaults (``--sg-target auto``: bootstrapped
SG targets for cDNI up to 5 layers, propagated ones from 6 and for plain DNI; ``--sg-clip
auto``: 1 and 0.5 with them), ``+trust`` with ``--sg-trust``, ``noclip`` with ``--sg-clip
0``, ``bootstrap`` / ``propagate`` with ``--sg-target bootstrap`` (the DNI paper's targets)
/ ``propagate``, ``damp`` with the remedy the docs recommended before (``--sg-damp
0.8``, window 2's lags, bootstrapped targets, no clip); any of them followed by
`` sequential``: the same with no staleness (every lag 0). Each cell is
the mean final test error over the seeds, with each seed's error in brackets; a second
table gives the steps to ``--target`` test accuracy (evaluations every ``--eval-every``).
The replay does not time anything, so the figures do not depend on the machine's load.

    .venv/bin/python -m benchmarks.depth --jobs 2      # everything: 576 runs, over an hour on 2 cores
    .venv/bin/python -m benchmarks.depth --depths 6 --methods "cdni,dni,dni sequential" --bn off --jobs 2
    .venv/bin/python -m benchmarks.depth --set train.sg_target=bootstrap --set train.sg_clip=1   # the defaults before
    .venv/bin/python -m benchmarks.depth --backend torch --bn off --datasets mnist --depths 6

Not part of ``make test``.
"""
from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")     # one BLAS thread per process, like the workers (before numpy loads)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
WINDOW3_LAGS = (0.27, 0.58, 0.15)       # benchmarks.staleness.MEASURED_LAGS
WINDOW2_LAGS = (0.54, 0.46)
METHODS = {
    "backprop": {"train.schedule": "backprop"},   # (a layer's arithmetic follows its spec's schedule)
    "cdni": {"train.cond": True},
    "cdni+trust": {"train.cond": True, "train.sg_trust": True},
    "cdni propagate+trust": {"train.cond": True, "train.sg_target": "propagate", "train.sg_trust": True},
    "cdni noclip": {"train.cond": True, "train.sg_clip": 0.0},
    "cdni bootstrap": {"train.cond": True, "train.sg_target": "bootstrap"},
    "cdni propagate": {"train.cond": True, "train.sg_target": "propagate"},
    "cdni damp": {"train.cond": True, "train.sg_target": "bootstrap", "train.sg_clip": 0.0, "train.sg_damp": 0.8},
    "dni": {"train.cond": False},
    "dni+trust": {"train.cond": False, "train.sg_trust": True},
    "dni noclip": {"train.cond": False, "train.sg_clip": 0.0},
    "dni bootstrap": {"train.cond": False, "train.sg_target": "bootstrap"},
    # plain DNI's gap: SG capacity, SG learning rate, no staleness (lag 0: the sequential order)
    "dni mlp-sg": {"train.cond": False, "train.sg_model": "mlp"},
    "dni sg-lr 3e-4": {"train.cond": False, "train.sg_lr": 3e-4},
}
SEQUENTIAL = " sequential"    # any SG method + " sequential": the same arithmetic with no staleness (lag 0)


def method_overrides(method: str) -> dict | None:
    """The config overrides of ``method`` (``METHODS``, or one of them + " sequential"), or None."""
    base = method[: -len(SEQUENTIAL)] if method.endswith(SEQUENTIAL) else method
    if base not in METHODS or (base != method and base == "backprop"):
        return None
    return METHODS[base]
BACKENDS = {"numpy": {}, "torch": {"model.model": "mlp"}}   # torch: the zoo's mlp, one stage per layer (no BN)
DEFAULT_METHODS = "backprop,cdni,dni,cdni sequential,dni sequential,dni+trust,cdni bootstrap,dni bootstrap"


def digits_npz(directory: str) -> str | None:
    """scikit-learn's 8x8 digits as an .npz (pixels scaled to 0..1), or None without sklearn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    d = load_digits()
    path = os.path.join(directory, "digits.npz")
    np.savez(path, x=(d.data / 16.0).astype(np.float32), y=d.target.astype(np.int64))
    return path


def one_run(job: dict) -> dict:
    from asyncdni import config
    from asyncdni.engine.plan import load_datasets, make_plan
    from asyncdni.engine.reference import evaluate, train_reference
    from benchmarks.staleness import replay
    ov = {**job["data"], "model.layers": job["depth"], "model.width": 256, "model.batch_norm": job["bn"],
          "train.epochs": job["epochs"], "train.seed": job["seed"], "runtime.progress": False,
          **BACKENDS[job["backend"]], **job.get("set", {}), **method_overrides(job["method"])}
    if job["backend"] == "torch":
        from asyncdni.torch import pin_threads
        pin_threads(1)
    cfg = config.build(overrides=ov)
    train, test = load_datasets(cfg)
    plan = make_plan(cfg, train)
    if job["method"] == "backprop":
        res = train_reference(plan, "backprop", train, cfg.train.seed, test=test, eval_every=job["eval_every"])
        evals = [(e["step"], e["metric"]) for e in res.evals]
        train_loss = float(np.mean(res.losses[-100:]))
        nodes = res.nodes
    else:
        lags = ((1.0,) if job["method"].endswith(SEQUENTIAL) else WINDOW2_LAGS if "damp" in job["method"]
                else WINDOW3_LAGS)
        r = replay(cfg, plan.steps, lags, job["eval_every"], datasets=(train, test), keep_nodes=True)
        evals = [(s, m) for s, m, _ in r["evals"]]
        train_loss = float("nan")
        nodes = r["nodes"]
    tr = evaluate(nodes, plan.loss, train, 1000, plan.in_shape)
    hit = next((s for s, m in evals if m >= job["target"]), None)
    return {**{k: job[k] for k in ("dataset", "depth", "bn", "method", "seed", "backend")}, "steps": plan.steps,
            "test_error": 100 * (1 - evals[-1][1]), "train_error": 100 * (1 - tr["metric"]),
            "train_loss_eval": tr["loss"], "train_loss_last100": train_loss, "steps_to_target": hit,
            "curve": evals}


def fmt_cell(rows: list[dict], key: str = "test_error") -> str:
    """The mean of ``key`` over the runs (test error), then each run's value, in seed order
    (the runs finish in any order under --jobs)."""
    if not rows:
        return "-"
    rows = sorted(rows, key=lambda r: r["seed"])
    if key == "test_error":
        v = [r[key] for r in rows]
        return f"{np.mean(v):.2f} ({' / '.join(f'{x:.2f}' for x in v)})"
    v = [r[key] for r in rows]
    return " / ".join("never" if x is None else str(x) for x in v)


def tables(rows: list[dict], depths, methods, target: float) -> str:
    out = []
    for ds in sorted({r["dataset"] for r in rows}):
        for bn in sorted({r["bn"] for r in rows if r["dataset"] == ds}):
            for key, title in (("test_error", "final test error %, mean (seeds)"),
                               ("steps_to_target", f"steps to {100 * target:.0f}% test accuracy (seeds)")):
                sel = [r for r in rows if r["dataset"] == ds and r["bn"] == bn]
                steps = sel[0]["steps"] if sel else 0
                out.append(f"\n{ds}, {'batch norm' if bn else 'no batch norm'}, {steps} steps: {title}")
                out.append("| method | " + " | ".join(f"depth {d}" for d in depths) + " |")
                out.append("|---|" + "---|" * len(depths))
                for m in methods:
                    cells = [fmt_cell([r for r in sel if r["method"] == m and r["depth"] == d], key) for d in depths]
                    out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.depth", allow_abbrev=False,
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="mnist,digits")
    ap.add_argument("--depths", default="3,4,5,6,7,8")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help=f"comma-separated, of: {', '.join(METHODS)}; an SG method + ' sequential': with no staleness")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a config override for every run (repeatable; the methods' own settings apply over "
                         "it), e.g. --set train.sg_target=bootstrap --set train.sg_clip=1: the defaults before")
    ap.add_argument("--bn", default="both", choices=("both", "on", "off"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=float, default=20.0)
    ap.add_argument("--eval-every", type=int, default=125)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (one core each)")
    ap.add_argument("--backend", default="numpy", choices=tuple(BACKENDS),
                    help="numpy layers, or torch stages (the zoo's mlp, width 256, no batch norm)")
    ap.add_argument("--json", help="write every run (with its evaluation curve) here")
    args = ap.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    bad = [m for m in methods if method_overrides(m) is None]
    from asyncdni import config
    try:
        extra = config.parse_set(args.set)
    except config.ConfigError as e:
        print(f"benchmarks.depth: {e}", file=sys.stderr)
        return 2
    if bad:
        print(f"benchmarks.depth: unknown method {bad[0]!r} (choose from {', '.join(METHODS)})", file=sys.stderr)
        return 2
    bns = {"both": (False, True), "on": (True,), "off": (False,)}[args.bn]
    if args.backend == "torch" and True in bns:
        print("benchmarks.depth: the torch zoo's mlp has no batch norm; use --bn off", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="asyncdni-depth-") as tmp:
        data = {}
        for ds in args.datasets.split(","):
            if ds == "mnist":
                if not (MNIST / "t10k-images-idx3-ubyte").exists() and not any(MNIST.glob("*idx3*")):
                    print(f"mnist: skipped, no IDX files in {MNIST}")
                    continue
                data[ds] = {"data.dataset": "idx", "data.path": str(MNIST)}
            elif ds == "digits":
                path = digits_npz(tmp)
                if path is None:
                    print("digits: skipped, scikit-learn is not installed (pip install scikit-learn)")
                    continue
                data[ds] = {"data.dataset": "npz", "data.path": path}
            else:
                print(f"benchmarks.depth: unknown dataset {ds!r} (mnist, digits)", file=sys.stderr)
                return 2
        jobs = [{"dataset": ds, "data": ov, "depth": d, "bn": bn, "method": m, "seed": int(s), "backend": args.backend,
                 "epochs": args.epochs, "eval_every": args.eval_every, "target": args.target, "set": extra}
                for ds, ov in data.items() for bn in bns for d in depths for m in methods
                for s in args.seeds.split(",")]
        rows = []
        def report(r: dict) -> None:
            rows.append(r)
            print(f"{r['dataset']} depth {r['depth']} {'bn' if r['bn'] else 'no-bn'} {r['method']} seed {r['seed']}: "
                  f"test error {r['test_error']:.2f}%, train error {r['train_error']:.2f}%, "
                  f"steps to target {r['steps_to_target']}", flush=True)

        if args.jobs <= 1:                   # in this process (BLAS already on one thread)
            for job in jobs:
                report(one_run(job))
        else:
            with get_context("spawn").Pool(args.jobs) as pool:
                for r in pool.imap_unordered(one_run, jobs):
                    report(r)
                pool.close()
                pool.join()                  # the pool's processes are gone before it returns
    print(tables(rows, depths, methods, args.target))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
