"""Local launcher: starts worker processes on this machine and guarantees they end.

One :class:`~asyncdni.launch.base.Launcher` implementation, keyed by worker name. ``stop()`` asks
politely (SIGTERM), waits, then SIGKILLs; it is idempotent and safe to call from
``finally``. Each worker also dies with its parent (PR_SET_PDEATHSIG), so even a
SIGKILLed coordinator (or agent, which uses this launcher on its host) leaves no process
behind. A worker's CURVE secret key reaches it through its stdin pipe, never argv.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from asyncdni.launch.base import BLAS_VARS, LaunchError, Launcher, WorkerLaunch

__all__ = ["LocalLauncher", "LaunchError", "WorkerProcess", "worker_env"]


def worker_env(blas_threads: int) -> dict:
    """The environment of a worker process: BLAS pinned, this checkout importable."""
    import asyncdni
    env = dict(os.environ)
    for var in BLAS_VARS:
        env[var] = str(blas_threads)
    # the folder that holds the asyncdni package: the checkout (editable install) or
    # site-packages (this file is asyncdni/launch/local.py only in an installed wheel)
    root = str(Path(asyncdni.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@dataclass
class WorkerProcess:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    state: str = "before"          # before -> running -> after

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class LocalLauncher(Launcher):
    run_dir: Path
    blas_threads: int = 1
    die_with_parent: bool = True
    procs: dict[str, WorkerProcess] = field(default_factory=dict)
    kind = "local"

    @classmethod
    def from_config(cls, cfg, run_dir) -> "LocalLauncher":
        return cls(run_dir, cfg.runtime.blas_threads)

    def env(self) -> dict:
        return worker_env(self.blas_threads)

    def bind_host(self, name: str, default: str) -> str:
        return default

    def module(self, w: WorkerLaunch) -> str:
        """The module run as the worker (tests substitute their own)."""
        return w.module

    def argv(self, w: WorkerLaunch) -> list[str]:
        argv = [sys.executable, "-m", self.module(w), *w.args()]
        if self.die_with_parent:
            argv += ["--die-with-parent", "--parent-pid", str(os.getpid())]
        return argv

    def start(self, w: WorkerLaunch) -> None:
        p = WorkerProcess(w.name, self.argv(w), Path(self.run_dir) / f"{w.name}.log")
        old = self.procs.get(w.name)
        if old is not None and old.exit_code() is None:
            raise LaunchError(f"cannot start {w.name}: it is already running (pid {old.pid})")
        try:
            with open(p.log_path, "wb") as log:
                p.proc = subprocess.Popen(p.argv, stdin=subprocess.PIPE if w.secret_key else subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                          start_new_session=True)
            if w.secret_key:
                try:
                    p.proc.stdin.write(w.secret_key + b"\n")
                    p.proc.stdin.close()
                except OSError:
                    pass                   # it died at once: reported through exited()
        except OSError as e:
            raise LaunchError(f"cannot start {w.name}: {e}") from None
        p.state = "running"
        self.procs[w.name] = p

    # --------------------------------------------------------------- queries
    def state(self, name: str) -> str:
        p = self.procs.get(name)
        if p is None:
            return "before"
        if p.state == "running" and p.exit_code() is not None:
            return "after"
        return p.state

    def exit_code(self, name: str) -> int | None:
        p = self.procs.get(name)
        return None if p is None else p.exit_code()

    def log_tail(self, name: str, lines: int = 15) -> str:
        p = self.procs.get(name)
        return "" if p is None else p.log_tail(lines)

    def pid(self, name: str) -> int | None:
        p = self.procs.get(name)
        return None if p is None else p.pid

    def host(self, name: str) -> str:
        import socket
        return socket.gethostname()

    def exited(self) -> list[str]:
        """Workers whose process has ended while they were meant to be running."""
        return [n for n, p in self.procs.items() if p.state == "running" and p.exit_code() is not None]

    def wait(self, timeout: float) -> bool:
        """Wait for every worker to exit by itself; True if all did."""
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            if p.proc is None:
                continue
            try:
                p.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop(self, grace: float = 3.0) -> None:
        """End every worker: SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
        live = [p for p in self.procs.values() if p.proc is not None and p.proc.poll() is None]
        for p in live:
            try:
                os.kill(p.proc.pid, signal.SIGCONT)   # a stopped process cannot act on SIGTERM
                p.proc.terminate()
            except ProcessLookupError:
                pass
        if live and not self.wait(grace):
            for p in live:
                if p.proc.poll() is None:
                    try:
                        p.proc.kill()
                    except ProcessLookupError:
                        pass
            for p in live:
                p.proc.wait()
        for p in self.procs.values():
            if p.proc is not None:
                p.proc.poll()
            p.state = "after"

    def forget(self, name: str) -> None:
        """Drop an ended worker's record (an agent restarting it under the same name)."""
        p = self.procs.get(name)
        if p is not None and (p.proc is None or p.proc.poll() is not None):
            del self.procs[name]
