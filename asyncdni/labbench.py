"""``asyncdni bench --lab``: every schedule over emulated links (root only).

For each link setting (rate, one-way delay per link) a lab is made (``lab.py``): one
namespace host per layer (the feeder shares layer 1's host unless ``feeder_host="own"``),
an ``asyncdni agent`` in each, the coordinator in the root namespace on the bridge
address. The same model, data and seed then run under every schedule through the agents
launcher, with ``Lab.route`` putting a delaying relay in front of every inbox a peer on
another host sends to. Each run reports samples/s, time to the target accuracy, final
accuracy, per layer busy / wait / communicate time and bytes, and the delay the relays
actually added (median and p99 per chunk).
"""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import config as C
from . import coordinator, report
from .bench import _layer_rows
from .lab import Lab, LabError, parse_delay, parse_rate, rate_bits

DEFAULT_LINKS = "unshaped:0,unshaped:5,1gbit:0,100mbit:0"
LAB_SCHEDULES = ("sequential", "async", "backprop", "pipeline")
AGENT_WAIT = 60.0


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
                       "--name", name, "--bind", lab.addresses[i], "--wait", str(int(AGENT_WAIT))],
                   stdout=log, stderr=subprocess.STDOUT)
        log.close()


def run_link(cfg: C.RunConfig, schedules, rate: str | None, delay_ms: float, datasets, *,
             feeder_host: str = "shared", prefix: str = "adb-", subnet: str = "10.76.0.0/24",
             log=None) -> dict:
    """Every schedule over one link setting; returns {schedule: summary}."""
    from asyncdni.launch.agents import AgentsLauncher
    log = log or (lambda line: None)
    K = cfg.model.layers if not cfg.model.widths else len(cfg.model.widths) + 1
    n_hosts = K + (1 if feeder_host == "own" else 0)
    names = [f"h{i}" for i in range(n_hosts)]
    runs: dict = {}
    with Lab(hosts=n_hosts, rate=rate, delay_ms=delay_ms, prefix=prefix, subnet=subnet) as lab, \
            tempfile.TemporaryDirectory(prefix="asyncdni-lab-") as tmp:
        port = _free_port(lab.bridge_ip)
        listen = f"{lab.bridge_ip}:{port}"
        c0 = C.replace(cfg, **{"runtime.launcher": "agents", "runtime.listen": listen,
                               "runtime.hosts": tuple(names), "runtime.security": "insecure",
                               "runtime.progress": False})
        _start_agents(lab, names, port, Path(tmp))
        launcher = AgentsLauncher.from_config(c0)
        try:
            for s in schedules:
                log(f"bench --lab: {link_label(rate, delay_ms)} running {s} ...")
                c = C.replace(c0, **{"train.schedule": s})
                try:
                    r = coordinator.run(c, datasets=datasets, launcher=launcher, route=lab.route)
                finally:
                    relay = lab.stop_relays(refill=s != schedules[-1])
                summ = report.run_summary(r)
                summ["per_layer"] = _layer_rows(summ["per_layer"])
                summ["relay"] = {k: relay.get(k) for k in ("delay_ms", "chunks", "backlogged", "added_ms",
                                                           "on_time_ms")}
                runs[s] = summ
        finally:
            launcher.close()
    return runs


def lab_bench(cfg: C.RunConfig, schedules=LAB_SCHEDULES, links=None, *, feeder_host: str = "shared",
              prefix: str = "adb-", subnet: str = "10.76.0.0/24", log=None) -> dict:
    """Every schedule under every link setting; a plain-data result."""
    from .model import load_datasets, make_plan
    if feeder_host not in ("shared", "own"):
        raise C.ConfigError(f"--feeder-host {feeder_host!r}: expected shared or own")
    links = parse_links(DEFAULT_LINKS) if links is None else links
    cfg = C.replace(cfg, **{"runtime.checkpoint_every": 0, "runtime.checkpoint_dir": "", "runtime.resume": "",
                            "runtime.max_restarts": 0})
    datasets = load_datasets(cfg)
    plan = make_plan(cfg, datasets[0])
    rows = []
    t0 = time.monotonic()
    for rate, delay in links:
        runs = run_link(cfg, list(schedules), rate, delay, datasets, feeder_host=feeder_host, prefix=prefix,
                        subnet=subnet, log=log)
        rows.append({"link": link_label(rate, delay), "rate": rate or "unshaped", "rate_bits": rate_bits(rate),
                     "delay_ms": delay, "runs": runs})
        if log:
            log(format_link(rows[-1]))
    return {"layers": plan.n_layers, "widths": list(plan.widths), "batch_size": plan.batch_size,
            "steps": plan.steps, "samples": plan.steps * plan.batch_size, "feeder_host": feeder_host,
            "target_accuracy": cfg.train.target_accuracy or None, "links": rows,
            "wall_s": time.monotonic() - t0}


