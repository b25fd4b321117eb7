"""The network lab: emulated hosts (network namespaces) on one bridge, with shaped links and
a fixed added delay per link.

    with Lab(hosts=3, rate="1gbit", delay_ms=5, prefix="adl-", subnet="10.77.0.0/24") as lab:
        p = lab.run_in(0, ["python", "-m", "http.server", "--bind", lab.addresses[0]])
        peers = lab.route(peers)          # inbox endpoints -> relays that add the delay

Layout (Linux, root only): a bridge ``<prefix>br`` holding the first address of the subnet
(``.1``), given *before* any host exists, so that the root namespace reaches the hosts
over the bridge and a connection to a host address never leaves the machine. Host ``i`` is
the namespace ``<prefix>h<i>``: a veth pair ``<prefix>v<i>`` (bridge port, root side) /
``<prefix>e<i>`` (inside the namespace) with address ``.<i+2>``, and loopback up.

Shaping (``rate``): a ``tc tbf`` qdisc (burst: 2 ms of the rate, at least 4 KiB; ``burst``) on both ends of every veth:
the host's egress and the bridge port's egress, i.e. the host's ingress; otherwise traffic
from two peers into one host would add up to twice the rate.

Delay (``delay_ms``): this kernel has no netem, so :meth:`Lab.route` starts one relay
process (``asyncdni.lab.relay``) per inbox endpoint, listening on the bridge address in the
root namespace, that forwards bytes to the inbox with the delay added in each direction.
Traffic through a relay still crosses both hosts' shaped veths. Spare relays are started by up()
(and refilled by stop_relays()), so that route() only hands them their targets: it runs
inside the coordinator's handshake, while workers wait on heartbeats.

Everything created is recorded in a state file (``/run/asyncdni-lab/<prefix>.json``)
*before* it is created, so that :func:`down` from any process (``asyncdni lab down``)
removes it all: processes (by pid, checked against their start time; every process left
inside a lab namespace), relays, namespaces, veths, the bridge. ``down`` is idempotent and
runs on every exit path of a ``with Lab(...)`` block, including Ctrl-C and SIGTERM.

Library only: nothing here reads argv. Errors a user can cause are :class:`LabError` with
a one-line message.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

STATE_DIR = Path("/run/asyncdni-lab")
DEFAULT_PREFIX = "adl-"
DEFAULT_SUBNET = "10.77.0.0/24"
# tbf's bucket: "auto" holds 2 ms of the rate, at least 4 KiB (1 Gbit/s: 250 kB, 100 Mbit/s:
# 25 kB, 10 Mbit/s: 4 KiB), so that a message of a few kB or more is paced at the rate as a serial
# link sends it; a bucket as large as a few messages lets them through at once, and a
# lock-step schedule then pays no serialization time (docs/results/lab.md)
BURST = "auto"
MIN_BURST = 4 << 10            # 10 Mbit/s with 3-8 KiB: 94-96% of the rate (benchmarks.lab_links)
_BURST_RE = re.compile(r"^([0-9]+)(b|kb|k|mb|m)?$")
_BURST_UNIT = {None: 1, "b": 1, "kb": 1 << 10, "k": 1 << 10, "mb": 1 << 20, "m": 1 << 20}
TBF_LATENCY = "50ms"             # the longest a packet may wait in the tbf queue
MAX_HOSTS = 64
MAX_DELAY_MS = 1000.0
STOP_GRACE = 3.0                 # seconds between SIGTERM and SIGKILL
RELAY_START_TIMEOUT = 15.0
CMD_TIMEOUT = 20.0               # one `ip` / `tc` command
_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(gbit|mbit|kbit|bit)$")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}-?$")
_UNIT = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}


class LabError(RuntimeError):
    """A lab cannot be made, used or removed; the message is one line."""


# ---------------------------------------------------------------- validation
def parse_rate(rate) -> str | None:
    """'10gbit', '1gbit', '100mbit', '500kbit' (or None / 'unshaped' / 'none') -> the tc rate
    string, or None for an unshaped link. LabError otherwise."""
    if rate is None:
        return None
    s = str(rate).strip().lower()
    if s in ("", "none", "unshaped", "off"):
        return None
    m = _RATE_RE.match(s)
    if not m or float(m.group(1)) <= 0:
        raise LabError(f"rate {rate!r}: expected unshaped or a number with gbit, mbit or kbit "
                       f"(e.g. 10gbit, 1gbit, 100mbit)")
    bps = rate_bits(s)
    if not 8e3 <= bps <= 100e9:
        raise LabError(f"rate {rate!r}: expected between 8kbit and 100gbit")
    return s


def rate_bits(rate: str | None) -> float | None:
    """The rate in bits per second (None for unshaped)."""
    if rate is None:
        return None
    m = _RATE_RE.match(rate)
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_burst(burst, rate: str | None) -> str:
    """``auto`` or a size (``25000``, ``64kb``, ``1mb``) -> tbf's burst in bytes, as a string
    for tc: ``auto`` is 2 ms of ``rate``, at least :data:`MIN_BURST`. LabError otherwise."""
    s = str(burst).strip().lower()
    if s == "auto":
        bps = rate_bits(rate)
        return str(max(MIN_BURST, round(bps / 8 * 0.002)) if bps else MIN_BURST)
    m = _BURST_RE.match(s)
    n = int(m.group(1)) * _BURST_UNIT[m.group(2)] if m else 0
    if not 1600 <= n <= 64 << 20:
        raise LabError(f"burst {burst!r}: expected auto or a size from 1600 bytes to 64mb (e.g. 25000, 64kb)")
    return str(n)


def parse_delay(delay_ms) -> float:
    try:
        d = float(delay_ms)
    except (TypeError, ValueError):
        raise LabError(f"delay {delay_ms!r}: expected milliseconds, e.g. 5") from None
    if not 0.0 <= d <= MAX_DELAY_MS or d != d:
        raise LabError(f"delay {delay_ms!r}: expected 0 to {MAX_DELAY_MS:g} ms")
    return d


def parse_prefix(prefix) -> str:
    p = str(prefix)
    if not _PREFIX_RE.match(p):
        raise LabError(f"prefix {prefix!r}: expected 1-8 lower-case letters/digits starting with a "
                       f"letter, optionally ending in '-' (e.g. adl-)")
    return p


def parse_subnet(subnet, hosts: int) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(str(subnet), strict=False)
    except ValueError:
        raise LabError(f"subnet {subnet!r}: expected an IPv4 CIDR such as 10.77.0.0/24") from None
    if not net.is_private or net.is_loopback:
        raise LabError(f"subnet {subnet!r}: expected a private range (10/8, 172.16/12, 192.168/16)")
    if net.num_addresses - 2 < hosts + 1:
        raise LabError(f"subnet {subnet!r}: too small for a bridge and {hosts} hosts")
    return net


def parse_hosts(hosts) -> int:
    try:
        n = int(hosts)
    except (TypeError, ValueError):
        raise LabError(f"hosts {hosts!r}: expected a whole number 1-{MAX_HOSTS}") from None
    if not 1 <= n <= MAX_HOSTS:
        raise LabError(f"hosts {hosts!r}: expected 1-{MAX_HOSTS}")
    return n


def require_root() -> None:
    """LabError unless this process may make namespaces, links and qdiscs."""
    if not sys.platform.startswith("linux"):
        raise LabError("the network lab needs Linux (network namespaces)")
    if os.geteuid() != 0:
        raise LabError("the network lab needs root (network namespaces, veths, a bridge, tc)")
    for tool in ("ip", "tc"):
        if not any(os.access(os.path.join(d, tool), os.X_OK)
                   for d in os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(os.pathsep) +
                   ["/usr/sbin", "/sbin"]):
            raise LabError(f"the network lab needs the '{tool}' command (iproute2)")


def _sh(argv: list[str], check: bool = True, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"{' '.join(argv)}: {e}") from None
    if check and r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise LabError(f"{' '.join(argv)}: {msg[-1] if msg else f'exit code {r.returncode}'}")
    return r


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def _proc_start(pid: int) -> float | None:
    """Start time of pid (clock ticks since boot, from /proc), None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return float(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _netns_pids(ns: str) -> list[int]:
    r = _sh(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()] if r.returncode == 0 else []


# ---------------------------------------------------------------- state file
def state_path(prefix: str, state_dir: Path | str = STATE_DIR) -> Path:
    # the prefix verbatim: labs "aq" and "aq-" are different labs (their devices are named
    # aqbr and aq-br), so they must not share a state file
    return Path(state_dir) / f"{prefix}.json"


@contextlib.contextmanager
def _locked(path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lf = open(path.with_suffix(".lock"), "w")
    except OSError as e:
        why = "not a directory" if isinstance(e, (FileExistsError, NotADirectoryError)) else (e.strerror or e)
        raise LabError(f"lab state directory {path.parent}: {why} (--state-dir takes a writable directory)") from None
    with lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lf, fcntl.LOCK_UN)


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise LabError(f"lab state directory {path.parent}: not a directory (--state-dir takes a "
                       f"writable directory)") from None
    except (OSError, ValueError) as e:
        raise LabError(f"cannot read lab state {path}: {e}") from None


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _update_state(path: Path, fn) -> dict | None:
    with _locked(path):
        st = _read_state(path)
        if st is None:
            return None
        fn(st)
        _write_state(path, st)
        return st


# ---------------------------------------------------------------- teardown
def _end_pids(entries: list[dict], extra_pids: list[int] = (), grace: float = STOP_GRACE,
              children: list = ()) -> None:
    """SIGTERM every recorded process still alive with the start time we recorded (and its
    process group, which the lab made), plus ``extra_pids``; SIGKILL what is left after
    ``grace`` seconds. ``children``: our own Popen objects among them, to reap."""
    live: list[tuple[int, float | None, bool]] = []
    for e in entries:
        pid, start = int(e["pid"]), e.get("start")
        if start is not None and _proc_start(pid) == start:
            live.append((pid, start, bool(e.get("group"))))
    for pid in extra_pids:
        if pid != os.getpid() and all(pid != p for p, _, _ in live):
            live.append((pid, _proc_start(pid), False))

    def send(sig):
        for pid, start, group in live:
            if start is None or _proc_start(pid) != start:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if group:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, sig)
                os.kill(pid, sig)

    def reap():
        for c in children:
            with contextlib.suppress(Exception):
                c.poll()

    send(signal.SIGCONT)
    send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap()
        if all(_proc_start(pid) != start or _is_zombie(pid) for pid, start, _ in live):
            return
        time.sleep(0.05)
    send(signal.SIGKILL)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap()
        if all(_proc_start(pid) != start or _is_zombie(pid) for pid, start, _ in live):
            return
        time.sleep(0.02)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def teardown(state: dict, grace: float = STOP_GRACE, children: list = ()) -> list[str]:
    """Remove everything a state records; missing pieces are fine. ``children``: Popen
    objects of this process among the recorded processes (reaped here). Returns the
    problems met (empty when all is gone)."""
    problems: list[str] = []
    hosts = state.get("hosts", [])
    in_ns = [pid for h in hosts if _netns_exists(h["ns"]) for pid in _netns_pids(h["ns"])]
    _end_pids(state.get("procs", []) + state.get("relays", []), in_ns, grace, children)
    for _ in range(3):              # a process may have started another while we ended it
        in_ns = [pid for h in hosts if _netns_exists(h["ns"]) for pid in _netns_pids(h["ns"])]
        if not in_ns:
            break
        _end_pids([], in_ns, 1.0, children)
    for h in hosts:
        for pid in (_netns_pids(h["ns"]) if _netns_exists(h["ns"]) else []):
            problems.append(f"process {pid} still in {h['ns']}")
        if _netns_exists(h["ns"]):
            r = _sh(["ip", "netns", "del", h["ns"]], check=False)
            if r.returncode != 0 and _netns_exists(h["ns"]):
                problems.append(f"cannot delete namespace {h['ns']}: {r.stderr.strip()}")
        if _link_exists(h["veth"]):
            r = _sh(["ip", "link", "del", h["veth"]], check=False)
            if r.returncode != 0 and _link_exists(h["veth"]):
                problems.append(f"cannot delete {h['veth']}: {r.stderr.strip()}")
    if state.get("relay_dir"):
        shutil.rmtree(state["relay_dir"], ignore_errors=True)
    br = state.get("bridge")
    if br and _link_exists(br):
        r = _sh(["ip", "link", "del", br], check=False)
        if r.returncode != 0 and _link_exists(br):
            problems.append(f"cannot delete bridge {br}: {r.stderr.strip()}")
    return problems


