"""``asyncdni bench --lab``: every schedule over emulated links (root only).

For each link setting (rate, one-way delay per link) a lab is made (``lab.py``): one
namespace host per layer (the feeder shares layer 1's host unless ``feeder_host="own"``),
an ``asyncdni agent`` in each, the coordinator in the root namespace on the bridge
address. The same model, data and seed then run under every schedule through the agents
launcher, with ``Lab.route`` putting a delaying relay in front of every inbox a peer on
another host sends to. Each run reports samples/s, time and steps to the target
accuracy, final accuracy, per layer busy / wait / communicate time and bytes, the delay
the relays actually added (median and p99 per chunk) and, for DNI, how stale the SG
targets were (lag distribution). ``repeats`` runs every cell that many times, interleaved,
and reports medians with their min-max spread; ``windows`` runs each schedule that has an
in-flight window once per window (the staleness study). Every run records the machine's
other work while it ran (:mod:`asyncdni.bench.load`); a cell on which other processes
took more than ``load.BUSY_SHARE`` of the CPU is marked busy, and its ratios to other
cells are printed as no verdict. ``straggler`` (``--straggler``) follows every run with the
same run with a layer, or every layer on a lab host, computing slower (``runtime.slow``), and
reports each cell's samples/s and time to target with and without it and their ratios.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from asyncdni import config as C
from asyncdni.engine import coordinator
from asyncdni import report
from asyncdni import schedules as S
from asyncdni.bench import load
from asyncdni.bench.compare import layer_rows, median_of
from asyncdni.lab.namespaces import Lab, LabError, parse_burst, parse_delay, parse_rate, rate_bits

DEFAULT_LINKS = "unshaped:0,unshaped:5,1gbit:0,100mbit:0"
# every schedule of schedules.TABLE, in bench's order; the in-process run has no network to cross
LAB_SCHEDULES = tuple(n for n in S.BENCH_ORDER if n in S.TABLE) + tuple(n for n in S.NAMES if n not in S.BENCH_ORDER)
# bench's in-process rows (one process, no sockets) have no network to cross
NOT_IN_LAB = {n: "one process, no network to cross" for n in S.BENCH_CHOICES if n not in S.TABLE}
AGENT_WAIT = 60.0


def parse_schedules(text: str | None) -> tuple[list[str], dict]:
    """'a,b,...' (default: every schedule) -> (schedules the lab runs, {skipped: why});
    ConfigError with one line for an unknown name."""
    names = [s.strip() for s in (text or ",".join(LAB_SCHEDULES)).split(",") if s.strip()]
    run, skipped = [], {}
    for s in names:
        if s in NOT_IN_LAB:
            skipped[s] = NOT_IN_LAB[s]
        elif s not in S.TABLE:
            raise C.ConfigError(f"--schedules: {s!r} is not one of {', '.join(LAB_SCHEDULES)}")
        elif s not in run:
            run.append(s)
    if not run:
        raise C.ConfigError(f"--schedules: nothing the lab can run (choose from {', '.join(LAB_SCHEDULES)})")
    return run, skipped


def parse_windows(text: str | None) -> list[int]:
    """'2,4,8,16' -> [2, 4, 8, 16] (in-flight windows); empty for None."""
    if not text:
        return []
    out = []
    for item in [s.strip() for s in str(text).split(",") if s.strip()]:
        try:
            w = int(item)
        except ValueError:
            w = 0
        if not 1 <= w <= 1024:
            raise C.ConfigError(f"--windows {item!r}: expected whole numbers of steps from 1 to 1024, e.g. 2,4,8,16")
        if w not in out:
            out.append(w)
    if not out:
        raise C.ConfigError("--windows: expected whole numbers of steps, e.g. 2,4,8,16")
    return out


def variants(schedules, windows, wires=()) -> list[tuple[str, str, int | None, tuple | None]]:
    """(label, schedule, window, wire) per run of one link: with ``windows``, every schedule
    whose window is the in-flight window (async, delayed, local) once per window ('async w4'),
    the others once; with ``wires`` (:func:`parse_wires`), each of those once per codec
    setting ('backprop int8'; wire None: the configuration's own codecs)."""
    out = []
    for s in schedules:
        if windows and S.TABLE[s].window == "max_inflight":
            out += [(f"{s} w{w}", s, w) for w in windows]
        else:
            out.append((s, s, None))
    if not wires:
        return [(label, s, w, None) for label, s, w in out]
    return [(f"{label} {wire_label(wire)}", s, w, wire) for label, s, w in out for wire in wires]


def wire_label(wire: tuple) -> str:
    fwd, bwd = wire
    return fwd if fwd == bwd else f"{fwd}/{bwd}"


def parse_wires(text: str | None) -> list[tuple[str, str]]:
    """'fp32,int8,fp16/int8,aq:int8/int8' -> [(fwd codec, bwd codec)]: CODEC for both
    directions, or FWD/BWD (FWD may be aq:CODEC); canonical names (asyncdni.wire.codec).
    ConfigError with one line otherwise."""
    from asyncdni.wire import codec as WC
    if not text:
        return []
    out = []
    for item in [x.strip() for x in str(text).split(",") if x.strip()]:
        fwd, sep, bwd = item.partition("/")
        if not sep and fwd.strip().lower().startswith(WC.AQ_PREFIX):
            raise C.ConfigError(f"--wires {item!r}: aq: is for activations; say the gradients' codec too, "
                                f"e.g. {item}/int8")
        try:
            pair = (WC.wire_name(*WC.parse_wire(fwd)), WC.parse(bwd if sep else fwd).name)
        except ValueError as e:
            raise C.ConfigError(f"--wires {item!r}: {e}") from None
        if pair not in out:
            out.append(pair)
    if not out:
        raise C.ConfigError("--wires: expected CODEC or FWD/BWD[,...], e.g. fp32,int8,fp16/int8")
    return out


def parse_links(text: str) -> list[tuple[str | None, float]]:
    """'RATE:DELAY_MS,...' (e.g. 'unshaped:0,unshaped:5,100mbit:0') -> [(rate, delay_ms)];
    ConfigError with one line otherwise."""
    out = []
    for item in [s.strip() for s in str(text).split(",") if s.strip()]:
        rate, sep, delay = item.partition(":")
        try:
            out.append((parse_rate(rate), parse_delay(delay if sep else "0")))
        except LabError as e:
            raise C.ConfigError(f"--links {item!r}: {e}") from None
    if not out:
        raise C.ConfigError("--links: expected RATE:DELAY_MS[,...], e.g. unshaped:0,unshaped:5,100mbit:0")
    return out


def link_label(rate: str | None, delay_ms: float) -> str:
    return f"{rate or 'unshaped'}/{delay_ms:g}ms"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _start_agents(lab: Lab, names: list[str], port: int, log_dir: Path) -> None:
    for i, name in enumerate(names):
        log = open(log_dir / f"agent-{name}.log", "wb")
        lab.run_in(i, [sys.executable, "-m", "asyncdni.cli", "agent", "--join", f"tcp://{lab.bridge_ip}:{port}",
                       "--name", name, "--bind", lab.addresses[i], "--wait", str(int(AGENT_WAIT)),
                       "--insecure"],          # the lab's own namespaces, and the run says --insecure too
                   stdout=log, stderr=subprocess.STDOUT)
        log.close()


def _pct(sorted_vals, q):
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def lag_summary(counts) -> dict | None:
    """Counts of SG targets by lag (bins 0..N-1, the last N+) -> shares, mean, median, p90, max
    bin; None when no SG target was counted."""
    if not counts or not sum(counts):
        return None
    n = sum(counts)
    cum, p50, p90 = 0, None, None
    for lag, c in enumerate(counts):
        cum += c
        if p50 is None and cum >= 0.5 * n:
            p50 = lag
        if p90 is None and cum >= 0.9 * n:
            p90 = lag
    top = max(i for i, c in enumerate(counts) if c)
    return {"targets": n, "counts": list(counts), "share": [round(c / n, 4) for c in counts],
            "mean": sum(i * c for i, c in enumerate(counts)) / n, "median": p50, "p90": p90, "max": top,
            "max_is_open": top == len(counts) - 1}


def _pool_counts(count_lists) -> list[int] | None:
    """Element-wise sum of the lag-count lists given (None and empty ones skipped); None if none."""
    pooled = None
    for c in count_lists:
        if c:
            pooled = list(c) if pooled is None else [a + b for a, b in zip(pooled, c)]
    return pooled


def _one_run(r, relay: dict, load_sample: dict | None = None, rate_bits: float | None = None) -> dict:
    """The plain-data record of one run through the lab (``load_sample``: the machine's
    other work while it ran, :class:`load.LoadSampler`)."""
    from asyncdni.bench.compare import steps_to_target
    summ = report.run_summary(r)
    summ["traffic"] = report.traffic(summ, rate_bits)
    summ["wire"] = [r.config.train.wire_fwd, r.config.train.wire_bwd]
    summ["per_layer"] = layer_rows(summ["per_layer"])
    summ["steps_to_target"] = steps_to_target(summ.get("evals"), summ.get("target_accuracy"))
    summ["relay"] = {k: relay.get(k) for k in ("delay_ms", "chunks", "backlogged", "added_ms", "on_time_ms")}
    summ["sg_lag_counts"] = _pool_counts(st.get("sg_lags") for st in r.layers)
    summ["load_sample"] = load_sample
    return summ


# per-run figures that a cell of repeats reports as median and min-max (and the CSV with them)
MEDIAN_KEYS = ("samples_per_s", "train_time_s", "test_metric", "time_to_target_s", "steps_to_target")




def _spread(vals):
    xs = [float(v) for v in vals if v is not None]
    return [min(xs), max(xs)] if xs else None


def aggregate(label: str, schedule: str, window: int | None, reps: list[dict]) -> dict:
    """Medians (and min-max spread) over the repeats of one schedule on one link; per layer
    figures and relay accounting from the repeat with the median samples/s."""
    order = sorted(range(len(reps)), key=lambda i: reps[i]["samples_per_s"])
    mid = reps[order[(len(order) - 1) // 2]]
    out = {k: v for k, v in mid.items() if k not in ("evals", "load_sample")}
    out.update(label=label, schedule=schedule, window_asked=window, repeats=len(reps))
    for key in MEDIAN_KEYS:
        vals = [r.get(key) for r in reps]
        out[key] = median_of(vals)
        out[key + "_range"] = _spread(vals)
    out["reached_target"] = sum(r.get("time_to_target_s") is not None for r in reps)
    out["windows_used"] = sorted({r.get("window") for r in reps if r.get("window") is not None})
    out["sg_lag"] = lag_summary(_pool_counts(r.get("sg_lag_counts") for r in reps))
    out["runs"] = [{k: r.get(k) for k in (*MEDIAN_KEYS, "window")}
                   | {"relay_added_ms": (r.get("relay") or {}).get("added_ms"), "load": r.get("load_sample")}
                   for r in reps]
    out["load"] = load.combine([r.get("load_sample") for r in reps])
    return out


def host_names(n_layers: int, feeder_host: str = "shared") -> list[str]:
    """The lab's host names, as runtime.hosts names them: h0.. (one per layer, and one more
    for the feeder with ``feeder_host="own"``, which then is h0)."""
    return [f"h{i}" for i in range(n_layers + (1 if feeder_host == "own" else 0))]


def parse_straggler(text, cfg: C.RunConfig, feeder_host: str = "shared") -> tuple[str, ...]:
    """--straggler with --lab: its entries checked against the lab's run (a layer number, or
    a host h0.. of the lab that runs a layer); ConfigError with one line otherwise."""
    from asyncdni.bench.compare import parse_straggler as check
    K = cfg.model.layers
    probe = C.replace(cfg, **{"runtime.launcher": "agents", "runtime.listen": "127.0.0.1:1",
                              "runtime.hosts": tuple(host_names(K, feeder_host)), "runtime.security": "insecure"})
    return check(text, probe, K)


def run_link(cfg: C.RunConfig, schedules, rate: str | None, delay_ms: float, datasets, *,
             feeder_host: str = "shared", prefix: str = "adb-", subnet: str = "10.76.0.0/24",
             repeats: int = 1, windows=(), wires=(), straggler: tuple[str, ...] = (), burst: str = "auto",
             log=None) -> tuple[dict, dict]:
    """Every schedule (and window variant) over one link setting, ``repeats`` times, the
    repeats interleaved (so drifting load spreads over all of them); with ``straggler``
    (runtime.slow entries) each run is followed by the same run with those layers slowed.
    Returns ({label: aggregate}, {label: aggregate of the slowed runs}; empty without)."""
    from asyncdni.launch.agents import AgentsLauncher
    log = log or (lambda line: None)
    K = cfg.model.layers               # the plan's stage count (lab_bench applied with_stages)
    names = host_names(K, feeder_host)
    n_hosts = len(names)
    todo = variants(schedules, windows, wires)
    reps: dict = {label: [] for label, _, _, _ in todo}
    slow_reps: dict = {label: [] for label, _, _, _ in todo} if straggler else {}
    with Lab(hosts=n_hosts, rate=rate, delay_ms=delay_ms, prefix=prefix, subnet=subnet, burst=burst) as lab, \
            tempfile.TemporaryDirectory(prefix="asyncdni-lab-") as tmp:
        port = _free_port(lab.bridge_ip)
        listen = f"{lab.bridge_ip}:{port}"
        c0 = C.replace(cfg, **{"runtime.launcher": "agents", "runtime.listen": listen,
                               "runtime.hosts": tuple(names), "runtime.security": "insecure",
                               "runtime.progress": False})
        _start_agents(lab, names, port, Path(tmp))
        launcher = AgentsLauncher.from_config(c0)
        try:
            n_runs, k = repeats * len(todo) * (2 if straggler else 1), 0
            for rep in range(repeats):
                for label, s, w, wire in todo:
                    rep_s = f" (repeat {rep + 1}/{repeats})" if repeats > 1 else ""
                    ov = {"train.schedule": s}
                    if w is not None:
                        ov["train.max_inflight"] = w
                    if wire is not None:
                        ov["train.wire_fwd"], ov["train.wire_bwd"] = wire
                    c = C.replace(c0, **ov)
                    pairs = [("", c, reps)]
                    if straggler:         # right after it: the pair runs under the same load
                        pairs.append((f" with straggler {','.join(straggler)}",
                                      C.replace(c, **{"runtime.slow": c.runtime.slow + tuple(straggler)}), slow_reps))
                    for what, cc, into in pairs:
                        k += 1
                        log(f"bench --lab: {link_label(rate, delay_ms)} running {label}{what}{rep_s} ...")
                        ld = load.LoadSampler().start()
                        try:
                            r = coordinator.run(cc, datasets=datasets, launcher=launcher, route=lab.route)
                        finally:
                            sample = ld.stop()
                            relay = lab.stop_relays(refill=k < n_runs)
                        into[label].append(_one_run(r, relay, sample, rate_bits(rate)))
        finally:
            launcher.close()
    return ({label: aggregate(label, s, w, reps[label]) for label, s, w, _ in todo},
            {label: aggregate(label, s, w, slow_reps[label]) for label, s, w, _ in todo} if straggler else {})


def lab_bench(cfg: C.RunConfig, schedules=LAB_SCHEDULES, links=None, *, feeder_host: str = "shared",
              prefix: str = "adb-", subnet: str = "10.76.0.0/24", repeats: int = 1, windows=(), wires=(),
              skipped=None, straggler: str | None = None, burst: str = "auto", log=None) -> dict:
    """Every schedule under every link setting; a plain-data result. ``straggler``
    (``TARGET:FACTOR[,..]``, a layer number or a lab host h0..): every run is followed by
    the same run with that straggler; each link's row then holds ``straggler_runs`` and
    ``straggler_ratios`` (with / without, :func:`asyncdni.bench.compare.straggler_ratios`)."""
    from asyncdni.bench.compare import straggler_ratios
    from asyncdni.engine.plan import load_datasets, make_plan
    if feeder_host not in ("shared", "own"):
        raise C.ConfigError(f"--feeder-host {feeder_host!r}: expected shared or own")
    if not 1 <= int(repeats) <= 100:
        raise C.ConfigError(f"--repeats {repeats}: expected 1 to 100")
    links = parse_links(DEFAULT_LINKS) if links is None else links
    for rate, _delay in links:              # a bad --lab-burst: one line, before any lab is made
        try:
            parse_burst(burst, rate)
        except LabError as e:
            raise C.ConfigError(f"--lab-burst: {e}") from None
    cfg = C.replace(cfg, **{"runtime.checkpoint_every": 0, "runtime.checkpoint_dir": "", "runtime.resume": "",
                            "runtime.max_restarts": 0})
    datasets = load_datasets(cfg)
    plan = make_plan(cfg, datasets[0])
    cfg = C.with_stages(cfg, plan.n_layers)      # torch models: one host per stage of the model
    entries = parse_straggler(straggler, cfg, feeder_host) if straggler is not None else ()
    skipped = dict(skipped or {})
    for s, why in skipped.items():
        if log:
            log(f"bench --lab: {s} skipped: {why}")
    rows = []
    t0 = time.monotonic()
    for rate, delay in links:
        runs, slowed = run_link(cfg, list(schedules), rate, delay, datasets, feeder_host=feeder_host, prefix=prefix,
                                subnet=subnet, repeats=int(repeats), windows=list(windows), wires=list(wires),
                                straggler=entries, burst=burst, log=log)
        rows.append({"link": link_label(rate, delay), "rate": rate or "unshaped", "rate_bits": rate_bits(rate),
                     "delay_ms": delay, "burst_bytes": int(parse_burst(burst, rate)) if rate else None, "runs": runs}
                    | ({"straggler_runs": slowed, "straggler_ratios": straggler_ratios(runs, slowed)}
                       if entries else {}))
        if log:
            log(format_link(rows[-1], int(repeats)))
    return {"layers": plan.n_layers, "widths": list(plan.widths), "batch_size": plan.batch_size,
            "steps": plan.steps, "samples": plan.steps * plan.batch_size, "feeder_host": feeder_host,
            "target_accuracy": cfg.train.target_accuracy or None, "repeats": int(repeats),
            "windows": list(windows), "wires": [list(w) for w in wires], "max_inflight": cfg.train.max_inflight or "auto",
            "schedules": list(schedules), "skipped": skipped, "links": rows, "wall_s": time.monotonic() - t0,
            "straggler": straggler_info(cfg, entries, feeder_host) if entries else None}


def straggler_info(cfg: C.RunConfig, entries, feeder_host: str = "shared") -> dict:
    """The straggler of a lab bench: its entries, label and {layer number: factor}."""
    K = cfg.model.layers
    c = C.replace(cfg, **{"runtime.launcher": "agents", "runtime.listen": "127.0.0.1:1",
                          "runtime.hosts": tuple(host_names(K, feeder_host)), "runtime.security": "insecure",
                          "runtime.slow": cfg.runtime.slow + tuple(entries)})
    return {"entries": list(entries), "label": ",".join(entries),
            "layers": {str(i + 1): f for i, f in enumerate(C.slow_factors(c, K)) if f > 1.0}}


def _num(v, fmt: str, unit: str = "") -> str:
    return "-" if v is None else f"{v:{fmt}}{unit}"


def _rng(r: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    rg = r.get(key + "_range")
    if not rg or r.get("repeats", 1) < 2:
        return ""
    return f" [{rg[0] * scale:{fmt}}-{rg[1] * scale:{fmt}}]"


def format_link(row: dict, repeats: int = 1) -> str:
    med = "median of %d [min-max]" % repeats if repeats > 1 else ""
    burst = f"tbf burst {row['burst_bytes']:,} B" if row.get("burst_bytes") else ""
    lines = [f"  link {row['link']}:" + (f" ({', '.join(x for x in (burst, med) if x)})" if burst or med else "")]
    w1 = 24 if repeats > 1 else 11
    lines.append(f"    {'schedule':<16}{'window':>7}{'samples/s':>{w1}}{'test acc':>{w1}}{'steps to tgt':>{w1 + 2}}"
                 f"{'time to tgt':>{w1 + 2}}  relay added ms (median/p99)  kB/step up/down per link, link use")
    for label, r in row["runs"].items():
        rel = r.get("relay") or {}
        add = rel.get("added_ms") or {}
        rel_s = "-" if not rel.get("chunks") else f"{add.get('median')}/{add.get('p99')}"
        win = ",".join(map(str, r.get("windows_used") or [])) or "-"
        if r.get("window_auto"):
            win += "a"
        sps = _num(r["samples_per_s"], ".0f") + _rng(r, "samples_per_s", ".0f")
        acc = _num(None if r["test_metric"] is None else 100 * r["test_metric"], ".2f", "%") \
            + _rng(r, "test_metric", ".2f", 100)
        stt = _num(r.get("steps_to_target"), ".0f") + _rng(r, "steps_to_target", ".0f")
        ttt = _num(r.get("time_to_target_s"), ".2f", "s") + _rng(r, "time_to_target_s", ".2f")
        if r.get("target_accuracy") and r.get("repeats", 1) > 1 and r.get("reached_target") != r["repeats"]:
            ttt += f" ({r.get('reached_target')}/{r['repeats']} reached)"
        note = load.busy_note(r.get("load"))
        lines.append(f"    {label:<16}{win:>7}{sps:>{w1}}{acc:>{w1}}{stt:>{w1 + 2}}{ttt:>{w1 + 2}}  {rel_s}"
                     + f"  {_traffic_cell(r.get('traffic'))}" + (f"  {note}" if note else ""))
    if any(load.is_busy(r.get("load")) for r in row["runs"].values()):
        lines.append(f"    (busy: other processes took more than {100 * load.BUSY_SHARE:.0f}% of the machine's CPU "
                     f"while the run ran{', in its busiest repeat' if repeats > 1 else ''}; no verdict is drawn "
                     "from it)")
    lines += format_link_straggler(row)
    return "\n".join(lines)


def _traffic_cell(t: dict | None) -> str:
    if not t:
        return "-"
    out = f"{t['fwd_bytes_per_step'] / 1024:.1f}/{t['bwd_bytes_per_step'] / 1024:.1f}"
    if t.get("link_use") is not None:
        out += f", {100 * t['link_use']:.0f}%"
    if t.get("compression") and abs(t["compression"] - 1) > 1e-3:
        out += f" (coded {t['compression']:.2f}x smaller)"
    return out


def format_wires(res: dict) -> str:
    """With ``--wires``: per link and codec setting, each schedule's time to target against
    uncompressed backprop (the first setting's backprop) and backprop with the same codecs,
    and its final accuracy and bytes per step against the same schedule with the first
    setting's codecs."""
    wires = [tuple(w) for w in res.get("wires") or []]
    if len(wires) < 2:
        return ""
    base = wire_label(wires[0])
    lines = [f"  codecs (against {base}): time to target vs backprop {base} and vs backprop with the same "
             "codecs (below 1: sooner); final accuracy and bytes per step vs the same schedule with " + base]
    for row in res["links"]:
        runs = row["runs"]
        lines.append(f"    {row['link']}:")
        for label, r in runs.items():
            name, _, wl = label.rpartition(" ")
            ref = runs.get(f"{name} {base}") or {}
            bp0 = (runs.get(f"backprop {base}") or {}).get("time_to_target_s")
            bpw = (runs.get(f"backprop {wl}") or {}).get("time_to_target_s")
            t = r.get("time_to_target_s")
            parts = [f"{label:<28}", f"time {_num(t, '.2f', 's'):>8}"]
            parts.append(f"vs bp {base} {t / bp0:.2f}x" if t and bp0 else f"vs bp {base} -")
            parts.append(f"vs bp {wl} {t / bpw:.2f}x" if t and bpw and wl != base else "")
            if r.get("test_metric") is not None and ref.get("test_metric") is not None:
                parts.append(f"acc {100 * (r['test_metric'] - ref['test_metric']):+.2f} pts")
            tr, tr0 = r.get("traffic") or {}, ref.get("traffic") or {}
            for key, word in (("fwd_bytes_per_step", "up"), ("bwd_bytes_per_step", "down")):
                if tr.get(key) and tr0.get(key):
                    parts.append(f"{word} {tr[key] / tr0[key]:.2f}x bytes")
            why = load.not_a_verdict(r.get("load"), (runs.get(f"backprop {base}") or {}).get("load"))
            lines.append("      " + "  ".join(p for p in parts if p) + (f" ({why})" if why else ""))
    return "\n".join(lines)


def format_link_straggler(row: dict) -> list[str]:
    """The straggler's cost on one link: per schedule, samples/s and time to the target
    without and with it, and the ratios with / without."""
    slowed = row.get("straggler_runs")
    if not slowed:
        return []
    lines = [f"    with the straggler: {'schedule':<16}{'samples/s':>10}{'with':>9}{'ratio':>8}"
             f"{'time to tgt':>13}{'with':>9}{'ratio':>8}"]
    for label, r in slowed.items():
        b, q = row["runs"][label], row["straggler_ratios"][label]
        t0, t1 = b.get("time_to_target_s"), r.get("time_to_target_s")
        why = q.get("not_a_verdict") or ""
        lines.append(f"    {'':<20}{label:<16}{_num(b['samples_per_s'], '.0f'):>10}{_num(r['samples_per_s'], '.0f'):>9}"
                     f"{_num(q.get('samples_per_s'), '.2f', 'x'):>8}{_num(t0, '.2f', 's'):>13}{_num(t1, '.2f', 's'):>9}"
                     f"{_num(q.get('time_to_target'), '.2f', 'x'):>8}" + (f"  ({why})" if why else ""))
    return lines


def format_staleness(res: dict) -> str:
    """The in-flight windows' cost: one row per link and window-variant label."""
    if not res.get("windows"):
        return ""
    tgt = res.get("target_accuracy")
    lines = [f"  staleness: SG-target lag = forward steps a layer ran between a step and its SG target's arrival "
             f"(pooled over layers{' and repeats' if res.get('repeats', 1) > 1 else ''})"]
    lines.append(f"    {'link':<16}{'run':<16}{'final acc':>10}{'steps to ' + (f'{100 * tgt:.0f}%' if tgt else 'tgt'):>13}"
                 f"{'time':>9}{'samples/s':>11}  lag mean/p50/p90/max   share of lag 0,1,2,..")
    for row in res["links"]:
        for label, r in row["runs"].items():
            if r.get("window_asked") is None:
                continue
            lag = r.get("sg_lag")
            if lag:
                mx = f"{lag['max']}{'+' if lag['max_is_open'] else ''}"
                lag_s = f"{lag['mean']:.2f}/{lag['median']}/{lag['p90']}/{mx}"
                top = lag["max"] + 1
                share = " ".join(f"{100 * x:.0f}" for x in lag["share"][:min(top, 10)]) + (" .." if top > 10 else "")
            else:
                lag_s, share = "-", ""
            lines.append(f"    {row['link']:<16}{label:<16}{_num(None if r['test_metric'] is None else 100 * r['test_metric'], '.2f', '%'):>10}"
                         f"{_num(r.get('steps_to_target'), '.0f'):>13}{_num(r.get('time_to_target_s'), '.2f', 's'):>9}"
                         f"{_num(r['samples_per_s'], '.0f'):>11}  {lag_s:<22}{share}")
    return "\n".join(lines)


def format_lab_bench(res: dict) -> str:
    lines = [f"bench --lab: {res['layers']} layers {'-'.join(map(str, res['widths']))}, batch {res['batch_size']}, "
             f"{res['steps']} steps, feeder host {res['feeder_host']}, max-inflight {res.get('max_inflight')}"
             + (f", {res['repeats']} repeats per cell" if res.get("repeats", 1) > 1 else "")]
    st = res.get("straggler")
    if st:
        layers = ", ".join(f"layer {k} x{v:g}" for k, v in st["layers"].items())
        lines.append(f"  straggler {st['label']} ({layers}): every run is followed by the same run with those layers' "
                     "training computes taking that many times as long (links not slowed); ratios are with / "
                     "without")
    for s, why in (res.get("skipped") or {}).items():
        lines.append(f"  {s}: not run in the lab ({why})")
    for row in res["links"]:
        lines.append(format_link(row, res.get("repeats", 1)))
    labels = list(res["links"][0]["runs"]) if res["links"] else []
    ref = next((x for x in labels if x == "async"), None)
    if ref and len(labels) > 1:
        lines.append("")
        lines.append("  async against each other schedule: samples/s ratio (above 1: async faster), and time to "
                     "target ratio (below 1: async reaches it sooner):")
        for row in res["links"]:
            a = row["runs"][ref]
            parts = []
            for s in labels:
                if s == ref:
                    continue
                o = row["runs"][s]
                t = ""
                if a.get("time_to_target_s") and o.get("time_to_target_s"):
                    t = f", time {a['time_to_target_s'] / o['time_to_target_s']:.2f}x"
                why = load.not_a_verdict(a.get("load"), o.get("load"))
                parts.append(f"{s} {a['samples_per_s'] / o['samples_per_s']:.2f}x{t}" + (f" ({why})" if why else ""))
            lines.append(f"    {row['link']:<18} " + "; ".join(parts))
    if res.get("target_accuracy") and len(labels) > 1:
        lines.append("")
        lines.append(f"  first to {100 * res['target_accuracy']:.0f}% per link, and its lead over backprop:")
        for row in res["links"]:
            hit = sorted((r["time_to_target_s"], s) for s, r in row["runs"].items() if r.get("time_to_target_s"))
            if not hit:
                lines.append(f"    {row['link']:<18} none reached it")
                continue
            bp = (row["runs"].get("backprop") or {}).get("time_to_target_s")
            lead = f" ({bp / hit[0][0]:.2f}x sooner than backprop)" if bp and hit[0][1] != "backprop" else ""
            busy = [s for s, r in row["runs"].items() if load.is_busy(r.get("load"))]
            shares = [load.share(r.get("load")) for r in row["runs"].values()]
            shares = [x for x in shares if x is not None]
            if busy or (shares and max(shares) - min(shares) >= load.BUSY_SHARE):
                lead += (f" (not a verdict: other work took {100 * min(shares):.0f}% to {100 * max(shares):.0f}% "
                         "of the CPU across the runs)")
            lines.append(f"    {row['link']:<18} {hit[0][1]} in {hit[0][0]:.2f}s{lead}")
    st = format_staleness(res)
    if st:
        lines += ["", st]
    wt = format_wires(res)
    if wt:
        lines += ["", wt]
    return "\n".join(lines)


def _csv_base(row: dict, label: str, r: dict) -> dict:
    """The CSV row of one cell (link and schedule): medians, min and max over repeats."""
    rel = r.get("relay") or {}
    lag = r.get("sg_lag") or {}
    base = {"link": row["link"], "rate": row["rate"], "delay_ms": row["delay_ms"], "schedule": label,
            "repeats": r.get("repeats", 1),
            "window": ",".join(map(str, r.get("windows_used") or []))}
    for k in MEDIAN_KEYS:
        rg = r.get(k + "_range") or [None, None]
        base.update({k: r.get(k), k + "_min": rg[0], k + "_max": rg[1]})
    tr = r.get("traffic") or {}
    base.update({k: tr.get(k) for k in ("fwd_bytes_per_step", "bwd_bytes_per_step", "bwd_msgs_per_step",
                                         "compression", "egress_mbit_s", "link_use")})
    base["wire"] = "/".join(r.get("wire") or [])
    base.update({"other_share": load.share(r.get("load")),
                 "sg_lag_mean": lag.get("mean"), "sg_lag_p90": lag.get("p90"),
                 "relay_added_median_ms": (rel.get("added_ms") or {}).get("median"),
                 "relay_added_p99_ms": (rel.get("added_ms") or {}).get("p99"), "layer": ""})
    return base


def csv_rows(res: dict) -> list[dict]:
    """One row per link and schedule (medians, min and max over repeats), then one per layer;
    with a straggler, each link's slowed runs after them (``straggler``: its entries), with
    ``slowdown_samples_per_s`` and ``slowdown_time_to_target`` (with / without)."""
    rows = []
    label_st = (res.get("straggler") or {}).get("label")
    for row in res["links"]:
        for label, r in row["runs"].items():
            base = _csv_base(row, label, r)
            if label_st:
                base["straggler"] = ""
            rows.append(base)
            for L in r["per_layer"]:
                rows.append({"link": row["link"], "rate": row["rate"], "delay_ms": row["delay_ms"],
                             "schedule": label, **L} | ({"straggler": ""} if label_st else {}))
        for label, r in (row.get("straggler_runs") or {}).items():
            q = row["straggler_ratios"][label]
            rows.append(_csv_base(row, label, r) | {"straggler": label_st,
                                                    "slowdown_samples_per_s": q.get("samples_per_s"),
                                                    "slowdown_time_to_target": q.get("time_to_target")})
            for L in r["per_layer"]:
                rows.append({"link": row["link"], "rate": row["rate"], "delay_ms": row["delay_ms"],
                             "schedule": label, **L, "straggler": label_st})
    return rows


PLOT_HINT = "plot skipped: matplotlib is not installed (pip install matplotlib, or pip install -e '.[plot]')"


def _axes_groups(res: dict):
    """The link settings as two series: against rate (links with the smallest delay) and
    against delay (links with the highest rate); each sorted along its axis."""
    links = res["links"]
    if not links:
        return [], []
    d0 = min(r["delay_ms"] for r in links)
    by_rate = sorted([r for r in links if r["delay_ms"] == d0], key=lambda r: r["rate_bits"] or float("inf"))
    top = max((r["rate_bits"] or float("inf")) for r in links)
    by_delay = sorted([r for r in links if (r["rate_bits"] or float("inf")) == top], key=lambda r: r["delay_ms"])
    return by_rate, by_delay


def write_plot(directory: str, res: dict) -> str | None:
    """samples/s and time to target against link rate and against delay, one line per
    schedule (error bars: min-max over repeats); None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return None
    Path(directory).mkdir(parents=True, exist_ok=True)
    by_rate, by_delay = _axes_groups(res)
    labels = list(res["links"][0]["runs"]) if res["links"] else []
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), squeeze=False)
    tgt = res.get("target_accuracy") or 0
    metrics = (("samples_per_s", "samples/s"),
               ("time_to_target_s", f"seconds to {100 * tgt:.0f}% test accuracy") if tgt else
               ("train_time_s", "training time, s (no --target-accuracy)"))
    cols = ((by_rate, "link rate (one-way delay %g ms)" % (by_rate[0]["delay_ms"] if by_rate else 0),
             lambda r: r["rate"]),
            (by_delay, "one-way delay per link, ms (rate %s)" % (by_delay[0]["rate"] if by_delay else "-"),
             lambda r: r["delay_ms"]))
    markers = "osD^v<>ph*"
    for ci, (group, xlabel, xname) in enumerate(cols):
        xs = [xname(r) for r in group]
        for mi, (key, ylabel) in enumerate(metrics):
            ax = axes[mi][ci]
            for li, lab in enumerate(labels):
                ys, lo, hi = [], [], []
                for r in group:
                    run = r["runs"].get(lab) or {}
                    y = run.get(key)
                    rg = run.get(key + "_range") if run.get("repeats", 1) > 1 else None
                    ys.append(float("nan") if y is None else y)
                    lo.append(0 if (y is None or not rg) else max(0.0, y - rg[0]))
                    hi.append(0 if (y is None or not rg) else max(0.0, rg[1] - y))
                ax.errorbar(xs, ys, yerr=[lo, hi], marker=markers[li % len(markers)], capsize=3, label=lab)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "2357" else ""))
            ax.grid(alpha=0.3)
            if not group:
                ax.text(0.5, 0.5, "no link setting on this axis", ha="center", transform=ax.transAxes)
    rep = res.get("repeats", 1)
    fig.suptitle(f"bench --lab: {res['layers']} layers {'-'.join(map(str, res['widths']))}, batch "
                 f"{res['batch_size']}, {res['steps']} steps" + (f", median of {rep} (bars: min-max)" if rep > 1 else "")
                 + ("; a missing point: target not reached" if tgt else ""), y=0.995, fontsize=11)
    h, lab_ = axes[0][0].get_legend_handles_labels()
    ncol = min(5, max(1, len(lab_)))
    legend_rows = -(-len(lab_) // ncol)
    fig.legend(h, lab_, loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=ncol, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95 - 0.03 * legend_rows))
    path = str(Path(directory) / "lab.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
