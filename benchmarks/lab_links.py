"""The network lab's links and its delay relay, measured (root only).

    sudo .venv/bin/python -m benchmarks.lab_links [--delay MS] [--rates unshaped,1gbit,100mbit]
                                                  [--mbytes N] [--burst auto|BYTES] [--json FILE]

For each link rate, a 2-host lab (prefix ``adb-``, subnet 10.76.0.0/24): bulk transfer
host 0 -> host 1 in 1 MiB writes, direct and through a relay that adds ``--delay`` ms per
direction, and 64-byte round trips the same two ways. The relay's own account of the
delay it added (median and p99 per chunk) is printed next to it. Targets: a shaped link
carries 80-105% of its rate; the relay adds the delay within 0.5 ms (median) and does not
cut a 1 Gbit/s link's throughput by more than 20%.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from asyncdni.lab.namespaces import Lab, LabError, _read_line, rate_bits

PREFIX, SUBNET = "adb-", "10.76.0.0/24"


def _server(lab: Lab, host: int, kind: str) -> tuple[subprocess.Popen, str]:
    p = lab.run_in(host, [sys.executable, "-m", "asyncdni.lab.netprobe", kind, "--bind", f"{lab.addresses[host]}:0",
                          "--count", "1"], stdout=subprocess.PIPE)
    line = _read_line(p.stdout, time.monotonic() + 15)
    try:
        return p, json.loads(line)["listen"]
    except (ValueError, KeyError):
        raise LabError(f"probe {kind} did not start in host {host}") from None


def _client(lab: Lab, host: int, args: list[str], timeout: float = 120) -> dict:
    p = lab.run_in(host, [sys.executable, "-m", "asyncdni.lab.netprobe", *args], stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise LabError(f"probe {args[0]} failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
    return json.loads(out)


def bulk(lab: Lab, nbytes: int, via_relay: bool) -> dict:
    srv, listen = _server(lab, 1, "sink")
    to = lab.relay(listen) if via_relay else listen
    r = _client(lab, 0, ["send", "--to", to, "--bytes", str(nbytes)])
    srv.wait(10)
    if via_relay:
        r["relay"] = {k: v for k, v in lab.relay_stats(only=[to]).items() if k != "relays"}
    return r


def ping(lab: Lab, via_relay: bool, count: int = 200) -> dict:
    srv, listen = _server(lab, 1, "echo")
    to = lab.relay(listen) if via_relay else listen
    r = _client(lab, 0, ["ping", "--to", to, "--count", str(count)])
    srv.wait(10)
    if via_relay:
        r["relay"] = {k: v for k, v in lab.relay_stats(only=[to]).items() if k != "relays"}
    return r


def measure(rate: str | None, delay_ms: float, nbytes: int, log=print, burst: str = "auto") -> dict:
    with Lab(hosts=2, rate=rate, delay_ms=delay_ms, prefix=PREFIX, subnet=SUBNET, burst=burst) as lab:
        row = {"rate": rate or "unshaped", "delay_ms": delay_ms, "burst_bytes": int(lab.burst) if rate else None}
        row["direct"] = bulk(lab, nbytes, False)
        row["relayed"] = bulk(lab, nbytes, True)
        row["ping_direct"] = ping(lab, False)
        row["ping_relayed"] = ping(lab, True)
    d, r = row["direct"], row["relayed"]
    bits = rate_bits(rate)
    rel = r["relay"]
    log(f"{row['rate']:>9}{'' if not rate else f' (burst {lab.burst} B)'}  direct {d['mbit_s']:8.1f} Mbit/s"
        + (f" ({100 * d['mbit_s'] * 1e6 / bits:5.1f}% of rate)" if bits else " " * 18)
        + f"  relayed {r['mbit_s']:8.1f} Mbit/s ({100 * r['mbit_s'] / d['mbit_s']:5.1f}% of direct)"
        + f"  rtt direct {row['ping_direct']['rtt_ms']['median']:.3f} ms, relayed "
          f"{row['ping_relayed']['rtt_ms']['median']:.3f} ms (p99 {row['ping_relayed']['rtt_ms']['p99']:.3f})")
    pr = row["ping_relayed"]["relay"]
    log(f"{'':>9}  relay added per chunk: bulk median {rel['added_ms']['median']} p99 {rel['added_ms']['p99']} ms "
        f"(on time: median {rel['on_time_ms']['median']} p99 {rel['on_time_ms']['p99']} ms, "
        f"{rel['backlogged']}/{rel['chunks']} chunks queued behind the link); "
        f"ping median {pr['added_ms']['median']} p99 {pr['added_ms']['p99']} ms")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lab_links")
    ap.add_argument("--delay", type=float, default=5.0, help="relay delay, ms each way (default 5)")
    ap.add_argument("--rates", default="unshaped,1gbit,100mbit")
    ap.add_argument("--mbytes", type=int, default=0, help="MiB per bulk transfer (default: about 2 s at the rate)")
    ap.add_argument("--burst", default="auto", help="tbf's bucket: a size (25000, 64kb) or auto (default)")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    rows = []
    try:
        for rate in a.rates.split(","):
            rate = None if rate == "unshaped" else rate
            bits = rate_bits(rate) or 4e9
            mb = a.mbytes or max(8, min(512, int(bits * 2 / 8 / (1 << 20))))
            rows.append(measure(rate, a.delay, mb << 20, burst=a.burst))
    except LabError as e:
        print(f"lab_links: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
