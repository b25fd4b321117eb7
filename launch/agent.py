"""The per-host agent: ``asyncdni agent --join tcp://HEAD:PORT --name NAME --bind ADDR``.

The plain multi-host path, for machines where no cluster engine runs (Slurm, ssh,
Kubernetes): one agent per host registers with the coordinator's agents launcher,
starts the workers the coordinator assigns to it (as local processes that die with the
agent), reports their exits and log tails, ends them on request (a restart, the end of
the run), and exits when the run is over or the coordinator has gone silent.

A small state machine: ``joining`` (AGENT_HELLO every second until AGENT_WELCOME, up to
``wait`` seconds) -> ``joined`` (heartbeats both ways; LAUNCH / KILL) -> ``done``
(RELEASE, or the coordinator silent past its deadline: every worker is ended first).

``--persist`` (``AgentConfig.persist``) serves run after run, as torchrun's and Ray's
nodes stay up: at ``done`` the run's workers are ended, its temporary files removed and
its socket closed, and the agent goes back to ``joining`` (a new socket, so that nothing
queued for or from the last coordinator reaches the next one), for as long as it takes:
``wait`` then only sets when it says, once per join, that nobody answers. It ends on
SIGTERM or SIGINT (the CLI turns both into KeyboardInterrupt), its workers first.

Under CURVE (``keys``: a directory from ``asyncdni keys``) the agent authenticates with
``NAME.key_secret`` (or ``agent.key_secret``) and checks the coordinator's
``coordinator.key``; workers' secret keys reach it only over that encrypted channel.
"""
from __future__ import annotations

import math
import os
import socket as _socket
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from asyncdni import files
from asyncdni.wire import protocol as P
from asyncdni.wire import security
from asyncdni.wire import transport

AGENT_HEARTBEAT = 0.25        # seconds between agent <-> coordinator heartbeats
JOIN_RETRY = 1.0              # seconds between AGENT_HELLOs while joining
TAIL_BYTES = 4096             # log tail sent with an exit report
REOPEN_EVERY = 10.0           # --persist: seconds of unanswered HELLOs before the socket is made anew
MAX_WORKERS = 16              # workers one agent runs at once by default (--max-workers)
SEND_TIMEOUT_MS = 200         # a send to the coordinator gives up after this (the loop goes on)
DRAIN_LIMIT = 256             # messages handled per loop turn (heartbeats always get their turn)
# the largest values a coordinator may hand an agent: beyond them a head (or something
# posing as one) could keep the agent, or its workers, alive long after it is gone
MAX_DEADLINE = 600.0          # AGENT_WELCOME deadline, seconds of silence before the agent gives up
MAX_START_TIMEOUT = 3600.0    # LAUNCH start_timeout (runtime.start_timeout's own limit)


def bounded(value, limit: float) -> bool:
    """A finite number in (0, limit]: NaN, infinities and absurd values are refused."""
    return isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= limit


class AgentError(RuntimeError):
    """The agent cannot do its job; the message says why (one line)."""


@dataclass
class AgentConfig:
    join: str                        # tcp://HEAD:PORT of the coordinator's agents launcher
    name: str
    bind: str = "127.0.0.1"          # address the workers of this host bind their inboxes to
    keys: str = ""                   # CURVE key directory ("" : plain TCP)
    wait: float = 120.0              # seconds to wait for the coordinator to answer
    log_dir: str = ""                # worker logs ("" : a temporary directory)
    insecure: bool = False           # no keys, yet workers bound off loopback: allowed only when asked
    max_workers: int = MAX_WORKERS   # workers this agent runs at once; further LAUNCHes are refused
    persist: bool = False            # serve run after run (back to joining after each), until a signal


