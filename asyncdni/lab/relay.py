"""A TCP forwarder that adds a fixed one-way delay in each direction, and measures it.

This kernel has no ``netem``, so the network lab (``lab.py``) emulates link latency in
user space: one relay process per delayed inbox listens on an address, and for every
connection it accepts it opens one to the target. Each chunk read from either side is
timestamped and written to the other side when ``delay`` has passed since it was read.
Bytes only: ZeroMQ framing and CURVE pass through unchanged.

Run as its own process (``python -m asyncdni.lab.relay``) so it never shares a GIL with the
coordinator or a worker. It prints one JSON line on stdout once it listens
(``{"listen": "HOST:PORT", "pid": N}``), then nothing more. It writes its statistics as
JSON to ``--stats FILE`` on SIGUSR1, every few seconds while traffic flows, and at exit
(SIGTERM/SIGINT, or when its parent is gone). The statistic that matters is the delay
actually added per chunk: the time from the chunk's read to the start of its write.
Connections whose peer address is ``--local`` (the target's own host) are forwarded with
no added delay: they are not a network link.
With ``--target -`` the relay listens at once and reads ``HOST:PORT [LOCAL]`` from stdin
before it accepts anyone: a spare started ahead of need, so that handing out a relay
takes no process start-up.

Flow control: the relay stops reading in one direction when ``--max-buffer`` bytes wait
there, or when its writer has fallen behind (the oldest chunk is overdue by more than
MAX_LAG): the bytes then wait in the kernel and TCP pushes back on the sender, as behind a
real bottleneck link, instead of queueing without bound in the relay.

This module imports only the standard library.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from collections import deque

CHUNK = 256 * 1024                # bytes read per recv
MAX_BUFFER = 32 * 1024 * 1024     # bytes waiting in one direction before reading stops
MAX_LAG = 0.001                   # the writer this far behind the oldest due chunk: reading stops
SAMPLES = 20000                   # delay samples kept (reservoir) for the statistics
STATS_EVERY = 2.0                 # seconds between periodic statistics writes while busy
CONNECT_TIMEOUT = 3.0
MAX_CONNECTIONS = 64              # open connections (4 threads each); more are accepted and closed at once
OVERSLEEP_CAP = 0.0005            # at most this much early wake-up to make up for timer lateness


def parse_hostport(text: str) -> tuple[str, int]:
    """'HOST:PORT' (or 'tcp://HOST:PORT') -> (host, port); ValueError with one line otherwise."""
    s = text[6:] if text.startswith("tcp://") else text
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an already sorted list; None when empty."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


class Stats:
    """Delay samples (seconds added per chunk) kept as a bounded reservoir, plus counters."""

    def __init__(self, delay: float, keep: int = SAMPLES):
        self.delay = delay
        self.keep = keep
        self.samples: list[float] = []
        self.seen = 0
        self.chunks = 0
        self.bytes = 0
        self.connections = 0
        self.local_connections = 0
        self.refused = 0
        self.over_limit = 0          # clients closed at once: MAX_CONNECTIONS were open
        self.accept_errors = 0       # accept() failures (out of file descriptors): retried
        self.backlogged = 0
        self.lock = threading.Lock()
        self._rng = random.Random(0)

    def add(self, added: float, nbytes: int, backlogged: bool) -> None:
        """One chunk: ``added`` seconds from its read to the start of its write;
        ``backlogged`` when it fell due while the writer was still busy sending earlier
        bytes (the delay then includes queueing behind the downstream link)."""
        with self.lock:
            self.chunks += 1
            self.bytes += nbytes
            self.backlogged += backlogged
            self.seen += 1
            sample = -added if backlogged else added       # the sign carries the flag
            if len(self.samples) < self.keep:
                self.samples.append(sample)
            else:
                j = self._rng.randrange(self.seen)
                if j < self.keep:
                    self.samples[j] = sample

    def summary(self) -> dict:
        with self.lock:
            raw = list(self.samples)
            out = {"delay_ms": self.delay * 1e3, "chunks": self.chunks, "bytes": self.bytes,
                   "backlogged": self.backlogged,
                   "connections": self.connections, "local_connections": self.local_connections,
                   "refused": self.refused, "over_limit": self.over_limit,
                   "accept_errors": self.accept_errors, "samples": len(raw)}
        out.update(summarize([int(round(v * 1e6)) for v in raw]))
        # the samples themselves (microseconds; negative: backlogged) so a lab can pool relays
        out["added_us"] = [int(round(v * 1e6)) for v in raw]
        return out


def summarize(samples_us: list[int]) -> dict:
    """Median/p99/max of the added delay over all chunks (``added_ms``) and over the chunks
    that found the writer idle when due (``on_time_ms``: the relay's own timing accuracy).
    Samples are microseconds, negative for backlogged chunks."""
    def stats(values):
        v = sorted(values)
        f = lambda x: None if x is None else round(x / 1e3, 3)   # noqa: E731
        return {"median": f(percentile(v, 50)), "p99": f(percentile(v, 99)),
                "max": f(v[-1] if v else None)}
    return {"added_ms": stats(abs(x) for x in samples_us),
            "on_time_ms": stats(x for x in samples_us if x >= 0)}


class Direction:
    """One direction of one connection: a reader thread queues timestamped chunks, a writer
    thread sends each one when it is due."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, stats: Stats | None,
                 on_done, max_buffer: int = MAX_BUFFER):
        self.src, self.dst, self.delay, self.stats = src, dst, delay, stats
        self.on_done = on_done
        self.max_buffer = max_buffer
        self.queue: deque = deque()
        self.queued = 0
        self.cond = threading.Condition()
        self.closed = False
        self.failed = False
        self.oversleep = 0.0           # running estimate of how late a timed wait wakes
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._write, daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def abort(self) -> None:
        with self.cond:
            self.closed = True
            self.failed = True
            self.cond.notify_all()

    def _read(self) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            while True:
                n = self.src.recv_into(view)
                t = time.monotonic()
                with self.cond:
                    if self.closed:
                        return
                    self.queue.append((t, bytes(view[:n]) if n else None))
                    self.queued += n
                    self.cond.notify_all()
                    if not n:
                        return
                    # stop reading while the writer is behind (the downstream link is the
                    # bottleneck: let the kernel's buffers and TCP push back, as a real link
                    # would) or too much waits
                    while not self.closed and (self.queued > self.max_buffer or
                                               (len(self.queue) > 1 and
                                                time.monotonic() > self.queue[0][0] + self.delay + MAX_LAG)):
                        self.cond.wait(MAX_LAG)
        except OSError:
            self.abort()
            self.on_done(self)

    def _write(self) -> None:
        free_at = 0.0                  # when the last write returned
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.closed:
                        self.cond.wait()
                    if self.closed and (self.failed or not self.queue):
                        return
                    t_read, _ = self.queue[0]
                    due = t_read + self.delay
                    now = time.monotonic()
                    if now < due - self.oversleep:
                        # wake early by the usual oversleep, so that the write starts on time
                        wake = due - self.oversleep
                        self.cond.wait(wake - now)
                        late = time.monotonic() - wake
                        if 0.0 <= late < 0.002:
                            self.oversleep = min(OVERSLEEP_CAP, 0.9 * self.oversleep + 0.1 * late)
                        continue
                    # everything already due goes out in one write
                    batch = []
                    edge = now + self.oversleep
                    while self.queue and self.queue[0][0] + self.delay <= edge:
                        batch.append(self.queue.popleft())
                    self.queued -= sum(len(d) for _, d in batch if d)
                    self.cond.notify_all()
                t_send = time.monotonic()
                data = [d for _, d in batch if d]
                if data:
                    self.dst.sendall(data[0] if len(data) == 1 else b"".join(data))
                    if self.stats is not None:
                        for t_read, d in batch:
                            if d:
                                self.stats.add(t_send - t_read, len(d), t_read + self.delay < free_at)
                    free_at = time.monotonic()
                if batch[-1][1] is None:                  # EOF from the source: pass it on
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    with self.cond:
                        self.closed = True
                    self.on_done(self)
                    return
        except OSError:
            self.abort()
            self.on_done(self)


