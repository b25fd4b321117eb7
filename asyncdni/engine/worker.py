"""Worker processes: the feeder and one process per layer.

Each worker talks to the coordinator over a DEALER socket (hello, heartbeats, progress,
errors, bye) and to its neighbours over PUSH/PULL sockets:

    feeder.up --FWD/EVAL--> L1.fwd_in ... Li.up --FWD/EVAL/ACK--> L(i+1).fwd_in
    L(i+1).down --BWD/ACK--> Li.bwd_in ... L1.down --ACK--> feeder.inbox
    LK.sink --DONE/EVAL_RESULT--> feeder.inbox

Start-up: bind inboxes (free or configured ports) -> HELLO with the bound endpoints ->
START from the coordinator with every peer's endpoints -> connect -> run.
Stop: STOP from the coordinator -> BYE (final stats, parameters, timeline) -> exit.
A worker exits by itself when the coordinator has been silent for
``heartbeat_interval * heartbeat_misses`` seconds.

Nothing here reads argv or the environment; ``workers/*.py`` are the entry points.
"""
from __future__ import annotations

import bisect
import os
import resource
import socket as _socket
import time
import traceback

import numpy as np
import zmq

from asyncdni import config as C
from asyncdni.engine import checkpoint as CK
from asyncdni.wire import protocol as P
from asyncdni import schedules as S
from asyncdni.wire import codec as WC
from asyncdni.wire import security
from asyncdni.wire import transport
from asyncdni.engine.spec import RunSpec
from asyncdni.engine.trace import TRACE_CODES, TRACE_LIMIT
from asyncdni.numerics import losses
from asyncdni.numerics.data import DataError
from asyncdni.nodes import make_node
from asyncdni.numerics.layer import NonFiniteError, StepError, all_finite


class StepLost(RuntimeError):
    """The message that a step needs arrived broken: that step can never complete."""


# failures that a user causes or must act on: reported in one line, without a traceback
USER_ERRORS = (DataError, transport.TransportError, CK.CheckpointError, NonFiniteError, StepLost)

T_FWD, T_BWD, T_EVAL, T_WAIT = (TRACE_CODES[k] for k in ("forward", "backward", "eval", "wait"))
PROGRESS_INTERVAL = 0.25        # seconds between feeder progress reports
AUTO_WARMUP, AUTO_PROBE = 3, 8  # --max-inflight auto: steps ignored, then steps measured, per phase


def auto_window(round_trip: float, step_time: float, cap: int) -> int:
    """Steps in flight that keep the slowest stage busy: a step's round trip (all hops and
    layers in series) divided by the slowest stage's time per step, rounded up, in [1, cap]."""
    if not (round_trip > 0 and step_time > 0) or not np.isfinite(round_trip / step_time):
        return cap
    return int(min(cap, max(1, np.ceil(round_trip / step_time))))
# Messages read from one inbox per loop turn: a flood on one socket cannot starve the
# others, the heartbeats or the control socket (each gets its turn between batches).
MAX_DRAIN = 64


