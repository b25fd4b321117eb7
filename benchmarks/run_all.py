"""`make bench`: every benchmark with its target, printing measured figures.

1. transport: protocol vs raw pyzmq, 4 KiB .. 4 MiB (target: >= 90% of raw from 256 KiB)
2. speed: 4 layers of width 1024, batch 128, 1 BLAS thread per worker, all schedules
   (targets: async >= 1.8x sequential; async vs backprop and pipeline reported with FLOPs)
3. depth: 16 layers on this machine's cores still run, in-flight bound respected, RSS printed
4. MNIST: every schedule, time to 94% test accuracy and final accuracy (targets: cDNI
   async >= 94%, backprop >= 95%, and a decoupled schedule (async, delayed, local)
   reaches 94% before backprop, reported); skipped when ../shared/data/mnist is absent
5. low-rank SG (benchmarks/lowrank.py --quick): ranks 16, 64 x SG update every 1, 2 steps;
   FLOPs/sample at width 1024 within 1.2x backprop's, async samples/s there above
   in-process backprop on every core, MNIST accuracy within 0.5 points of linear cDNI
   (targets, for one setting)
6. torch stages (benchmarks/torch_stages.py): the zoo's cnn on MNIST under four schedules,
   the example model under every schedule, and the 4-stage MLP against
   torch.distributed.pipelining (targets there); skipped without the torch extra

Sections 2 and 4 also run plain backprop in one process (inprocess-backprop, on 1 BLAS
thread and on every core), and say where the engine loses to it.
"""
from __future__ import annotations

import sys

from pathlib import Path

from asyncdni.bench import compare as bench
from asyncdni import config
from asyncdni.bench import transport as transport_bench
from benchmarks import lowrank, mnist_accuracy, torch_stages


def main() -> int:
    print("== transport: protocol vs raw pyzmq (same sockets, loopback, medians of 41 short paired trials)", flush=True)
    rows = transport_bench.run(log=print)
    big = [r for r in rows if r["bytes"] >= 256 << 10]
    worst = min(r["protocol_vs_raw"] for r in big)
    print(f"   target protocol >= 90% of raw for >= 256 KiB: worst {100 * worst:.1f}% -> "
          f"{'met' if worst >= 0.9 else 'MISSED'}", flush=True)

    print("\n== speed: 4 layers of width 1024, batch 128, 200 steps", flush=True)
    cfg = config.build(overrides={"model.width": 1024, "train.batch_size": 128, "train.steps": 200,
                                  "runtime.progress": False})
    res = bench.bench(cfg, eval_every=0)       # speed only: no evaluation pauses in the pipeline
    print(bench.format_bench(res), flush=True)
    _against_baseline(res)
    sp = res["async_speedup"]
    print(f"   target async >= 1.8x sequential: {sp['sequential']:.2f}x -> {'met' if sp['sequential'] >= 1.8 else 'MISSED'}")
    print(f"   target async faster than backprop: {sp['backprop']:.2f}x -> {'met' if sp['backprop'] > 1 else 'MISSED'} "
          f"(DNI {res['flops_per_sample']['async'] / 1e6:.1f} vs backprop {res['flops_per_sample']['backprop'] / 1e6:.1f} "
          f"MFLOP/sample)", flush=True)

    print("\n== depth: 16 layers of width 256, batch 64, 300 steps, async", flush=True)
    cfg16 = config.build(overrides={"model.layers": 16, "model.width": 256, "train.steps": 300,
                                    "runtime.progress": False})
    r16 = bench.bench(cfg16, schedules=("async",))
    run = r16["runs"]["async"]
    rss = [L["peak_rss_mb"] for L in run["per_layer"]]
    cached = max(L["cached_steps"] for L in run["per_layer"])
    print(f"   {run['samples_per_s']:.0f} samples/s, {run['train_time_s']:.2f} s, every layer did "
          f"{min(L['updates'] for L in run['per_layer'])} updates, peak RSS per worker "
          f"{min(rss):.0f}-{max(rss):.0f} MB (total {sum(rss):.0f} MB), SG cache left at end {cached}", flush=True)

    print("\n== MNIST: 4x256 ReLU, batch 64, Adam, 10 epochs; test accuracy every 25 steps (off the clock)", flush=True)
    if not Path(mnist_accuracy.DEFAULT_DIR).is_dir():
        print(f"   skipped: no MNIST files in {mnist_accuracy.DEFAULT_DIR}")
        return 0
    mcfg = mnist_accuracy.mnist_config(mnist_accuracy.DEFAULT_DIR, "async", 10.0, **{
        "train.eval_every": 25, "train.eval_batch": 2000, "train.target_accuracy": 0.94})
    mres = bench.bench(mcfg)
    print(bench.format_bench(mres), flush=True)
    _against_baseline(mres)
    runs = mres["runs"]
    bp = runs["backprop"]["time_to_target_s"]
    dec = {s: runs[s]["time_to_target_s"] for s in ("async", "delayed", "local") if s in runs}
    best = min((v, s) for s, v in dec.items() if v is not None) if any(v is not None for v in dec.values()) else None
    if best is None or bp is None:
        print(f"   target a decoupled schedule reaches 94% before backprop: not measurable (times {dec}, backprop {bp})")
    else:
        print(f"   target a decoupled schedule reaches 94% before backprop: {best[1]} {best[0]:.2f} s vs backprop "
              f"{bp:.2f} s -> {'met' if best[0] < bp else 'MISSED'}", flush=True)
    ok = True
    for s, target in mnist_accuracy.TARGETS.items():
        acc = mres["runs"][s]["test_metric"]
        ok &= acc >= target
        print(f"   target {s} >= {100 * target:.0f}%: {100 * acc:.2f}% -> {'met' if acc >= target else 'MISSED'}")

    print("\n== low-rank SG: ranks 16, 64 x SG update every 1, 2 steps (benchmarks.lowrank --quick)", flush=True)
    lres = lowrank.run((16, 64), (1, 2), mnist_accuracy.DEFAULT_DIR, log=lambda s: print(s, flush=True))
    print(lowrank.format_table(lres))
    print(lowrank.verdict(lres)[1], flush=True)

    print("\n== torch stages (benchmarks.torch_stages)", flush=True)
    torch_stages.main([])
    return 0 if ok else 1


def _against_baseline(res) -> None:
    """The baseline a user would pick instead: plain backprop in one process, on every core."""
    runs = res["runs"]
    base = runs.get(bench.BASELINE_ALL)
    if base is None or "async" not in runs:
        return
    a = runs["async"]
    sp = a["samples_per_s"] / base["samples_per_s"]
    t, tb = a.get("time_to_target_s"), base.get("time_to_target_s")
    when = "" if t is None or tb is None else f"; to {100 * res['target_accuracy']:g}%: {t:.2f} s vs {tb:.2f} s"
    print(f"   async vs in-process backprop on {base.get('blas_threads')} cores: {sp:.2f}x samples/s{when} -> "
          f"{'async faster' if sp > 1 and (t is None or tb is None or t < tb) else 'async LOSES'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
