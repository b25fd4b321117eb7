"""Transport micro-benchmark: round trip and GB/s of the protocol against raw pyzmq.

Both modes use the same pair of sockets (PUSH out, PULL back, loopback TCP) to a peer
process, in many short trials interleaved pair by pair so that machine noise hits both alike:

* raw: ``send_multipart([array], copy=False)``; the peer rebuilds ``np.frombuffer``.
* protocol: ``transport.send`` (up to ``protocol.INLINE_MAX`` bytes of arrays: one frame,
  header and arrays; above: msgpack header frame + zero-copy array frame); the peer runs
  the full ``protocol.decode`` validation.
* curve: the protocol over a second pair of sockets with CURVE encryption and a ZAP
  allowlist, exactly as workers use them when traffic leaves the machine.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import numpy as np
import zmq

from asyncdni.wire import protocol as P
from asyncdni.wire import security
from asyncdni.wire import transport

SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)


def peer(out_ep: str, back_ep: str, curve_out_ep: str = "", curve_back_ep: str = "", keys=None) -> None:
    """The far end: consume (stream) or echo (ping-pong) messages as told. Commands always
    come on the plain pair; the data on the pair the command names."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(out_ep)
    push = ctx.socket(zmq.PUSH)
    push.connect(back_ep)
    pairs = {"plain": (pull, push)}
    socks = [pull, push]
    if curve_out_ep:
        own, server_out, server_back = (security.KeyPair.from_secret(keys[0].encode()), keys[1].encode(),
                                        keys[2].encode())
        cpull = transport.connect(ctx, zmq.PULL, curve_out_ep, curve=(own, server_out))
        cpush = transport.connect(ctx, zmq.PUSH, curve_back_ep, curve=(own, server_back))
        pairs["curve"] = (cpull, cpush)
        socks += [cpull, cpush]
    try:
        while True:
            cmd = json.loads(pull.recv())
            if cmd["mode"] == "quit":
                return
            src, dst = pairs["curve" if cmd["mode"] == "curve" else "plain"]
            proto = cmd["mode"] != "raw"
            for _ in range(cmd["n"]):
                frames = src.recv_multipart(copy=False)
                if proto:
                    msg = P.decode(frames)
                    a = msg.arrays[0]
                else:
                    a = np.frombuffer(frames[0].buffer, np.float32)
                if cmd["echo"]:
                    if proto:
                        transport.send(dst, P.BWD, msg.step, (a,))
                    else:
                        dst.send_multipart([a], copy=False)
            if not cmd["echo"]:
                dst.send(b"done")
    finally:
        for s in socks:
            s.close(0)
        ctx.term()