def peak_rss(ru) -> int:
    """Peak resident memory of this process in bytes. VmHWM, because ru_maxrss carries the
    parent's high-water mark across fork+exec and would report the coordinator's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return ru.ru_maxrss * 1024


class CoordinatorLost(RuntimeError):
    pass


class StopRequested(Exception):
    pass


class Worker:
    role = "worker"

    def __init__(self, spec: RunSpec, index: int, ctx: zmq.Context, ctrl: zmq.Socket,
                 keys: security.KeyPair | None = None):
        self.spec = spec
        self.index = index
        self.cfg = spec.config
        self.rt = self.cfg.runtime
        self.schedule = self.cfg.train.schedule
        self.sched = S.get(self.schedule, spec.specs[0].sg_target)   # everything schedule-specific is read from here
        self.host = spec.nodes[self._node_id].host
        # the first layer's per-sample input shape (Plan.in_shape): the feeder sends x as
        # (B, *in_shape) and layer 1 agrees to exactly that
        self.in_shape = spec.in_shape or (spec.specs[0].fan_in,)
        self.ctx = ctx
        self.ctrl = ctrl
        self.socks: list[zmq.Socket] = [ctrl]
        self.max_message = spec.max_message
        # CURVE: this worker's key pair, and a ZAP allowlist of the run's own workers
        self.keys = keys if spec.curve_keys is not None else None
        self.allowlist = None        # started in run(), stopped in close()
        self.hb_interval = self.rt.heartbeat_interval
        self.hb_deadline = self.rt.heartbeat_interval * self.rt.heartbeat_misses
        self.last_coord = time.monotonic()
        self.next_hb = 0.0
        self.state = "starting"
        self.cur_step = -1
        # accounting
        self.t_start = time.time()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu0 = ru0.ru_utime + ru0.ru_stime          # CPU used before this point (imports)
        self.busy = 0.0
        self.comm = 0.0
        self.wait = 0.0
        self.msgs_sent = 0
        self.bytes_sent = 0
        self.msgs_recv = 0
        self.bytes_recv = 0
        self.kind_bytes: dict[str, int] = {}    # bytes sent per message kind (the data plane's fwd/bwd)
        self.kind_msgs: dict[str, int] = {}
        self.codec_time = 0.0                   # encoding outgoing activations/gradients (part of comm)
        self.dense_bytes = 0                    # activations/gradients sent: their float32 size ...
        self.coded_bytes = 0                    # ... and their size on the wire (the codec's arrays)
        self.data_in = 0             # data-plane messages received (heartbeats carry it: progress)
        self.rejected: dict[str, int] = {}
        self.last_reject: P.ProtocolError | None = None   # why the latest message was refused
        self.trace_t = np.zeros(TRACE_LIMIT, np.float64)
        self.trace_d = np.zeros(TRACE_LIMIT, np.float64)
        self.trace_c = np.zeros(TRACE_LIMIT, np.uint8)
        self.n_trace = 0

    # ---------------------------------------------------------------- naming
    @property
    def _node_id(self) -> int:
        return 0 if self.role == "feeder" else self.index + 1

    @property
    def identity(self) -> str:
        return "feeder" if self.role == "feeder" else f"layer{self.index}"

    @property
    def label(self) -> str:
        return "feeder" if self.role == "feeder" else f"layer {self.index + 1}"

    # ------------------------------------------------------------- messaging
    def trace(self, code: int, t0: float, dur: float) -> None:
        n = self.n_trace
        if n < TRACE_LIMIT:
            self.trace_t[n] = t0
            self.trace_d[n] = dur
            self.trace_c[n] = code
            self.n_trace = n + 1

    def send(self, sock, kind, step=-1, arrays=(), fields=None):
        t0 = time.perf_counter()
        try:
            nbytes = transport.send(sock, kind, step, arrays, fields)
        except zmq.Again:
            peer = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            raise RuntimeError(f"{self.label}: {kind} message to {peer} not accepted for "
                               f"{self.hb_deadline + 1:.1f} s (peer gone or stalled)") from None
        self.comm += time.perf_counter() - t0
        self.msgs_sent += 1
        self.bytes_sent += nbytes
        self.kind_bytes[kind] = self.kind_bytes.get(kind, 0) + nbytes
        self.kind_msgs[kind] = self.kind_msgs.get(kind, 0) + 1

    def send_ctrl(self, kind, step=-1, arrays=(), **fields):
        transport.send(self.ctrl, kind, step, arrays, fields)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def recv(self, sock, expect=None, check_finite=False):
        """Receive and validate one message; None if it was rejected (and counted)."""
        t0 = time.perf_counter()
        frames = transport.recv_frames(sock)
        self.comm += time.perf_counter() - t0
        return self.accept(frames, expect, check_finite)

    def accept(self, frames, expect=None, check_finite=False):
        """Validate one received message; None if it was rejected (counted by reason, and
        the error kept in ``last_reject``)."""
        t0 = time.perf_counter()
        self.msgs_recv += 1
        self.bytes_recv += P.frame_nbytes(frames)
        try:
            return P.decode(frames, expect=expect, check_finite=check_finite)
        except P.ProtocolError as e:
            self.reject(e.reason)
            self.last_reject = e
            return None
        finally:
            self.comm += time.perf_counter() - t0

    def heartbeat(self, now: float) -> None:
        if now >= self.next_hb:
            # the step travels in the header's step, where the coordinator reads it
            self.send_ctrl(P.HEARTBEAT, self.reported_step(), state=self.state, data=self.data_in,
                           **self.heartbeat_extra())
            self.next_hb = now + self.hb_interval
        if now - self.last_coord > self.hb_deadline:
            raise CoordinatorLost(f"{self.label}: no word from the coordinator for {now - self.last_coord:.1f} s")

    def heartbeat_extra(self) -> dict:
        return {}

    def reported_step(self) -> int:
        """The step named in heartbeats (and so in a failure line): the latest this worker handled."""
        return self.cur_step

    def handle_ctrl(self) -> None:
        """Read the queued control messages (at most MAX_DRAIN); raises StopRequested on STOP."""
        for _ in range(MAX_DRAIN):
            if not self.ctrl.poll(0):
                return
            msg = self.recv(self.ctrl)
            if msg is None:
                continue
            self.last_coord = time.monotonic()
            if msg.kind == P.STOP:
                raise StopRequested(msg.fields.get("reason", ""))
            self.on_ctrl(msg)

    def on_ctrl(self, msg) -> None:
        pass

    # ------------------------------------------------------------- life cycle
    def setup(self) -> None:
        """Heavy start-up (data, model, resumed state); errors here reach the coordinator."""

    def bind_inboxes(self) -> dict:
        raise NotImplementedError

    def connect_peers(self, peers: list[dict]) -> None:
        raise NotImplementedError

    def connect_data(self, peer: dict, which: str) -> zmq.Socket:
        """PUSH socket to a peer's inbox (``which``: "fwd" or "bwd"). A send that cannot
        leave within the heartbeat deadline raises (zmq.Again) instead of blocking the
        worker forever. Under CURVE the peer is authenticated by the public key the
        coordinator vouched for."""
        curve = (self.keys, peer["key"].encode()) if self.keys is not None else None
        sock = transport.connect(self.ctx, zmq.PUSH, peer[which], max_message=self.max_message, curve=curve)
        sock.setsockopt(zmq.SNDTIMEO, int(self.hb_deadline * 1000) + 1000)
        self.socks.append(sock)
        return sock

    def loop(self) -> None:
        raise NotImplementedError

    def bye_payload(self) -> tuple[list, dict]:
        return [], {}

    def checkpoint_root(self):
        return self.spec.checkpoint_dir

    def save_checkpoint_file(self, step: int, name: str, arrays: dict) -> None:
        """Write this worker's part of checkpoint ``step`` and tell the coordinator."""
        path = CK.step_dir(self.checkpoint_root(), step) / name
        info = CK.write_arrays(path, arrays)
        self.send_ctrl(P.CKPT_DONE, step, file=name, sha256=info["sha256"], bytes=info["bytes"],
                       host=f"{_socket.gethostname()}/{self.host}")

    def stats(self) -> dict:
        wall = time.time() - self.t_start
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu = ru.ru_utime + ru.ru_stime - self.cpu0
        return {
            "role": self.role, "index": self.index, "pid": os.getpid(), "host": self.host,
            "wall": wall, "busy": self.busy, "comm": self.comm, "wait": self.wait,
            "cpu_time": cpu, "peak_rss": peak_rss(ru),
            "msgs_sent": self.msgs_sent, "bytes_sent": self.bytes_sent,
            "msgs_recv": self.msgs_recv, "bytes_recv": self.bytes_recv,
            "kind_bytes": dict(self.kind_bytes), "kind_msgs": dict(self.kind_msgs), "codec_time": self.codec_time,
            "dense_bytes": self.dense_bytes, "coded_bytes": self.coded_bytes,
            "rejected": dict(self.rejected), "trace_dropped": self.n_trace >= TRACE_LIMIT,
            "curve": self.keys is not None,
            "curve_refused": self.allowlist.refused if self.allowlist is not None else 0,
        }

    def run(self) -> int:
        code = 0
        try:
            if self.keys is not None:
                self.allowlist = security.Allowlist(self.ctx, [k.encode() for k in self.spec.curve_keys])
            self.setup()
            self.last_coord = time.monotonic()   # set-up time is not the coordinator's silence
            endpoints = self.bind_inboxes()
            self.send_ctrl(P.READY, **endpoints)
            peers = self.wait_for_start()
            self.connect_peers(peers)
            self.state = "running"
            self.loop()
        except StopRequested:
            self.state = "stopping"
            try:
                arrays, extra = self.bye_payload()
                n = self.n_trace
                arrays = list(arrays) + [self.trace_t[:n].copy(), self.trace_d[:n].copy(), self.trace_c[:n].copy()]
                self.send_ctrl(P.BYE, -1, arrays, stats=self.stats(), **extra)
            except Exception as e:  # noqa: BLE001 - the final report itself failed: say so
                code = 1
                self.send_ctrl(P.ERROR, role=self.role, index=self.index,
                               error=f"final report failed: {type(e).__name__}: {e}", traceback=traceback.format_exc())
        except CoordinatorLost:
            code = 3
        except Exception as e:  # noqa: BLE001 - every failure goes back to the coordinator as data
            code = 1
            user = isinstance(e, USER_ERRORS)
            try:
                self.send_ctrl(P.ERROR, role=self.role, index=self.index,
                               error=str(e) if user else f"{type(e).__name__}: {e}",
                               traceback="" if user else traceback.format_exc())
            except Exception:
                pass
        finally:
            self.close()
        return code

    def wait_for_start(self) -> list[dict]:
        # before START the coordinator may be busy starting other workers (a slow launcher):
        # its silence is tolerated up to the start-up timeout, not just a few heartbeats
        # (a local worker still dies with its parent at once)
        self.hb_deadline = max(self.hb_deadline, self.rt.start_timeout)
        try:
            return self._wait_for_start()
        finally:
            self.hb_deadline = self.rt.heartbeat_interval * self.rt.heartbeat_misses

    def _wait_for_start(self) -> list[dict]:
        while True:
            now = time.monotonic()
            self.heartbeat(now)
            if self.ctrl.poll(int(self.hb_interval * 1000)):
                msg = self.recv(self.ctrl)
                if msg is None:
                    continue
                self.last_coord = time.monotonic()
                if msg.kind == P.START:
                    return msg.fields["peers"]
                if msg.kind == P.STOP:
                    raise StopRequested(msg.fields.get("reason", ""))

    def close(self) -> None:
        # give the last control message (bye/error) a moment to leave
        self.ctrl.setsockopt(zmq.LINGER, 2000)
        for s in self.socks:
            if s is not self.ctrl:
                s.close(0)
        self.ctrl.close()
        if self.allowlist is not None:
            self.allowlist.stop()
        self.ctx.term()


