"""Small TCP probes for the network lab: a sink, an echo server, a bulk sender and a pinger.

    python -m asyncdni.lab.netprobe sink --bind HOST:PORT [--count N]
    python -m asyncdni.lab.netprobe echo --bind HOST:PORT [--count N]
    python -m asyncdni.lab.netprobe send --to HOST:PORT --bytes N [--chunk B]
    python -m asyncdni.lab.netprobe ping --to HOST:PORT [--count N] [--size B]

Servers print one JSON line ``{"listen": "HOST:PORT"}`` once they listen, and serve
``--count`` connections (default 1) before they exit. ``send`` writes N bytes in chunks,
half-closes, and prints the sink's own measurement as JSON: bytes, seconds from the first
to the last byte received, and Mbit/s. ``ping`` prints round-trip times (ms) of ``--size``
byte messages through an echo server. Standard library only; used by the lab's tests and
its link benchmark, run inside lab hosts with ``Lab.run_in``.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from asyncdni.lab.relay import parse_hostport, percentile


def _listen(bind: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(parse_hostport(bind))
    s.listen(8)
    host, port = s.getsockname()[:2]
    print(json.dumps({"listen": f"{host}:{port}"}), flush=True)
    return s


def sink(bind: str, count: int) -> None:
    s = _listen(bind)
    buf = bytearray(1 << 20)
    for _ in range(count):
        c, _ = s.accept()
        n, t0, t1 = 0, None, None
        while True:
            k = c.recv_into(buf)
            if not k:
                break
            t1 = time.perf_counter()
            if t0 is None:
                t0 = t1
            n += k
        secs = (t1 - t0) if t0 is not None else 0.0
        c.sendall(json.dumps({"bytes": n, "seconds": secs}).encode() + b"\n")
        c.close()


def echo(bind: str, count: int) -> None:
    s = _listen(bind)
    for _ in range(count):
        c, _ = s.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            d = c.recv(1 << 20)
            if not d:
                break
            c.sendall(d)
        c.close()


def send(to: str, nbytes: int, chunk: int) -> dict:
    c = socket.create_connection(parse_hostport(to), timeout=60)
    block = b"\0" * chunk
    t = time.perf_counter()
    left = nbytes
    while left > 0:
        c.sendall(block if left >= chunk else block[:left])
        left -= chunk
    c.shutdown(socket.SHUT_WR)
    reply = b""
    while not reply.endswith(b"\n"):
        d = c.recv(4096)
        if not d:
            break
        reply += d
    total = time.perf_counter() - t
    c.close()
    r = json.loads(reply)
    secs = r["seconds"] or total
    return {"bytes": r["bytes"], "seconds": secs, "sender_seconds": total,
            "mbit_s": r["bytes"] * 8 / secs / 1e6 if secs > 0 else None}


def ping(to: str, count: int, size: int) -> dict:
    c = socket.create_connection(parse_hostport(to), timeout=30)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"p" * size
    rtts = []
    for _ in range(count + 2):
        t = time.perf_counter()
        c.sendall(msg)
        n = 0
        while n < size:
            d = c.recv(size - n)
            if not d:
                raise ConnectionError("echo server closed the connection")
            n += len(d)
        rtts.append((time.perf_counter() - t) * 1e3)
    c.close()
    rtts = sorted(rtts[2:])                        # the first two warm the path up
    return {"count": count, "size": size, "rtt_ms": {"median": percentile(rtts, 50), "p99": percentile(rtts, 99),
                                                      "min": rtts[0], "max": rtts[-1]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m asyncdni.lab.netprobe", allow_abbrev=False)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("sink", "echo"):
        p = sub.add_parser(name)
        p.add_argument("--bind", required=True)
        p.add_argument("--count", type=int, default=1)
    p = sub.add_parser("send")
    p.add_argument("--to", required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--chunk", type=int, default=1 << 20)
    p = sub.add_parser("ping")
    p.add_argument("--to", required=True)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "sink":
            sink(a.bind, a.count)
        elif a.cmd == "echo":
            echo(a.bind, a.count)
        elif a.cmd == "send":
            print(json.dumps(send(a.to, a.bytes, a.chunk)), flush=True)
        else:
            print(json.dumps(ping(a.to, a.count, a.size)), flush=True)
    except (OSError, ValueError) as e:
        print(f"netprobe: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
