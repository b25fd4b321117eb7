"""Ray launcher: every worker is a Ray actor (one process each), placed one per node.

``asyncdni train --launcher ray [--ray-address ADDR] [--hosts IP,IP,...]``

* Ray does placement, process life cycle and death detection; ZeroMQ still carries every
  activation, gradient and control message, between the actors' own node addresses (each
  worker binds the IP address Ray knows its node by; the coordinator's control socket
  binds the driver's node address). Nothing but the worker's start arguments crosses
  Ray's own channel, and nothing comes back over it but the exit code and a log tail.
* Placement: with ``--hosts`` (node IP addresses, the feeder first) each actor is pinned
  to a node with that address (``NodeAffinitySchedulingStrategy``, hard; several nodes
  with one address are used in turn). Without it, one placement group holds one small
  bundle per worker: ``STRICT_SPREAD`` (one worker per node) when the cluster has at
  least as many nodes as workers, else ``SPREAD`` (as even as Ray can make it).
* BLAS is pinned through the actor's ``runtime_env`` environment variables, which are set
  before the actor's process starts, so before anything imports numpy.
* An actor that dies (killed, OOM, crashed, its node gone) resolves its pending ``run``
  call with ``RayActorError`` at once; :meth:`exited` sees it with ``ray.wait(timeout=0)``
  and the coordinator raises its usual one-line ``WorkerFailed``. Ray does not know the
  signal that ended a process, so the line says the process died, not which signal. A
  node that Ray declares dead ends the run with :class:`~asyncdni.launch.base.HostLost`.
* ``ADDR`` empty: a private local Ray is started (``ray.init(address="local")``) and shut
  down at :meth:`close`; ``auto``: Ray's own rule (``RAY_ADDRESS``, then the newest
  cluster started on this machine); ``HOST:PORT``: that cluster's GCS. If the caller had
  already connected to Ray, that connection is used and left open.
* A worker's CURVE secret key is an argument of its actor's ``run`` call, so it travels
  over Ray's own gRPC channel, which is plaintext unless the cluster runs with Ray's TLS
  (``RAY_USE_TLS=1``); see the README.
"""
from __future__ import annotations

import io
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from asyncdni.launch.base import BLAS_VARS, HostLost, LaunchError, Launcher, WorkerLaunch

NEED_RAY = "the Ray launcher needs Ray: pip install 'asyncdni[ray]'"
CPU_PER_WORKER = 0.01         # a token CPU share: K+1 actors fit any node; the OS schedules them
NODE_CHECK_INTERVAL = 1.0     # seconds between looks at the cluster's node table
CONNECT_PROBE_TIMEOUT = 5.0   # seconds for the TCP probe of HOST:PORT before ray.init
TAIL_BYTES = 64 * 1024        # an actor keeps at most this much of its worker's output
NODE_DIED = "its node died"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise LaunchError(NEED_RAY) from None
    return ray


# --------------------------------------------------------------- inside the actor
class _Tail(io.TextIOBase):
    """A bounded text sink: the last TAIL_BYTES characters written."""

    def __init__(self):
        self.buf = ""

    def writable(self) -> bool:
        return True

    def write(self, s) -> int:
        self.buf = (self.buf + str(s))[-TAIL_BYTES:]
        return len(s)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.buf.strip().splitlines()[-lines:])


class RayWorker:
    """The actor class (wrapped with ``ray.remote`` by the launcher). Its process is the
    worker process: ``run`` calls :func:`asyncdni.engine.worker.run_worker` in it."""

    def where(self) -> dict:
        import ray
        return {"pid": os.getpid(), "ip": ray.util.get_node_ip_address(),
                "env": {v: os.environ.get(v) for v in BLAS_VARS}}

    def blas_threads(self) -> list:
        """The thread counts of the BLAS libraries loaded with numpy (tests; needs threadpoolctl)."""
        import numpy  # noqa: F401 - loads the BLAS library
        from threadpoolctl import threadpool_info
        return [(i.get("internal_api"), i.get("num_threads")) for i in threadpool_info()]

    def run(self, role: str, index: int, control: str, start_timeout: float,
            server_key: bytes, secret_key: bytes) -> dict:
        import contextlib
        import sys
        import traceback
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)   # the coordinator stops us by message
        except ValueError:
            pass                                            # not the main thread: nothing to do
        out = _Tail()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                from asyncdni.engine.worker import run_worker
            except ImportError as e:
                return {"code": 2, "tail": f"cannot import asyncdni on this node ({sys.executable}): {e}; "
                                           f"install the same asyncdni on every Ray node"}
            try:
                code = run_worker(role, index, control, start_timeout=start_timeout,
                                  server_key=server_key, secret_key=secret_key)
            except BaseException:  # noqa: BLE001 - reported as the worker's exit, like a crash
                traceback.print_exc()
                code = 1
        return {"code": int(code), "tail": out.tail()}


