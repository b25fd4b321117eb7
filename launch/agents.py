"""Agents launcher: workers on other hosts, each started by the ``asyncdni agent`` there.

``asyncdni train --launcher agents --listen ADDR:PORT --hosts h1,h1,h2,h3,h4`` binds a
ROUTER on ADDR:PORT, waits (up to ``start_timeout``) for the agents that ``--hosts``
names, and starts each worker through its agent. The agents stay joined across the
restarts of one run (``--max-restarts``: the agents end and restart their workers); the
loss of a whole agent ends the run with :class:`~asyncdni.launch.base.HostLost`, one line
naming the host. ``close()`` releases the agents (RELEASE): each exits, or, started with
``--persist``, ends the run's workers and waits for the next coordinator. The coordinator's control socket binds the ``--listen`` address too.

Under CURVE (``--keys DIR``; on by default when ADDR is not loopback) only agents whose
public key is in DIR get in, and the coordinator is authenticated by
``DIR/coordinator.key_secret``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import zmq

from asyncdni.wire import protocol as P
from asyncdni.wire import security
from asyncdni.wire import transport
from asyncdni.launch.agent import AGENT_HEARTBEAT, DRAIN_LIMIT

from asyncdni.launch.base import HostLost, LaunchError, Launcher, WorkerLaunch

AGENT_MISSES = 6              # agent heartbeats missed before an agent is declared lost, at least (1.5 s)


@dataclass
class AgentInfo:
    name: str
    bind: str
    host: str
    pid: int
    last_seen: float
    lost: bool = False
    peer: str = ""                # the address its connection to us comes from ("" if unknown)


@dataclass
class _Worker:
    agent: str
    state: str = "running"         # running -> after
    pid: int | None = None
    code: int | None = None
    tail: str = ""
    error: str = ""


@dataclass
class AgentsLauncher(Launcher):
    listen: str                                   # ADDR:PORT
    keys_dir: str = ""
    security_mode: str = "auto"
    heartbeat_deadline: float = 2.0               # the agents' deadline for our silence
    agents: dict[str, AgentInfo] = field(default_factory=dict)
    workers: dict[str, _Worker] = field(default_factory=dict)
    kind = "agents"

    def __post_init__(self):
        host, _, port = self.listen.rpartition(":")
        self.listen_host, self.listen_port = host.strip("[]"), int(port)
        self.placements: dict[str, str] = {}
        self.ctx = None
        self.sock = None
        self.allowlist = None
        self.refused = 0
        self.agent_keys: dict[str, str] | None = None   # CURVE: agent name -> its z85 public key
        self.impostors = 0               # CURVE messages whose key is not their name's
        self._next_hb = 0.0
        self.endpoint = transport.endpoint(self.listen_host, self.listen_port)

    @classmethod
    def from_config(cls, cfg, run_dir=None) -> "AgentsLauncher":
        rt = cfg.runtime
        return cls(rt.listen, rt.keys, rt.security, rt.heartbeat_interval * rt.heartbeat_misses)

    # ----------------------------------------------------------- the socket
    @property
    def curve(self) -> bool:
        return self.security_mode == "curve" or (self.security_mode == "auto"
                                                 and not security.is_loopback(self.listen_host))

    def _bind(self) -> None:
        if self.sock is not None:
            return
        server = None
        agent_keys = {}
        if self.curve:
            if not self.keys_dir:
                raise LaunchError(f"agents at {self.listen} would connect without encryption: make keys with "
                                  f"'asyncdni keys DIR', pass --keys DIR here and to every agent, "
                                  f"or pass --insecure on a trusted network")
            try:
                server = security.load_secret(self.keys_dir, security.COORDINATOR)
                agent_keys = security.load_all_public(self.keys_dir)
            except security.KeyError_ as e:
                raise LaunchError(str(e)) from None
            if not agent_keys:
                raise LaunchError(f"key directory {self.keys_dir} holds no agent keys (asyncdni keys DIR NAME ...)")
        self.ctx = zmq.Context()
        if server is not None:
            self.allowlist = security.Allowlist(self.ctx, agent_keys.values())
            # ZAP gives each message the z85 public key of its sender (pyzmq's default User-Id):
            # a key speaks only for its own name, whatever routing identity it claims
            self.agent_keys = {name: key.decode() for name, key in agent_keys.items()}
        try:
            self.sock, _ = transport.bind(self.ctx, zmq.ROUTER, self.listen_host, self.listen_port, curve=server)
        except transport.TransportError as e:
            self._close_socket()
            raise LaunchError(f"agents launcher: {e}") from None
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)

    def _close_socket(self) -> None:
        transport.close_all(self.sock)
        self.sock = None
        if self.allowlist is not None:
            self.refused = self.allowlist.refused
            self.allowlist.stop()
            self.allowlist = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    def _send(self, agent: str, kind: str, **fields) -> bool:
        try:
            transport.send(self.sock, kind, -1, (), fields, prefix=(agent.encode(),))
            return True
        except zmq.ZMQError:
            return False               # not connected (any more): its heartbeats tell

    # ------------------------------------------------------------ messages
    def _pump(self, timeout_ms: int = 0) -> None:
        """Handle what the agents sent, send due heartbeats; never blocks past timeout_ms."""
        now = time.monotonic()
        if now >= self._next_hb:
            for a in self.agents.values():
                if not a.lost:
                    self._send(a.name, P.HEARTBEAT)
            self._next_hb = now + AGENT_HEARTBEAT
        if not self.sock.poll(timeout_ms):
            return
        for _ in range(DRAIN_LIMIT):
            frames = self.sock.recv_multipart(copy=False)
            if len(frames) >= 2:
                name = frames[0].bytes.decode(errors="replace")
                if self.agent_keys is not None and frames[1].get("User-Id") != self.agent_keys.get(name):
                    self.impostors += 1          # another agent's key under this name: ignored
                else:
                    self._handle(name, frames[1:], _peer_address(frames[1]))
            if not self.sock.poll(0):
                break

    def _handle(self, name: str, frames, peer: str = "") -> None:
        try:
            msg = P.decode(frames)
        except P.ProtocolError:
            return
        now = time.monotonic()
        a = self.agents.get(name)
        if msg.kind == P.AGENT_HELLO:
            f = msg.fields
            if f["name"] != name:
                return
            if a is not None and not a.lost and a.pid != f["pid"]:
                return                 # a second agent under a name already taken: ignored
            self.agents[name] = AgentInfo(name, f["bind"], f["host"], f["pid"], now, peer=peer)
            self._send(name, P.AGENT_WELCOME, heartbeat_interval=AGENT_HEARTBEAT,
                       deadline=float(self.heartbeat_deadline))
            return
        if a is None:
            return                     # not joined: ignored
        a.last_seen = now
        f = msg.fields
        w = self.workers.get(f.get("name", "")) if isinstance(f.get("name"), str) else None
        if w is not None and w.agent != name:
            return                     # about a worker this agent does not run
        if msg.kind == P.STARTED and w is not None:
            w.pid = f["pid"]
        elif msg.kind == P.EXITED and w is not None:
            w.code, w.tail = f["code"], f["tail"]
        elif msg.kind == P.LAUNCH_FAILED and w is not None:
            w.code, w.error = 1, f["error"]
            w.tail = f"agent {name} could not start it: {f['error']}"

    def _check_agents(self) -> None:
        now = time.monotonic()
        limit = self.agent_deadline
        for a in self.agents.values():
            if a.lost or not any(w.agent == a.name for w in self.workers.values()):
                continue
            if now - a.last_seen > limit:
                a.lost = True
                raise HostLost(f"agent {a.name} ({a.bind}) lost: no heartbeat for {now - a.last_seen:.1f} s; "
                               f"its workers are gone and the run cannot go on without that host")

    @property
    def agent_deadline(self) -> float:
        """Seconds of silence after which an agent is lost: the deadline the agents are told to
        keep for ours (runtime.heartbeat_interval x heartbeat_misses), never less than
        AGENT_MISSES of our own beats."""
        return max(AGENT_HEARTBEAT * AGENT_MISSES, self.heartbeat_deadline)

    def check_hosts(self) -> None:
        """Every agent that runs workers shows a sign of life after now, within its deadline."""
        if self.sock is None:
            return
        t0 = time.monotonic()
        busy = {w.agent for w in self.workers.values()}
        while True:
            self._pump(20)
            silent = [a for a in busy if self.agents[a].last_seen <= t0 and not self.agents[a].lost]
            if not silent:
                return
            if time.monotonic() - t0 > self.agent_deadline:
                self._check_agents()
                return

    # ------------------------------------------------------------ interface
    def control_host(self, default: str) -> str:
        return self.listen_host

    def prepare(self, placements: dict[str, str], timeout: float) -> None:
        self._bind()
        self.placements = dict(placements)
        need = sorted(set(placements.values()))
        missing = [n for n in need if not n]
        if missing:
            raise LaunchError("the agents launcher needs an agent name for every worker (--hosts)")
        deadline = time.monotonic() + timeout
        while True:
            self._pump(50)
            lost = [n for n in need if n in self.agents and self.agents[n].lost]
            if lost:
                a = self.agents[lost[0]]
                raise HostLost(f"agent {a.name} ({a.bind}) was lost earlier in this run")
            waiting = [n for n in need if n not in self.agents]
            if not waiting:
                self._check_binds(need)
                return
            if time.monotonic() > deadline:
                raise LaunchError(f"start-up timed out after {timeout:.0f} s: no agent named "
                                  f"{', '.join(waiting)} joined at {self.endpoint} "
                                  f"(start it there with: asyncdni agent --join {self.endpoint} "
                                  f"--name {waiting[0]} --bind ADDR)")

    def _check_binds(self, need: list[str]) -> None:
        """Workers on one host must reach those on another: refuse, in one line, an agent whose
        workers bind loopback or a wildcard address when the run's agents are on different
        hosts (they connect from different addresses, or name different machines)."""
        agents = [self.agents[n] for n in need]
        peers = {a.peer for a in agents if a.peer}
        if len(peers) < 2 and len({a.host for a in agents}) < 2:
            return                     # one host: loopback reaches every worker
        for a in agents:
            if security.is_loopback(a.bind) or a.bind.strip("[]") in ("0.0.0.0", "::", "*"):
                others = ", ".join(f"{b.name} ({b.peer or b.host})" for b in agents if b is not a)
                raise LaunchError(f"agent {a.name} (connecting from {a.peer or a.host}) has its workers bind to "
                                  f"{a.bind}, which the workers on the other hosts ({others}) cannot reach; "
                                  f"restart it with --bind ADDR, an address of its host that they can reach")

    def bind_host(self, name: str, default: str) -> str:
        return self.agents[self.placements[name]].bind

    def start(self, w: WorkerLaunch) -> None:
        agent = self.placements.get(w.name) or w.placement
        if agent not in self.agents:
            raise LaunchError(f"cannot start {w.name}: no agent named {agent!r}")
        self.workers[w.name] = _Worker(agent)
        sent = self._send(agent, P.LAUNCH, name=w.name, role=w.role, index=w.index, control=w.control,
                          blas_threads=w.blas_threads, start_timeout=float(w.start_timeout),
                          server_key=w.server_key.decode(), secret_key=w.secret_key.decode())
        if not sent:
            self.workers[w.name].code = 1
            self.workers[w.name].tail = f"agent {agent} is not connected"

    def poll(self) -> None:
        if self.sock is not None:
            self._pump(0)
            self._check_agents()

    def state(self, name: str) -> str:
        w = self.workers.get(name)
        if w is None:
            return "before"
        return "after" if w.code is not None else w.state

    def exit_code(self, name: str) -> int | None:
        w = self.workers.get(name)
        return None if w is None else w.code

    def log_tail(self, name: str, lines: int = 15) -> str:
        w = self.workers.get(name)
        return "" if w is None else "\n".join(w.tail.strip().splitlines()[-lines:])

    def pid(self, name: str) -> int | None:
        w = self.workers.get(name)
        return None if w is None else w.pid

    def host(self, name: str) -> str:
        w = self.workers.get(name)
        if w is None:
            return "?"
        a = self.agents.get(w.agent)
        return f"{w.agent} ({a.bind})" if a else w.agent

    def describe_exit(self, name: str) -> str:
        w = self.workers.get(name)
        if w is not None and w.error:
            return "could not be started"
        return super().describe_exit(name)

    def exited(self) -> list[str]:
        self.poll()
        return [n for n, w in self.workers.items() if w.state == "running" and w.code is not None]

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._pump(50)
            if all(w.code is not None for w in self.workers.values()):
                return True
        return False

    def stop(self, grace: float = 3.0) -> None:
        """Every agent ends its workers (SIGTERM, then SIGKILL after ``grace``)."""
        if self.sock is None:
            return
        busy = {w.agent for w in self.workers.values() if w.code is None}
        silent_since = time.monotonic() - AGENT_HEARTBEAT * AGENT_MISSES
        for a in busy:
            if self.agents[a].last_seen < silent_since:
                self.agents[a].lost = True          # its workers died with it
            if not self.agents[a].lost:
                self._send(a, P.KILL, grace=float(grace))
        deadline = time.monotonic() + grace + 3.0
        while time.monotonic() < deadline:
            self._pump(50)
            left = [w for w in self.workers.values() if w.code is None and not self.agents[w.agent].lost]
            if not left:
                break
        for w in self.workers.values():
            w.state = "after"

    def close(self) -> None:
        """The run is over: release every agent (it exits, or under ``--persist`` waits for the
        next coordinator) and close the socket."""
        if self.sock is None:
            return
        try:
            self.stop(grace=2.0)
        finally:
            for a in self.agents.values():
                if not a.lost:
                    self._send(a.name, P.RELEASE, reason="run over")
            # let the releases leave (up to 1 s): closed here, since _close_socket closes with linger 0
            self.sock.close(linger=1000)
            self._close_socket()


def _peer_address(frame) -> str:
    """The address a message's connection comes from (libzmq's Peer-Address), or ""."""
    try:
        return frame.get("Peer-Address") or ""
    except (zmq.ZMQError, AttributeError, TypeError):
        return ""
