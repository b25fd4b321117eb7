"""Local launcher: starts worker processes on this machine and guarantees they end.

A small state machine: ``before`` -> ``running`` -> ``after``. ``stop()`` asks politely
(SIGTERM), waits, then SIGKILLs; it is idempotent and safe to call from ``finally``.
Each worker also dies with its parent (PR_SET_PDEATHSIG), so even a SIGKILLed
coordinator leaves no process behind.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


class LaunchError(RuntimeError):
    """A worker process could not be started."""


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
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class LocalLauncher:
    run_dir: Path
    blas_threads: int = 1
    workers: list[WorkerProcess] = field(default_factory=list)

    def env(self) -> dict:
        env = dict(os.environ)
        n = str(self.blas_threads)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
            env[var] = n
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def start(self, name: str, module: str, args: list[str]) -> WorkerProcess:
        argv = [sys.executable, "-m", module, *args, "--die-with-parent", "--parent-pid", str(os.getpid())]
        w = WorkerProcess(name, argv, self.run_dir / f"{name}.log")
        try:
            log = open(w.log_path, "wb")
            w.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      env=self.env(), start_new_session=True)
            log.close()
        except OSError as e:
            raise LaunchError(f"cannot start {name}: {e}") from None
        w.state = "running"
        self.workers.append(w)
        return w

    def exited(self) -> list[WorkerProcess]:
        """Workers whose process has ended while they were meant to be running."""
        return [w for w in self.workers if w.state == "running" and w.exit_code() is not None]

    def wait(self, timeout: float) -> bool:
        """Wait for every worker to exit by itself; True if all did."""
        import time
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop(self, grace: float = 3.0) -> None:
        """End every worker: SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
        live = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for w in live:
            try:
                os.kill(w.proc.pid, signal.SIGCONT)   # a stopped process cannot act on SIGTERM
                w.proc.terminate()
            except ProcessLookupError:
                pass
        if live and not self.wait(grace):
            for w in live:
                if w.proc.poll() is None:
                    try:
                        w.proc.kill()
                    except ProcessLookupError:
                        pass
            for w in live:
                w.proc.wait()
        for w in self.workers:
            if w.proc is not None:
                w.proc.poll()
            w.state = "after"