def down(prefix: str = DEFAULT_PREFIX, state_dir: Path | str = STATE_DIR) -> bool:
    """Remove the lab recorded under ``prefix`` (from any process). Returns False when there
    was none. LabError (one line) if something could not be removed."""
    prefix = parse_prefix(prefix)
    path = state_path(prefix, state_dir)
    with _locked(path):
        st = _read_state(path)
        problems = teardown(st) if st is not None else []
        if problems:
            raise LabError(f"lab {prefix} not fully removed: {'; '.join(problems)}")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(OSError):
            path.with_suffix(".lock").unlink()
    return st is not None


def status(prefix: str = DEFAULT_PREFIX, state_dir: Path | str = STATE_DIR) -> dict | None:
    """The recorded state of the lab under ``prefix`` (None if there is none), with each
    recorded process marked alive or not."""
    st = _read_state(state_path(parse_prefix(prefix), state_dir))
    if st is not None:
        for e in st.get("procs", []) + st.get("relays", []):
            e["alive"] = _proc_start(int(e["pid"])) == e.get("start") and not _is_zombie(int(e["pid"]))
    return st


# ---------------------------------------------------------------- the lab
class Lab:
    """N namespace hosts on one bridge, optionally shaped, with an optional fixed delay per
    link applied through :meth:`route`. Use as a context manager, or call up()/down()."""

    def __init__(self, hosts: int = 2, rate: str | None = None, delay_ms: float = 0.0,
                 prefix: str = DEFAULT_PREFIX, subnet: str = DEFAULT_SUBNET,
                 state_dir: Path | str = STATE_DIR, burst: str = BURST):
        self.n = parse_hosts(hosts)
        self.rate = parse_rate(rate)
        self.delay_ms = parse_delay(delay_ms)
        self.prefix = parse_prefix(prefix)
        self.net = parse_subnet(subnet, self.n)
        self.burst = parse_burst(burst, self.rate)
        self.state_dir = Path(state_dir)
        self.path = state_path(self.prefix, self.state_dir)
        self.relay_dir = self.state_dir / f"{self.prefix.rstrip('-') or 'lab'}-relays"
        ips = list(self.net.hosts())
        self.bridge = f"{self.prefix}br"
        self.bridge_ip = str(ips[0])
        self.hosts = [{"ns": f"{self.prefix}h{i}", "veth": f"{self.prefix}v{i}",
                       "inner": f"{self.prefix}e{i}", "ip": str(ips[i + 1])} for i in range(self.n)]
        self.procs: list[subprocess.Popen] = []
        self._relays: list[dict] = []          # in use: {"proc", "pid", "start", "listen", "target", "stats"}
        self._spares: list[dict] = []          # started ahead, waiting for a target on stdin
        self._relay_seq = 0
        self.final_relay_stats: list[dict] | None = None
        self._is_up = False
        self._owner = False                    # this object made the lab (and removes it)
        self._old_handlers: dict = {}
        self._lock = threading.Lock()

    # -- names and addresses
    @property
    def names(self) -> list[str]:
        """Namespace names, host 0 first."""
        return [h["ns"] for h in self.hosts]

    @property
    def addresses(self) -> list[str]:
        """Host addresses, host 0 first."""
        return [h["ip"] for h in self.hosts]

    def host_of(self, address: str) -> int | None:
        """Index of the host that has ``address``, or None."""
        for i, h in enumerate(self.hosts):
            if h["ip"] == address:
                return i
        return None

    def _host(self, host) -> dict:
        if isinstance(host, int) and 0 <= host < self.n:
            return self.hosts[host]
        for h in self.hosts:
            if host in (h["ns"], h["ip"]):
                return h
        raise LabError(f"no host {host!r} in lab {self.prefix} (hosts 0-{self.n - 1}, {', '.join(self.names)})")

    def _state(self) -> dict:
        return {"prefix": self.prefix, "subnet": str(self.net), "rate": self.rate, "delay_ms": self.delay_ms,
                "burst": self.burst, "bridge": self.bridge, "bridge_ip": self.bridge_ip, "hosts": self.hosts,
                "relay_dir": str(self.relay_dir), "owner_pid": os.getpid(), "created": time.time(),
                "procs": [], "relays": []}

    # -- life cycle
    def up(self, prestart: bool = True) -> "Lab":
        """Make the bridge, the hosts and the shaping; with a delay and ``prestart``, start
        the spare relays that route() will use. LabError (one line) on any failure, with
        whatever was made already removed."""
        require_root()
        self.check()
        with _locked(self.path):
            if _read_state(self.path) is not None:
                raise LabError(f"lab {self.prefix} is already up (asyncdni lab down --prefix {self.prefix})")
            _write_state(self.path, self._state())      # recorded before anything exists
        self._owner = True
        self._install_signal_handlers()
        atexit.register(self._atexit)
        try:
            self._make()
            self._is_up = True
            if prestart:
                self.prestart_relays()
        except BaseException:
            self.down()
            raise
        return self

    def check(self) -> None:
        """LabError (one line) if this lab cannot be made: a name in use, or a subnet that
        overlaps a network of this machine."""
        for name in [self.bridge] + [h["veth"] for h in self.hosts] + [h["inner"] for h in self.hosts]:
            if _link_exists(name):
                raise LabError(f"network device {name} already exists (another lab with prefix "
                               f"{self.prefix}? asyncdni lab down --prefix {self.prefix})")
        for h in self.hosts:
            if _netns_exists(h["ns"]):
                raise LabError(f"namespace {h['ns']} already exists (asyncdni lab down --prefix {self.prefix})")
        # the subnet must not overlap any route of this machine: the bridge address would
        # otherwise capture (or leak) traffic meant for a real network
        r = _sh(["ip", "-4", "-j", "route", "show", "table", "all"], check=False)
        try:
            routes = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else []
        except ValueError:
            routes = []
        for rt in routes:
            dst = rt.get("dst", "")
            if dst in ("default", ""):
                continue
            try:
                other = ipaddress.IPv4Network(dst, strict=False)
            except ValueError:
                continue
            if other.is_loopback:
                continue
            if other.overlaps(self.net):
                raise LabError(f"subnet {self.net} overlaps {dst} (dev {rt.get('dev', '?')}) on this machine; "
                               f"choose another with --subnet")

    def _make(self) -> None:
        plen = self.net.prefixlen
        # bridge first, with its address, before any host exists
        _sh(["ip", "link", "add", self.bridge, "type", "bridge"])
        _sh(["ip", "addr", "add", f"{self.bridge_ip}/{plen}", "dev", self.bridge])
        _sh(["ip", "link", "set", self.bridge, "up"])
        for h in self.hosts:
            ns, veth, inner = h["ns"], h["veth"], h["inner"]
            _sh(["ip", "netns", "add", ns])
            _sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", inner])
            _sh(["ip", "link", "set", inner, "netns", ns])
            _sh(["ip", "link", "set", veth, "master", self.bridge])
            _sh(["ip", "link", "set", veth, "up"])
            _sh(["ip", "-n", ns, "addr", "add", f"{h['ip']}/{plen}", "dev", inner])
            _sh(["ip", "-n", ns, "link", "set", inner, "up"])
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            if self.rate is not None:
                tbf = ["tbf", "rate", self.rate, "burst", self.burst, "latency", TBF_LATENCY]
                _sh(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", inner, "root", *tbf])
                _sh(["tc", "qdisc", "replace", "dev", veth, "root", *tbf])

    def down(self) -> None:
        """End every process started through this lab, every relay, and remove the hosts and
        the bridge. Idempotent; safe from ``finally``, signal handlers and atexit."""
        with self._lock:
            if not self._owner:
                return
            old = {}
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):   # nothing may cut teardown short
                    old[sig] = signal.signal(sig, signal.SIG_IGN)
            try:
                self.final_relay_stats = self._collect_final_relay_stats()
                st = None
                with contextlib.suppress(LabError):
                    st = _read_state(self.path)
                st = st or self._state()
                problems = teardown(st, children=self.procs + [r["proc"] for r in self._relays + self._spares])
                for p in self.procs:
                    with contextlib.suppress(Exception):
                        p.wait(0)
                self._owner = False
                self._is_up = False
                if not problems:
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    with contextlib.suppress(OSError):
                        self.path.with_suffix(".lock").unlink()
            finally:
                for sig, h in old.items():
                    signal.signal(sig, h)
                self._restore_signal_handlers()
                with contextlib.suppress(Exception):
                    atexit.unregister(self._atexit)
            if problems:
                raise LabError(f"lab {self.prefix} not fully removed: {'; '.join(problems)}")

    @classmethod
    def attach(cls, prefix: str = DEFAULT_PREFIX, state_dir: Path | str = STATE_DIR) -> "Lab":
        """A handle on a lab that is already up (made by ``asyncdni lab up`` or another
        process), to run_in and route through it. Its close() (and ``with`` exit) ends only
        the processes and relays it started; the lab stays up."""
        require_root()
        st = _read_state(state_path(parse_prefix(prefix), state_dir))
        if st is None:
            raise LabError(f"no lab {prefix} is up (asyncdni lab up --prefix {prefix})")
        lab = cls(hosts=len(st["hosts"]), rate=st.get("rate"), delay_ms=st.get("delay_ms", 0.0),
                  prefix=st["prefix"], subnet=st["subnet"], state_dir=state_dir, burst=st.get("burst", BURST))
        lab.relay_dir = Path(st.get("relay_dir") or lab.relay_dir)
        for name in [lab.bridge] + [h["veth"] for h in lab.hosts]:
            if not _link_exists(name):
                raise LabError(f"lab {prefix} is recorded but {name} is missing (asyncdni lab down --prefix {prefix})")
        lab._is_up = True
        return lab

    def detach(self) -> None:
        """Leave the lab up when this process ends (``asyncdni lab up``): no teardown at exit
        or on signals; ``down(prefix)`` from any process removes it later."""
        self._owner = False
        self._restore_signal_handlers()
        with contextlib.suppress(Exception):
            atexit.unregister(self._atexit)

    def close(self) -> None:
        """End the processes and relays this object started, keeping the lab up (for a lab
        joined with attach()). Idempotent."""
        with self._lock:
            relays = self._relays + self._spares
            mine = {p.pid for p in self.procs} | {r["pid"] for r in relays}
            self.final_relay_stats = self._collect_final_relay_stats()
            st = _read_state(self.path) or {}
            entries = [e for e in st.get("procs", []) + st.get("relays", []) if e["pid"] in mine]
            _end_pids(entries, (), STOP_GRACE, self.procs + [r["proc"] for r in relays])
            _update_state(self.path, lambda s: [s.__setitem__(k, [e for e in s[k] if e["pid"] not in mine])
                                                for k in ("procs", "relays")])
            self.procs, self._relays = [], []

    def _atexit(self) -> None:
        with contextlib.suppress(Exception):
            self.down()

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGHUP become SystemExit while the lab is up, so that ``with`` blocks and
        ``finally`` clauses run and the lab comes down (Ctrl-C already raises)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, _frame):
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def __enter__(self) -> "Lab":
        return self if self._is_up else self.up()

    def __exit__(self, *exc) -> None:
        if self._owner:
            self.down()
        else:
            self.close()

    # -- processes in hosts
    def _record(self, key: str, entry: dict) -> None:
        st = _update_state(self.path, lambda s: s[key].append(entry))
        if st is None:
            raise LabError(f"lab {self.prefix} is not up")

    def run_in(self, host, argv: list[str], **popen_kw) -> subprocess.Popen:
        """Start ``argv`` inside host ``host`` (index, namespace name or address) with
        ``ip netns exec``; the process gets its own process group and ends with the lab.
        Keyword arguments go to subprocess.Popen."""
        if not self._is_up:
            raise LabError(f"lab {self.prefix} is not up")
        h = self._host(host)
        popen_kw.setdefault("start_new_session", True)
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        try:
            p = subprocess.Popen(["ip", "netns", "exec", h["ns"], *argv], **popen_kw)
        except OSError as e:
            raise LabError(f"cannot start {argv[0] if argv else '?'} in {h['ns']}: {e}") from None
        self.procs.append(p)
        self._record("procs", {"pid": p.pid, "start": _proc_start(p.pid), "ns": h["ns"],
                               "group": bool(popen_kw.get("start_new_session")), "argv": list(argv)[:8]})
        return p

    # -- delay
    def route(self, peers: list[dict], senders: dict | None = None) -> list[dict]:
        """Put a relay that adds ``delay_ms`` in front of every inbox endpoint that a peer on
        another host sends to. ``peers`` is the coordinator's list of inbox endpoints, one
        dict per worker in chain order (feeder, layer 1, .., layer K), e.g.
        ``{"fwd": "tcp://10.77.0.3:4100", "bwd": "tcp://10.77.0.3:4101"}``; returns the same
        list (new dicts, other keys kept) with those endpoints rewritten to
        ``tcp://<bridge address>:<relay port>``. Unchanged when delay_ms is 0, for empty
        endpoints, and for endpoints outside the lab or whose senders all share its host.

        ``senders`` maps (worker index, key) to the indices of the workers that connect to
        that inbox; default :func:`chain_senders`. A relay gives no delay to connections from
        its inbox's own host, so an inbox shared by a local and a remote sender is delayed for
        the remote one only."""
        out = [dict(p) for p in peers]
        if self.delay_ms <= 0:
            return out
        if not self._is_up:
            raise LabError(f"lab {self.prefix} is not up")
        senders = chain_senders(len(peers)) if senders is None else senders
        todo = []
        for i, p in enumerate(peers):
            for key, ep in p.items():
                if not isinstance(ep, str) or not ep:
                    continue
                if not ep.startswith("tcp://"):
                    continue
                host, port = _split_endpoint(ep)
                if self.host_of(host) is None:
                    continue
                froms = senders.get((i, key), [])
                remote = [j for j in froms if _endpoint_host(peers[j]) not in (None, host)]
                if not remote:
                    continue
                todo.append((i, key, host, port))
        started = self._start_relays([(host, port, host) for _, _, host, port in todo])
        for (i, key, _host, _port), listen in zip(todo, started):
            out[i][key] = f"tcp://{listen}"
        return out

    def relay(self, target: str, delay_ms: float | None = None, local: str | None = None) -> str:
        """Start one relay on the bridge address forwarding to ``target`` ('HOST:PORT' or
        'tcp://HOST:PORT') with ``delay_ms`` (default: the lab's) added each way; peers from
        address ``local`` get no delay. Returns the relay's 'HOST:PORT'."""
        host, port = _split_endpoint(target if target.startswith("tcp://") else f"tcp://{target}")
        return self._start_relays([(host, port, local)], delay_ms)[0]

    def _spawn_relays(self, targets: list[tuple[str, int, str | None] | None], delay: float) -> list[dict]:
        """Start one relay per target at once (None: a spare that reads its target from stdin
        later) and wait until each listens."""
        self.relay_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        new = []
        for t in targets:
            self._relay_seq += 1
            stats = self.relay_dir / f"relay{self._relay_seq}.json"
            with contextlib.suppress(FileNotFoundError):
                stats.unlink()
            argv = [sys.executable, "-m", "asyncdni.lab.relay", "--listen", f"{self.bridge_ip}:0",
                    "--target", "-" if t is None else f"{t[0]}:{t[1]}", "--delay-ms", repr(delay),
                    "--stats", str(stats), "--parent-pid", str(os.getpid())]
            if t is not None and t[2]:
                argv += ["--local", t[2]]
            try:
                p = subprocess.Popen(argv, stdin=subprocess.PIPE if t is None else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, env=env, start_new_session=True)
            except OSError as e:
                raise LabError(f"cannot start a relay: {e}") from None
            r = {"proc": p, "pid": p.pid, "start": _proc_start(p.pid), "delay_ms": delay,
                 "target": None if t is None else f"{t[0]}:{t[1]}", "stats": str(stats), "listen": None}
            self._record("relays", {k: v for k, v in r.items() if k != "proc"})
            new.append(r)
        deadline = time.monotonic() + RELAY_START_TIMEOUT
        for r in new:
            line = _read_line(r["proc"].stdout, deadline)
            r["proc"].stdout.close()
            try:
                r["listen"] = json.loads(line)["listen"]
            except (ValueError, KeyError, TypeError):
                raise LabError(f"a relay (pid {r['pid']}) did not start (exit code {r['proc'].poll()})") from None
        _update_state(self.path, lambda s: [e.update(listen=r["listen"]) for e in s["relays"]
                                            for r in new if e["pid"] == r["pid"]])
        return new

    def prestart_relays(self, n: int | None = None) -> None:
        """Start spare relays (default: enough for every inbox of a chain over all hosts), so
        that route() only hands them their targets: it then takes milliseconds, not the
        seconds that starting Python processes takes, while the workers wait for START."""
        if not self._is_up:
            raise LabError(f"lab {self.prefix} is not up")
        if self.delay_ms <= 0:
            return
        want = (2 * self.n + 2) if n is None else n
        self._spares = [r for r in self._spares if r["proc"].poll() is None]
        missing = want - len(self._spares)
        if missing > 0:
            self._spares += self._spawn_relays([None] * missing, self.delay_ms)

    def _start_relays(self, targets: list[tuple[str, int, str | None]], delay_ms: float | None = None) -> list[str]:
        """A relay per (host, port, local): a spare one if there is one, else a new one.
        Returns their HOST:PORT."""
        if not self._is_up:
            raise LabError(f"lab {self.prefix} is not up")
        delay = self.delay_ms if delay_ms is None else parse_delay(delay_ms)
        chosen: list[dict | None] = []
        for host, port, local in targets:
            r = None
            while delay == self.delay_ms and self._spares and r is None:
                cand = self._spares.pop(0)
                try:
                    cand["proc"].stdin.write(f"{host}:{port} {local or '-'}\n".encode())
                    cand["proc"].stdin.close()
                except OSError:
                    continue                   # that spare is gone: take the next
                cand["target"] = f"{host}:{port}"
                r = cand
            chosen.append(r)
        fresh = iter(self._spawn_relays([t for t, r in zip(targets, chosen) if r is None], delay))
        chosen = [r if r is not None else next(fresh) for r in chosen]
        self._relays += chosen
        _update_state(self.path, lambda s: [e.update(target=r["target"]) for e in s["relays"]
                                            for r in chosen if e["pid"] == r["pid"]])
        return [r["listen"] for r in chosen]

    def stop_relays(self, refill: bool = True) -> dict:
        """End the relays in use (their connections with them) and return their final
        figures pooled as relay_stats() does; with ``refill``, start spares for the next
        route(). Between runs through one lab, so that each run gets its own figures."""
        used, self._relays = self._relays, []
        final = self._end_relays(used)
        _update_state(self.path, lambda s: s.__setitem__("relays", [e for e in s["relays"]
                                                                    if e["pid"] not in {r["pid"] for r in used}]))
        if refill and self._is_up:
            self.prestart_relays()
        return pool_relay_stats(final, self.delay_ms)

    def relay_stats(self, fresh: bool = True, only: list[str] | None = None) -> dict:
        """The relays' statistics: one entry per relay, and the delay added per chunk pooled
        over all of them (``added_ms``: every chunk; ``on_time_ms``: chunks that found the
        relay idle when due, i.e. its own timing accuracy), in ms. With ``fresh``, ask each
        live relay to write its figures first (SIGUSR1). ``only``: relays by listen address.
        After down()/close(), the relays' final figures."""
        if self.final_relay_stats is not None and not any(r["proc"].poll() is None for r in self._relays):
            return pool_relay_stats([d for d in self.final_relay_stats
                                     if d and (only is None or d.get("listen") in only)], self.delay_ms)
        relays = [r for r in self._relays if only is None or r["listen"] in only]
        if fresh:
            asked = []
            for r in relays:
                if r["proc"].poll() is None:
                    with contextlib.suppress(OSError):
                        before = os.stat(r["stats"]).st_mtime_ns if os.path.exists(r["stats"]) else 0
                        r["proc"].send_signal(signal.SIGUSR1)
                        asked.append((r, before))
            deadline = time.monotonic() + 2.0
            for r, before in asked:
                while time.monotonic() < deadline:
                    with contextlib.suppress(OSError):
                        if os.stat(r["stats"]).st_mtime_ns != before:
                            break
                    time.sleep(0.02)
        return pool_relay_stats([_load_json(r["stats"]) for r in relays], self.delay_ms)

    def _collect_final_relay_stats(self) -> list[dict] | None:
        spares, self._spares = self._spares, []
        self._end_relays(spares)
        if not self._relays:
            return self.final_relay_stats
        return self._end_relays(self._relays)

    @staticmethod
    def _end_relays(relays: list[dict]) -> list[dict]:
        """SIGTERM (each writes its final figures), wait, SIGKILL; returns their figures."""
        live = [r for r in relays if r["proc"].poll() is None]
        for r in live:
            with contextlib.suppress(OSError):
                r["proc"].terminate()
        deadline = time.monotonic() + STOP_GRACE
        for r in live:
            try:
                r["proc"].wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r["proc"].kill()
                r["proc"].wait()
        out = []
        for r in relays:
            d = _load_json(r["stats"])
            if d is not None:
                out.append(d)
            with contextlib.suppress(OSError):
                os.unlink(r["stats"])
        return out


