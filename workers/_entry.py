"""Shared entry point of the worker processes: argv, environment, signals, then the worker.

A worker is told only how to reach the coordinator (``--control``, and its public key
with ``--server-key``); its own CURVE secret key arrives on stdin (``--key-stdin``),
never on argv; its run spec arrives over the control socket in the reply to HELLO.
BLAS thread counts must be fixed before numpy is imported, so they come on argv and are
set before anything imports numpy.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from asyncdni.launch.base import BLAS_VARS


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: have the kernel send SIGKILL when the parent (coordinator or agent) dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except OSError:
        return
    # the parent died before prctl took effect: we were re-parented (to init or a subreaper)
    if os.getppid() != (parent_pid or os.getppid()) or os.getppid() == 1:
        os._exit(3)


def pin_blas(threads) -> None:
    """Fix the BLAS thread count; must run before numpy is first imported."""
    for var in BLAS_VARS:
        os.environ[var] = str(threads)


def parse(role: str, argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m asyncdni.workers.{role}", allow_abbrev=False)
    if role == "layer":
        ap.add_argument("index", type=int, help="0-based layer index")
    ap.add_argument("--control", required=True, help="the coordinator's control endpoint (tcp://HOST:PORT)")
    ap.add_argument("--blas-threads", type=int, default=1, help="BLAS threads (default 1)")
    ap.add_argument("--start-timeout", type=float, default=60.0, help="seconds to wait for the run spec")
    ap.add_argument("--server-key", default="", help="the coordinator's CURVE public key (z85)")
    ap.add_argument("--key-stdin", action="store_true", help="read this worker's CURVE secret key from stdin")
    ap.add_argument("--die-with-parent", action="store_true", help="exit when the launching process dies")
    ap.add_argument("--parent-pid", type=int, default=None, help="pid of the launching process (with --die-with-parent)")
    return ap.parse_args(argv)


def main(role: str, argv: list[str] | None = None) -> int:
    args = parse(role, argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the coordinator owns Ctrl-C and stops us by message
    if args.die_with_parent:
        _die_with_parent(args.parent_pid)
    secret = b""
    if args.key_stdin:
        secret = sys.stdin.buffer.readline(128).strip()
        if len(secret) != 40:
            print(f"{role}: --key-stdin: expected a 40-character CURVE secret key on stdin", file=sys.stderr)
            return 2
    if args.blas_threads < 1:
        print(f"{role}: --blas-threads must be >= 1", file=sys.stderr)
        return 2
    pin_blas(args.blas_threads)
    from asyncdni.engine.worker import run_worker  # numpy is imported here, after the thread variables
    return run_worker(role, getattr(args, "index", 0), args.control, start_timeout=args.start_timeout,
                      server_key=args.server_key.encode(), secret_key=secret)
