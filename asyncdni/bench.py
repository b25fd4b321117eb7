"""``asyncdni bench``: the same model, data, seed and samples under every schedule, one run.

Reports wall-clock, samples/s, loss, accuracy, time to a target accuracy and per-layer
busy / waiting / communicating time, messages, bytes, CPU % and peak RSS; the speedup of
``async`` over each other schedule next to the bound this machine allows; the
floating-point work per sample of each schedule and the samples/s that work allows.
"""
from __future__ import annotations

import os

import numpy as np

from . import config as C
from . import coordinator, reference
from . import schedules as S
from .model import load_datasets, make_plan

SCHEDULE_ORDER = S.BENCH_ORDER
BENCH_CHOICES = S.BENCH_CHOICES
INPROCESS = "sequential"      # the schedule whose arithmetic and order the in-process run has
PARALLELISM = {"locked": lambda K, M, cores, balance: 1.0,
               "microbatch": lambda K, M, cores, balance: min(float(cores), K * M / (M + K - 1)),
               "free": lambda K, M, cores, balance: balance}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def flops_per_sample(plan, schedule: str) -> float:
    """Arithmetic of one training sample under a schedule (multiply-adds count 2)."""
    from .layer import LayerNode
    total = 0
    B = plan.batch_size
    s = INPROCESS if schedule == "inprocess" else schedule
    for spec in plan.specs:
        total += LayerNode(spec).flops_per_batch(B, s)
    return total / B


def _sched(name: str) -> S.Schedule:
    return S.get(INPROCESS if name == "inprocess" else name)


def steps_to_target(evals, target) -> int | None:
    """The step of the first evaluation at or above ``target`` (None: never)."""
    if not target:
        return None
    hit = [e for e in evals or [] if e["metric"] >= target]
    return int(hit[0]["step"]) if hit else None


def _layer_rows(summary_layers):
    return [{k: L.get(k) for k in ("layer", "pid", "busy_s", "wait_s", "comm_s", "busy_fraction", "msgs_sent",
                                   "bytes_sent", "cpu_percent", "peak_rss_mb", "steps", "updates", "sg_updates",
                                   "cached_steps", "rejected", "delay_mean", "delay_max", "stash_peak_bytes",
                                   "aux_train_metric")} for L in summary_layers]