def chain_senders(n: int) -> dict:
    """Who sends to which inbox in a chain of n workers (0 = feeder, 1..n-1 = layers):
    layer i's fwd inbox hears from i-1; bwd inboxes from i+1; the feeder's bwd inbox also
    from the last layer."""
    s: dict = {}
    for i in range(n):
        if i >= 1:
            s[(i, "fwd")] = [i - 1]
        if i + 1 < n:
            s[(i, "bwd")] = [i + 1]
    if n >= 2:
        s[(0, "bwd")] = sorted({1, n - 1})
    return s


def pool_relay_stats(docs: list[dict | None], delay_ms: float) -> dict:
    from asyncdni.lab.relay import summarize
    relays, pooled = [], []
    for d in docs:
        if not d:
            continue
        pooled.extend(d.get("added_us", []))
        relays.append({k: v for k, v in d.items() if k != "added_us"})
    return {"delay_ms": delay_ms, "relays": relays, "chunks": sum(r.get("chunks", 0) for r in relays),
            "backlogged": sum(r.get("backlogged", 0) for r in relays), **summarize(pooled)}


def _load_json(path: str) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read_line(stream, deadline: float) -> str:
    buf = b""
    fd = stream.fileno()
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").split("\n", 1)[0]


def _split_endpoint(ep: str) -> tuple[str, int]:
    from asyncdni.lab.relay import parse_hostport
    try:
        return parse_hostport(ep)
    except ValueError:
        raise LabError(f"endpoint {ep!r} is not tcp://HOST:PORT") from None


def _endpoint_host(peer: dict) -> str | None:
    """The host address of a worker, from any of its tcp endpoints."""
    for ep in peer.values():
        if isinstance(ep, str) and ep.startswith("tcp://"):
            return _split_endpoint(ep)[0]
    return None
