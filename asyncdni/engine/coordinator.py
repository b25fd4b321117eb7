"""The coordinator: launches a run, watches it, stops it, and gathers what it measured.

Liveness and shutdown belong here. Workers are started by a launcher (local processes,
per-host agents or Ray actors: ``launch/``), say HELLO, get their run spec in the reply
(SPEC), bind their inboxes, say READY with the endpoints they bound, get START with
every peer's endpoints (and, under CURVE, public keys), and then heartbeat.
A worker that exits, reports an error, or stays silent for
``heartbeat_interval * heartbeat_misses`` seconds ends the run with a
:class:`WorkerFailed` naming it; every exit path stops all workers.
"""
from __future__ import annotations

import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from asyncdni.engine import checkpoint as CK
from asyncdni.wire import protocol as P
from asyncdni.wire import security
from asyncdni.wire import transport
from asyncdni import config as C
from asyncdni import files
from asyncdni.config import RunConfig
from asyncdni.engine.spec import NodeAddress, ResumePoint, RunSpec
from asyncdni.engine.plan import Plan, data_info, load_datasets, make_plan

STOP_TIMEOUT = 10.0          # seconds to wait for every BYE after STOP
# control messages handled per turn of the watch loop: a flood on the control port cannot
# hold back the coordinator's own heartbeats or its liveness checks
MAX_CTRL_DRAIN = 256


class RunError(RuntimeError):
    """The run could not complete; the message says why."""


class WorkerFailed(RunError):
    def __init__(self, name: str, pid: int | None, host: str, message: str, tb: str = ""):
        self.name, self.pid, self.host, self.tb = name, pid, host, tb
        super().__init__(f"{name} (pid {pid} on {host}): {message}")


class Stalled(WorkerFailed):
    """No worker received a data-plane message for the stall limit while every worker still
    answered the coordinator: the data plane is broken somewhere between them. A
    WorkerFailed, so that ``--max-restarts`` replays the run from the last checkpoint."""

    def __init__(self, message: str):
        self.name, self.pid, self.host, self.tb = "data plane", None, "", ""
        RunError.__init__(self, message)


class Interrupted(RunError):
    pass


STALL_MIN = 15.0     # seconds: the least an automatic stall limit allows
STALL_GAPS = 20      # the automatic limit: this many times the longest pause in progress seen so far
STALL_MAX_AUTO = 600.0   # ... but never more than this (a run that once recovered from a long cut)


def stall_limit(rt, longest_gap: float) -> float:
    """Seconds without any data-plane message (anywhere) after which a run is stalled:
    ``runtime.stall_timeout`` when set; else the largest of STALL_MIN, four heartbeat
    deadlines, and STALL_GAPS times the longest pause in progress this run has shown (a slow
    model's long steps, a first step's warm-up), so that a slow run is not taken for a stall."""
    if rt.stall_timeout > 0:
        return rt.stall_timeout
    return max(STALL_MIN, 4 * rt.heartbeat_interval * rt.heartbeat_misses,
               min(STALL_MAX_AUTO, STALL_GAPS * longest_gap))


@dataclass
class WorkerInfo:
    name: str                     # for people: "feeder", "layer 1", ...
    ident: str                    # control identity and launcher key: "feeder", "layer0", ...
    role: str
    index: int
    node: int
    host: str
    pid: int | None = None
    bind: str = ""                # the address it binds its inboxes to
    hello: bool = False           # said HELLO and got its spec
    endpoints: dict = field(default_factory=dict)
    last_seen: float = 0.0
    state: str = "starting"
    step: int = -1
    data: int = 0                 # data-plane messages it has received (its heartbeats say)
    sent: int = 0                 # the feeder: steps it has sent into the pipeline
    stats: dict | None = None
    arrays: dict = field(default_factory=dict)


