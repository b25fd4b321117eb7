"""Shared entry point of the worker processes: argv, environment, signals, then the worker.

BLAS thread counts must be fixed before numpy is imported, so this module reads the run
spec with the json module alone, sets the thread variables, and only then imports asyncdni.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: have the kernel send SIGKILL when the parent (the coordinator) dies."""
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


def main(role: str, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m workers.{role}")
    ap.add_argument("spec", help="run spec JSON written by the coordinator")
    if role == "layer":
        ap.add_argument("index", type=int, help="0-based layer index")
    ap.add_argument("--die-with-parent", action="store_true", help="exit when the launching process dies")
    ap.add_argument("--parent-pid", type=int, default=None, help="pid of the launching process (with --die-with-parent)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the coordinator owns Ctrl-C and stops us by message
    if args.die_with_parent:
        _die_with_parent(args.parent_pid)
    try:
        with open(args.spec) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        print(f"{role}: cannot read run spec {args.spec}: {e}", file=sys.stderr)
        return 2
    pin_blas(spec["config"]["runtime"]["blas_threads"])
    from asyncdni.worker import run_worker     # numpy is imported here, after the thread variables
    return run_worker(spec, role, getattr(args, "index", 0))
