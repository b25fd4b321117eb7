"""What a link codec costs in CPU time, against what it saves on the wire.

For each codec (fp16, bf16, int8:row, int8:tensor, topk:0.1) on one float32 tensor of
--rows x --features (default 64 x 256: 64 KiB, a hidden activation of the MNIST preset):
the median over --repeats repeats of the time of one encode + decode (a loop of --calls
calls per repeat, timed with time.perf_counter), the bytes of its wire arrays and their
ratio to fp32's, and that time as a share of the time fp32's bytes take to send at
1 Gbit/s and at 100 Mbit/s (64 KiB: 524.288 us and 5242.88 us). Decode includes its
validation, as a receiver runs it. The target: int8 encode + decode within 20% of the
time of sending the fp32 tensor at 1 Gbit/s (about 105 us for 64 KiB).

    python -m benchmarks.codec_cost                     # 64 x 256, 7 repeats
    python -m benchmarks.codec_cost --rows 128 --features 1024 --repeats 11

Single-threaded numpy; a loaded machine makes every figure larger. Not part of ``make test``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from asyncdni.wire import codec as wc

CODECS = ("fp16", "bf16", "int8:row", "int8:tensor", "topk:0.1")
LINKS = (("1 Gbit/s", 1e9), ("100 Mbit/s", 1e8))
TARGET_CODEC, TARGET_SHARE = "int8:row", 0.20


def send_us(nbytes: int, bits_per_s: float) -> float:
    return nbytes * 8 / bits_per_s * 1e6


def time_codec(c: wc.Codec, x: np.ndarray, calls: int, repeats: int) -> float:
    """Median over repeats of the microseconds of one encode + decode (read-only wire arrays)."""
    fs = x.shape[1:]

    def once():
        arrays = c.encode(x)
        arrays = [a.view() for a in arrays]
        for a in arrays:
            a.flags.writeable = False     # what the receiver's decode sees: read-only views
        return c.decode(arrays, fs)

    for _ in range(max(1, calls // 10)):   # warm up
        once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            once()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def run(rows: int = 64, features: int = 256, repeats: int = 7, calls: int = 200, seed: int = 0) -> dict:
    x = np.random.default_rng(seed).standard_normal((rows, features)).astype(np.float32)
    dense = wc.parse("fp32").nbytes(rows, (features,))
    out = []
    for name in CODECS:
        c = wc.parse(name)
        us = time_codec(c, x, calls, repeats)
        nb = c.nbytes(rows, (features,))
        out.append({"codec": c.name, "us": us, "wire_bytes": nb, "vs_fp32": nb / dense,
                    "share": {link: us / send_us(dense, bps) for link, bps in LINKS}})
    return {"rows": rows, "features": features, "fp32_bytes": dense, "repeats": repeats, "calls": calls,
            "send_us": {link: send_us(dense, bps) for link, bps in LINKS}, "codecs": out}


def format_table(res: dict) -> str:
    links = [link for link, _ in LINKS]
    lines = [f"{res['rows']} x {res['features']} float32 ({res['fp32_bytes'] / 1024:g} KiB); sending it takes "
             + ", ".join(f"{res['send_us'][k]:.3f} us at {k}" for k in links)
             + f"; median of {res['repeats']} repeats x {res['calls']} calls",
             "",
             "| codec | encode+decode (us) | wire bytes | vs fp32 | " + " | ".join(f"% of send at {k}" for k in links) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(links)]
    for r in res["codecs"]:
        lines.append(f"| {r['codec']} | {r['us']:.1f} | {r['wire_bytes']} | {r['vs_fp32']:.3f}x | "
                     + " | ".join(f"{100 * r['share'][k]:.1f}%" for k in links) + " |")
    return "\n".join(lines)


def verdict(res: dict) -> tuple[bool, str]:
    r = next(r for r in res["codecs"] if r["codec"] == TARGET_CODEC)
    link = LINKS[0][0]
    limit = TARGET_SHARE * res["send_us"][link]
    ok = r["us"] <= limit
    return ok, (f"target: int8 encode+decode <= {100 * TARGET_SHARE:.0f}% of sending {res['fp32_bytes'] / 1024:g} KiB "
                f"at {link} ({limit:.1f} us): {r['us']:.1f} us = {100 * r['share'][link]:.1f}% -> "
                + ("met" if ok else "MISSED"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200, help="encode+decode calls timed per repeat")
    args = ap.parse_args(argv)
    res = run(args.rows, args.features, args.repeats, args.calls)
    print(format_table(res))
    ok, line = verdict(res)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