def format_link(row: dict) -> str:
    lines = [f"  link {row['link']}:"]
    lines.append(f"    {'schedule':<11}{'samples/s':>10}{'train s':>9}{'test acc':>9}{'to target':>10}"
                 f"{'relay added ms (median/p99)':>30}")
    for s, r in row["runs"].items():
        ttt = r.get("time_to_target_s")
        rel = r.get("relay") or {}
        add = rel.get("added_ms") or {}
        rel_s = "-" if not rel.get("chunks") else f"{add.get('median')}/{add.get('p99')}"
        lines.append(f"    {s:<11}{r['samples_per_s']:>10.0f}{r['train_time_s']:>9.2f}"
                     f"{100 * r['test_metric']:>8.2f}%{'-' if ttt is None else f'{ttt:.2f}s':>10}{rel_s:>30}")
    return "\n".join(lines)


def format_lab_bench(res: dict) -> str:
    lines = [f"bench --lab: {res['layers']} layers {'-'.join(map(str, res['widths']))}, batch {res['batch_size']}, "
             f"{res['steps']} steps, feeder host {res['feeder_host']}"]
    for row in res["links"]:
        lines.append(format_link(row))
    scheds = list(res["links"][0]["runs"]) if res["links"] else []
    if "async" in scheds and len(scheds) > 1:
        lines.append("")
        lines.append("  async against each other schedule: samples/s ratio (above 1: async faster), and time to "
                     "target ratio (below 1: async reaches it sooner):")
        for row in res["links"]:
            a = row["runs"]["async"]
            parts = []
            for s in scheds:
                if s == "async":
                    continue
                o = row["runs"][s]
                t = ""
                if a.get("time_to_target_s") and o.get("time_to_target_s"):
                    t = f", time {a['time_to_target_s'] / o['time_to_target_s']:.2f}x"
                parts.append(f"{s} {a['samples_per_s'] / o['samples_per_s']:.2f}x{t}")
            lines.append(f"    {row['link']:<18} " + "; ".join(parts))
    return "\n".join(lines)


def csv_rows(res: dict) -> list[dict]:
    rows = []
    for row in res["links"]:
        for s, r in row["runs"].items():
            rel = r.get("relay") or {}
            base = {"link": row["link"], "rate": row["rate"], "delay_ms": row["delay_ms"], "schedule": s,
                    "samples_per_s": r["samples_per_s"], "train_time_s": r["train_time_s"],
                    "test_metric": r["test_metric"], "time_to_target_s": r.get("time_to_target_s"),
                    "relay_added_median_ms": (rel.get("added_ms") or {}).get("median"),
                    "relay_added_p99_ms": (rel.get("added_ms") or {}).get("p99"), "layer": ""}
            rows.append(base)
            for L in r["per_layer"]:
                rows.append({"link": row["link"], "rate": row["rate"], "delay_ms": row["delay_ms"],
                             "schedule": s, **L})
    return rows


def write_plot(directory: str, res: dict) -> str | None:
    """samples/s and time to target per link setting, one line per schedule; None without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    Path(directory).mkdir(parents=True, exist_ok=True)
    labels = [row["link"] for row in res["links"]]
    scheds = list(res["links"][0]["runs"]) if res["links"] else []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in scheds:
        a1.plot(labels, [row["runs"][s]["samples_per_s"] for row in res["links"]], marker="o", label=s)
        a2.plot(labels, [row["runs"][s].get("time_to_target_s") or float("nan") for row in res["links"]],
                marker="o", label=s)
    a1.set_ylabel("samples/s")
    a1.set_yscale("log")
    a2.set_ylabel(f"seconds to {100 * (res.get('target_accuracy') or 0):.0f}% test accuracy")
    for a in (a1, a2):
        a.set_xlabel("link (rate / one-way delay)")
        a.grid(alpha=0.3)
        a.legend()
        a.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    path = str(Path(directory) / "lab.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