class Connection:
    def __init__(self, client: socket.socket, server: socket.socket, delay: float, stats: Stats | None,
                 max_buffer: int, on_closed):
        self.client, self.server = client, server
        self.lock = threading.Lock()
        self.done: set = set()
        self.is_closed = False
        self.on_closed = on_closed
        self.dirs = [Direction(client, server, delay, stats, self._dir_done, max_buffer),
                     Direction(server, client, delay, stats, self._dir_done, max_buffer)]

    def start(self) -> None:
        for d in self.dirs:
            d.start()

    def _dir_done(self, d: Direction) -> None:
        with self.lock:
            self.done.add(id(d))
            finished = len(self.done) == 2 or d.failed
            if not finished:
                return
        self.close()

    def close(self) -> None:
        with self.lock:
            if self.is_closed:
                return
            self.is_closed = True
        for d in self.dirs:
            d.abort()
        for s in (self.client, self.server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.on_closed(self)


class Relay:
    """Listens on ``listen`` and forwards every connection to ``target`` with ``delay_s``
    added in each direction."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float,
                 local: str | None = None, max_buffer: int = MAX_BUFFER, max_connections: int = MAX_CONNECTIONS):
        self.target = target
        self.max_connections = max_connections
        self.delay = delay_s
        self.local = local
        self.max_buffer = max_buffer
        self.stats = Stats(delay_s)
        self.conns: set = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET6 if ":" in listen[0] else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(listen)
        self.sock.listen(64)
        self.sock.settimeout(0.25)
        self.address = self.sock.getsockname()[:2]

    def _closed(self, conn: Connection) -> None:
        with self.lock:
            self.conns.discard(conn)

    def accept_once(self) -> None:
        try:
            client, peer = self.sock.accept()
        except (socket.timeout, InterruptedError):
            return
        except OSError:
            if self.stop.is_set():
                return
            # out of file descriptors (EMFILE/ENFILE) or a connection aborted before accept:
            # count it and go on; the client's connect times out or is retried
            with self.stats.lock:
                self.stats.accept_errors += 1
            self.stop.wait(0.05)
            return
        with self.lock:
            full = len(self.conns) >= self.max_connections
        if full:
            with self.stats.lock:
                self.stats.over_limit += 1
            client.close()
            return
        local = self.local is not None and peer[0] == self.local
        try:
            server = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
        except OSError:
            # the target is not listening (yet): drop the client, it will reconnect
            with self.stats.lock:
                self.stats.refused += 1
            client.close()
            return
        for s in (client, server):
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.stats.lock:
            if local:
                self.stats.local_connections += 1
            else:
                self.stats.connections += 1
        conn = Connection(client, server, 0.0 if local else self.delay, None if local else self.stats,
                          self.max_buffer, self._closed)
        with self.lock:
            self.conns.add(conn)
        conn.start()

    def close(self) -> None:
        self.stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            c.close()


def write_stats(path: str | None, relay: Relay, extra: dict) -> None:
    if not path:
        return
    doc = {**extra, **relay.stats.summary()}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _fine_timers() -> None:
    """Linux: 1 ns timer slack instead of 50 us, so timed waits wake closer to their due time."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(29, 1)     # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def _target_from_stdin(stop: threading.Event, parent_pid: int | None):
    """Wait for one line 'HOST:PORT [LOCAL]' on stdin; (None, None) when stopped, orphaned
    or at end of input."""
    import select
    buf = b""
    while not stop.is_set() and not (parent_pid and os.getppid() != parent_pid):
        try:
            ready, _, _ = select.select([0], [], [], 0.25)
        except InterruptedError:
            continue
        if not ready:
            continue
        chunk = os.read(0, 4096)
        if not chunk:
            break
        buf += chunk
        if b"\n" in buf:
            words = buf.split(b"\n", 1)[0].decode().split()
            if not words:
                raise ValueError("stdin: expected HOST:PORT [LOCAL]")
            return parse_hostport(words[0]), (words[1] if len(words) > 1 and words[1] != "-" else None)
    return None, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m asyncdni.lab.relay", allow_abbrev=False,
                                 description="TCP forwarder with a fixed added one-way delay")
    ap.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on (port 0: any)")
    ap.add_argument("--target", required=True, metavar="HOST:PORT",
                    help="address to forward to; '-': read 'HOST:PORT [LOCAL]' from stdin once listening "
                         "(a relay started ahead of need)")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    ap.add_argument("--local", metavar="ADDR", help="peers from this address get no added delay")
    ap.add_argument("--stats", metavar="FILE", help="write statistics here (SIGUSR1, periodically, at exit)")
    ap.add_argument("--max-buffer", type=int, default=MAX_BUFFER, help="bytes queued per direction")
    ap.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                    help=f"open connections at most (default {MAX_CONNECTIONS}); more are closed at once")
    ap.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    args = ap.parse_args(argv)
    try:
        listen = parse_hostport(args.listen)
        target = None if args.target == "-" else parse_hostport(args.target)
        if not 0 <= args.delay_ms <= 10000:
            raise ValueError(f"--delay-ms {args.delay_ms}: expected 0..10000")
        if not 1 <= args.max_connections <= 4096:
            raise ValueError(f"--max-connections {args.max_connections}: expected 1..4096")
        relay = Relay(listen, target, args.delay_ms / 1e3, args.local, args.max_buffer, args.max_connections)
    except (ValueError, OSError) as e:
        print(f"relay: error: {e}", file=sys.stderr)
        return 2
    extra = {"listen": f"{relay.address[0]}:{relay.address[1]}", "pid": os.getpid()}
    _fine_timers()
    stop = threading.Event()
    want_stats = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: want_stats.set())
    sys.stdout.write(json.dumps({"listen": extra["listen"], "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    try:                                        # say nothing more on stdout: the reader may be gone
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass
    if target is None:
        try:
            target, local = _target_from_stdin(stop, args.parent_pid)
        except ValueError as e:
            print(f"relay: error: {e}", file=sys.stderr)
            relay.close()
            return 2
        if target is None:                      # stopped (or orphaned) before it was needed
            relay.close()
            return 0
        relay.target, relay.local = target, local or relay.local
    extra["target"] = f"{relay.target[0]}:{relay.target[1]}"
    next_write, written_chunks = time.monotonic() + STATS_EVERY, -1
    try:
        while not stop.is_set():
            relay.accept_once()
            now = time.monotonic()
            if args.parent_pid and os.getppid() != args.parent_pid:
                break
            if want_stats.is_set() or (now >= next_write and relay.stats.chunks != written_chunks):
                want_stats.clear()
                written_chunks = relay.stats.chunks
                write_stats(args.stats, relay, extra)
                next_write = now + STATS_EVERY
    finally:
        relay.close()
        write_stats(args.stats, relay, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
