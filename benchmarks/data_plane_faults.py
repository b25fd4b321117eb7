"""How long a broken data plane takes to end a run (or to be replayed), across namespace hosts.

Three namespace hosts on a bridge (asyncdni.lab), one ``asyncdni agent`` in each, the
coordinator in the root namespace; the MLP default (4 x 256, addition data), ``async``.
Once the feeder reports step 100, one fault is made between layer 1's host and layer 2's:

* ``partition``: a blackhole route on layer 1's host to layer 2's address (both still reach
  the head, so every heartbeat stays healthy);
* ``reset``: ``ss -K`` on layer 2's host, five times 0.2 s apart (TCP resets on every
  connection from layer 1's host; zmq reconnects, a message in flight is lost);
* ``relay``: layer 2's forward inbox sits behind a lab relay (1 ms), which is SIGKILLed.

Each case prints the seconds from the fault to the run's end and the line it ended with;
``--restarts`` runs them with checkpoints every 100 steps and ``--max-restarts 3`` instead
and prints the restarts. Needs root (network namespaces). Not part of ``make test``.

    sudo .venv/bin/python -m benchmarks.data_plane_faults [--stall-timeout S] [--restarts]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time

from asyncdni import config
from asyncdni.engine import coordinator
from asyncdni.lab.namespaces import Lab, LabError

PREFIX, SUBNET = "adf-", "10.79.0.0/24"


def _agents(lab: Lab, port: int):
    return [lab.run_in(i, [sys.executable, "-m", "asyncdni.cli", "agent", "--join", f"tcp://{lab.bridge_ip}:{port}",
                           "--name", f"h{i}", "--bind", lab.addresses[i], "--wait", "60", "--insecure"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(lab.n)]


def _ns(lab: Lab, host: int, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", lab.names[host], *argv], capture_output=True, text=True, timeout=30)


def one_case(lab: Lab, case: str, port: int, stall: float, restarts: bool, ckdir: str) -> dict:
    a2 = lab.addresses[2]
    relays = []
    route = None
    if case == "relay":
        def route(peers):
            out = [dict(p) for p in peers]
            out[2]["fwd"] = "tcp://" + lab.relay(peers[2]["fwd"], delay_ms=1.0)
            relays.append(lab._relays[-1]["proc"])
            return out

    def fault():
        if case == "partition":
            _ns(lab, 1, ["ip", "route", "add", "blackhole", f"{a2}/32"])
        elif case == "reset":
            for _ in range(5):
                out = _ns(lab, 2, ["ss", "-K", "dst", lab.addresses[1]]).stdout.strip().splitlines()
                box["killed"] = box.get("killed", 0) + max(0, len(out) - 1)   # a line per socket, after the header
                time.sleep(0.2)
        else:
            relays[0].kill()

    ov = {"train.schedule": "async", "runtime.launcher": "agents", "runtime.listen": f"{lab.bridge_ip}:{port}",
          "runtime.hosts": "h0,h1,h2,h2,h2", "runtime.security": "insecure", "runtime.progress": False,
          # a reset may lose nothing (the run then completes): that case runs a bounded number of steps
          "runtime.stall_timeout": stall, "train.steps": 3000 if restarts or case == "reset" else 1_000_000}
    if restarts:
        ov.update({"runtime.checkpoint_every": 100, "runtime.max_restarts": 3, "runtime.checkpoint_dir": ckdir})
    cfg = config.build(overrides=ov)
    box: dict = {}

    def on_started(c):
        if box:
            return
        box["armed"] = True

        def go():
            while c.progress_done < 100:
                time.sleep(0.005)
            box["t"] = time.monotonic()
            fault()
        threading.Thread(target=go, daemon=True).start()

    agents = _agents(lab, port)
    try:
        try:
            res = coordinator.run(cfg, on_started=on_started, route=route)
            end = f"completed {res.feeder['completed']} steps; restarts: " + (
                "; ".join(f"from step {r['resumed_from_step']} ({r['error'][:60]}...)" for r in res.restarts) or "none")
        except coordinator.RunError as e:
            end = str(e)
        took = time.monotonic() - box.get("t", time.monotonic())
    finally:
        for p in agents:
            p.kill()
            p.wait(10)
        if case == "partition":
            _ns(lab, 1, ["ip", "route", "del", "blackhole", f"{a2}/32"])
        lab.stop_relays(refill=False)
    if case == "reset":
        end = f"{box.get('killed', 0)} connections reset; {end}"
    return {"case": case, "seconds": took, "end": end}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.data_plane_faults", allow_abbrev=False)
    ap.add_argument("--stall-timeout", type=float, default=0.0, help="runtime.stall_timeout (default 0: auto)")
    ap.add_argument("--restarts", action="store_true", help="checkpoints every 100 steps and --max-restarts 3")
    ap.add_argument("--cases", default="partition,reset,relay")
    args = ap.parse_args(argv)
    try:
        with Lab(hosts=3, prefix=PREFIX, subnet=SUBNET) as lab, tempfile.TemporaryDirectory() as tmp:
            for k, case in enumerate(args.cases.split(",")):
                r = one_case(lab, case, 47900 + k, args.stall_timeout, args.restarts, f"{tmp}/ck{k}")
                print(f"{r['case']:>9}: {r['seconds']:5.1f} s from the fault to the end: {r['end']}", flush=True)
    except LabError as e:
        print(f"data_plane_faults: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
