"""``asyncdni bench``: the same model, data, seed and samples under every schedule, one run.

Reports wall-clock, samples/s, loss, accuracy, time to a target accuracy and per-layer
busy / waiting / communicating time, messages, bytes, CPU % and peak RSS; the speedup of
``async`` over each other schedule next to the bound this machine allows; the
floating-point work per sample of each schedule and the samples/s that work allows.

Every schedule runs ``repeats`` times (default 2), interleaved (all schedules once, then all
again), and each row reports the median over its repeats. Each run is bracketed by a
:class:`~asyncdni.bench.load.LoadSampler`: a row on which other work took more than
``load.BUSY_SHARE`` of the machine is marked busy, and a comparison between two rows is
printed as a verdict only when neither was busy and their loads were alike.

``--straggler TARGET:FACTOR`` runs every schedule that has workers a second time in each
repeat, right after the first, with that layer (or every layer on that host) computing
FACTOR times slower (``runtime.slow``), and reports samples/s and time to the target with
and without it and their ratios (:func:`straggler_ratios`).
"""
from __future__ import annotations

import os

import numpy as np

from asyncdni import config as C
from asyncdni import report
from asyncdni.engine import coordinator
from asyncdni.engine import reference
from asyncdni import schedules as S
from asyncdni.bench import load
from asyncdni.engine.plan import load_datasets, make_plan
from asyncdni.nodes import make_node

SCHEDULE_ORDER = S.BENCH_ORDER
BENCH_CHOICES = S.BENCH_CHOICES
INPROCESS = "sequential"      # the schedule whose arithmetic and order the in-process run has
# the rows run in one process (no sockets): name -> (lock-step order, BLAS threads; None: the
# config's runtime.blas_threads, as every worker has; "all": one per core)
INPROCESS_ROWS = {"inprocess": (INPROCESS, None), "inprocess-backprop": ("backprop", 1),
                  "inprocess-backprop-all": ("backprop", "all")}
BASELINE, BASELINE_ALL = "inprocess-backprop", "inprocess-backprop-all"
PARALLELISM = {"locked": lambda K, M, cores, balance: 1.0,
               "microbatch": lambda K, M, cores, balance: min(float(cores), K * M / (M + K - 1)),
               "free": lambda K, M, cores, balance: balance}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def flops_per_sample(plan, schedule: str, nodes=None) -> float:
    """Arithmetic of one training sample under a schedule (multiply-adds count 2). ``nodes``:
    the plan's nodes if already built (a torch stage builds its model and counts its FLOPs)."""
    total = 0
    B = plan.batch_size
    s = INPROCESS_ROWS[schedule][0] if schedule in INPROCESS_ROWS else schedule
    for node in nodes or [make_node(spec) for spec in plan.specs]:
        total += node.flops_per_batch(B, s)
    return total / B


def flops_parts(plan, schedule: str, nodes=None) -> list[dict]:
    """Per layer, the FLOPs per sample by part (the node's ``flops_parts``: analytic for numpy
    layers, counted once by torch's FlopCounterMode for torch stages)."""
    B = plan.batch_size
    s = INPROCESS_ROWS[schedule][0] if schedule in INPROCESS_ROWS else schedule
    return [{k: v / B for k, v in node.flops_parts(B, s).items()}
            for node in nodes or [make_node(spec) for spec in plan.specs]]


