"""Torch stages: measured figures and the targets they are held to.

    python -m benchmarks.torch_stages [--section cnn|example|peer|all] [--data DIR] [--epochs E]

1. cnn: the zoo's ``cnn`` (three torch stages) on the MNIST split, 10 epochs, under
   sequential, async (cDNI), backprop and plain backprop in one process on one thread.
   Targets: backprop through the workers >= 98% test accuracy; async within 1 point of
   it; steps and time to 97% printed; async >= 1.8x sequential's samples/s (the bound on
   2 cores is 2.0); backprop through the workers >= 0.8x in-process torch backprop.
2. example: examples/residual_cnn.py (a user's model) under every schedule in one bench.
3. peer: the 4-stage MLP 784-256-256-256-10, batch 64, torch stages under pipeline (M=4)
   against torch.distributed.pipelining's GPipe and 1F1B on the same stages. Target:
   pipeline >= 1.5x GPipe's samples/s.

Each section is one ``asyncdni bench`` run (the command is printed); sections 1 and 2 need
the MNIST files (skipped, saying so, when absent); all need the torch extra.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asyncdni import config
from asyncdni import schedules as S
from asyncdni.bench import compare as bench

DEFAULT_DATA = str(Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist")
EXAMPLE = str(Path(__file__).resolve().parent.parent / "examples" / "residual_cnn.py") + ":build"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def cnn(data: str, epochs: float) -> dict:
    ov = {"model.model": "cnn", "data.path": data, "data.dataset": "idx", "train.epochs": epochs,
          "train.eval_every": 125, "train.eval_batch": 2000, "train.target_accuracy": 0.97,
          "runtime.progress": False}
    print(f"== cnn: asyncdni bench --model cnn --data-path {data} --epochs {epochs:g} --schedules "
          "sequential,async,backprop,inprocess-backprop --target-accuracy 0.97 --eval-every 125 --eval-batch 2000",
          flush=True)
    res = bench.bench(config.build(overrides=ov), ("sequential", "async", "backprop", "inprocess-backprop"),
                      log=print)
    print(bench.format_bench(res), flush=True)
    runs = res["runs"]
    bp, a = runs["backprop"]["test_metric"], runs["async"]["test_metric"]
    print(f"   target backprop through the workers >= 98%: {100 * bp:.2f}% -> {verdict(bp >= 0.98)}")
    print(f"   target async cDNI within 1 point of backprop: {100 * a:.2f}% vs {100 * bp:.2f}% -> "
          f"{verdict(a >= bp - 0.01)}")
    for s in ("sequential", "async", "backprop", "inprocess-backprop"):
        r = runs[s]
        t, n = r.get("time_to_target_s"), r.get("steps_to_target")
        print(f"   {s}: to 97% in {'-' if n is None else n} steps, {'-' if t is None else f'{t:.1f} s'}")
    sp = res["async_speedup"]["sequential"]
    print(f"   target async >= 1.8x sequential's samples/s: {sp:.2f}x (bound {res['async_bound']:.2f}) -> "
          f"{verdict(sp >= 1.8)}")
    ratio = runs["backprop"]["samples_per_s"] / runs["inprocess-backprop"]["samples_per_s"]
    print(f"   target backprop through the workers >= 0.8x in-process torch backprop (1 thread): {ratio:.2f}x -> "
          f"{verdict(ratio >= 0.8)}", flush=True)
    return res


def example(data: str, steps: int = 300) -> dict:
    ov = {"model.model": EXAMPLE, "data.path": data, "data.dataset": "idx", "train.steps": steps,
          "train.eval_batch": 2000, "runtime.progress": False}
    schedules = tuple(s for s in S.BENCH_ORDER if s not in ("inprocess", "inprocess-backprop-all"))
    print(f"\n== example: asyncdni bench --model examples/residual_cnn.py:build --data-path {data} --steps {steps} "
          f"--eval-batch 2000 --schedules {','.join(schedules)}", flush=True)
    res = bench.bench(config.build(overrides=ov), schedules, log=print)
    print(bench.format_bench(res), flush=True)
    trained = [s for s in schedules if s in res["runs"]]
    print(f"   target the example trains under every schedule in one run: {len(trained)} of {len(schedules)} rows "
          f"-> {verdict(len(trained) == len(schedules))}", flush=True)
    return res


def peer(data: str | None, epochs: float) -> dict:
    ov = {"model.model": "mlp", "train.epochs": epochs, "runtime.progress": False, "train.target_accuracy": 0.94}
    if data:
        ov.update({"data.path": data, "data.dataset": "idx"})
    print(f"\n== peer: asyncdni bench --model mlp --data-path {data} --epochs {epochs:g} --schedules "
          "pipeline,delayed,async,backprop,inprocess-backprop --peer --target-accuracy 0.94", flush=True)
    res = bench.bench(config.build(overrides=ov), ("pipeline", "delayed", "async", "backprop", "inprocess-backprop"),
                      log=print, peers=True)
    print(bench.format_bench(res), flush=True)
    gpipe = next((p for p in res["peers"] if p["name"].endswith("gpipe")), None)
    if gpipe is None:
        print("   target pipeline >= 1.5x GPipe: not measurable (no torch.distributed.pipelining row)")
    else:
        r = res["runs"]["pipeline"]["samples_per_s"] / gpipe["samples_per_s"]
        print(f"   target torch stages under pipeline >= 1.5x GPipe's samples/s: {r:.2f}x -> {verdict(r >= 1.5)}",
              flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.torch_stages", allow_abbrev=False)
    ap.add_argument("--section", choices=("cnn", "example", "peer", "all"), default="all")
    ap.add_argument("--data", default=DEFAULT_DATA, help="directory of the MNIST IDX files")
    ap.add_argument("--epochs", type=float, default=10.0)
    args = ap.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch stages: skipped, torch is not installed (pip install '.[torch]')")
        return 0
    have = Path(args.data).is_dir()
    if args.section in ("cnn", "all"):
        cnn(args.data, args.epochs) if have else print(f"== cnn: skipped, no MNIST files in {args.data}")
    if args.section in ("example", "all"):
        example(args.data) if have else print(f"== example: skipped, no MNIST files in {args.data}")
    if args.section in ("peer", "all"):
        peer(args.data if have else None, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