# ============================================================================ layer
class LayerWorker(Worker):
    role = "layer"

    def __init__(self, spec: RunSpec, index: int, *args, **kw):
        super().__init__(spec, index, *args, **kw)
        self.lspec = spec.specs[index]
        self.K = self.lspec.n_layers
        self.first = self.lspec.is_first
        self.last = self.lspec.is_last
        self.M = self.lspec.microbatches
        self.batch_size = self.cfg.train.batch_size
        # fixed lag (delayed_fixed): the gradient of step s is applied right after the forward
        # of step s + lag; gradients that come earlier wait in bwd_queue, and the forward of
        # step t waits until the gradient of step t - lag - 1 has been applied
        self.lag = self.sched.lags(self.K)[self.index] if self.sched.fixed_lag and not self.last else None
        self.bwd_queue: list = []
        self.bwd_applied = 0         # fixed lag: gradients applied (they come in step order)
        self.is_pause = S.pause_points(0, spec.steps, self.cfg.train.eval_every,
                                       self.rt.checkpoint_every)
        self.pending = None          # hold_for_ack: (step, target, message) held until the ACK from below
        self.marker = None           # checkpoint step waiting for this layer's in-flight state to drain
        self.metrics_acc = None      # pipeline (last layer): the metrics of a step's micro-batches so far
        self.nonfinite_outputs = 0   # outgoing activations/gradients that had to be zeroed
        ls = self.lspec
        # codecs on the wire: activations up (--wire-fwd), gradients down (--wire-bwd, with error
        # feedback for a lossy one unless --no-wire-feedback); the feeder's input travels as float32
        t = self.cfg.train
        self.fwd_codec, self.fwd_delta = WC.parse_wire(t.wire_fwd)
        self.bwd_codec = WC.parse(t.wire_bwd)
        self.feedback = WC.ErrorFeedback(self.bwd_codec) if t.wire_feedback and self.bwd_codec.lossy else None
        # aq:CODEC: every FWD carries its sample ids; each end of a layer-to-layer link keeps
        # every sample's activation as last reconstructed (DeltaHistory)
        self.n_ids = spec.n_train if self.fwd_delta else 0
        self.hist_out = WC.DeltaHistory(self.fwd_codec, spec.n_train) if self.fwd_delta and not self.last else None
        self.hist_in = WC.DeltaHistory(self.fwd_codec, spec.n_train) if self.fwd_delta and not self.first else None
        self.expect_fwd, self.expect_bwd = P.layer_expect(
            ls.fan_in, ls.fan_out, classes=ls.n_out if ls.task == "classification" else None, targets=ls.n_out,
            batch=self.batch_size, microbatches=self.M, eval_batch=self.cfg.train.eval_batch,
            in_shape=self.in_shape if self.first else (ls.in_shape or None), out_shape=ls.out_shape or None,
            target_range=(0.0, 1.0) if ls.task == "bits" else None,    # regression targets: finite (check_finite)
            fwd_codec=None if self.first else self.fwd_codec, bwd_codec=None if self.last else self.bwd_codec,
            fwd_delta=self.fwd_delta and not self.first, n_samples=self.n_ids)
        self.next_step = 0           # the only FWD step this layer accepts next (micro-steps in pipeline)
        # a straggler (runtime.slow): this layer's factor, resolved once from its number and host
        self.slow = C.slow_factors(self.cfg, self.K)[index]
        self.slow_owed = 0.0         # seconds of slowdown still to wait (negative: waited ahead)
        self.slow_s = 0.0            # seconds waited in all

    def setup(self) -> None:
        if self.lspec.backend == "torch":      # torch's own thread pools, as BLAS is pinned at start-up
            from asyncdni.torch import pin_threads
            pin_threads(self.rt.blas_threads)
        self.node = make_node(self.lspec, fail_on_nonfinite=self.rt.fail_on_nonfinite)
        resume = self.spec.resume
        if resume:
            # the coordinator verified the whole checkpoint; each layer re-checks its own file
            ck = CK.validate(resume.directory, None, self.K, verify_files=False)
            state = ck.read_layer(self.index)
            CK.restore_node(self.node, state)
            ws = CK.wire_state(state)
            try:
                if self.feedback is not None:
                    self.feedback.load({k: v for k, v in ws.items() if k.startswith("ef")})
                for hist, name in ((self.hist_out, "aqsend"), (self.hist_in, "aqrecv")):
                    if hist is not None:
                        hist.load(ws.get(name))
            except ValueError as e:
                raise CK.CheckpointError(f"{self.label}: the checkpoint's wire state: {e}") from None
            self.next_step = ck.step * self.M
            self.bwd_applied = ck.step
            self.is_pause = S.pause_points(ck.step, self.spec.steps, self.cfg.train.eval_every,
                                           self.rt.checkpoint_every)

    def bind_inboxes(self) -> dict:
        node = self.spec.nodes[self._node_id]
        self.fwd_in, fwd_ep = transport.bind(self.ctx, zmq.PULL, self.host, node.fwd_port,
                                             max_message=self.max_message, curve=self.keys)
        self.socks.append(self.fwd_in)
        self.bwd_in, bwd_ep = transport.bind(self.ctx, zmq.PULL, self.host, node.bwd_port,
                                             max_message=self.max_message, curve=self.keys)
        self.socks.append(self.bwd_in)
        return {"fwd": fwd_ep, "bwd": bwd_ep}

    def connect_peers(self, peers: list[dict]) -> None:
        me = self._node_id
        self.up = self.down = self.sink = None
        if not self.last:
            self.up = self.connect_data(peers[me + 1], "fwd")
        self.down = self.connect_data(peers[me - 1], "bwd")
        if self.last:
            self.sink = self.connect_data(peers[0], "bwd")

    # ------------------------------------------------------------------ loop
    def loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.ctrl, zmq.POLLIN)
        poller.register(self.bwd_in, zmq.POLLIN)
        poller.register(self.fwd_in, zmq.POLLIN)
        holding = zmq.Poller()       # while a checkpoint marker waits: upstream is not read at all
        holding.register(self.ctrl, zmq.POLLIN)
        holding.register(self.bwd_in, zmq.POLLIN)
        timeout = int(self.hb_interval * 1000)
        pc = time.perf_counter
        while True:
            t0 = pc()
            events = dict((poller if self.fwd_open() else holding).poll(timeout))
            dt = pc() - t0
            self.wait += dt
            if dt > 1e-4:
                self.trace(T_WAIT, time.time() - dt, dt)
            if self.ctrl in events:
                self.handle_ctrl()
            self.heartbeat(time.monotonic())     # after draining control: queued beats count
            if self.bwd_in in events:
                # gradients first: they free cached state and unblock the sequential order
                # (a bounded number per turn: a flood must not starve the heartbeats)
                for _ in range(MAX_DRAIN):
                    if not self.bwd_in.poll(0):
                        break
                    self.handle_bwd(self.recv_timed(self.bwd_in))
            if self.marker is not None:
                self.try_checkpoint()
            # while a checkpoint marker waits, nothing from upstream may touch the weights
            if self.fwd_in in events and self.fwd_open():
                self.handle_fwd(self.recv_timed(self.fwd_in))

    def reported_step(self) -> int:
        return self.cur_step // self.M if self.cur_step >= 0 else -1     # a step, not a micro-step

    def recv_timed(self, sock):
        t0 = time.perf_counter()
        frames = transport.recv_frames(sock)
        self.comm += time.perf_counter() - t0
        self.data_in += 1
        return frames

    def handle_bwd(self, frames) -> None:
        """One message from the backward inbox: validated, then applied or counted as rejected."""
        msg = self.accept(frames, self.expect_bwd, check_finite=True)
        if msg is not None:
            self.on_bwd(msg)

    def handle_fwd(self, frames) -> None:
        """One message from the forward inbox: validated, then applied or counted as rejected.
        Raises StepLost when the forward message of the step this layer waits for arrived
        broken: the upstream sends each step once, so that step could never complete."""
        msg = self.accept(frames, self.expect_fwd, check_finite=True)
        if msg is not None:
            self.on_fwd(msg)
            return
        e = self.last_reject
        if e.kind == P.FWD and e.step == self.next_step and self.pending is None:
            s = e.step
            which = f"step {s // self.M} (micro-batch {s % self.M + 1} of {self.M})" if self.M > 1 else f"step {s}"
            raise StepLost(f"{self.label}: {which} can never complete: its forward message was rejected "
                           f"({e.reason}: {e})")
        if e.kind == P.EVAL and e.reason == "nonfinite":
            # the feeder waits for every evaluation batch; only data (or a forgery) can carry
            # a NaN here, since every layer zeroes its non-finite outputs
            raise StepLost(f"{self.label}: evaluation batch {e.step} can never complete: its message was rejected "
                           f"({e.reason}: {e})")

    def fwd_open(self) -> bool:
        """May the next message from upstream be read? Not while a checkpoint marker waits,
        nor, under a fixed lag, before the gradient that must precede the next forward."""
        if self.marker is not None:
            return False
        return self.lag is None or self.bwd_applied >= self.next_step - self.lag

    def _timed(self, code, fn, *args):
        t0 = time.perf_counter()
        w0 = time.time()
        out = fn(*args)
        d = time.perf_counter() - t0
        if code != T_EVAL:      # evaluations are off the training clock, so off busy time too
            if self.slow > 1.0:
                d += self.slow_down(d)
            self.busy += d
        self.trace(code, w0, d)
        return out

    def slow_down(self, d: float) -> float:
        """A straggler (runtime.slow): after a training compute that took ``d`` seconds, wait
        (factor - 1) x d more, as a CPU that slow would have taken; returns the seconds
        waited, which count as busy time and trace as the compute. The wait is owed and paid
        across computes: what a sleep overshoots is taken off the next wait, so the added
        time matches the factor over a run even where single computes are shorter than
        the sleep's resolution. A long wait is cut into pieces of half a heartbeat interval,
        with the control socket read and a heartbeat sent between them, so that a slowed
        layer is never taken for a dead one (nor takes the coordinator for one)."""
        self.slow_owed += (self.slow - 1.0) * d
        if self.slow_owed <= 0.0:
            return 0.0
        pc = time.perf_counter
        t0 = pc()
        piece = self.hb_interval / 2
        while True:
            left = self.slow_owed - (pc() - t0)
            if left <= 0.0:
                break
            time.sleep(min(left, piece))
            if left > piece:
                self.handle_ctrl()
                self.heartbeat(time.monotonic())
        waited = pc() - t0
        self.slow_owed -= waited
        self.slow_s += waited
        return waited

    def finite_out(self, a, what: str):
        """Outgoing arrays are finite: a NaN/Inf one is zeroed (and counted) so the step still
        completes downstream, or ends the run under fail_on_nonfinite."""
        if a is None or all_finite(a):
            return a
        self.nonfinite_outputs += 1
        if self.rt.fail_on_nonfinite:
            raise NonFiniteError(f"{self.label}: non-finite {what}; stopping (fail_on_nonfinite)")
        return np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)

    # --------------------------------------------------------------- forward
    def on_fwd(self, msg) -> None:
        kind = msg.kind
        if kind == P.ACK:
            self.release_pending(msg.step)
            return
        if kind == P.EVAL:
            self.on_eval(msg)
            return
        if kind == P.MARKER:
            self.on_marker(msg)
            return
        if kind != P.FWD:
            self.reject("unexpected")
            return
        step = msg.step
        if step != self.next_step or self.pending is not None:
            self.reject("step")            # out of sequence: a replay, a stranger, or a gap
            return
        x, y, *rest = msg.arrays
        ids = rest[0] if rest else None
        if self.hist_in is not None:
            x = self.changes_to_activations(step, x, ids)
        self.next_step = step + 1
        self.cur_step = step
        scale = x.shape[0] / self.batch_size if self.M > 1 else 1.0   # micro-batch share of the batch
        h, gx, metrics = self._timed(T_FWD, self.node.forward, step, x, y, scale)
        # a DNI layer sends no gradient for a step on which the layer below does not regress
        # its SG (--sg-every): nothing to wait for then under the sequential order
        held = self.sched.hold_for_ack and not self.first and gx is not None
        if gx is not None:
            self.send(self.down, *self.bwd_out(step, gx))
        if not self.last:
            out = self.fwd_out(step, h, y, ids)
            if held:
                self.pending = (step, self.up, out)     # strictly one layer at a time: wait for the ACK
            else:
                self.send(self.up, *out)
            self.drain_bwd_queue()
            return
        full_step = step // self.M
        if self.M > 1:
            self.metrics_acc = (self.metrics_acc or []) + [metrics]
            if step % self.M != self.M - 1:
                return
            metrics = losses.combine(self.metrics_acc, self.lspec.task, self.lspec.n_out)
            self.metrics_acc = None
        out = (P.DONE, full_step, (), _metric_fields(metrics))
        if held:
            self.pending = (step, self.sink, out)
        else:
            self.send(self.sink, *out)
        if self.first and self.sched.needs_ack and self.node.step_complete:
            self.send(self.down, P.ACK, full_step)       # single-layer network: release the feeder

    def changes_to_activations(self, step: int, delta, ids):
        """aq:CODEC: the activations of a FWD whose step is this layer's next, from their
        changes; a batch whose sample ids repeat (which no feeder sends) loses the step."""
        why = WC.check_ids(ids, self.hist_in.n)
        try:
            if why is None:
                t0 = time.perf_counter()
                x = self.hist_in.decode(delta, ids)
                self.codec_time += time.perf_counter() - t0
                return x
        except WC.CodecError as e:
            why = str(e)
        self.reject("codec")
        raise StepLost(f"{self.label}: step {step} can never complete: its activation changes cannot be applied ({why})")

    def fwd_out(self, step: int, h, y, ids=None) -> tuple:
        """The FWD message of a step's activations, through the forward codec (aq: their
        changes since the samples ``ids`` last crossed, the ids sent along)."""
        h = self.finite_out(h, "activations")
        c = self.fwd_codec
        extra = () if ids is None else (ids,)
        self.dense_bytes += h.nbytes
        if not c.lossy:
            self.coded_bytes += h.nbytes
            return P.FWD, step, (h, y, *extra), None
        t0 = time.perf_counter()
        h = np.ascontiguousarray(h, np.float32)
        wire = self.hist_out.encode(h, ids) if self.hist_out is not None else c.encode(h)
        self.codec_time += time.perf_counter() - t0
        self.comm += time.perf_counter() - t0
        self.coded_bytes += sum(a.nbytes for a in wire)
        return P.FWD, step, (*wire, y, *extra), {"c": WC.wire_name(c, self.fwd_delta)}

    def bwd_out(self, step: int, gx) -> tuple:
        """The BWD message of an input gradient, through the backward codec (and its error
        feedback, one residual per micro-batch position)."""
        gx = self.finite_out(gx, "input gradient")
        c = self.bwd_codec
        self.dense_bytes += gx.nbytes
        if not c.lossy:
            self.coded_bytes += gx.nbytes
            return P.BWD, step, (gx,), None
        t0 = time.perf_counter()
        gx = np.ascontiguousarray(gx, np.float32)
        wire = self.feedback.encode(gx, step % self.M) if self.feedback is not None else c.encode(gx)
        self.codec_time += time.perf_counter() - t0
        self.comm += time.perf_counter() - t0
        self.coded_bytes += sum(a.nbytes for a in wire)
        return P.BWD, step, tuple(wire), {"c": c.name}

    def release_pending(self, step: int) -> None:
        if self.pending is None or self.pending[0] != step:
            self.reject("step")
            return
        _step, target, out = self.pending
        self.pending = None
        self.send(target, *out)

    def on_eval(self, msg) -> None:
        x, y = msg.arrays
        h = self._timed(T_EVAL, self.node.forward_only, x)
        if self.last:
            loss, _ = losses.compute(self.lspec.loss, h, y)
            m, m2, n = losses.metrics(self.lspec.loss, h, y, self.lspec.task)
            self.send(self.sink, P.EVAL_RESULT, msg.step, (),
                      {"eid": msg.fields["eid"], "loss": loss, "metric": m, "metric2": m2, "n": n})
        else:
            self.send(self.up, P.EVAL, msg.step, (self.finite_out(h, "activations"), y), {"eid": msg.fields["eid"]})

    # ------------------------------------------------------------ checkpoint
    def on_marker(self, msg) -> None:
        if (msg.fields.get("purpose") != "ckpt" or not self.checkpoint_root() or self.pending is not None
                or msg.step * self.M != self.next_step):
            self.reject("step")
            return
        self.marker = msg.step
        self.try_checkpoint()

    def try_checkpoint(self) -> None:
        """Save once every step before the marker is fully applied here: no SG target and
        no pipeline gradient still outstanding (they arrive on bwd_in, which keeps flowing)."""
        if self.node.cache or not self.node.step_complete or self.pending is not None:
            return
        step, self.marker = self.marker, None
        t0 = time.perf_counter()
        self.save_checkpoint_file(step, CK.layer_file(self.index),
                                  CK.with_wire_state(CK.node_state(self.node), self.feedback,
                                                     self.hist_out, self.hist_in))
        self.busy += time.perf_counter() - t0
        if not self.last:
            self.send(self.up, P.MARKER, step, (), {"purpose": "ckpt"})

    # -------------------------------------------------------------- backward
    def on_bwd(self, msg) -> None:
        if msg.kind != P.BWD or not self.sched.sends_backward:
            self.reject("unexpected")
            return
        if self.lag is not None:
            if msg.step not in self.node.cache or any(m.step == msg.step for m in self.bwd_queue):
                self.reject("step")
                return
            bisect.insort(self.bwd_queue, msg, key=lambda m: m.step)   # in step order, whatever the arrival
            self.drain_bwd_queue()
            return
        self.apply_bwd(msg)

    def drain_bwd_queue(self) -> None:
        """Fixed lag: apply queued gradients whose turn has come: step s after the forward
        of step s + lag, or all of them once the forwards reached a drain point."""
        q = self.bwd_queue
        while q and (q[0].step + self.lag < self.next_step or self.is_pause(self.next_step)):
            msg = q.pop(0)
            self.apply_bwd(msg)
            self.bwd_applied += 1

    def apply_bwd(self, msg) -> None:
        step = msg.step
        try:
            gx = self._timed(T_BWD, self.node.backward, step, msg.arrays[0])
        except StepError:
            self.reject("step")            # a gradient for a step that is not in flight here
            return
        if self.sched.hold_for_ack:
            self.send(self.up, P.ACK, step)        # the layer above may pass its output on now
        elif gx is not None:
            self.send(self.down, *self.bwd_out(step, gx))
        elif self.first and self.sched.needs_ack and self.node.step_complete:
            self.send(self.down, P.ACK, step // self.M)

    # ------------------------------------------------------------------ bye
    def stats(self) -> dict:
        s = super().stats()
        n = self.node
        s.update(steps=self.node.fwd_steps // self.M, updates=self.node.updates, sg_updates=self.node.sg_updates,
                 sg_loss=float(np.mean(n.sg_recent)) if n.sg_recent else None,
                 delay_mean=n.delay_sum / n.delay_n if n.delay_n else None,
                 delay_max=n.delay_max if n.delay_n else None,
                 stash_peak_bytes=n.stash_peak,
                 sg_lags=list(n.sg_lags) if any(n.sg_lags) else None,
                 aux_train_metric=float(np.mean(n.aux_recent)) if n.aux_recent else None,
                 cached_steps=len(self.node.cache), nonfinite_skipped=self.node.nonfinite_skipped,
                 nonfinite_outputs=self.nonfinite_outputs,
                 fan_in=self.lspec.fan_in, fan_out=self.lspec.fan_out,
                 flops_per_batch=self.node.flops_per_batch(self.batch_size),
                 slow=self.slow, slow_s=self.slow_s,
                 wire_state_bytes=sum(x.nbytes for x in (self.feedback, self.hist_out, self.hist_in) if x is not None))
        return s

    def bye_payload(self):
        names, arrays = [], []
        for k, v in self.node.params().items():
            names.append(k)
            arrays.append(v)
        return arrays, {"params": names}


def _metric_fields(m: dict) -> dict:
    return {"loss": float(m["loss"]), "metric": float(m["metric"]), "metric2": float(m["metric2"]), "n": int(m["n"])}


# ============================================================================ feeder
class FeederWorker(Worker):
    role = "feeder"
    FILE = CK.FEEDER_FILE
    expect_in = None            # set in setup(): the metric ranges of this run's DONE / EVAL_RESULT

    def setup(self) -> None:
        from asyncdni.numerics.data import BatchStream, eval_batches
        from asyncdni.engine.plan import load_datasets, microbatch_bounds
        self.train, self.test = load_datasets(self.cfg)
        t = self.cfg.train
        self.steps = self.spec.steps
        self.stream = BatchStream(self.train, t.batch_size, t.seed, in_shape=self.in_shape)
        self.send_ids = t.wire_fwd.startswith(WC.AQ_PREFIX)    # aq: the layers keep per-sample histories
        self.eval_set = eval_batches(self.test, t.eval_batch, in_shape=self.in_shape)
        self.task = self.test.task
        # regression: R² is about the test set's own mean, whatever the evaluation batches
        self.sst = losses.sum_sq_dev(self.test.y) if self.task == "regression" else None
        # the metrics the last layer may report: accuracies, or a regression's RMSE and R²
        self.expect_in = P.result_expect(self.task == "regression")
        self.M = t.microbatches if self.sched.microbatches else 1
        self.bounds = microbatch_bounds(t.batch_size, self.M)
        self.window = self.sched.window_size(t.max_inflight, self.spec.n_layers)
        # --max-inflight auto (0): probe, then size the window from measured times (auto_window)
        self.auto = self.window == 0
        self.auto_probe = {"phase": "serial", "latency": [], "done": [], "rtt": None, "step": None}
        if self.auto:
            self.window = 1
        self.sent_at = np.full(self.steps, np.nan)   # training-clock time each step was sent
        self.losses = np.full(self.steps, np.nan)
        self.metric = np.full(self.steps, np.nan)
        self.done_at = np.full(self.steps, np.nan)   # training-clock time each step finished
        self.evals: list[dict] = []
        self.time_to_target = None
        self.start_step = 0
        self.completed = 0
        self.sent_steps = 0          # steps sent into the pipeline (heartbeats carry it)
        self.time_offset = 0.0                       # training time already spent before a resume
        resume = self.spec.resume
        if resume:
            ck = CK.validate(resume.directory, None, None)
            self.start_step = self.completed = self.sent_steps = ck.step
            if self.FILE in ck.files:
                st = CK.read_arrays(ck.directory / self.FILE, ck.files[self.FILE])
                n = min(self.steps, len(st["loss"]), self.start_step)
                self.losses[:n], self.metric[:n], self.done_at[:n] = st["loss"][:n], st["metric"][:n], st["done_at"][:n]
                self.time_offset = float(st["train_time"])
                self.evals = CK.evals_from_arrays(st)
                ttt = float(st["time_to_target"])
                self.time_to_target = None if np.isnan(ttt) else ttt

    def accept(self, frames, expect=None, check_finite=False):
        """Validate one inbox message; DONE and EVAL_RESULT metrics are held to the ranges of
        this run's targets (accuracies, or a regression's RMSE and R²)."""
        return super().accept(frames, self.expect_in if expect is None else expect, check_finite)

    def bind_inboxes(self) -> dict:
        node = self.spec.nodes[0]
        self.inbox, ep = transport.bind(self.ctx, zmq.PULL, self.host, node.bwd_port,
                                        max_message=self.max_message, curve=self.keys)
        self.socks.append(self.inbox)
        return {"fwd": "", "bwd": ep}

    def connect_peers(self, peers):
        self.up = self.connect_data(peers[1], "fwd")
        self.poller = zmq.Poller()
        self.poller.register(self.inbox, zmq.POLLIN)
        self.poller.register(self.ctrl, zmq.POLLIN)

    def _pump_frames(self, timeout_ms: int):
        """Wait for one inbox message (or control / heartbeat); returns its frames or None.
        One inbox message per call: control and heartbeats get a turn between any two."""
        t0 = time.perf_counter()
        ready = dict(self.poller.poll(timeout_ms))
        self.wait += time.perf_counter() - t0
        if self.ctrl in ready:
            self.handle_ctrl()
        self.heartbeat(time.monotonic())     # after draining control: queued beats count
        if self.inbox in ready:
            t0 = time.perf_counter()
            frames = transport.recv_frames(self.inbox)
            self.comm += time.perf_counter() - t0
            self.data_in += 1
            return frames
        return None

    def _pump(self, timeout_ms: int):
        """Like _pump_frames, but the message validated (None if there was none or it was rejected)."""
        frames = self._pump_frames(timeout_ms)
        return None if frames is None else self.accept(frames)

    def on_inbox(self, frames, sent: int, got: np.ndarray, need: int) -> int | None:
        """One inbox message while training: a step's DONE (its loss, from the last layer)
        or, for the update-locked schedules, its ACK (its release, from layer 1). Returns the
        step if this message completed it; anything else is counted as rejected. Raises
        StepLost when the message that an in-flight step waits for arrived broken."""
        if frames is None:
            return None
        msg = self.accept(frames)
        if msg is None:
            e = self.last_reject
            if (e.kind in (P.DONE, P.ACK) and e.step is not None and self.start_step <= e.step < sent
                    and not got[e.step] & (1 if e.kind == P.DONE else 2) and (e.kind == P.DONE or need == 3)):
                raise StepLost(f"feeder: step {e.step} can never complete: its {e.kind} message was rejected "
                               f"({e.reason}: {e})")
            return None
        s = msg.step
        if msg.kind not in (P.DONE, P.ACK) or (msg.kind == P.ACK and need == 1):
            self.reject("unexpected")       # (the DNI schedules never release by ACK)
            return None
        bit = 1 if msg.kind == P.DONE else 2
        if not self.start_step <= s < sent or got[s] & bit:
            self.reject("step")             # not in flight, or already reported
            return None
        if msg.kind == P.DONE:
            self.losses[s] = msg.fields["loss"]
            self.metric[s] = msg.fields["metric"]
        # a step is complete once its loss (DONE, from the last layer) and, for the
        # update-locked schedules, its release (ACK, from layer 1) have both arrived;
        # they travel different paths and may arrive in either order
        got[s] |= bit
        return s if got[s] == need else None

    def heartbeat_extra(self) -> dict:
        return {"sent": self.sent_steps}

    def _pause_point(self, step: int) -> bool:
        """Steps at which the pipeline drains: periodic evaluation and checkpoints."""
        t = self.cfg.train
        ck = self.rt.checkpoint_every
        return step > self.start_step and ((t.eval_every and step % t.eval_every == 0) or (ck and step % ck == 0))

    def loop(self) -> None:
        timeout = int(self.hb_interval * 1000)
        sent = completed = self.start_step
        paused = 0.0
        t0 = time.perf_counter() - self.time_offset
        next_progress = 0.0
        eval_every = self.cfg.train.eval_every
        ck_every = self.rt.checkpoint_every
        target = self.cfg.train.target_accuracy
        need = 3 if self.sched.needs_ack else 1      # DONE, and ACK where the gradient travels back
        got = np.zeros(self.steps, np.uint8)
        self.state = "training"
        while completed < self.steps:
            while sent < self.steps and sent - completed < self.window:
                if self._pause_point(sent) and sent > completed:
                    break                       # drain before evaluating or checkpointing
                x, y = self.stream.batch(sent)
                ids = (self.stream.indices(sent),) if self.send_ids else ()
                self.sent_at[sent] = time.perf_counter() - t0 - paused
                if self.M == 1:
                    self.send(self.up, P.FWD, sent, (x, y, *ids))
                else:
                    for j, (a, b) in enumerate(self.bounds):
                        self.send(self.up, P.FWD, sent * self.M + j, (x[a:b], y[a:b], *(i[a:b] for i in ids)))
                sent += 1
                self.sent_steps = sent
            s = self.on_inbox(self._pump_frames(timeout), sent, got, need)
            if s is None:
                continue
            completed += 1
            self.completed = completed
            self.done_at[s] = time.perf_counter() - t0 - paused
            if self.auto and self.auto_probe["phase"] != "set":
                self._probe_window(s)
            self.cur_step = completed
            now = time.perf_counter()
            if completed == sent and completed < self.steps and self._pause_point(completed):
                if ck_every and completed % ck_every == 0:
                    self.checkpoint(completed, now - t0 - paused)
                if eval_every and completed % eval_every == 0:
                    p0 = time.perf_counter()
                    ev = self.evaluate()
                    ev.update(step=completed, train_time=p0 - t0 - paused)
                    paused += time.perf_counter() - p0        # evaluation is off the training clock
                    self.evals.append(ev)
                    if target and self.time_to_target is None and ev["metric"] >= target:
                        self.time_to_target = ev["train_time"]
            if now >= next_progress or completed == self.steps:
                i = completed - 1
                self.send_ctrl(P.PROGRESS, done=completed, total=self.steps,
                               loss=float(np.nanmean(self.losses[max(0, i - 20):i + 1])) if completed else float("nan"),
                               elapsed=now - t0 - paused, **self.latest_eval())
                next_progress = now + PROGRESS_INTERVAL
        self.train_time = time.perf_counter() - t0 - paused
        self.state = "evaluating"
        ev = self.evaluate()
        ev.update(step=self.steps, train_time=self.train_time)
        self.evals.append(ev)
        if target and self.time_to_target is None and ev["metric"] >= target:
            self.time_to_target = self.train_time
        if ck_every and self.steps > self.start_step:
            # a last checkpoint at the final step (its history includes the final evaluation),
            # so that a finished run can be extended; then a barrier, so that every layer has
            # saved before the coordinator is told the run is over
            self.checkpoint(self.steps, self.train_time)
            self.barrier()
        self.state = "finished"
        self.send_ctrl(P.STATS, finished=True)
        while True:                        # until STOP
            self._pump(timeout)

    def latest_eval(self) -> dict:
        """The newest evaluation (a resumed run's too), as PROGRESS carries it: test_metric
        (accuracy; a regression's RMSE), test_metric2 (exact sums; R²) and its step."""
        if not self.evals:
            return {}
        ev = self.evals[-1]
        out = {"test_step": int(ev["step"])}
        for key, field in (("metric", "test_metric"), ("metric2", "test_metric2")):
            v = float(ev[key])
            if np.isfinite(v):
                out[field] = v
        return out

    def checkpoint(self, step: int, train_time: float) -> None:
        """The pipeline is drained at ``step``: save the feeder's history, then send the
        marker that makes every layer save its state for the same step."""
        self.save_checkpoint_file(step, self.FILE, {
            "loss": self.losses[:step], "metric": self.metric[:step], "done_at": self.done_at[:step],
            "train_time": np.array(train_time), **CK.evals_to_arrays(self.evals),
            "time_to_target": np.array(np.nan if self.time_to_target is None else self.time_to_target)})
        self.send(self.up, P.MARKER, step, (), {"purpose": "ckpt"})

    def barrier(self) -> None:
        """Send one evaluation row behind everything already sent and wait for its result:
        messages travel in order, so every layer has handled what came before."""
        x, y = self.eval_set[0]
        eid = len(self.eval_set)                 # an id no evaluation pass uses
        self.send(self.up, P.EVAL, eid, (x[:1], y[:1]), {"eid": eid})
        while True:
            msg = self._pump(int(self.hb_interval * 1000))
            if msg is not None and msg.kind == P.EVAL_RESULT and msg.fields.get("eid") == eid:
                return
            if msg is not None:
                self.reject("unexpected")

    def evaluate(self) -> dict:
        for eid, (x, y) in enumerate(self.eval_set):
            self.send(self.up, P.EVAL, eid, (x, y), {"eid": eid})
        got = {}
        while len(got) < len(self.eval_set):
            msg = self._pump(int(self.hb_interval * 1000))
            if msg is None:
                continue
            self.on_eval_result(msg, got)
        return losses.combine([got[eid] for eid in sorted(got)], self.task, self.test.n_out, self.sst)

    def on_eval_result(self, msg, got: dict) -> None:
        """One evaluation result; kept in ``got`` by its id, or counted as rejected."""
        eid = msg.fields.get("eid") if msg.kind == P.EVAL_RESULT else None
        if eid is None or not 0 <= eid < len(self.eval_set) or eid in got:
            self.reject("unexpected")
            return
        if msg.fields["n"] != len(self.eval_set[eid][1]):
            self.reject("range")              # a result for another number of rows than were sent
            return
        if "metric2" not in msg.fields:
            self.reject("fields")             # the last layer always sends it; the average needs it
            return
        got[eid] = msg.fields

    def _probe_window(self, s: int) -> None:
        """--max-inflight auto. Phase 1, one step in flight: the round trip of a step (every
        hop and every layer, in series). Phase 2, the cap in flight: the interval between
        completions, i.e. the slowest stage's step time. Then the window is just enough to
        cover a round trip: ceil(round trip / step time), between 1 and the cap."""
        pr, t = self.auto_probe, self.cfg.train
        if pr["phase"] == "serial":
            pr["latency"].append(self.done_at[s] - self.sent_at[s])
            if len(pr["latency"]) >= AUTO_WARMUP + AUTO_PROBE:
                pr["rtt"] = float(np.median(pr["latency"][AUTO_WARMUP:]))
                pr["phase"] = "full"
                self.window = t.max_inflight_cap
            return
        pr["done"].append(self.done_at[s])
        if len(pr["done"]) >= AUTO_WARMUP + AUTO_PROBE + 1:
            pr["step"] = float(np.median(np.diff(pr["done"][AUTO_WARMUP:])))
            self.window = auto_window(pr["rtt"], pr["step"], t.max_inflight_cap)
            pr["phase"] = "set"

    def stats(self) -> dict:
        s = super().stats()
        pr = self.auto_probe
        s.update(window=int(self.window), window_auto=bool(self.auto), window_rtt=pr["rtt"], window_step=pr["step"])
        s.update(steps=self.steps, start_step=self.start_step, completed=int(self.completed),
                 train_time=getattr(self, "train_time", None),
                 n_evals=len(self.evals), time_to_target=self.time_to_target, batch_size=self.cfg.train.batch_size,
                 samples=self.steps * self.cfg.train.batch_size)   # train_time includes time before a resume
        return s

    def bye_payload(self):
        # the evaluations travel as arrays: a long run's list would outgrow a header
        ev = CK.evals_to_arrays(self.evals)
        return [self.losses, self.metric, self.done_at, *ev.values()], {"series": ["loss", "metric", "done_at", *ev]}


def _wait_for_spec(ctrl: zmq.Socket, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CoordinatorLost(f"no run spec from the coordinator within {timeout:.0f} s")
        if not ctrl.poll(int(min(left, 0.5) * 1000) + 1):
            continue
        try:
            msg = P.decode(transport.recv_frames(ctrl))
        except P.ProtocolError:
            continue
        if msg.kind == P.SPEC:
            return msg.fields.get("spec")
        if msg.kind == P.STOP:
            raise StopRequested(msg.fields.get("reason", ""))


def run_worker(role: str, index: int, control: str, *, start_timeout: float = 60.0,
               server_key: bytes = b"", secret_key: bytes = b"") -> int:
    """Say HELLO to the coordinator at ``control``, receive the run spec, run the worker."""
    ctx = zmq.Context()
    keys = security.KeyPair.from_secret(secret_key) if secret_key else None
    identity = b"feeder" if role == "feeder" else f"layer{index}".encode()
    ctrl = transport.connect(ctx, zmq.DEALER, control, identity=identity,
                             curve=(keys, server_key) if keys is not None else None)
    try:
        transport.send(ctrl, P.HELLO, -1, (), {"role": role, "index": index, "pid": os.getpid(),
                                                "host": _socket.gethostname()})
        spec = RunSpec.from_wire(_wait_for_spec(ctrl, start_timeout), role, index)
        worker = (FeederWorker if role == "feeder" else LayerWorker)(spec, index, ctx, ctrl, keys)
    except (CoordinatorLost, StopRequested) as e:
        print(f"{role}: {e}" if str(e) else f"{role}: stopped before start", flush=True)
        ctrl.close(0)
        ctx.term()
        return 3
    except Exception as e:  # noqa: BLE001 - a spec we cannot use: say so to the coordinator
        transport.send(ctrl, P.ERROR, -1, (), {"role": role, "index": index, "traceback": "",
                                                "error": f"unusable run spec: {e}"})
        ctrl.setsockopt(zmq.LINGER, 2000)
        ctrl.close()
        ctx.term()
        return 2
    return worker.run()