def default_eval_every(steps: int) -> int:
    """The bench's evaluation interval when none is given: every 25 steps (MNIST's 10 epochs:
    50 points), and on long runs often enough for about 100 points per curve."""
    return max(25, -(-steps // 100))


def _sched(name: str) -> S.Schedule:
    return S.get(INPROCESS_ROWS[name][0] if name in INPROCESS_ROWS else name)


def _threads(cfg: C.RunConfig, name: str) -> int:
    t = INPROCESS_ROWS[name][1]
    return cfg.runtime.blas_threads if t is None else cores() if t == "all" else t


def steps_to_target(evals, target) -> int | None:
    """The step of the first evaluation at or above ``target`` (None: never)."""
    if not target:
        return None
    hit = [e for e in evals or [] if e["metric"] >= target]
    return int(hit[0]["step"]) if hit else None


def layer_rows(summary_layers):
    return [{k: L.get(k) for k in ("layer", "pid", "busy_s", "wait_s", "comm_s", "busy_fraction", "msgs_sent",
                                   "bytes_sent", "cpu_percent", "peak_rss_mb", "steps", "updates", "sg_updates",
                                   "cached_steps", "rejected", "delay_mean", "delay_max", "stash_peak_bytes",
                                   "aux_train_metric", "slow", "slow_s")} for L in summary_layers]


def run_inprocess(cfg: C.RunConfig, name: str = "inprocess") -> dict:
    """A single-process run (no sockets) of one of ``INPROCESS_ROWS``, timed like the others,
    in a process of its own whose BLAS thread count is fixed before numpy loads: the DNI math
    on ``runtime.blas_threads`` threads like every worker, or plain backprop on 1 thread or
    on every core (the way a user would run it)."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path
    from asyncdni.launch.local import worker_env
    with tempfile.TemporaryDirectory(prefix="asyncdni-inproc-") as d:
        cfg_path, out_path = Path(d) / "config.json", Path(d) / "out.json"
        threads = _threads(cfg, name)
        cfg = C.replace(cfg, **{"runtime.blas_threads": threads})
        cfg_path.write_text(json.dumps(cfg.to_dict()))
        env = worker_env(threads)
        proc = subprocess.run([sys.executable, "-m", "asyncdni.workers.inprocess", str(cfg_path), str(out_path), name],
                              env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise coordinator.RunError(f"in-process run {name} failed (exit {proc.returncode}): {tail}")
        return json.loads(out_path.read_text()) | {"blas_threads": threads}


def run_inprocess_here(cfg: C.RunConfig, name: str = "inprocess") -> dict:
    """The in-process run in the calling process (whatever its BLAS threads)."""
    # the layers' arithmetic follows the plan's schedule: the row's own lock-step order
    cfg = C.replace(cfg, **{"train.schedule": INPROCESS_ROWS[name][0]})
    if cfg.model.model:                 # torch's own thread pools, as BLAS's
        from asyncdni.torch import pin_threads
        pin_threads(cfg.runtime.blas_threads)
    train, test = load_datasets(cfg)
    plan = make_plan(cfg, train)
    t = cfg.train
    r = reference.train_reference(plan, INPROCESS_ROWS[name][0], train, t.seed, test=test, eval_every=t.eval_every,
                                  eval_batch=t.eval_batch)
    ev = r.evals[-1]
    loss = np.asarray(r.losses)
    k = max(1, min(50, len(loss) // 10))
    ttt = None
    if t.target_accuracy:
        hit = [e for e in r.evals if e["metric"] >= t.target_accuracy]
        ttt = hit[0]["train_time"] if hit else None
    return {"schedule": name, "train_time_s": r.train_time,
            "samples_per_s": plan.steps * plan.batch_size / r.train_time,
            "loss_first": float(loss[:k].mean()), "loss_last": float(loss[-k:].mean()),
            "test_loss": ev["loss"], "test_metric": ev["metric"], "test_metric2": ev["metric2"],
            "time_to_target_s": ttt, "evals": r.evals, "per_layer": [], "wall_s": r.train_time}


def run_peers(cfg: C.RunConfig, plan, log=None, steps: int | None = None) -> list[dict]:
    """The peer a torch user would pick instead: ``torch.distributed.pipelining`` (GPipe and
    1F1B, gloo, one process per stage, one thread each, ``train.microbatches`` micro-batches)
    on the same stages and batch size; samples/s on a fixed batch (no test accuracy)."""
    import os

    from asyncdni.bench import pipelining
    why = pipelining.available()
    if why:
        if log:
            log(f"bench: no torch.distributed.pipelining rows: {why}")
        return []
    split = plan.specs[0].split
    env = dict(zip(pipelining.PEER_ENV, (cfg.model.model, split, str(cfg.train.seed))))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    rows = []
    try:
        for sched in ("gpipe", "1f1b"):
            if log:
                log(f"bench: running torch.distributed.pipelining {sched} ...")
            rows.append(pipelining.run_pipelining(
                pipelining.PEER_FACTORY, plan.in_shape, plan.n_out, plan.batch_size, steps or min(plan.steps, 300),
                sched, microbatches=cfg.train.microbatches, seed=cfg.train.seed, lr=cfg.train.lr, warmup=10))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rows


REPEATS = 2            # the bench's default: every schedule twice, interleaved, medians reported
# per-run figures that a row of repeats reports as their median (and min-max)
MEDIAN_KEYS = ("samples_per_s", "train_time_s", "loss_last", "test_metric", "test_metric2", "time_to_target_s",
               "steps_to_target")


def median_of(vals):
    """Median of numbers, None counted as never (+inf); None when the median is never."""
    xs = sorted(float("inf") if v is None else float(v) for v in vals)
    if not xs:
        return None
    m = len(xs) // 2
    med = xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2
    return None if med == float("inf") else med


def parse_repeats(value) -> int:
    """--repeats: a whole number from 1 to 100; ConfigError with one line otherwise."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if not 1 <= n <= 100:
        raise C.ConfigError(f"--repeats {value!r}: expected a whole number from 1 to 100")
    return n


def aggregate_repeats(reps: list[dict]) -> tuple[dict, int]:
    """One row from the repeats of one schedule: the figures of ``MEDIAN_KEYS`` are medians
    (with their min-max as ``<key>_range``), everything else (per layer, evaluations) is the
    repeat with the median samples/s (the slower of the middle two); ``load`` is
    :func:`load.combine` of the repeats' samples. Returns (row, index of that repeat)."""
    order = sorted(range(len(reps)), key=lambda i: reps[i]["samples_per_s"])
    k = order[(len(order) - 1) // 2]
    out = dict(reps[k])
    for key in MEDIAN_KEYS:
        if key not in out:
            continue
        vals = [r.get(key) for r in reps]
        if len(reps) > 1:
            out[key] = median_of(vals)
            xs = [float(v) for v in vals if v is not None]
            out[key + "_range"] = [min(xs), max(xs)] if xs else None
    out["repeats"] = len(reps)
    out["load"] = load.combine([r.get("load_sample") for r in reps])
    out["repeat_runs"] = [{key: r.get(key) for key in MEDIAN_KEYS if key in r} | {"load": r.get("load_sample")}
                          for r in reps]
    out.pop("load_sample", None)
    return out, k


def resolve_target(cfg, plan, runs: dict) -> tuple[float | None, bool]:
    """(target accuracy, whether chosen automatically): the config's, or 98% of the best
    final accuracy among ``runs`` (a regression has no accuracy to reach)."""
    target = cfg.train.target_accuracy or None
    auto = target is None
    if auto and plan.task != "regression":
        target = auto_target(runs)
    return target, auto


def set_target_times(r: dict, target, auto: bool) -> None:
    """A run's steps and seconds to ``target`` from its evaluations (the run's own time to
    the config's target is kept when it has one)."""
    r["steps_to_target"] = steps_to_target(r.get("evals"), target)
    if auto or r.get("time_to_target_s") is None:
        r["time_to_target_s"] = time_to_target(r.get("evals"), target) if target else None


def parse_straggler(text, cfg: C.RunConfig, n_layers: int | None) -> tuple[str, ...]:
    """--straggler TARGET:FACTOR[,..] -> its entries, checked against the run (layer number
    1..K or a host of the run, factor >= 1; K None: not yet known, torch stages) and
    against the --slow entries every run has already; ConfigError with one line naming the
    entry otherwise."""
    entries = tuple(e for e in str(text).replace(",", " ").split() if e)
    if not entries:
        raise C.ConfigError(f"--straggler {str(text)!r:.60}: expected {C.SLOW_FORM}")
    C.parse_slow(entries, cfg, n_layers, name="--straggler")
    if cfg.runtime.slow:
        C.parse_slow(cfg.runtime.slow + entries, cfg, n_layers, name="--straggler (with --slow)")
    return entries


def straggler_label(entries) -> str:
    return ",".join(entries)


def bench(cfg: C.RunConfig, schedules=SCHEDULE_ORDER, on_progress=None, log=None,
          eval_every: int | None = None, peers: bool = False, repeats: int = REPEATS,
          straggler: str | None = None) -> dict:
    """Run every schedule on the same config; returns a plain-data result.

    ``eval_every``: test-set evaluations (off the clock) every so many steps; None: the
    config's ``train.eval_every``, or :func:`default_eval_every` where that is 0, so that
    every row has an accuracy curve and a time to the target accuracy; 0: at the end only.
    ``repeats``: every schedule that many times, interleaved (all once, then all again, so
    that drifting load spreads over every row); each row reports medians. Each run records
    the machine's other work while it ran (``load``: :mod:`asyncdni.bench.load`).
    ``straggler``: ``TARGET:FACTOR[,..]`` (as ``runtime.slow``): every schedule that runs in
    workers runs a second time in each repeat, right after the first, with those layers
    slowed (on top of any ``runtime.slow``); ``straggler`` in the result holds those rows
    (medians, like the others) and each schedule's ratios with / without
    (:func:`straggler_ratios`). The in-process rows have no worker to slow and run once."""
    repeats = parse_repeats(repeats)
    # one bench runs several schedules on the same config: checkpoints, resume and restarts
    # would mix their files in one directory, and are not what is being measured
    cfg = C.replace(cfg, **{"runtime.checkpoint_every": 0, "runtime.checkpoint_dir": "", "runtime.resume": "",
                            "runtime.max_restarts": 0})
    datasets = load_datasets(cfg)
    plan = make_plan(cfg, datasets[0])
    if eval_every is None:
        eval_every = cfg.train.eval_every or default_eval_every(plan.steps)
    cfg = C.replace(cfg, **{"train.eval_every": eval_every})
    slowed = None
    if straggler is not None:
        staged = C.with_stages(cfg, plan.n_layers)
        entries = parse_straggler(straggler, staged, plan.n_layers)
        slowed = C.replace(staged, **{"runtime.slow": staged.runtime.slow + entries})
    schedules = list(dict.fromkeys(schedules))
    if slowed is not None and all(s in INPROCESS_ROWS for s in schedules):
        raise C.ConfigError(f"--straggler: {', '.join(schedules)} run(s) in one process, with no worker to slow; "
                            "choose a schedule that runs in workers")
    reps: dict = {s: [] for s in schedules}
    rep_traces: dict = {s: [] for s in schedules}
    rep_series: dict = {s: [] for s in schedules}
    worker_rows = [s for s in schedules if s not in INPROCESS_ROWS]
    slow_reps: dict = {s: [] for s in worker_rows} if slowed is not None else {}
    slow_traces: dict = {s: [] for s in slow_reps}
    slow_series: dict = {s: [] for s in slow_reps}

    def run_engine(base: C.RunConfig, s: str, into, traces_into, series_into) -> None:
        c = C.replace(base, **{"train.schedule": s})
        with load.LoadSampler() as ld:
            r = coordinator.run(c, on_progress=on_progress, datasets=datasets)
        summ = report.run_summary(r)
        summ["per_layer"] = layer_rows(summ["per_layer"])
        aux = reference.aux_evaluate(r.plan, r.params, datasets[1], cfg.train.eval_batch)
        for Lr, a in zip(summ["per_layer"], aux):
            Lr["aux_test_metric"] = a
        summ["load_sample"] = ld.result
        into.append(summ)
        traces_into.append(r.traces)
        series_into.append({"loss": r.series["loss"], "done_at": r.series["done_at"]})

    for rep in range(repeats):
        for s in schedules:
            of = f" (repeat {rep + 1}/{repeats})" if repeats > 1 else ""
            if log:
                log(f"bench: running {s}{of} ...")
            if s in INPROCESS_ROWS:
                with load.LoadSampler() as ld:
                    row = run_inprocess(cfg, s)
                reps[s].append(row | {"load_sample": ld.result})
                continue
            run_engine(cfg, s, reps[s], rep_traces[s], rep_series[s])
            if slowed is not None:      # right after it: the pair runs under the same load
                if log:
                    log(f"bench: running {s} with straggler {straggler_label(entries)}{of} ...")
                run_engine(slowed, s, slow_reps[s], slow_traces[s], slow_series[s])
    # the target from the rows' median accuracies, then every repeat's time to it
    target, auto = resolve_target(cfg, plan, {s: {"test_metric": median_of([r.get("test_metric") for r in rr])}
                                              for s, rr in reps.items()})
    runs, traces, series = {}, {}, {}
    for s, rr in reps.items():
        for r in rr:
            set_target_times(r, target, auto)
        runs[s], k = aggregate_repeats(rr)
        if rep_traces[s]:
            traces[s], series[s] = rep_traces[s][k], rep_series[s][k]
    extra: dict = {}
    if slowed is not None:
        label = straggler_label(entries)
        slow_runs = {}
        for s, rr in slow_reps.items():
            for r in rr:
                set_target_times(r, target, auto)
            slow_runs[s], k = aggregate_repeats(rr)
            traces[f"{s} + straggler {label}"] = slow_traces[s][k]
            series[f"{s} + straggler {label}"] = slow_series[s][k]
        extra["straggler"] = {"entries": list(entries), "label": label,
                              "layers": {str(i + 1): f for i, f in enumerate(C.slow_factors(slowed, plan.n_layers))
                                         if f > 1.0},
                              "runs": slow_runs, "ratios": straggler_ratios(runs, slow_runs),
                              "not_slowed": [s for s in schedules if s in INPROCESS_ROWS]}
    peer_rows = run_peers(cfg, plan, log) if peers else []
    return analyse(cfg, plan, runs) | {"_traces": traces, "_series": series, "eval_every": eval_every,
                                       "peers": peer_rows, "repeats": repeats, "busy_share": load.BUSY_SHARE} | extra


def straggler_ratios(runs: dict, slow_runs: dict) -> dict:
    """Per schedule, the straggler's cost, with / without: ``samples_per_s`` (below 1: slower)
    and ``time_to_target`` (above 1: later; None when either run missed the target), from
    the rows' medians; ``not_a_verdict``: why the pair is no verdict
    (:func:`load.not_a_verdict`: busy, or unlike load), '' when it is one."""
    out = {}
    for s, w in slow_runs.items():
        b = runs[s]
        t, tb = w.get("time_to_target_s"), b.get("time_to_target_s")
        out[s] = {"samples_per_s": w["samples_per_s"] / b["samples_per_s"] if b.get("samples_per_s") else None,
                  "time_to_target": t / tb if t and tb else None,
                  "not_a_verdict": load.not_a_verdict(b.get("load"), w.get("load"))}
    return out


def bench_rows(res: dict) -> list[dict]:
    """bench.csv: one row per schedule, then one per layer of it; with a straggler, the
    slowed runs' rows after them (``straggler``: its entries) with their ratios to the
    rows without (``slowdown_samples_per_s``, ``slowdown_time_to_target``: with / without)."""
    skip = ("per_layer", "evals", "load", "repeat_runs")
    st = res.get("straggler")
    rows = []
    for s, r in res["runs"].items():
        base = {k: v for k, v in r.items() if k not in skip}
        rows.append({**base, "other_share": (r.get("load") or {}).get("other_share"), "layer": ""}
                    | ({"straggler": ""} if st else {}))
        for L in r["per_layer"]:
            rows.append({"schedule": s, **L} | ({"straggler": ""} if st else {}))
    if st:
        for s, r in st["runs"].items():
            ratio = st["ratios"][s]
            base = {k: v for k, v in r.items() if k not in skip}
            rows.append({**base, "other_share": (r.get("load") or {}).get("other_share"), "layer": "",
                         "straggler": st["label"], "slowdown_samples_per_s": ratio["samples_per_s"],
                         "slowdown_time_to_target": ratio["time_to_target"]})
            for L in r["per_layer"]:
                rows.append({"schedule": s, **L, "straggler": st["label"]})
    return rows


def auto_target(runs: dict) -> float | None:
    """The target accuracy when none is given: 98% of the best final test accuracy among the
    rows, rounded down to half a point (MNIST: ~94.5%), so that times to it compare rows
    that all learn the task; rows that stop short of it show '-'."""
    best = max((r["test_metric"] for r in runs.values() if np.isfinite(r.get("test_metric", np.nan))), default=None)
    if not best:
        return None
    return float(np.floor(0.98 * best * 200) / 200)


def time_to_target(evals, target) -> float | None:
    hit = [e for e in evals or [] if e["metric"] >= target]
    return float(hit[0]["train_time"]) if hit else None


def analyse(cfg, plan, runs: dict) -> dict:
    n_cores = cores()
    K = plan.n_layers
    M = cfg.train.microbatches
    nodes = [make_node(spec) for spec in plan.specs]      # once: every row's FLOPs read them
    flops = {s: flops_per_sample(plan, s, nodes) for s in runs}
    target, target_auto = resolve_target(cfg, plan, runs)
    for r in runs.values():
        if "repeats" not in r:          # rows of bench() have their times to target: medians of repeats
            set_target_times(r, target, target_auto)
    out = {"machine": {"cores": n_cores}, "task": plan.task, "layers": K, "widths": list(plan.widths),
           "batch_size": plan.batch_size, "steps": plan.steps, "samples": plan.steps * plan.batch_size,
           "target_accuracy": target, "target_auto": target_auto, "runs": runs, "flops_per_sample": flops,
           "flops_parts": {s: flops_parts(plan, s, nodes) for s in runs},
           "torch": cfg.model.model or None, "shapes": report.plan_shapes(plan)}
    # measured compute of each layer in the sequential run: the balance of the pipeline
    bound = float(min(K, n_cores))
    if "sequential" in runs and runs["sequential"]["per_layer"]:
        busy = np.array([L["busy_s"] for L in runs["sequential"]["per_layer"]])
        balance = float(busy.sum() / busy.max())
        bound = min(float(n_cores), balance)
        out["layer_balance"] = balance
    out["async_bound"] = bound
    # compute rate of one core on this model, from a single-process run when available
    rate = None
    for s in ("inprocess", BASELINE, "sequential"):
        if s in runs:
            rate = flops[s] * runs[s]["samples_per_s"]
            break
    out["core_flop_rate"] = rate
    work_bound = {}
    if rate:
        for s in runs:
            if s in INPROCESS_ROWS:
                par = float(runs[s].get("blas_threads") or 1)
            else:
                par = PARALLELISM[_sched(s).parallelism](K, M, n_cores, bound)
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
        # above 100%: more than the machine allows, i.e. the rows ran under different load
        out["async_efficiency_impossible"] = out["async_efficiency"] > 1.0
    out["busy_rows"] = [s for s, r in runs.items() if load.is_busy(r.get("load"))]
    # every engine row against plain backprop in one process: samples/s and time to target
    vs = {}
    for base in (BASELINE, BASELINE_ALL):
        if base not in runs:
            continue
        b = runs[base]
        vs[base] = {}
        for s, r in runs.items():
            if s in INPROCESS_ROWS:
                continue
            t, tb = r.get("time_to_target_s"), b.get("time_to_target_s")
            vs[base][s] = {"samples_per_s": r["samples_per_s"] / b["samples_per_s"],
                           "time_to_target": (tb / t) if t and tb else None}
    out["vs_inprocess_backprop"] = vs
    return out


def _verdict(s: str, base: str, v: dict, r: dict, b: dict, tname: str) -> str:
    """One plain sentence: does the engine row beat plain backprop in one process? Only
    when both rows ran under like, light load (:func:`load.not_a_verdict`); otherwise the
    ratios, and why they are no verdict."""
    sp = v["samples_per_s"]
    why = load.not_a_verdict(r.get("load"), b.get("load"))
    t, tb = r.get("time_to_target_s"), b.get("time_to_target_s")
    rate = f"{sp:.2f}x its samples/s"
    if tb is None:
        when, faster_t = f"the baseline never reached {tname[3:]}", None
    elif t is None:
        when, faster_t = f"never reaches {tname[3:]} (baseline {tb:.2f} s)", False
    else:
        faster_t = t < tb
        ratio = f"{tb / t:.2f}x sooner" if faster_t else f"{t / tb:.2f}x later"
        when = f"reaches {tname[3:]} {ratio} ({t:.2f} s vs {tb:.2f} s)"
    if why:
        return f"  {s} against {base}: {rate}, {when} ({why})"
    if sp >= 1 and faster_t is not False:
        word = "BEATS"
    elif sp < 1 and faster_t is not True:
        word = "LOSES TO"
    else:
        word = "is faster per sample than" if sp >= 1 else "is slower per sample than"
        word += " but " + ("reaches the target later than" if faster_t is False else "reaches the target before")
    return f"  {s} {word} {base}: {rate}, {when}"


def format_flops(res: dict) -> list[str]:
    """MFLOP per sample by part, summed over layers, per schedule (analytic)."""
    parts = res.get("flops_parts") or {}
    if not parts:
        return []
    keys = ("forward", "backward", "sg_predict", "sg_repredict", "sg_update", "aux")
    how = "torch's FLOP counter on the forward, backward 2x it" if res.get("torch") else "analytic"
    lines = ["", f"  MFLOP/sample by part ({how}, all layers; SG regression averaged over --sg-every steps):",
             f"  {'schedule':<24}" + "".join(f"{k.replace('_', ' '):>13}" for k in keys) + f"{'total':>9}{'/ backprop':>11}"]
    bp = res["flops_per_sample"].get("backprop") or res["flops_per_sample"].get(BASELINE)
    groups: dict[tuple, list[str]] = {}      # rows with the same arithmetic share a line
    for s, layers in parts.items():
        groups.setdefault(tuple(sum(L[k] for L in layers) for k in keys), []).append(s)
    rows = [(", ".join(names), sums) for sums, names in groups.items()]
    w = max([24] + [len(n) + 2 for n, _ in rows])
    lines[-1] = f"  {'schedule':<{w}}" + lines[-1][26:]
    for name, sums in rows:
        tot = sum(sums)
        lines.append(f"  {name:<{w}}" + "".join(f"{v / 1e6:>13.2f}" for v in sums) + f"{tot / 1e6:>9.2f}"
                     + (f"{tot / bp:>10.2f}x" if bp else ""))
    return lines


def format_straggler(res: dict, tname: str = "to target") -> list[str]:
    """bench --straggler: per schedule, samples/s and time to the target without and with
    the straggler, and the ratios with / without (medians of the repeats)."""
    st = res.get("straggler")
    if not st:
        return []
    runs, slow = res["runs"], st["runs"]
    layers = ", ".join(f"layer {k} x{v:g}" for k, v in (st.get("layers") or {}).items()) or "no layer"
    lines = ["", f"  straggler {st['label']} ({layers}: training computes take that many times as long; "
                 "communication is not slowed), each schedule without and with it, run back to back:",
             f"    {'schedule':<16}{'samples/s':>10}{'with':>9}{'ratio':>8}{tname + ' s':>14}{'with':>9}{'ratio':>8}"]
    for s, r in slow.items():
        b, q = runs[s], st["ratios"][s]
        t0, t1 = b.get("time_to_target_s"), r.get("time_to_target_s")
        why = q.get("not_a_verdict") or ""
        lines.append(f"    {s:<16}{b['samples_per_s']:>10.0f}{r['samples_per_s']:>9.0f}"
                     f"{_ratio(q.get('samples_per_s')):>8}{'-' if t0 is None else f'{t0:.2f}':>14}"
                     f"{'-' if t1 is None else f'{t1:.2f}':>9}{_ratio(q.get('time_to_target')):>8}"
                     + (f"  ({why})" if why else ""))
    lines.append("    (ratio: with / without; samples/s below 1x and time above 1x are the straggler's cost"
                 + ("; '-': the target was not reached" if res.get("target_accuracy") else "") + ")")
    if st.get("not_slowed"):
        lines.append(f"    ({', '.join(st['not_slowed'])}: one process, no worker to slow; run without only)")
    return lines


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_peers(res: dict) -> list[str]:
    """The torch.distributed.pipelining rows, with each engine row's samples/s over theirs."""
    peers, runs = res.get("peers") or [], res["runs"]
    if not peers:
        return []
    lines = ["", f"  against torch.distributed.pipelining {peers[0]['torch']} (the same stages and batch, gloo, one "
                 f"process per stage, one thread each, {peers[0]['microbatches']} micro-batches; samples/s on a fixed "
                 "batch, no test accuracy):"]
    for p in peers:
        ratios = ", ".join(f"{s} {runs[s]['samples_per_s'] / p['samples_per_s']:.2f}x" for s in runs
                           if s not in INPROCESS_ROWS)
        lines.append(f"    {p['name']:<26}{p['samples_per_s']:>8.0f} samples/s   engine rows / it: {ratios}")
    return lines


def format_bench(res: dict) -> str:
    runs = res["runs"]
    regression = res.get("task") == "regression"          # its column: test R² (higher is better, as accuracy)
    net = report.network_label(res["layers"], res["widths"], res.get("shapes"))
    net = f"{res['torch']}, {net}" if res.get("torch") else net
    rep = res.get("repeats", 1)
    lines = [f"bench: {net}, batch {res['batch_size']}, "
             f"{res['steps']} steps ({res['samples']} samples), {res['machine']['cores']} cores"
             + (f", test {'RMSE and R²' if regression else 'accuracy'} every {res['eval_every']} steps (off the clock)"
                if res.get("eval_every") else "")
             + (f"; every row the median of {rep} runs, interleaved" if rep > 1 else "")]
    tgt = res.get("target_accuracy")
    tname = f"to {100 * tgt:g}%" if tgt else "to target"
    if tgt and res.get("target_auto"):
        lines.append(f"  target {100 * tgt:g}%: 98% of the best final accuracy (no --target-accuracy given)")
    w = max([14] + [len(s) + 2 for s in runs])
    ttcols = ("", "") if regression else (tname + " s", tname + " steps")   # a regression has no target
    hdr = (f"  {'schedule':<{w}}{'samples/s':>10}{'train s':>9}{'loss':>8}{'test R²' if regression else 'test acc':>9}"
           f"{ttcols[0]:>11}{ttcols[1]:>15}{'MFLOP/smp':>10}{'work bound':>11}{'of bound':>9}")
    lines.append(hdr)
    wb = res.get("work_bound_samples_per_s", {})
    order = [s for s in SCHEDULE_ORDER if s in runs] + [s for s in runs if s not in SCHEDULE_ORDER]
    for s in order:
        r = runs[s]
        ttt = r.get("time_to_target_s")
        stt = r.get("steps_to_target")
        b = wb.get(s)
        ttt_s = "-" if ttt is None else f"{ttt:.2f}"
        stt_s = "-" if stt is None else f"{stt:g}"
        b_s = "-" if not b else f"{b:.0f}"
        frac_s = "-" if not b else f"{100 * r['samples_per_s'] / b:.0f}%"
        note = load.busy_note(r.get("load"))
        lines.append(f"  {s:<{w}}{r['samples_per_s']:>10.0f}{r['train_time_s']:>9.2f}{r['loss_last']:>8.3f}"
                     + (f"{r['test_metric2']:>9.4f}" if regression else f"{100 * r['test_metric']:>8.2f}%")
                     + f"{ttt_s:>11}{stt_s:>15}"
                     f"{res['flops_per_sample'][s] / 1e6:>10.2f}{b_s:>11}{frac_s:>9}"
                     + (f"  {note}" if note else ""))
    busy = [s for s in order if load.is_busy(runs[s].get("load"))]
    if busy:
        lines.append(f"  (busy: other processes took more than {100 * load.BUSY_SHARE:.0f}% of the machine's CPU "
                     f"while the row ran{', in its busiest repeat' if rep > 1 else ''}; its figures are not the "
                     "schedule's own, and no verdict is drawn from it)")
    inproc = [s for s in order if s in INPROCESS_ROWS]
    if inproc:
        lines.append("  (" + "; ".join(f"{s}: one process, {runs[s].get('blas_threads', '?')} BLAS thread(s)"
                                       for s in inproc) + ")")
    if res.get("async_speedup"):
        lines.append("")
        bound = res["async_bound"]
        for s, v in res["async_speedup"].items():
            extra = ""
            if s == "sequential":
                eff = v / bound
                eff_s = (f"efficiency {100 * eff:.0f}%" if eff <= 1.0 else
                         f"efficiency impossible: the machine's load changed between rows ({100 * eff:.0f}% of "
                         "the bound)")
                extra = (f"   (bound {bound:.2f} = min(cores {res['machine']['cores']}, layer balance "
                         f"{res.get('layer_balance', float('nan')):.2f}); {eff_s})")
            why = load.not_a_verdict(runs["async"].get("load"), runs[s].get("load"))
            lines.append(f"  speedup async / {s:<{w}} {v:5.2f}x{extra}" + (f"   ({why})" if why else ""))
    vs = res.get("vs_inprocess_backprop") or {}
    for base, rows in vs.items():
        if not rows:
            continue
        b = runs[base]
        lines.append("")
        lines.append(f"  against {base} (plain backprop in one process, {b.get('blas_threads', '?')} BLAS thread(s), "
                     f"{b['samples_per_s']:.0f} samples/s"
                     + (f", {tname} in {b['time_to_target_s']:.2f} s" if b.get("time_to_target_s") is not None else "")
                     + "):")
        for s, v in rows.items():
            lines.append(_verdict(s, base, v, runs[s], b, tname))
    lines += format_straggler(res, tname)
    lines += format_peers(res)
    lines += format_flops(res)
    for s in order:
        if runs[s]["per_layer"]:
            lines.append("")
            lines.append(f"  {s}: layer  busy s  wait s  comm s  busy%   msgs   sent MB  cpu%  rss MB")
            for L in runs[s]["per_layer"]:
                lines.append(f"  {'':<{len(s)}}  {L['layer']:>5} {L['busy_s']:>7.2f} {L['wait_s']:>7.2f} {L['comm_s']:>7.2f}"
                             f" {100 * L['busy_fraction']:>5.1f}% {L['msgs_sent']:>6} {L['bytes_sent'] / 2**20:>9.1f}"
                             f" {L['cpu_percent']:>5.0f} {L['peak_rss_mb']:>7.1f}")
            extra = report.layer_extras(runs[s]["per_layer"], res.get("task"))
            if extra:
                lines += [f"  {'':<{len(s)}}  {x}" for x in extra]
    return "\n".join(lines)


def sweep(cfg: C.RunConfig, layers=(2, 4, 8), widths=(256, 1024), batches=(32, 128), steps: int = 40,
          log=None, repeats: int = 1) -> list[dict]:
    """sequential vs async (and backprop, through the workers and in one process on every
    core) over a grid of depth, width and batch size; ``repeats`` runs per point (medians)."""
    rows = []
    for K in layers:
        for w in widths:
            for b in batches:
                c = C.replace(cfg, **{"model.layers": K, "model.width": w, "model.widths": (),
                                      "train.batch_size": b, "train.steps": steps, "train.eval_every": 0,
                                      "train.target_accuracy": 0.0, "runtime.progress": False})
                res = bench(c, schedules=("sequential", "async", "backprop", BASELINE_ALL), eval_every=0,
                            repeats=repeats)
                r = res["runs"]
                row = {"layers": K, "width": w, "batch": b,
                       "sequential_sps": r["sequential"]["samples_per_s"], "async_sps": r["async"]["samples_per_s"],
                       "backprop_sps": r["backprop"]["samples_per_s"],
                       "inprocess_backprop_all_sps": r[BASELINE_ALL]["samples_per_s"],
                       "speedup_vs_sequential": res["async_speedup"]["sequential"],
                       "speedup_vs_backprop": res["async_speedup"]["backprop"],
                       "speedup_vs_inprocess_backprop_all": res["async_speedup"][BASELINE_ALL],
                       "bound": res["async_bound"],
                       "peak_rss_mb": max(L["peak_rss_mb"] for L in r["async"]["per_layer"]),
                       "other_share": max((load.share(x.get("load")) or 0.0) for x in r.values())}
                rows.append(row)
                if log:
                    log(format_sweep_row(row))
    return rows


def format_sweep_row(r: dict) -> str:
    busy = (r.get("other_share") or 0.0) > load.BUSY_SHARE
    return (f"  K={r['layers']:<2} width={r['width']:<5} batch={r['batch']:<4} seq {r['sequential_sps']:8.0f}/s  "
            f"async {r['async_sps']:8.0f}/s  backprop {r['backprop_sps']:8.0f}/s  async/seq {r['speedup_vs_sequential']:.2f}x "
            f"(bound {r['bound']:.2f})  async/bp {r['speedup_vs_backprop']:.2f}x  in-process bp (all cores) "
            f"{r['inprocess_backprop_all_sps']:8.0f}/s  async/it {r['speedup_vs_inprocess_backprop_all']:.2f}x"
            f"{'' if r['speedup_vs_inprocess_backprop_all'] >= 1 or busy else ' (async LOSES)'}  max rss "
            f"{r['peak_rss_mb']:.0f} MB" + (f"  busy: other work took up to {100 * r['other_share']:.0f}% of the CPU"
                                           if busy else ""))