def run_inprocess(cfg: C.RunConfig) -> dict:
    """The single-process run of the same DNI math (no sockets), timed like the others, in a
    process of its own pinned to ``runtime.blas_threads`` BLAS threads like every worker."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path
    from asyncdni.launch.local import worker_env
    with tempfile.TemporaryDirectory(prefix="asyncdni-inproc-") as d:
        cfg_path, out_path = Path(d) / "config.json", Path(d) / "out.json"
        cfg_path.write_text(json.dumps(cfg.to_dict()))
        env = worker_env(cfg.runtime.blas_threads)
        proc = subprocess.run([sys.executable, "-m", "asyncdni.workers.inprocess", str(cfg_path), str(out_path)],
                              env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise coordinator.RunError(f"in-process run failed (exit {proc.returncode}): {tail}")
        return json.loads(out_path.read_text())


def run_inprocess_here(cfg: C.RunConfig) -> dict:
    """The in-process run in the calling process (whatever its BLAS threads)."""
    train, test = load_datasets(cfg)
    plan = make_plan(cfg, train)
    t = cfg.train
    r = reference.train_reference(plan, INPROCESS, train, t.seed, test=test, eval_every=t.eval_every,
                                  eval_batch=t.eval_batch)
    ev = r.evals[-1]
    loss = np.asarray(r.losses)
    k = max(1, min(50, len(loss) // 10))
    ttt = None
    if t.target_accuracy:
        hit = [e for e in r.evals if e["metric"] >= t.target_accuracy]
        ttt = hit[0]["train_time"] if hit else None
    return {"schedule": "inprocess", "train_time_s": r.train_time,
            "samples_per_s": plan.steps * plan.batch_size / r.train_time,
            "loss_first": float(loss[:k].mean()), "loss_last": float(loss[-k:].mean()),
            "test_loss": ev["loss"], "test_metric": ev["metric"], "test_metric2": ev["metric2"],
            "time_to_target_s": ttt, "evals": r.evals, "per_layer": [], "wall_s": r.train_time}


def bench(cfg: C.RunConfig, schedules=SCHEDULE_ORDER, on_progress=None, log=None) -> dict:
    """Run every schedule on the same config; returns a plain-data result."""
    from . import report
    # one bench runs several schedules on the same config: checkpoints, resume and restarts
    # would mix their files in one directory, and are not what is being measured
    cfg = C.replace(cfg, **{"runtime.checkpoint_every": 0, "runtime.checkpoint_dir": "", "runtime.resume": "",
                            "runtime.max_restarts": 0})
    datasets = load_datasets(cfg)
    plan = make_plan(cfg, datasets[0])
    runs, traces, series = {}, {}, {}
    for s in schedules:
        if log:
            log(f"bench: running {s} ...")
        if s == "inprocess":
            runs[s] = run_inprocess(cfg)
            continue
        c = C.replace(cfg, **{"train.schedule": s})
        r = coordinator.run(c, on_progress=on_progress, datasets=datasets)
        summ = report.run_summary(r)
        summ["per_layer"] = _layer_rows(summ["per_layer"])
        aux = reference.aux_evaluate(r.plan, r.params, datasets[1], cfg.train.eval_batch)
        for L, a in zip(summ["per_layer"], aux):
            L["aux_test_metric"] = a
        runs[s] = summ
        traces[s] = r.traces
        series[s] = {"loss": r.series["loss"], "done_at": r.series["done_at"]}
    return analyse(cfg, plan, runs) | {"_traces": traces, "_series": series}


def analyse(cfg, plan, runs: dict) -> dict:
    n_cores = cores()
    K = plan.n_layers
    M = cfg.train.microbatches
    flops = {s: flops_per_sample(plan, s) for s in runs}
    target = cfg.train.target_accuracy
    for r in runs.values():
        r["steps_to_target"] = steps_to_target(r.get("evals"), target)
    out = {"machine": {"cores": n_cores}, "layers": K, "widths": list(plan.widths),
           "batch_size": plan.batch_size, "steps": plan.steps, "samples": plan.steps * plan.batch_size,
           "target_accuracy": target or None, "runs": runs, "flops_per_sample": flops}
    # measured compute of each layer in the sequential run: the balance of the pipeline
    bound = float(min(K, n_cores))
    if "sequential" in runs and runs["sequential"]["per_layer"]:
        busy = np.array([L["busy_s"] for L in runs["sequential"]["per_layer"]])
        balance = float(busy.sum() / busy.max())
        bound = min(float(n_cores), balance)
        out["layer_balance"] = balance
    out["async_bound"] = bound
    # compute rate of one core on this model, from the single-process run when available
    rate = None
    if "inprocess" in runs:
        rate = flops["inprocess"] * runs["inprocess"]["samples_per_s"]
    elif "sequential" in runs:
        rate = flops["sequential"] * runs["sequential"]["samples_per_s"]
    out["core_flop_rate"] = rate
    work_bound = {}
    if rate:
        for s in runs:
            par = 1.0 if s == "inprocess" else PARALLELISM[_sched(s).parallelism](K, M, n_cores, bound)
            work_bound[s] = par * rate / flops[s]
    out["work_bound_samples_per_s"] = work_bound
    speed = {}
    if "async" in runs:
        a = runs["async"]["samples_per_s"]
        for s in runs:
            if s != "async":
                speed[s] = a / runs[s]["samples_per_s"]
    out["async_speedup"] = speed
    if "sequential" in speed:
        out["async_efficiency"] = speed["sequential"] / bound
    return out


def format_bench(res: dict) -> str:
    runs = res["runs"]
    lines = [f"bench: {res['layers']} layers {'-'.join(map(str, res['widths']))}, batch {res['batch_size']}, "
             f"{res['steps']} steps ({res['samples']} samples), {res['machine']['cores']} cores"]
    tgt = res.get("target_accuracy")
    tname = f"to {100 * tgt:g}%" if tgt else "to target"
    hdr = (f"  {'schedule':<14}{'samples/s':>10}{'train s':>9}{'loss':>8}{'test acc':>9}{tname + ' s':>11}"
           f"{tname + ' steps':>15}{'MFLOP/smp':>10}{'work bound':>11}{'of bound':>9}")
    lines.append(hdr)
    wb = res.get("work_bound_samples_per_s", {})
    order = [s for s in SCHEDULE_ORDER if s in runs] + [s for s in runs if s not in SCHEDULE_ORDER]
    for s in order:
        r = runs[s]
        ttt = r.get("time_to_target_s")
        stt = r.get("steps_to_target")
        b = wb.get(s)
        ttt_s = "-" if ttt is None else f"{ttt:.2f}"
        stt_s = "-" if stt is None else f"{stt}"
        b_s = "-" if not b else f"{b:.0f}"
        frac_s = "-" if not b else f"{100 * r['samples_per_s'] / b:.0f}%"
        lines.append(f"  {s:<14}{r['samples_per_s']:>10.0f}{r['train_time_s']:>9.2f}{r['loss_last']:>8.3f}"
                     f"{100 * r['test_metric']:>8.2f}%{ttt_s:>11}{stt_s:>15}"
                     f"{res['flops_per_sample'][s] / 1e6:>10.2f}{b_s:>11}{frac_s:>9}")
    if res.get("async_speedup"):
        lines.append("")
        bound = res["async_bound"]
        for s, v in res["async_speedup"].items():
            extra = ""
            if s == "sequential":
                extra = (f"   (bound {bound:.2f} = min(cores {res['machine']['cores']}, layer balance "
                         f"{res.get('layer_balance', float('nan')):.2f}); efficiency {100 * v / bound:.0f}%)")
            lines.append(f"  speedup async / {s:<10} {v:5.2f}x{extra}")
    for s in order:
        if runs[s]["per_layer"]:
            lines.append("")
            lines.append(f"  {s}: layer  busy s  wait s  comm s  busy%   msgs   sent MB  cpu%  rss MB")
            for L in runs[s]["per_layer"]:
                lines.append(f"  {'':<{len(s)}}  {L['layer']:>5} {L['busy_s']:>7.2f} {L['wait_s']:>7.2f} {L['comm_s']:>7.2f}"
                             f" {100 * L['busy_fraction']:>5.1f}% {L['msgs_sent']:>6} {L['bytes_sent'] / 2**20:>9.1f}"
                             f" {L['cpu_percent']:>5.0f} {L['peak_rss_mb']:>7.1f}")
            from .report import layer_extras
            extra = layer_extras(runs[s]["per_layer"])
            if extra:
                lines += [f"  {'':<{len(s)}}  {x}" for x in extra]
    return "\n".join(lines)


def sweep(cfg: C.RunConfig, layers=(2, 4, 8), widths=(256, 1024), batches=(32, 128), steps: int = 40,
          log=None) -> list[dict]:
    """sequential vs async (and backprop) over a grid of depth, width and batch size."""
    rows = []
    for K in layers:
        for w in widths:
            for b in batches:
                c = C.replace(cfg, **{"model.layers": K, "model.width": w, "model.widths": (),
                                      "train.batch_size": b, "train.steps": steps, "train.eval_every": 0,
                                      "train.target_accuracy": 0.0, "runtime.progress": False})
                res = bench(c, schedules=("sequential", "async", "backprop"))
                r = res["runs"]
                row = {"layers": K, "width": w, "batch": b,
                       "sequential_sps": r["sequential"]["samples_per_s"], "async_sps": r["async"]["samples_per_s"],
                       "backprop_sps": r["backprop"]["samples_per_s"],
                       "speedup_vs_sequential": res["async_speedup"]["sequential"],
                       "speedup_vs_backprop": res["async_speedup"]["backprop"],
                       "bound": res["async_bound"],
                       "peak_rss_mb": max(L["peak_rss_mb"] for L in r["async"]["per_layer"])}
                rows.append(row)
                if log:
                    log(format_sweep_row(row))
    return rows


def format_sweep_row(r: dict) -> str:
    return (f"  K={r['layers']:<2} width={r['width']:<5} batch={r['batch']:<4} seq {r['sequential_sps']:8.0f}/s  "
            f"async {r['async_sps']:8.0f}/s  backprop {r['backprop_sps']:8.0f}/s  async/seq {r['speedup_vs_sequential']:.2f}x "
            f"(bound {r['bound']:.2f})  async/bp {r['speedup_vs_backprop']:.2f}x  max rss {r['peak_rss_mb']:.0f} MB")
