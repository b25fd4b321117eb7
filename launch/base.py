"""The launcher interface: what the coordinator needs from whatever starts its workers.

Launchers are keyed by worker name (``feeder``, ``layer0``, ``layer1``, ...) and are
drop-ins for each other (ipyparallel's ``BaseLauncher`` is the model):

* :meth:`Launcher.prepare` once per run attempt, before any start: place the workers
  (agents: wait for the agents that ``--hosts`` names; Ray: connect, place actors);
* :meth:`start` one worker; :meth:`state`, :meth:`exit_code`, :meth:`log_tail`,
  :meth:`pid`, :meth:`host` about one worker; :meth:`exited` the names of workers that
  ended while they were meant to run; :meth:`wait` for all to end by themselves;
  :meth:`stop` every worker of this attempt (idempotent, safe in ``finally``);
  :meth:`close` at the very end of a run (agents are released, clusters disconnected).

A worker learns everything else over its control socket: the coordinator's endpoint
and public key and the worker's own secret key are all a launcher hands over; its run
spec comes in the reply to HELLO.

States: ``before`` -> ``running`` -> ``after``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


class LaunchError(RuntimeError):
    """A worker (or an agent, or a cluster) could not be started or reached."""


class HostLost(LaunchError):
    """A whole host (an agent, a Ray node) is gone: restarts cannot help."""


@dataclass(frozen=True)
class WorkerLaunch:
    """Everything a launcher needs to start one worker."""
    name: str                     # control identity: "feeder", "layer0", ...
    role: str                     # "feeder" or "layer"
    index: int                    # layer index (0 for the feeder)
    control: str                  # the coordinator's control endpoint, as the worker reaches it
    blas_threads: int = 1
    start_timeout: float = 60.0   # how long the worker waits for its spec
    server_key: bytes = b""       # the coordinator's CURVE public key (empty: no CURVE)
    secret_key: bytes = b""       # the worker's own CURVE secret key (empty: no CURVE)
    placement: str = ""           # where --hosts puts it ("" : the launcher decides)

    @property
    def module(self) -> str:
        return f"asyncdni.workers.{self.role}"

    def args(self) -> list[str]:
        """Command-line arguments of the worker entry point (no secrets on argv)."""
        a = [] if self.role == "feeder" else [str(self.index)]
        a += [f"--control={self.control}", f"--blas-threads={self.blas_threads}",
              f"--start-timeout={self.start_timeout}"]
        if self.server_key:
            # --flag=VALUE: a z85 key may begin with '-' (about 1 in 80 does), which argparse
            # would take for an option in '--server-key -x...'
            a += [f"--server-key={self.server_key.decode()}", "--key-stdin"]
        return a


class Launcher(ABC):
    kind = "base"

    def control_host(self, default: str) -> str:
        """Address the coordinator binds its control socket to (reachable by every worker)."""
        return default

    def prepare(self, placements: dict[str, str], timeout: float) -> None:
        """Called once per attempt before any start: worker name -> placement ('' : any)."""

    def bind_host(self, name: str, default: str) -> str:
        """Address worker ``name`` binds its inboxes to."""
        return default

    def poll(self) -> None:
        """Called often by the coordinator; raises :class:`HostLost` when a host is gone."""

    def check_hosts(self) -> None:
        """After a worker failed: raise :class:`HostLost` if its whole host is gone (may wait
        briefly for a sign of life from each host)."""

    @abstractmethod
    def start(self, w: WorkerLaunch) -> None: ...

    @abstractmethod
    def state(self, name: str) -> str: ...

    @abstractmethod
    def exit_code(self, name: str) -> int | None: ...

    @abstractmethod
    def log_tail(self, name: str, lines: int = 15) -> str: ...

    def pid(self, name: str) -> int | None:
        return None

    def host(self, name: str) -> str:
        return "?"

    @abstractmethod
    def exited(self) -> list[str]: ...

    @abstractmethod
    def wait(self, timeout: float) -> bool: ...

    @abstractmethod
    def stop(self, grace: float = 3.0) -> None: ...

    def close(self) -> None:
        self.stop()

    @classmethod
    def from_config(cls, cfg, run_dir) -> "Launcher":
        """The launcher for a run's configuration; ``run_dir`` holds local logs."""
        raise NotImplementedError(f"{cls.__name__} does not build itself from a configuration")

    def describe_exit(self, name: str) -> str:
        code = self.exit_code(name)
        if code is None:
            return "ended"
        return f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