def _check(cfg: AgentConfig) -> None:
    host, _, port = cfg.join[6:].rpartition(":") if cfg.join.startswith("tcp://") else ("", "", "")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535 or any(c.isspace() for c in cfg.join):
        raise AgentError(f"--join {cfg.join[:80]!r}: expected tcp://HOST:PORT (a port 1-65535, no spaces)")
    try:                              # a name that never resolves would wait out --wait, then blame keys
        _socket.getaddrinfo(host.strip("[]"), int(port), type=_socket.SOCK_STREAM)
    except (_socket.gaierror, UnicodeError) as e:
        raise AgentError(f"--join {cfg.join[:80]}: cannot resolve {host[:64]!r} "
                         f"({getattr(e, 'strerror', None) or e})") from None
    try:
        security.check_agent_name(cfg.name, "--name")
    except security.KeyError_ as e:
        raise AgentError(str(e)) from None
    if not cfg.bind:
        raise AgentError("--bind: must not be empty")
    if not 0 < cfg.wait <= 86400:
        raise AgentError(f"--wait: must be between 0 and 86400 seconds, got {cfg.wait}")
    if not 1 <= cfg.max_workers <= 1024:
        raise AgentError(f"--max-workers: must be between 1 and 1024, got {cfg.max_workers}")
    # the bind address must belong to this host: try it once
    try:
        with _socket.socket(_socket.AF_INET6 if ":" in cfg.bind else _socket.AF_INET) as s:
            s.bind((cfg.bind.strip("[]"), 0))
    except OSError as e:
        raise AgentError(f"--bind {cfg.bind}: not an address of this host ({e.strerror})") from None
    if not cfg.keys and not cfg.insecure and not security.is_loopback(cfg.bind):
        raise AgentError(f"--bind {cfg.bind}: workers off loopback without --keys would take orders from whatever "
                         f"answers at --join; pass --keys DIR (CURVE), or --insecure on a trusted network")