@dataclass
class RunResult:
    config: RunConfig
    plan: Plan
    feeder: dict
    layers: list[dict]
    params: list[dict]            # per layer: name -> array
    series: dict                  # per-step loss / metric / done_at from the feeder
    traces: list[dict]            # per worker: {"name", "t", "d", "c"}
    wall: float                   # coordinator wall clock, start-up and shutdown included
    checkpoints: list[int] = field(default_factory=list)   # steps of checkpoints committed in this run
    resumed_from: int | None = None
    restarts: list[dict] = field(default_factory=list)      # one entry per restart (see run())
    refused: int = 0              # CURVE clients refused on the control port
    control_rejected: dict = field(default_factory=dict)    # control messages ignored, by reason
    # what resumes changed (field, old, new, step), this one's and those of the runs it continues
    changes: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)                # the dataset, its path, split and sizes (plan.data_info)

    @property
    def train_time(self) -> float:
        return self.feeder["train_time"]

    @property
    def samples_per_s(self) -> float:
        return self.feeder["samples"] / self.train_time

    @property
    def final_eval(self) -> dict:
        return self.feeder["evals"][-1]


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class Coordinator:
    def __init__(self, cfg: RunConfig, *, launcher=None, on_progress=None, run_dir: str | None = None,
                 datasets=None, resume: CK.Checkpoint | None = None, on_started=None, log=None, route=None,
                 changes: list[dict] | None = None):
        self.cfg = cfg
        self.rt = cfg.runtime
        self.resume = resume
        self.changes = list(changes or [])    # recorded in every manifest: a later resume keeps the history
        self.on_started = on_started          # called with the coordinator once every worker has START
        self.route = route                    # optional: rewrites the peers' endpoints in START (lab relays)
        self.refused = 0                      # CURVE clients refused on the control port
        self.log = log or (lambda line: None)
        self.progress_done = resume.step if resume else 0
        self.progress_exact = False       # progress_done is the feeder's own final count (its BYE)
        # control messages ignored, by reason: a protocol reason, or "identity" for a sender
        # this coordinator did not launch
        self.ctrl_rejected: dict[str, int] = {}
        self.ckpt_files: dict[int, dict] = {}
        self.ckpt_hosts: dict[int, dict] = {}     # step -> file -> "layer 2 on HOST/ADDR"
        self.ckpt_committed: list[int] = []
        self._exit_seen: dict[int, float] = {}
        train, _test = datasets if datasets is not None else load_datasets(cfg)
        self.plan = make_plan(cfg, train)
        self.on_progress = on_progress
        self._own_dir = run_dir is None
        self.run_dir = Path(run_dir or files.private_tempdir("run"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if launcher is None:
            from asyncdni.launch.registry import make_launcher
            launcher = make_launcher(cfg, self.run_dir)
            self._own_launcher = True
        else:
            self._own_launcher = False
        self.launcher = launcher
        K = self.plan.n_layers
        places = self.rt.hosts or ("",) * (K + 1)
        ports = self.rt.ports or (0,) * (2 * (K + 1) + 1)
        self.workers: list[WorkerInfo] = [WorkerInfo("feeder", "feeder", "feeder", 0, 0, places[0])]
        self.workers += [WorkerInfo(f"layer {i + 1}", f"layer{i}", "layer", i, i + 1, places[i + 1]) for i in range(K)]
        self.placements = {w.ident: w.host for w in self.workers}
        self._idents = {w.ident: w for w in self.workers}
        self.ports = ports
        self.curve = False
        self.allowlist: security.Allowlist | None = None
        self.keys: dict[str, security.KeyPair] = {}     # CURVE: each worker's key pair, this attempt
        self.server: security.KeyPair | None = None      # CURVE: the control socket's key pair
        self.control_port = ports[-1]
        widest = max(self.plan.widths)
        rows = max(cfg.train.batch_size, cfg.train.eval_batch)
        self.max_message = 2 * widest * rows * 8 + (1 << 20)
        # control messages: the largest is a layer's BYE (float32 parameters, its timeline)
        from asyncdni.engine.trace import TRACE_LIMIT
        param_bytes = 4 * max(s.param_count() for s in self.plan.specs)
        n_evals = self.plan.steps // max(1, cfg.train.eval_every) + 2
        feeder_bytes = 8 * 3 * self.plan.steps + 8 * len(CK.FEEDER_EVAL_KEYS) * n_evals   # the feeder's history
        self.max_ctrl_message = max(param_bytes, feeder_bytes) + 17 * TRACE_LIMIT + (16 << 20)
        self.ckpt_root = self.rt.checkpoint_dir or self.rt.resume

    # ------------------------------------------------------------- identity
    def _by_identity(self, ident: bytes) -> WorkerInfo | None:
        """The worker whose control identity (socket frame) this is; None for a stranger."""
        return self._by_ident(ident.decode(errors="replace"))

    def _by_ident(self, ident: str) -> WorkerInfo | None:
        return self._idents.get(ident)

    def _send(self, w: WorkerInfo, kind: str, **fields) -> None:
        try:
            transport.send(self.ctrl, kind, -1, (), fields, prefix=(w.ident.encode(),))
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            # its control connection is gone (ROUTER_MANDATORY): the process most likely
            # ended; say so in the usual words if the launcher already knows
            self._check_exits()
            raise WorkerFailed(w.name, w.pid, w.host, f"control connection lost while {w.state}") from None

    # ------------------------------------------------------------------- run
    def run(self) -> RunResult:
        t_wall = time.perf_counter()
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
        self.ctx = zmq.Context()
        self.ctrl = None
        try:
            self.launcher.prepare(dict(self.placements), self.rt.start_timeout)
            ctrl_host = self.launcher.control_host(self.rt.host)
            for w in self.workers:
                w.bind = self.launcher.bind_host(w.ident, w.host or self.rt.host)
            self.nodes = [NodeAddress(w.role, w.bind, self.ports[2 * j], self.ports[2 * j + 1])
                          for j, w in enumerate(self.workers)]
            # CURVE whenever anything binds off loopback, unless the user said --insecure
            self.curve = self.rt.security == "curve" or (self.rt.security == "auto" and not all(
                security.is_loopback(h) for h in [ctrl_host, *(w.bind for w in self.workers)]))
            server = None
            if self.curve:
                server = self.server = security.KeyPair.new()
                self.keys = {w.ident: security.KeyPair.new() for w in self.workers}
                self.allowlist = security.Allowlist(self.ctx, [k.public for k in self.keys.values()])
            self.ctrl, ctrl_ep = transport.bind(self.ctx, zmq.ROUTER, ctrl_host, self.control_port,
                                                max_message=self.max_ctrl_message, curve=server)
            self.ctrl.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.spec = RunSpec(
                config=self.cfg, nodes=tuple(self.nodes), specs=self.plan.specs, steps=self.plan.steps, in_shape=tuple(self.plan.in_shape),
                n_train=self.plan.n_train,
                max_message=self.max_message, checkpoint_dir=str(self.ckpt_root or ""),
                resume=ResumePoint(str(self.resume.directory), self.resume.step) if self.resume else None,
                curve_keys=tuple(k.public.decode() for k in self.keys.values()) if self.curve else None,
            ).to_wire()
            from asyncdni.launch.base import WorkerLaunch
            for w in self.workers:
                key = self.keys.get(w.ident)
                self.launcher.start(WorkerLaunch(
                    w.ident, w.role, w.index, ctrl_ep, self.rt.blas_threads, self.rt.start_timeout,
                    server_key=server.public if server else b"", secret_key=key.secret if key else b"",
                    placement=w.host))
                w.pid = self.launcher.pid(w.ident)
                w.host = self.launcher.host(w.ident)
            self._handshake()
            self._watch()
            result = self._collect()
            result.wall = time.perf_counter() - t_wall
            return result
        except KeyboardInterrupt:
            raise Interrupted("interrupted; all workers stopped") from None
        except WorkerFailed:
            self.launcher.check_hosts()       # a whole host gone: say that (no restart can help)
            raise
        finally:
            self._shutdown()
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)

    def _shutdown(self) -> None:
        try:
            if self.ctrl is not None and not self.ctrl.closed:
                for w in self.workers:
                    try:
                        if w.stats is None:
                            self._send(w, P.STOP, reason="coordinator shutting down")
                    except (zmq.ZMQError, WorkerFailed):
                        pass              # already gone: the launcher ends it below either way
                self._feeder_final_count()
        finally:
            try:
                self.launcher.stop(grace=2.0)
                if self._own_launcher:
                    self.launcher.close()
            finally:
                transport.close_all(self.ctrl)
                if self.allowlist is not None:
                    self.refused = self.allowlist.refused
                    self.allowlist.stop()
                # every socket of this context, also one that never reached self.ctrl (a bind
                # that failed half-way): ctx.term() alone would wait forever on an open socket
                self.ctx.destroy(linger=0)
                if self._own_dir:
                    shutil.rmtree(self.run_dir, ignore_errors=True)

    def _feeder_final_count(self, timeout: float = 1.0) -> None:
        """After a failure: the feeder's exact count of completed steps, from its BYE, so that
        the steps lost to a restart are counted, not estimated from progress reports.
        Checkpoint reports still arriving meanwhile are committed, not dropped."""
        feeder = self.workers[0]
        if feeder.stats is not None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                w, msg = self._recv_ctrl(50)
            except zmq.ZMQError:
                return
            if msg is not None and msg.kind == P.CKPT_DONE and w is not None:
                try:
                    self._checkpoint_part(w, msg)
                except (WorkerFailed, CK.CheckpointError):
                    pass
            if w is feeder and msg is not None and msg.kind == P.BYE:
                stats = msg.fields.get("stats")
                done = stats.get("completed") if isinstance(stats, dict) else None
                if type(done) is int:
                    self.progress_done = max(self.progress_done, done)
                    self.progress_exact = True
                return
            if feeder.ident in self.launcher.exited():
                return

    def _check_exits(self, grace: float = 0.0) -> None:
        """Raise WorkerFailed for a worker whose process ended without saying BYE. With
        ``grace``, an exit is only final once that long has passed since it was first seen,
        so that a BYE still in flight is read first."""
        self.launcher.poll()                  # a lost host ends the run (HostLost)
        now = time.monotonic()
        for ident in self.launcher.exited():
            w = self._by_ident(ident)
            if w is None or w.stats is not None:
                continue                  # not ours, or it said BYE: a normal exit
            if grace and now - self._exit_seen.setdefault(ident, now) < grace:
                continue
            tail = self.launcher.log_tail(ident)
            how = self.launcher.describe_exit(ident)
            if w.state == "starting":
                doing = " during start-up"
            else:
                doing = f" while {w.state}" + (f" (last reported step {w.step})" if w.step >= 0 else "")
            raise WorkerFailed(w.name, w.pid, w.host, f"{how}{doing}" + (f"\n{tail}" if tail else ""))

    def _ctrl_reject(self, reason: str) -> None:
        self.ctrl_rejected[reason] = self.ctrl_rejected.get(reason, 0) + 1

    def _recv_ctrl(self, timeout_ms: int):
        """One control message: (worker, message), or (None, None) when there was none or it
        was ignored. Only the identities of the workers this coordinator launched are heard;
        anything else (an unknown identity, a malformed message) is counted and ignored, so
        it can never affect the run."""
        if not self.ctrl.poll(timeout_ms):
            return None, None
        frames = self.ctrl.recv_multipart(copy=False)
        w = self._by_identity(frames[0].bytes)
        if w is None:
            self._ctrl_reject("identity")
            return None, None
        try:
            msg = P.decode(frames[1:])
        except P.ProtocolError as e:
            self._ctrl_reject(e.reason)   # garbage on the control port: ignored
            return None, None
        w.last_seen = time.monotonic()
        return w, msg

    def _handle_common(self, w: WorkerInfo | None, msg) -> bool:
        """Messages that mean the same in every phase. True if handled."""
        if w is None:
            return True                   # (never reached: _recv_ctrl drops unknown senders)
        if msg.kind == P.ERROR:
            raise WorkerFailed(w.name, w.pid, w.host, msg.fields["error"], msg.fields["traceback"])
        if msg.kind == P.HEARTBEAT:
            state = msg.fields.get("state", w.state)
            if not (w.state != "starting" and state == "starting"):   # a beat sent before START
                w.state = state
            # the worker's current step is the header's step (a "step" field, if any, is older)
            w.step = msg.step if msg.step >= 0 else msg.fields.get("step", w.step)
            w.data = msg.fields.get("data", w.data)
            w.sent = msg.fields.get("sent", w.sent)
            return True
        return False

    def _handshake(self) -> None:
        """HELLO -> SPEC (the run spec) -> READY (bound endpoints); START once all are ready."""
        deadline = time.monotonic() + self.rt.start_timeout
        pending = {id(w) for w in self.workers}
        self._next_hb = 0.0
        while pending:
            now = time.monotonic()
            if now > deadline:
                names = ", ".join(w.name for w in self.workers if id(w) in pending)
                raise RunError(f"start-up timed out after {self.rt.start_timeout:.0f} s: no hello from {names}")
            self._check_exits()
            # workers that are up wait for the others: keep them sure we are alive
            self._heartbeats(now, [w for w in self.workers if id(w) not in pending], check=False)
            w, msg = self._recv_ctrl(100)
            if msg is None or w is None or self._handle_common(w, msg):
                continue
            if msg.kind == P.HELLO:
                if msg.fields.get("role") != w.role or msg.fields.get("index") != w.index:
                    continue               # a worker of another run or role: no spec for it
                w.pid = msg.fields["pid"]
                w.hello = True
                self._send(w, P.SPEC, spec=self.spec)
            elif msg.kind == P.READY and w.hello:
                fwd, bwd = msg.fields.get("fwd", ""), msg.fields.get("bwd", "")
                if not (isinstance(fwd, str) and isinstance(bwd, str)):
                    continue
                w.endpoints = {"fwd": fwd, "bwd": bwd}
                if self.curve:
                    w.endpoints["key"] = self.keys[w.ident].public.decode()
                pending.discard(id(w))
        peers = [w.endpoints for w in self.workers]
        if self.route is not None:
            peers = self.route(peers)
        now = time.monotonic()
        for w in self.workers:
            w.last_seen = now
            w.state = "running"
            self._send(w, P.START, peers=peers)
        if self.on_started is not None:
            self.on_started(self)

    def _heartbeats(self, now: float, to=None, check: bool = True) -> None:
        """Send due heartbeats (to every live worker, or to ``to``), then, with ``check``,
        declare dead any worker silent for heartbeat_interval * heartbeat_misses."""
        if now >= self._next_hb:
            for w in (self.workers if to is None else to):
                if w.stats is None:
                    self._send(w, P.HEARTBEAT)
            self._next_hb = now + self.rt.heartbeat_interval
        if not check:
            return
        limit = self.rt.heartbeat_interval * self.rt.heartbeat_misses
        for w in self.workers:
            if w.stats is None and now - w.last_seen > limit:
                self.launcher.poll()          # its whole host may be gone: that is said first
                raise WorkerFailed(w.name, w.pid, w.host,
                                   f"no heartbeat for {now - w.last_seen:.1f} s (hung or unreachable) "
                                   f"while {w.state}" + (f" (last reported step {w.step})" if w.step >= 0 else ""))

    def _check_progress(self, now: float) -> None:
        """Progress detection: heartbeats say each worker's count of data-plane messages
        received. When no count moves for the stall limit, the data plane is broken (a cut
        link, a dead relay, a message lost to a connection reset) though every worker still
        answers: raise Stalled with one line naming the first break in the chain."""
        total = sum(w.data for w in self.workers)
        if total != self._data_seen:
            self._longest_gap = max(self._longest_gap, now - self._last_progress)
            self._data_seen, self._last_progress = total, now
            return
        silent = now - self._last_progress
        limit = stall_limit(self.rt, self._longest_gap)
        if silent > limit:
            raise Stalled(self._stall_line(silent, limit))

    def _stall_line(self, silent: float, limit: float) -> str:
        feeder, layers = self.workers[0], self.workers[1:]
        # how far forward each worker got: the feeder's last step sent, each layer's last step
        # handled; the first drop along the chain is where the forward data stopped
        pos = [feeder.sent - 1] + [w.step for w in layers]
        steps = ", ".join([f"feeder sent {feeder.sent} and completed {max(feeder.step, 0)}"]
                          + [f"{w.name} at {w.step}" for w in layers])
        where = ("every layer has handled the steps sent, so the break is on the way back "
                 "(gradients down the layers, or the last layer's results to the feeder)")
        for i in range(len(pos) - 1):
            if pos[i] > pos[i + 1]:
                a, b = self.workers[i], self.workers[i + 1]
                where = f"the first break is the forward link {a.name} ({a.bind}) -> {b.name} ({b.bind})"
                break
        how = "" if self.rt.max_restarts else (
            "; with --checkpoint-every N and --max-restarts N the run is replayed from its last checkpoint")
        return (f"data plane stalled: no worker received a data message for {silent:.1f} s (limit {limit:.0f} s, "
                f"--stall-timeout) though every worker still answers the coordinator: a link between hosts is "
                f"cut, a delay relay is gone, or a message was lost when a connection reset. Steps: {steps}; "
                f"{where}{how}")

    def _watch(self) -> None:
        self._next_hb = 0.0
        self._data_seen = -1               # none seen yet: the first count starts the clock
        self._last_progress = time.monotonic()
        self._longest_gap = 0.0
        poll_ms = max(10, int(self.rt.heartbeat_interval * 250))
        while True:
            w, msg = self._recv_ctrl(poll_ms)
            for _ in range(MAX_CTRL_DRAIN):       # what queued up, before judging liveness
                if msg is not None and self._dispatch(w, msg):
                    return
                if not self.ctrl.poll(0):
                    break
                w, msg = self._recv_ctrl(0)
            self._check_exits()
            now = time.monotonic()
            self._heartbeats(now)
            self._check_progress(now)

    def _dispatch(self, w, msg) -> bool:
        """Handle one message of the training phase; True when the feeder has finished."""
        if msg is None or self._handle_common(w, msg):
            return False
        if msg.kind == P.PROGRESS and w is self.workers[0]:
            self.progress_done = msg.fields["done"]
            if self.on_progress is not None:
                self.on_progress(msg.fields)
        elif msg.kind == P.CKPT_DONE and w is not None:
            self._checkpoint_part(w, msg)
        elif msg.kind == P.STATS and w is self.workers[0] and msg.fields.get("finished"):
            return True
        return False

    def _checkpoint_part(self, w: WorkerInfo, msg) -> None:
        """A worker saved its part of checkpoint ``step``; commit it once all parts are in."""
        f = msg.fields
        name = f.get("file")
        expected = CK.layer_file(w.index) if w.role == "layer" else CK.FEEDER_FILE
        if name != expected or not isinstance(f.get("sha256"), str) or not isinstance(f.get("bytes"), int):
            raise WorkerFailed(w.name, w.pid, w.host, f"malformed checkpoint report {f!r}")
        parts = self.ckpt_files.setdefault(msg.step, {})
        parts[name] = {"sha256": f["sha256"], "bytes": f["bytes"]}
        writers = self.ckpt_hosts.setdefault(msg.step, {})
        writers[name] = f"{w.name} on {f['host']}" if isinstance(f.get("host"), str) else w.name
        if len(parts) == len(self.workers):
            # a checkpoint at ``step`` means the feeder had completed that many steps, even if
            # its latest progress report (or its BYE, if it died) never arrived
            self.progress_done = max(self.progress_done, msg.step)
            try:
                CK.write_manifest(self.ckpt_root, msg.step, self.cfg.digest(), self.plan.n_layers, parts,
                                  extra={"schedule": self.cfg.train.schedule, "steps": self.plan.steps,
                                         "written_by": writers, "config": self.cfg.to_dict(),
                                         "changes": self.changes})
            except CK.CheckpointError as e:
                if self.rt.launcher == "local":
                    raise
                raise CK.CheckpointError(f"{e} (files are written by each worker on its own host: "
                                         f"{self.ckpt_root} must be shared storage that every host and the "
                                         f"coordinator see at the same path)") from None
            del self.ckpt_hosts[msg.step]
            del self.ckpt_files[msg.step]
            self.ckpt_committed.append(msg.step)
            CK.prune(self.ckpt_root, self.rt.keep_checkpoints, self.cfg.digests())
            self.log(f"checkpoint at step {msg.step} committed in {self.ckpt_root}")

    def _collect(self) -> RunResult:
        for w in self.workers:
            self._send(w, P.STOP, reason="finished")
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(w.stats is None for w in self.workers):
            if time.monotonic() > deadline:
                missing = ", ".join(w.name for w in self.workers if w.stats is None)
                raise RunError(f"no final report from {missing} within {STOP_TIMEOUT:.0f} s of stop")
            w, msg = self._recv_ctrl(100)
            if msg is None or w is None or self._handle_common(w, msg):
                self._check_exits(grace=1.0)      # a worker that exited may have a BYE in flight
                continue
            if msg.kind == P.CKPT_DONE:
                self._checkpoint_part(w, msg)
            elif msg.kind == P.BYE:
                w.stats = msg.fields["stats"]
                names = list(msg.fields.get("params", [])) + list(msg.fields.get("series", []))
                names += ["trace_t", "trace_d", "trace_c"]
                w.arrays = {n: np.array(a) for n, a in zip(names, msg.arrays)}
        self.launcher.wait(5.0)
        feeder = self.workers[0]
        feeder.stats["evals"] = CK.evals_from_arrays(feeder.arrays)
        layers = self.workers[1:]
        params = [{k: v for k, v in w.arrays.items() if not k.startswith(("trace_", "eval_"))} for w in layers]
        series = {k: feeder.arrays[k] for k in ("loss", "metric", "done_at")}
        traces = [{"name": w.name, "t": w.arrays["trace_t"], "d": w.arrays["trace_d"], "c": w.arrays["trace_c"]}
                  for w in self.workers]
        return RunResult(self.cfg, self.plan, feeder.stats, [w.stats for w in layers], params, series, traces, 0.0,
                         checkpoints=list(self.ckpt_committed),
                         resumed_from=self.resume.step if self.resume else None,
                         control_rejected=dict(self.ctrl_rejected))


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def find_resume_point(cfg: RunConfig, n_layers: int, log=None) -> CK.Checkpoint:
    """The newest complete checkpoint of ``cfg.runtime.resume`` made by this configuration
    (its digest, or the legacy digest of checkpoints written before the learning rate could
    change on resume); one made by another names the field that differs, where its manifest
    records its configuration."""
    ck, skipped = CK.find_latest(cfg.runtime.resume, cfg.digests(), n_layers,
                                 explain=lambda extra: C.explain_mismatch(extra.get("config"), cfg))
    for reason in skipped:
        if log:
            log(f"skipping checkpoint: {reason}")
    return ck


def resume_history(resume: CK.Checkpoint, cfg: RunConfig, steps: int | None = None) -> list[dict]:
    """The changes made on resume so far: those the checkpoint's manifest records (earlier
    resumes), then this resume's against the configuration the manifest records (none where
    it records none: a checkpoint from before manifests did). A change that a checkpoint
    cannot take (a schedule that adds or drops state) is a ConfigError naming it. A change
    of length (train.steps or train.epochs) is recorded as one of train.steps, in steps
    (``steps``: this run's; the manifest records the earlier run's)."""
    extra = resume.extra
    past = [c for c in extra.get("changes", []) if isinstance(c, dict) and isinstance(c.get("field"), str)] \
        if isinstance(extra.get("changes"), list) else []
    recorded = extra.get("config")
    if not isinstance(recorded, dict):
        return past
    try:
        old = C.from_dict(recorded)
    except (C.ConfigError, TypeError, ValueError):
        return past
    where = f"--resume {cfg.runtime.resume}"
    now = C.resume_changes(old, cfg, where, step=resume.step, old_name="in the checkpoint")
    before = extra.get("steps")
    if steps is not None and type(before) is int:
        now = [c for c in now if c["field"] not in ("train.steps", "train.epochs")]
        if before != steps:
            now.append({"field": "train.steps", "old": before, "new": steps, "step": resume.step})
        order = C.field_names()
        now.sort(key=lambda c: order.index(c["field"]))
    return past + now


def prepare_checkpoint_dir(cfg: RunConfig) -> None:
    """Before any worker starts: the checkpoint directory exists and is writable, and a
    fresh run does not mix its checkpoints with an earlier run's."""
    rt = cfg.runtime
    if not rt.checkpoint_every:
        return
    root = Path(rt.checkpoint_dir or rt.resume)
    if not rt.resume and CK.has_checkpoints(root):
        raise CK.CheckpointError(f"checkpoint directory {root} already holds checkpoints; continue them with "
                                 f"--resume {root}, or choose an empty directory")
    try:
        files.make_writable_dir(root)
    except OSError as e:
        raise CK.CheckpointError(f"checkpoint directory {root} is not writable: {e.strerror or e}") from None


def run(cfg: RunConfig, *, log=None, **kw) -> RunResult:
    """Run to completion. With ``runtime.max_restarts`` > 0, a worker failure restarts the
    whole pipeline from the newest complete checkpoint of this run (or of the checkpoint it
    resumed from; from the start if there is none yet). The result's ``restarts`` says what
    failed, at which step, how many steps of work were lost (done past that checkpoint,
    then redone) and from which step the run was recovered."""
    log = log or (lambda line: None)
    prepare_checkpoint_dir(cfg)
    # loaded once: the plan below and every restart attempt use the same data
    kw["datasets"] = kw.get("datasets") or load_datasets(cfg)
    plan = make_plan(cfg, kw["datasets"][0])
    # torch models whose stages come from the model: the worker count is known only now
    cfg = C.with_stages(cfg, plan.n_layers)
    resume = None
    if cfg.runtime.resume:
        resume = find_resume_point(cfg, plan.n_layers, log)
        steps = plan.steps
        if resume.step > steps:
            raise CK.CheckpointError(f"{resume.directory}: step {resume.step} is past this run's {steps} steps; "
                                     f"ask for at least {resume.step} steps")
        log(f"resuming from step {resume.step} ({resume.directory})")
        kw["changes"] = resume_history(resume, cfg, plan.steps)
        for ch in kw["changes"]:
            if ch.get("step") == resume.step:
                log(f"changed on resume: {ch['field']} {C.show_value(ch['old'])} -> {C.show_value(ch['new'])}")
    restarts: list[dict] = []
    first_resume = resume.step if resume else None
    lineage = [resume] if resume else []          # checkpoints this run may fall back to
    own = kw.get("launcher") is None              # one launcher for every attempt (agents stay joined)
    logs = None
    if own:
        from asyncdni.launch.registry import make_launcher
        logs = files.private_tempdir("logs")
        kw["launcher"] = make_launcher(cfg, logs)
    try:
        result = _attempts(cfg, kw, log, resume, restarts, first_resume, lineage)
        result.changes = list(kw.get("changes") or [])
        result.data = data_info(cfg, *kw["datasets"])
        return result
    finally:
        if own:
            kw["launcher"].close()
            shutil.rmtree(logs, ignore_errors=True)


def _attempts(cfg, kw, log, resume, restarts, first_resume, lineage) -> RunResult:
    while True:
        c = Coordinator(cfg, resume=resume, log=log, **kw)
        try:
            result = c.run()
        except WorkerFailed as e:
            if len(restarts) >= cfg.runtime.max_restarts:
                raise
            for step in c.ckpt_committed:
                try:
                    lineage.append(CK.validate(CK.step_dir(c.ckpt_root, step), cfg.digests(), c.plan.n_layers))
                except CK.CheckpointError:
                    pass                              # pruned or damaged since: not a fallback
            ck = max(lineage, key=lambda k: k.step) if lineage else None
            back_to = ck.step if ck else 0
            # the feeder's exact count when its BYE arrived; else (the feeder itself died) a
            # lower bound: its last progress report or this attempt's newest checkpoint
            done = max([c.progress_done, *c.ckpt_committed])
            restarts.append({"error": str(e).splitlines()[0], "failed_at_step": done,
                             "resumed_from_step": back_to, "steps_lost": max(0, done - back_to),
                             "exact": c.progress_exact})
            log(f"restart {len(restarts)}/{cfg.runtime.max_restarts}: {str(e).splitlines()[0]}; "
                f"resuming from step {back_to}")
            resume = ck
            continue
        result.restarts = restarts
        result.resumed_from = first_resume
        result.refused = c.refused
        result.control_rejected = dict(c.ctrl_rejected)
        return result