# ------------------------------------------------------------------ the launcher
@dataclass
class _Actor:
    name: str
    handle: object
    run_ref: object
    where_ref: object
    node_id: str
    node_ip: str
    state: str = "running"          # running -> after
    done: bool = False              # its run call has returned or failed
    code: int | None = None         # the worker's exit code (None: unknown, e.g. its process was killed)
    tail: str = ""
    died: str = ""                  # Ray's account of the actor's death, if it died
    pid: int | None = None
    killed: bool = False            # ray.kill was called on it (stop)


@dataclass
class RayLauncher(Launcher):
    address: str = ""                     # "" (a private local Ray), "auto", or the GCS HOST:PORT
    blas_threads: int = 1
    local_ip: str = "127.0.0.1"           # node address of a private local Ray
    gpus: bool = False                    # torch stages on CUDA: each layer actor asks Ray for one GPU
    actors: dict[str, _Actor] = field(default_factory=dict)
    kind = "ray"

    def __post_init__(self):
        self.ray = _import_ray()
        self._connected = False           # True if this launcher called ray.init
        self._pg = None
        self.strategy = ""                # how the last prepare placed the workers
        self.placed: dict[str, tuple[str, str]] = {}   # worker name -> (node id, node ip)
        self._next_node_check = 0.0
        self._remote = None

    @classmethod
    def from_config(cls, cfg, run_dir=None) -> "RayLauncher":
        _import_ray()                     # one line, before anything else, if Ray is missing
        rt = cfg.runtime
        return cls(rt.ray_address, rt.blas_threads, rt.host, gpus=rt.device.startswith("cuda"))

    def _resources(self, name: str) -> dict:
        """The Ray resources of one worker: CPU_PER_WORKER, and one GPU for a layer when the
        torch stages run on CUDA (the feeder never needs one)."""
        return {"CPU": CPU_PER_WORKER, **({"GPU": 1} if self.gpus and name != "feeder" else {})}

    # ----------------------------------------------------------- connection
    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        addr = self.address.strip()
        kw = dict(log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False)
        if not addr or addr == "local":
            kw.update(address="local", _node_ip_address=self.local_ip)
        elif addr == "auto" or addr.startswith("ray://"):
            kw.update(address=addr)
            kw.pop("include_dashboard")
        else:
            host, sep, port = addr.rpartition(":")
            host = host.strip("[]")
            if not sep or not host or not port.isdigit():
                raise LaunchError(f"--ray-address {addr!r}: expected HOST:PORT of the Ray head (or 'auto')")
            try:
                socket.create_connection((host, int(port)), timeout=CONNECT_PROBE_TIMEOUT).close()
            except OSError as e:
                raise LaunchError(f"no Ray cluster answers at {addr}: {e.strerror or e}") from None
            kw.update(address=f"{host}:{port}")
            kw.pop("include_dashboard")
            from asyncdni.wire.security import is_loopback
            if is_loopback(host):
                kw["_node_ip_address"] = host     # Ray would rewrite a loopback head to this host's LAN IP
        old_term = signal.getsignal(signal.SIGTERM) if _main_thread() else None
        try:
            ray.init(**kw)
        except Exception as e:  # noqa: BLE001 - any failure to connect is one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LaunchError(f"cannot connect to Ray ({addr or 'local'}): {first}") from None
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)   # ray.init installs its own handler
        self._connected = True

    def _nodes(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    # ------------------------------------------------------------ interface
    def control_host(self, default: str) -> str:
        """The driver's node address: every actor can reach it."""
        return self.ray.util.get_node_ip_address()

    def prepare(self, placements: dict[str, str], timeout: float) -> None:
        self._connect()
        self._release_group()
        names = list(placements)
        wanted = {ip for ip in placements.values() if ip}
        deadline = time.monotonic() + timeout
        while True:       # with --hosts, wait (like the agents launcher) for the nodes it names
            nodes = [n for n in self._nodes() if n.get("Resources", {}).get("CPU", 0) >= CPU_PER_WORKER]
            by_ip: dict[str, list[str]] = {}
            for n in nodes:
                by_ip.setdefault(n["NodeManagerAddress"], []).append(n["NodeID"])
            missing = sorted(wanted - set(by_ip))
            if nodes and not missing:
                break
            if time.monotonic() > deadline:
                if not nodes:
                    raise LaunchError("the Ray cluster has no live node with a CPU to place workers on")
                raise LaunchError(f"--hosts: no live Ray node has address {missing[0]} after {timeout:.0f} s "
                                  f"(nodes: {', '.join(sorted(by_ip))})")
            time.sleep(0.5)
        ip_of = {n["NodeID"]: n["NodeManagerAddress"] for n in nodes}
        self.placed = {}
        if wanted:
            turn: dict[str, int] = {}
            for name in names:
                ip = placements[name]
                ids = by_ip[ip]
                node = ids[turn.get(ip, 0) % len(ids)]
                turn[ip] = turn.get(ip, 0) + 1
                self.placed[name] = (node, ip)
            self.strategy = "--hosts (node affinity)"
            return
        from ray.util.placement_group import placement_group, placement_group_table
        strategy = "STRICT_SPREAD" if len(nodes) >= len(names) else "SPREAD"
        pg = placement_group([self._resources(name) for name in names], strategy=strategy)
        self._pg = pg
        if not pg.wait(timeout_seconds=max(1, int(timeout))):
            self._release_group()
            raise LaunchError(f"Ray could not place {len(names)} workers ({strategy} over {len(nodes)} nodes) "
                              f"within {timeout:.0f} s")
        where = placement_group_table(pg)["bundles_to_node_id"]
        for i, name in enumerate(names):
            node = where[i]
            self.placed[name] = (node, ip_of.get(node) or self._ip_of_node(node))
        self.strategy = f"{strategy} over {len(nodes)} nodes"

    def _ip_of_node(self, node_id: str) -> str:
        for n in self.ray.nodes():
            if n["NodeID"] == node_id:
                return n["NodeManagerAddress"]
        return "?"

    def bind_host(self, name: str, default: str) -> str:
        placed = self.placed.get(name)
        return placed[1] if placed else default

    def _actor_class(self):
        if self._remote is None:
            self._remote = self.ray.remote(RayWorker)
        return self._remote

    def start(self, w: WorkerLaunch) -> None:
        old = self.actors.get(w.name)
        if old is not None and old.state == "running" and not self._reap(old):
            raise LaunchError(f"cannot start {w.name}: it is already running")
        if w.name not in self.placed:
            raise LaunchError(f"cannot start {w.name}: it was not placed (prepare first)")
        node, ip = self.placed[w.name]
        if self._pg is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            index = list(self.placed).index(w.name)
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=index)
        else:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            strategy = NodeAffinitySchedulingStrategy(node, soft=False)
        env = {v: str(w.blas_threads) for v in BLAS_VARS}
        try:
            handle = self._actor_class().options(
                num_cpus=CPU_PER_WORKER, num_gpus=self._resources(w.name).get("GPU", 0), max_restarts=0, max_task_retries=0, scheduling_strategy=strategy,
                runtime_env={"env_vars": env}).remote()
            where_ref = handle.where.remote()
            # the secret key is an argument of this call: Ray's channel (TLS only if the cluster has it)
            run_ref = handle.run.remote(w.role, w.index, w.control, float(w.start_timeout),
                                        bytes(w.server_key), bytes(w.secret_key))
        except Exception as e:  # noqa: BLE001
            raise LaunchError(f"cannot start {w.name} on Ray node {ip}: {e}") from None
        self.actors[w.name] = _Actor(w.name, handle, run_ref, where_ref, node, ip)

    # --------------------------------------------------------------- queries
    def _reap(self, a: _Actor) -> bool:
        """Look (without waiting) whether ``a``'s run call has ended; True if it has."""
        if a.done:
            return True
        ray = self.ray
        ready, _ = ray.wait([a.run_ref], timeout=0)
        if not ready:
            return False
        a.done = True
        try:
            r = ray.get(a.run_ref, timeout=5)
            a.code, a.tail = r.get("code"), r.get("tail", "")
        except ray.exceptions.RayActorError as e:
            a.died = _ray_message(e)
            a.tail = a.died
        except ray.exceptions.RayError as e:
            a.code, a.tail = 1, str(e)
        return True

    def _pid(self, a: _Actor) -> int | None:
        if a.pid is None:
            ready, _ = self.ray.wait([a.where_ref], timeout=0)
            if ready:
                try:
                    a.pid = self.ray.get(a.where_ref, timeout=1)["pid"]
                except self.ray.exceptions.RayError:
                    a.pid = None
        return a.pid

    def poll(self) -> None:
        """A Ray node that carried a live worker is gone: :class:`HostLost`."""
        if not self.actors:
            return
        dead = [a for a in self.actors.values() if a.state == "running" and self._reap(a) and a.died]
        for a in dead:
            if _death_cause(a.died) == NODE_DIED:
                raise HostLost(f"Ray node {a.node_ip} (node id {a.node_id[:12]}) is gone; it ran {_human(a.name)}")
        died = bool(dead)
        now = time.monotonic()
        if not died and now < self._next_node_check:
            return
        self._next_node_check = now + NODE_CHECK_INTERVAL
        try:
            alive = {n["NodeID"] for n in self._nodes()}
        except Exception as e:  # noqa: BLE001 - the GCS itself is gone
            raise HostLost(f"lost the Ray cluster: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        gone = [a for a in self.actors.values() if a.state == "running" and a.node_id not in alive]
        if gone:
            names = ", ".join(_human(a.name) for a in gone)
            raise HostLost(f"Ray node {gone[0].node_ip} (node id {gone[0].node_id[:12]}) is gone; "
                           f"it ran {names}")

    def state(self, name: str) -> str:
        a = self.actors.get(name)
        if a is None:
            return "before"
        if a.state == "running" and self._reap(a):
            return "after"
        return a.state

    def exit_code(self, name: str) -> int | None:
        a = self.actors.get(name)
        if a is None:
            return None
        self._reap(a)
        return a.code

    def log_tail(self, name: str, lines: int = 15) -> str:
        a = self.actors.get(name)
        if a is None:
            return ""
        self._reap(a)
        return "\n".join(a.tail.strip().splitlines()[-lines:])

    def pid(self, name: str) -> int | None:
        a = self.actors.get(name)
        return None if a is None else self._pid(a)

    def host(self, name: str) -> str:
        a = self.actors.get(name)
        if a is not None:
            return a.node_ip
        placed = self.placed.get(name)
        return placed[1] if placed else "?"

    def describe_exit(self, name: str) -> str:
        a = self.actors.get(name)
        if a is not None and self._reap(a) and a.died:
            return f"its Ray actor process died ({_death_cause(a.died)})"
        return super().describe_exit(name)

    def exited(self) -> list[str]:
        return [n for n, a in self.actors.items() if a.state == "running" and self._reap(a)]

    def wait(self, timeout: float) -> bool:
        """Wait for every worker's run call to return by itself; True if all did."""
        refs = [a.run_ref for a in self.actors.values() if not a.done]
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=max(0.0, timeout))
        return all(self._reap(a) for a in self.actors.values())

    def stop(self, grace: float = 3.0) -> None:
        """End every actor of this attempt and wait until Ray has seen their processes end."""
        if not self.actors:
            self._release_group()
            return
        ray = self.ray
        self.wait(grace)                              # the coordinator has asked them to stop
        live = [a for a in self.actors.values() if not a.killed]
        for a in live:
            try:
                ray.kill(a.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        # a call on a killed actor fails once Ray has seen its process end
        probes = []
        for a in live:
            try:
                probes.append(a.handle.where.remote())
            except Exception:  # noqa: BLE001
                pass
        if probes:
            ray.wait(probes, num_returns=len(probes), timeout=grace + 10.0)
        for a in self.actors.values():
            self._reap(a)
            a.state, a.killed = "after", True
        self._release_group()

    def _release_group(self) -> None:
        if self._pg is not None:
            try:
                from ray.util.placement_group import remove_placement_group
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001 - the cluster is gone: so is the group
                pass
            self._pg = None

    def close(self) -> None:
        """Stop every actor; disconnect from Ray only if this launcher connected (a local
        Ray it started is shut down with it)."""
        try:
            if self.ray.is_initialized():
                self.stop(grace=2.0)
        finally:
            if self._connected:
                self._connected = False
                self.ray.shutdown()


def _human(ident: str) -> str:
    return f"layer {int(ident[5:]) + 1}" if ident.startswith("layer") and ident[5:].isdigit() else ident


def _ray_message(e) -> str:
    msg = getattr(e, "error_msg", "") or str(e)
    return msg.strip()


def _death_cause(msg: str) -> str:
    low = msg.lower()
    if "node" in low and ("died" in low or "dead" in low) and "worker process has died" not in low:
        return NODE_DIED
    if "ray.kill" in low:
        return "killed with ray.kill"
    if "worker process has died" in low or "unexpectedly" in low:
        return "killed by a signal, the OOM killer or a crash; Ray does not report which"
    return msg.splitlines()[0][:120]


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