def codec_cost_us(size: int, number: int = 2000) -> tuple[float, float]:
    """In-process encode and decode time of one message of ``size`` bytes (best of 5)."""
    import timeit
    a = np.ones(size // 4, np.float32)
    frames = [bytes(f) for f in P.encode(P.BWD, 5, (a,))]
    enc = min(timeit.repeat(lambda: P.encode(P.BWD, 5, (a,)), number=number, repeat=5)) / number
    dec = min(timeit.repeat(lambda: P.decode(frames), number=number, repeat=5)) / number
    return enc * 1e6, dec * 1e6


MODES = ("raw", "protocol", "curve")


def run(sizes=SIZES, trials: int = 41, min_bytes: int = 16 << 20, log=None, curve: bool = True) -> list[dict]:
    """Many short paired trials (raw, protocol and CURVE back to back, order rotating): loopback
    on a 2-core machine drifts by tens of percent over seconds, and short trials run back
    to back cancel that drift where a few long trials did not (repeated runs agreed within a
    few percent)."""
    ctx = zmq.Context()
    out, out_ep = transport.bind(ctx, zmq.PUSH, "127.0.0.1")
    back, back_ep = transport.bind(ctx, zmq.PULL, "127.0.0.1")
    pairs = {"raw": (out, back), "protocol": (out, back)}
    modes = MODES if curve else MODES[:2]
    allow = None
    extra = ""
    socks = [out, back]
    if curve:
        server, client = security.KeyPair.new(), security.KeyPair.new()
        allow = security.Allowlist(ctx, [client.public])
        cout, cout_ep = transport.bind(ctx, zmq.PUSH, "127.0.0.1", curve=server)
        cback, cback_ep = transport.bind(ctx, zmq.PULL, "127.0.0.1", curve=server)
        pairs["curve"] = (cout, cback)
        socks += [cout, cback]
        keys = [client.secret.decode(), server.public.decode(), server.public.decode()]
        extra = f", {cout_ep!r}, {cback_ep!r}, {keys!r}"
    proc = subprocess.Popen([sys.executable, "-c",
                             f"from asyncdni.bench.transport import peer; peer({out_ep!r}, {back_ep!r}{extra})"])
    rows = []
    try:
        for size in sizes:
            a = np.random.default_rng(0).standard_normal(size // 4).astype(np.float32).reshape(-1, 256 if size >= 1024 else 1)
            n_stream = max(20, min(5000, min_bytes // size))
            n_ping = max(20, min(1000, (8 << 20) // size))
            res = {m: {"gbps": [], "rtt": []} for m in modes}
            ratios = {m: [] for m in modes[1:]}
            for trial in range(trials + 1):                  # trial 0 is warm-up
                k = trial % len(modes)
                order = modes[k:] + modes[:k]
                got = {}
                for mode in order:
                    got[mode] = _trial(out, *pairs[mode], a, mode, n_stream, n_ping)
                if trial:
                    for mode in order:
                        res[mode]["gbps"].append(got[mode][0])
                        res[mode]["rtt"].append(got[mode][1])
                    for mode in ratios:
                        ratios[mode].append(got[mode][0] / got["raw"][0])
            row = {"bytes": size}
            for mode in modes:
                row[f"{mode}_gbps"] = statistics.median(res[mode]["gbps"])
                row[f"{mode}_rtt_us"] = statistics.median(res[mode]["rtt"]) * 1e6
            # the median of paired ratios: each set ran back to back on the same sockets,
            # so machine noise that lasts longer than a set cancels out
            for mode in ratios:
                row[f"{mode}_vs_raw"] = statistics.median(ratios[mode])
            row["encode_us"], row["decode_us"] = codec_cost_us(size)
            rows.append(row)
            if log:
                log(format_row(row))
        out.send(json.dumps({"mode": "quit"}).encode())
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        transport.close_all(*socks)
        if allow is not None:
            allow.stop()
        ctx.term()
    return rows


def _trial(ctl, out, back, a, mode, n_stream, n_ping):
    proto = mode != "raw"
    # stream: n messages one way, one reply at the end
    ctl.send(json.dumps({"mode": mode, "n": n_stream, "echo": False}).encode())
    t0 = time.perf_counter()
    for i in range(n_stream):
        if proto:
            transport.send(out, P.BWD, i, (a,))
        else:
            out.send_multipart([a], copy=False)
    back.recv()
    dt = time.perf_counter() - t0
    gbps = n_stream * a.nbytes / dt / 1e9
    # ping-pong: median round trip
    ctl.send(json.dumps({"mode": mode, "n": n_ping, "echo": True}).encode())
    rtts = []
    for i in range(n_ping):
        t1 = time.perf_counter()
        if proto:
            transport.send(out, P.BWD, i, (a,))
            frames = back.recv_multipart(copy=False)
            P.decode(frames)
        else:
            out.send_multipart([a], copy=False)
            frames = back.recv_multipart(copy=False)
            np.frombuffer(frames[0].buffer, np.float32)
        rtts.append(time.perf_counter() - t1)
    return gbps, statistics.median(rtts)


def format_row(r: dict) -> str:
    size = r["bytes"]
    label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
    return (f"  {label:>7}  raw {r['raw_gbps']:6.2f} GB/s rtt {r['raw_rtt_us']:7.1f} us | protocol "
            f"{r['protocol_gbps']:6.2f} GB/s rtt {r['protocol_rtt_us']:7.1f} us | protocol/raw {100 * r['protocol_vs_raw']:5.1f}%"
            + (f" | curve {r['curve_gbps']:6.2f} GB/s rtt {r['curve_rtt_us']:7.1f} us, curve/raw "
               f"{100 * r['curve_vs_raw']:5.1f}%" if "curve_gbps" in r else "")
            + f" | encode {r['encode_us']:.1f} us decode {r['decode_us']:.1f} us")