class Agent:
    def __init__(self, cfg: AgentConfig, log=print):
        _check(cfg)
        self.cfg = cfg
        self.log = log
        self.keys = None
        self.server_key = b""
        if cfg.keys:
            try:
                self.keys = security.load_secret(cfg.keys, cfg.name)
            except security.KeyError_:
                self.keys = security.load_secret(cfg.keys, "agent")
            self.server_key = security.load_public(cfg.keys, security.COORDINATOR)
        self._tmp = None if cfg.log_dir else files.private_tempdir(f"agent-{cfg.name}")
        self.log_dir = Path(cfg.log_dir or self._tmp)
        try:
            files.make_writable_dir(self.log_dir)
        except OSError as e:
            raise AgentError(f"--log-dir {self.log_dir}: not a writable directory ({e.strerror or e})") from None
        self.workers = self._launcher(self.log_dir)    # children die with this agent (PDEATHSIG)
        self.reported: set[str] = set()                # exits already reported
        if not cfg.keys:
            log("no --keys: this agent does not authenticate the coordinator, and its traffic is not encrypted")
        self.state = "joining"
        self.deadline = 2.0
        self.last_heard = time.monotonic()
        self.next_hb = 0.0
        self.runs = 0                                  # runs joined so far
        self.run_dir: Path | None = None               # --persist: this run's own log directory
        self.ctx = None
        self.sock = None
        self.opened = 0.0                              # when self.sock was made

    @staticmethod
    def _launcher(directory: Path):
        from asyncdni.launch.local import LocalLauncher
        return LocalLauncher(directory)

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        """Serve one run (or, with ``persist``, run after run until interrupted); the exit code."""
        try:
            while True:
                code = self._serve()
                if not self.cfg.persist:
                    return code
                self.log(f"waiting for the next coordinator at {self.cfg.join}")
        finally:
            self._end_run()            # again: a signal may have cut the last one short
            if self._tmp:
                import shutil
                shutil.rmtree(self._tmp, ignore_errors=True)

    def _serve(self) -> int:
        """Join a coordinator and serve its run; the run's workers, socket and temporary files
        are gone when this returns (or raises)."""
        self.ctx = zmq.Context()
        self._open()
        self.state = "joining"
        self.deadline = 2.0
        self.next_hb = 0.0
        try:
            return self._run(self.sock)
        finally:
            self._end_run()

    def _open(self):
        """A new DEALER to --join (the one before, if any, closed and its queue dropped)."""
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        self.sock = transport.connect(self.ctx, zmq.DEALER, self.cfg.join, identity=self.cfg.name.encode(),
                                      curve=(self.keys, self.server_key) if self.keys else None)
        # a DEALER with no connected peer blocks in send: after a failed CURVE handshake libzmq
        # drops the connection, and a blocking HELLO would outlast --wait. Sends time out instead.
        self.sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        self.opened = time.monotonic()
        return self.sock

    def _end_run(self) -> None:
        """The current run's workers ended, its socket closed and (under --persist, without
        --log-dir) its log directory removed. Idempotent."""
        self.workers.stop(grace=2.0)
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        if self.run_dir is not None:
            if self._tmp and self.run_dir != self.log_dir:
                import shutil
                shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
            self.workers = self._launcher(self.log_dir)

    def _begin_run(self) -> None:
        """Joined: under --persist, this run's workers log into a directory of their own
        (LOG_DIR/run-YYYYMMDD-HHMMSS-N), so that no run overwrites another's logs."""
        self.runs += 1
        self.reported = set()
        if not self.cfg.persist:
            return
        run_dir = self.log_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{self.runs}"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.log(f"cannot make {run_dir} ({e.strerror or e}); this run's worker logs go to {self.log_dir}")
            run_dir = self.log_dir
        self.run_dir = run_dir
        self.workers = self._launcher(run_dir)

    def _send(self, sock, kind, **fields) -> None:
        try:
            transport.send(sock, kind, -1, (), fields)
        except zmq.Again:
            pass

    def _run(self, sock) -> int:
        hello = {"name": self.cfg.name, "bind": self.cfg.bind, "host": _socket.gethostname(), "pid": os.getpid()}
        t0 = time.monotonic()
        next_hello = 0.0
        waited_out = False             # --persist: "no answer" is said once per join
        said = ""                      # --persist: the last refusal logged (not repeated every second)
        while self.state == "joining":
            now = time.monotonic()
            if not waited_out and now - t0 > self.cfg.wait:
                line = (f"no answer from a coordinator at {self.cfg.join} within {self.cfg.wait:.0f} s"
                        + (" (a key mismatch? with --keys, the coordinator must use the same key "
                           "directory and CURVE)" if self.keys else " (if it uses CURVE, pass --keys DIR)"))
                if not self.cfg.persist:
                    raise AgentError(line)
                self.log(line + "; still waiting (--persist)")
                waited_out = True
            if self.cfg.persist and now - self.opened > REOPEN_EVERY:
                # while no coordinator listens, the HELLOs queue up on the socket (libzmq keeps a
                # queue for a peer it is still connecting to) and would all reach the next one
                # at once: a fresh socket drops them. (ZMQ_IMMEDIATE would too, but it also
                # drops a RELEASE not yet read when the coordinator closes right after it.)
                sock = self._open()
            if now >= next_hello:
                self._send(sock, P.AGENT_HELLO, **hello)
                next_hello = now + JOIN_RETRY
            if sock.poll(100):
                msg = self._recv(sock)
                if msg is not None and msg.kind == P.AGENT_WELCOME:
                    deadline = msg.fields["deadline"]
                    if not bounded(deadline, MAX_DEADLINE):
                        line = (f"the coordinator at {self.cfg.join} sent an impossible deadline "
                                f"{deadline!r} (expected 0 to {MAX_DEADLINE:g} s); not joining")
                        if not self.cfg.persist:
                            raise AgentError(line)
                        if line != said:
                            self.log(line)
                            said = line
                        continue
                    self.deadline = max(float(deadline), 4 * AGENT_HEARTBEAT)
                    self.last_heard = time.monotonic()
                    self.state = "joined"
                    self._begin_run()
                    self.log(f"joined {self.cfg.join} as {self.cfg.name}"
                             + (f" (run {self.runs})" if self.cfg.persist else "")
                             + f"; workers bind to {self.cfg.bind}")
                elif msg is not None and msg.kind == P.RELEASE and not self.cfg.persist:
                    return 0           # (a persistent agent has no run to end yet: it keeps joining)
        while True:
            now = time.monotonic()
            if now >= self.next_hb:
                self._send(sock, P.HEARTBEAT, state="running")
                self.next_hb = now + AGENT_HEARTBEAT
            if now - self.last_heard > self.deadline:
                self.log(f"the coordinator at {self.cfg.join} is gone (silent for {now - self.last_heard:.1f} s); "
                         "ending its workers")
                return 3
            self._report_exits(sock)
            if not sock.poll(int(AGENT_HEARTBEAT * 400)):
                continue
            for _ in range(DRAIN_LIMIT):
                msg = self._recv(sock)
                if msg is not None:
                    self.last_heard = time.monotonic()
                    if self._handle(sock, msg):
                        return 0
                if not sock.poll(0):
                    break

    def _recv(self, sock):
        try:
            return P.decode(transport.recv_frames(sock))
        except P.ProtocolError:
            return None

    def _handle(self, sock, msg) -> bool:
        """One message from the coordinator; True when the run is over."""
        f = msg.fields
        if msg.kind == P.LAUNCH:
            self._launch(sock, f)
        elif msg.kind == P.KILL:
            self.workers.stop(grace=float(f.get("grace", 2.0)))
            self._report_exits(sock)
            self._send(sock, P.KILLED)
        elif msg.kind == P.RELEASE:
            self.log(f"released: {f.get('reason', 'run over')}")
            return True
        return False

    def _launch(self, sock, f: dict) -> None:
        from asyncdni.launch.base import LaunchError, WorkerLaunch
        name = f["name"]
        ok_name = name == "feeder" or (name.startswith("layer") and name[5:].isdigit())
        if not ok_name or f["role"] not in ("feeder", "layer") or not 1 <= f["blas_threads"] <= 1024 \
                or not bounded(f["start_timeout"], MAX_START_TIMEOUT):
            self._send(sock, P.LAUNCH_FAILED, name=name, error="malformed launch request")
            return
        running = [n for n in self.workers.procs if n != name and n not in self.workers.exited()]
        if len(running) >= self.cfg.max_workers:
            self._send(sock, P.LAUNCH_FAILED, name=name,
                       error=f"agent {self.cfg.name} runs {len(running)} workers already (--max-workers "
                             f"{self.cfg.max_workers})")
            return
        try:
            w = WorkerLaunch(name, f["role"], f["index"], f["control"], f["blas_threads"], f["start_timeout"],
                             server_key=f["server_key"].encode(), secret_key=f["secret_key"].encode())
            self.workers.forget(name)
            self.workers.start(w)
        except LaunchError as e:
            self._send(sock, P.LAUNCH_FAILED, name=name, error=str(e))
            return
        self.reported.discard(name)
        self._send(sock, P.STARTED, name=name, pid=self.workers.pid(name))

    def _report_exits(self, sock) -> None:
        for name in self.workers.exited():
            if name in self.reported:
                continue
            self.reported.add(name)
            tail = self.workers.log_tail(name)[-TAIL_BYTES:]
            self._send(sock, P.EXITED, name=name, code=int(self.workers.exit_code(name)), tail=tail)
        # after stop(): processes are "after", but their exit still has to be reported once
        for name, p in self.workers.procs.items():
            if name not in self.reported and p.state == "after" and p.exit_code() is not None:
                self.reported.add(name)
                self._send(sock, P.EXITED, name=name, code=int(p.exit_code()), tail="")
