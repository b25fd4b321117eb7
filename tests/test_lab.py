"""The network lab (namespace hosts on a bridge, tbf shaping) and the delay relay.

Tests that make namespaces need root and `ip netns`; they skip with one line elsewhere.
Each lab uses its own prefix and a free 10.78.x.0/24 subnet, so parallel test runs and a
user's lab (adl-, 10.77.0.0/24) never collide. Traffic goes only to loopback and to the
namespaces the test made.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from asyncdni import cli
from asyncdni.lab import namespaces as L
from asyncdni.lab.relay import parse_hostport
from tests.conftest import env_with_repo, pids_gone, raises_one_line

pytestmark = pytest.mark.timeout(90)
PY = sys.executable


# ------------------------------------------------------------------ helpers
def _lab_skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the network lab needs Linux"
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces); skipped"
    probe = f"adp{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns is not allowed here ({(r.stderr or '').strip()[:80]}); skipped"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_SKIP = None


@pytest.fixture
def needs_lab():
    global _SKIP
    if _SKIP is None:
        _SKIP = _lab_skip_reason() or ""
    if _SKIP:
        pytest.skip(_SKIP)


def _names(prefix: str) -> dict:
    links = [n for n in os.listdir("/sys/class/net") if n.startswith(prefix)]
    nss = [n for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else []) if n.startswith(prefix)]
    return {"links": links, "netns": nss}


@pytest.fixture
def lab_args(needs_lab, tmp_path, no_leftover_processes):
    """Arguments for a test lab: own prefix, a free subnet, state under tmp_path; whatever
    happens, the lab is removed afterwards and nothing of it may remain."""
    prefix = f"t{os.getpid() % 10000:04d}-"
    state = tmp_path / "state"
    args = None
    for k in range(250):
        x = (os.getpid() + k) % 250
        cand = dict(prefix=prefix, subnet=f"10.78.{x}.0/24", state_dir=state)
        try:
            L.Lab(hosts=3, **cand).check()
        except L.LabError:
            continue
        args = cand
        break
    assert args is not None, "no free 10.78.x.0/24 subnet"
    yield args
    L.down(prefix, state)
    assert _names(prefix) == {"links": [], "netns": []}
    assert not L.state_path(prefix, state).exists()


def _server(lab: L.Lab, host: int, kind: str, count: int = 1):
    p = lab.run_in(host, [PY, "-m", "asyncdni.lab.netprobe", kind, "--bind", f"{lab.addresses[host]}:0",
                          "--count", str(count)], stdout=subprocess.PIPE, env=env_with_repo())
    line = L._read_line(p.stdout, time.monotonic() + 20)
    assert line, f"probe {kind} did not start in host {host}"
    return p, json.loads(line)["listen"]


def _client(lab: L.Lab, host: int, args: list[str], timeout: float = 40) -> dict:
    p = lab.run_in(host, [PY, "-m", "asyncdni.lab.netprobe", *args], stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True, env=env_with_repo())
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return json.loads(out)


# ------------------------------------------------------------------ no root needed
def test_flags_are_validated_in_one_line():
    raises_one_line(L.LabError, L.parse_rate, "10gbps", match_all=("10gbps", "gbit"))
    raises_one_line(L.LabError, L.parse_rate, "-1mbit")
    assert L.parse_rate("1GBIT") == "1gbit" and L.parse_rate("unshaped") is None and L.parse_rate(None) is None
    assert L.rate_bits("100mbit") == 100e6 and L.rate_bits("2.5gbit") == 2.5e9
    raises_one_line(L.LabError, L.parse_delay, "x", match_all=("milliseconds",))
    raises_one_line(L.LabError, L.parse_delay, "-1")
    raises_one_line(L.LabError, L.parse_prefix, "Bad_Prefix!", match_all=("prefix",))
    raises_one_line(L.LabError, L.parse_prefix, "waytoolongprefix")
    raises_one_line(L.LabError, L.parse_subnet, "8.8.8.0/24", 2, match_all=("private",))
    raises_one_line(L.LabError, L.parse_subnet, "10.1.0.0/30", 3, match_all=("too small",))
    raises_one_line(L.LabError, L.parse_subnet, "nonsense", 2, match_all=("CIDR",))
    raises_one_line(L.LabError, L.parse_hosts, "0")
    lab = L.Lab(hosts=3, prefix="zz-", subnet="10.78.9.0/24", state_dir="/nonexistent")
    assert lab.bridge == "zz-br" and lab.bridge_ip == "10.78.9.1"
    assert lab.names == ["zz-h0", "zz-h1", "zz-h2"] and lab.addresses == ["10.78.9.2", "10.78.9.3", "10.78.9.4"]
    raises_one_line(L.LabError, lab.run_in, 0, ["true"], match_all=("not up",))


def test_labs_aq_and_aq_dash_keep_separate_state(tmp_path):
    """`lab down --prefix aq-` removed lab `aq`: both shared aq.json."""
    assert L.state_path("aq", tmp_path) != L.state_path("aq-", tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="lab up/down need root before they read --state-dir")
@pytest.mark.parametrize("cmd", ["up", "down", "status"])
def test_a_state_dir_that_is_a_file_is_one_line(tmp_path, capsys, cmd):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(["lab", cmd, "--prefix", "zq-", "--state-dir", str(f)]) in (1, 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a directory" in err and "Traceback" not in err, err
    assert f.read_text() == "x" and _names("zq-") == {"links": [], "netns": []}


def test_cli_refuses_without_root_and_bad_flags(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for argv in (["lab", "up"], ["lab", "down"], ["lab", "up", "--hosts", "3", "--rate", "1gbit"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs root" in err, err
    monkeypatch.undo()
    if os.geteuid() == 0:
        for argv, word in ((["lab", "up", "--rate", "fast"], "rate"), (["lab", "up", "--hosts", "x"], "hosts"),
                           (["lab", "up", "--delay", "-3"], "delay"), (["lab", "down", "--prefix", "A B"], "prefix"),
                           (["lab", "up", "--subnet", "1.2.3.0/24"], "subnet")):
            assert cli.main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and word in err, err
    assert cli.main(["lab"]) == 2


def test_chain_senders():
    s = L.chain_senders(5)                         # feeder + 4 layers
    assert s[(1, "fwd")] == [0] and s[(4, "fwd")] == [3]
    assert s[(1, "bwd")] == [2] and s[(3, "bwd")] == [4] and (4, "bwd") not in s
    assert s[(0, "bwd")] == [1, 4] and (0, "fwd") not in s


def _start_relay(target: str, delay_ms: float, stats: Path, local: str | None = None):
    argv = [PY, "-m", "asyncdni.lab.relay", "--listen", "127.0.0.1:0", "--target", target,
            "--delay-ms", str(delay_ms), "--stats", str(stats), "--parent-pid", str(os.getpid())]
    if local:
        argv += ["--local", local]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env_with_repo())
    line = L._read_line(p.stdout, time.monotonic() + 20)
    p.stdout.close()
    return p, json.loads(line)["listen"]


def test_relay_bounds_its_connections_and_stops_at_once_on_sigterm(tmp_path, no_leftover_processes):
    """Issue 18.8: 3,000 idle connections made 12,001 threads and SIGTERM took minutes; at the
    usual 1,024-file limit the relay died with a traceback. Now: at most --max-connections
    open, the rest closed at once and counted; out of descriptors it goes on."""
    import resource
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(512)
    stats = tmp_path / "st.json"
    argv = [PY, "-m", "asyncdni.lab.relay", "--listen", "127.0.0.1:0", "--target",
            f"127.0.0.1:{srv.getsockname()[1]}", "--delay-ms", "0", "--stats", str(stats),
            "--max-connections", "8", "--parent-pid", str(os.getpid())]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_with_repo(),
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40)))
    clients = []
    try:
        host, port = parse_hostport(json.loads(L._read_line(p.stdout, time.monotonic() + 20))["listen"])
        for _ in range(60):
            clients.append(socket.create_connection((host, port), timeout=5))
        time.sleep(1.0)
        assert p.poll() is None                                # alive, under the file limit too
        assert psutil.Process(p.pid).num_threads() <= 4 * 8 + 4
        p.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (stats.exists() and json.loads(stats.read_text())["over_limit"]):
            time.sleep(0.05)
        st = json.loads(stats.read_text())
        assert st["connections"] == 8 and st["over_limit"] >= 1
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        p.wait(10)
        assert time.monotonic() - t0 < 3.0 and p.returncode == 0
        assert b"Traceback" not in p.stderr.read()
    finally:
        for c in clients:
            c.close()
        srv.close()
        p.kill()
        p.wait(10)
        p.stdout.close()
        p.stderr.close()


def _probe(kind: str, *args, **kw):
    return subprocess.Popen([PY, "-m", "asyncdni.lab.netprobe", kind, *args], env=env_with_repo(), **kw)


def test_relay_on_loopback_adds_the_delay_and_passes_bytes_unchanged(tmp_path, no_leftover_processes):
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(2)
    srv.settimeout(20)
    relay, listen = _start_relay(f"127.0.0.1:{srv.getsockname()[1]}", 8.0, tmp_path / "st.json")
    try:
        c = socket.create_connection(parse_hostport(listen), timeout=20)
        s, _ = srv.accept()
        s.settimeout(20)
        payload = os.urandom(3 << 20)
        t = time.perf_counter()
        c.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            got += s.recv(1 << 20)
        assert bytes(got) == payload                   # forward, byte for byte
        s.sendall(payload[::-1])                        # and back
        got = bytearray()
        while len(got) < len(payload):
            got += c.recv(1 << 20)
        assert bytes(got) == payload[::-1]
        assert time.perf_counter() - t >= 0.016         # two directions, 8 ms each, at least
        rtts = []
        for _ in range(30):
            t = time.perf_counter()
            c.sendall(b"x")
            assert s.recv(1) == b"x"
            s.sendall(b"y")
            assert c.recv(1) == b"y"
            rtts.append(time.perf_counter() - t)
        c.close()
        s.close()
        rtts.sort()
        assert 0.0155 <= rtts[15] < 0.030, rtts          # median round trip: 2 x 8 ms plus a little
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(10) == 0
        srv.close()
    st = json.loads((tmp_path / "st.json").read_text())
    assert st["connections"] == 1 and st["bytes"] == 2 * (3 << 20) + 60
    assert abs(st["on_time_ms"]["median"] - 8.0) < 1.5, st["on_time_ms"]
    assert st["added_ms"]["p99"] is not None and len(st["added_us"]) == st["samples"] == st["chunks"]


def test_relay_adds_nothing_for_its_local_host(tmp_path, no_leftover_processes):
    echo = _probe("echo", "--bind", "127.0.0.1:0", stdout=subprocess.PIPE)
    listen = json.loads(L._read_line(echo.stdout, time.monotonic() + 20))["listen"]
    relay, rl = _start_relay(listen, 50.0, tmp_path / "st.json", local="127.0.0.1")
    try:
        out = subprocess.run([PY, "-m", "asyncdni.lab.netprobe", "ping", "--to", rl, "--count", "20"],
                             capture_output=True, text=True, timeout=30, env=env_with_repo())
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["rtt_ms"]["median"] < 20     # not 2 x 50 ms
    finally:
        relay.terminate()
        relay.wait(10)
        echo.wait(10)
    st = json.loads((tmp_path / "st.json").read_text())
    assert st["local_connections"] == 1 and st["connections"] == 0


@pytest.mark.slow                   # a subprocess
def test_relay_refuses_bad_arguments_in_one_line():
    r = subprocess.run([PY, "-m", "asyncdni.lab.relay", "--listen", "nowhere", "--target", "127.0.0.1:1",
                        "--delay-ms", "5"], capture_output=True, text=True, timeout=20, env=env_with_repo())
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "HOST:PORT" in r.stderr


# ------------------------------------------------------------------ root: real namespaces
def test_hosts_reach_each_other_and_the_root_namespace(lab_args):
    with L.Lab(hosts=3, **lab_args) as lab:
        st = json.loads(lab.path.read_text())
        assert [h["ns"] for h in st["hosts"]] == lab.names and st["bridge_ip"] == lab.bridge_ip
        echo, listen = _server(lab, 2, "echo", count=2)
        r = _client(lab, 0, ["ping", "--to", listen, "--count", "20"])     # host 0 -> host 2
        assert r["rtt_ms"]["median"] < 50
        out = subprocess.run([PY, "-m", "asyncdni.lab.netprobe", "ping", "--to", listen, "--count", "5"],
                             capture_output=True, text=True, timeout=30, env=env_with_repo())   # root -> host 2
        assert out.returncode == 0, out.stderr
        echo.wait(10)
        lo = subprocess.run(["ip", "netns", "exec", lab.names[1], "ip", "-o", "link", "show", "lo"],
                            capture_output=True, text=True, timeout=10).stdout
        assert "UP" in lo
        addr = subprocess.run(["ip", "-n", lab.names[1], "-4", "-o", "addr"], capture_output=True, text=True,
                              timeout=10).stdout
        assert f"{lab.addresses[1]}/24" in addr
    assert _names(lab_args["prefix"]) == {"links": [], "netns": []}


def test_tbf_shapes_both_ends_of_every_link(lab_args):
    with L.Lab(hosts=2, rate="100mbit", **lab_args) as lab:
        for h in lab.hosts:
            root_side = subprocess.run(["tc", "qdisc", "show", "dev", h["veth"]], capture_output=True,
                                       text=True, timeout=10).stdout
            ns_side = subprocess.run(["ip", "netns", "exec", h["ns"], "tc", "qdisc", "show", "dev", h["inner"]],
                                     capture_output=True, text=True, timeout=10).stdout
            for out in (root_side, ns_side):
                assert "tbf" in out and "rate 100Mbit" in out and "burst 25000b" in out, out   # auto: 2 ms of the rate
        sink, listen = _server(lab, 1, "sink")
        r = _client(lab, 0, ["send", "--to", listen, "--bytes", str(6 << 20)])
        sink.wait(10)
        assert r["bytes"] == 6 << 20
        assert 50 < r["mbit_s"] < 115, r                  # about the rate, generous bounds


def test_route_puts_relays_in_front_of_remote_inboxes(lab_args):
    with L.Lab(hosts=3, delay_ms=10, **lab_args) as lab:
        a0, a1, a2 = lab.addresses
        echo, listen = _server(lab, 2, "echo")
        port = listen.rsplit(":", 1)[1]
        # feeder and layer 1 share host 0; layer 2 on host 1 (inbox ports made up); layer 3 on
        # host 2 has a live echo server as its fwd inbox
        peers = [{"fwd": "", "bwd": f"tcp://{a0}:4000"},
                 {"fwd": f"tcp://{a0}:4001", "bwd": f"tcp://{a0}:4002", "name": "L1"},
                 {"fwd": f"tcp://{a1}:4003", "bwd": f"tcp://{a1}:4004"},
                 {"fwd": f"tcp://{a2}:{port}", "bwd": f"tcp://{a2}:4006"}]
        spares = [r["pid"] for r in json.loads(lab.path.read_text())["relays"]]
        assert len(spares) == 2 * 3 + 2                      # started ahead by up()
        routed = lab.route(peers)
        used = [r for r in json.loads(lab.path.read_text())["relays"] if r["target"]]
        assert len(used) == 5 and {r["pid"] for r in used} <= set(spares)   # route() took spares
        assert routed[0]["fwd"] == ""
        assert routed[1]["fwd"] == peers[1]["fwd"]            # its only sender, the feeder, is on its host
        assert routed[1]["name"] == "L1"
        for i, key in ((0, "bwd"), (1, "bwd"), (2, "fwd"), (2, "bwd"), (3, "fwd")):
            assert routed[i][key].startswith(f"tcp://{lab.bridge_ip}:"), (i, key, routed[i][key])
        assert routed[3]["bwd"] == peers[3]["bwd"]            # the last layer's bwd inbox has no sender
        assert len({r[k] for r in routed for k in ("fwd", "bwd")}) == 8
        to = routed[3]["fwd"][len("tcp://"):]
        r = _client(lab, 1, ["ping", "--to", to, "--count", "20"])
        echo.wait(10)
        assert 19.5 < r["rtt_ms"]["median"] < 30, r          # 2 x 10 ms through the relay
        st = lab.relay_stats()
        assert len(st["relays"]) == 5 and st["chunks"] >= 40
        assert abs(st["on_time_ms"]["median"] - 10) < 1.5, st["on_time_ms"]
        assert all(psutil.pid_exists(p) for p in spares)
        final = lab.stop_relays()                             # between two runs: figures, fresh spares
        assert final["chunks"] == st["chunks"] and len(final["relays"]) == 5
        assert not pids_gone([r["pid"] for r in used], 5)
        relay_pids = [r["pid"] for r in json.loads(lab.path.read_text())["relays"]]
        assert len(relay_pids) == 8 and not set(relay_pids) & {r["pid"] for r in used}
    assert not pids_gone(relay_pids + spares, 5)


def test_no_delay_means_no_relays(lab_args):
    with L.Lab(hosts=2, **lab_args) as lab:
        peers = [{"fwd": "", "bwd": f"tcp://{lab.addresses[0]}:4000"}, {"fwd": f"tcp://{lab.addresses[1]}:4001",
                                                                       "bwd": f"tcp://{lab.addresses[1]}:4002"}]
        assert lab.route(peers) == peers
        assert json.loads(lab.path.read_text())["relays"] == []


def test_second_lab_with_the_same_names_is_refused(lab_args):
    with L.Lab(hosts=2, **lab_args):
        raises_one_line(L.LabError, L.Lab(hosts=2, **lab_args).up, match_all=(lab_args["prefix"],))
    assert _names(lab_args["prefix"]) == {"links": [], "netns": []}


OWNER = """
import sys, time
from asyncdni.lab.namespaces import Lab
lab = Lab(hosts=2, delay_ms=3, prefix=sys.argv[1], subnet=sys.argv[2], state_dir=sys.argv[3])
with lab:
    lab.run_in(0, [sys.executable, "-c", "import time; time.sleep(120)"])
    lab.run_in(1, ["sh", "-c", "sleep 120 & sleep 120"])
    lab.route([{"fwd": "", "bwd": "tcp://%s:4000" % lab.addresses[0]},
               {"fwd": "tcp://%s:4001" % lab.addresses[1], "bwd": ""}])
    print("ready", flush=True)
    time.sleep(120)
"""


def _owner(lab_args):
    p = subprocess.Popen([PY, "-c", OWNER, lab_args["prefix"], lab_args["subnet"], str(lab_args["state_dir"])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_repo())
    assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.poll() is not None else "no ready"
    st = json.loads(L.state_path(lab_args["prefix"], lab_args["state_dir"]).read_text())
    pids = [e["pid"] for e in st["procs"] + st["relays"]]
    for ns in [h["ns"] for h in st["hosts"]]:
        pids += [int(x) for x in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                text=True, timeout=10).stdout.split()]
    assert len(set(pids)) >= 6                       # 2 run_in (+ a child of sh), 2 relays, ...
    return p, sorted(set(pids))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_tear_the_lab_down(lab_args, sig):
    p, pids = _owner(lab_args)
    p.send_signal(sig)
    p.communicate(timeout=30)
    assert p.returncode != 0
    assert not pids_gone(pids, 5)
    assert _names(lab_args["prefix"]) == {"links": [], "netns": []}
    assert not L.state_path(lab_args["prefix"], lab_args["state_dir"]).exists()


def test_down_from_another_process_after_the_owner_was_killed(lab_args):
    p, pids = _owner(lab_args)
    p.kill()
    p.wait(10)                  # (its pipes stay open: the lab's processes inherited them)
    assert _names(lab_args["prefix"])["netns"]         # SIGKILL: nothing could clean up
    st = L.status(lab_args["prefix"], lab_args["state_dir"])
    assert st is not None and all(e["alive"] for e in st["procs"])
    assert L.down(lab_args["prefix"], lab_args["state_dir"]) is True
    assert not pids_gone(pids, 5)
    assert _names(lab_args["prefix"]) == {"links": [], "netns": []}
    assert L.down(lab_args["prefix"], lab_args["state_dir"]) is False     # idempotent


def test_cli_up_status_down(lab_args, capsys):
    pre, net, sd = lab_args["prefix"], lab_args["subnet"], str(lab_args["state_dir"])
    assert cli.main(["lab", "up", "--hosts", "2", "--rate", "1gbit", "--delay", "5", "--prefix", pre,
                     "--subnet", net, "--state-dir", sd]) == 0
    out = capsys.readouterr().out
    assert f"{pre}h0" in out and "1gbit" in out and f"lab down --prefix {pre}" in out
    assert sorted(_names(pre)["netns"]) == [f"{pre}h0", f"{pre}h1"]       # it stays up
    assert cli.main(["lab", "up", "--hosts", "2", "--prefix", pre, "--subnet", net, "--state-dir", sd]) == 2
    assert "already" in capsys.readouterr().err
    assert cli.main(["lab", "status", "--prefix", pre, "--state-dir", sd]) == 0
    assert json.loads(capsys.readouterr().out)["delay_ms"] == 5.0
    attached = L.Lab.attach(pre, lab_args["state_dir"])
    assert attached.delay_ms == 5.0 and attached.addresses == [str(a) for a in attached.addresses]
    with attached:
        p = attached.run_in(1, ["sleep", "60"])
    assert p.poll() is not None and _names(pre)["netns"]                # close(): the lab stays
    assert cli.main(["lab", "down", "--prefix", pre, "--state-dir", sd]) == 0
    assert "removed" in capsys.readouterr().out
    assert _names(pre) == {"links": [], "netns": []}
    assert cli.main(["lab", "down", "--prefix", pre, "--state-dir", sd]) == 0
    assert "no lab" in capsys.readouterr().out


def test_train_on_a_lab_made_by_hand_gets_its_delay(lab_args, tmp_path, capsys):
    """`lab up --delay 20`, agents in its hosts, then `train --lab PREFIX`: the links between
    hosts go through relays adding the lab's delay (before, such a run saw no delay at all);
    the relays end with the run and the lab stays up. Without --lab there are none."""
    pre, sd = lab_args["prefix"], str(lab_args["state_dir"])
    assert cli.main(["lab", "up", "--hosts", "2", "--delay", "20", "--prefix", pre, "--subnet", lab_args["subnet"],
                     "--state-dir", sd]) == 0
    capsys.readouterr()
    lab = L.Lab.attach(pre, lab_args["state_dir"])
    with socket.socket() as s:
        s.bind((lab.bridge_ip, 0))
        port = s.getsockname()[1]

    def train(*extra):
        with lab:                           # the agents end with this handle; the lab stays up
            for i in range(2):
                lab.run_in(i, [PY, "-m", "asyncdni.cli", "agent", "--join", f"tcp://{lab.bridge_ip}:{port}",
                               "--name", f"h{i}", "--bind", lab.addresses[i], "--wait", "30", "--insecure"],
                           env=env_with_repo(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            code = cli.main(["train", "--launcher", "agents", "--listen", f"{lab.bridge_ip}:{port}", "--hosts",
                             "h0,h0,h1,h1,h1", "--insecure", "--steps", "30", "--width", "32", "--no-progress",
                             "--run-dir", str(tmp_path / f"run{len(extra)}"), *extra])
        return code, capsys.readouterr()
    code, out = train("--lab", pre, "--lab-state-dir", sd)
    assert code == 0, out.err
    line = next(ln for ln in out.out.splitlines() if ln.startswith(f"lab {pre}:"))
    median = float(line.split("a median ")[1].split(" ms")[0])
    assert "for a set delay of 20 ms" in line and 19.0 <= median <= 30.0, line
    assert json.loads(L.state_path(pre, sd).read_text())["relays"] == []      # ended with the run
    code, out = train()
    assert code == 0 and f"lab {pre}:" not in out.out
    assert cli.main(["train", "--launcher", "agents", "--listen", "127.0.0.1:5", "--hosts", "a,a,a,a,a",
                     "--lab", "zz9-", "--lab-state-dir", sd]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--lab: no lab zz9- is up" in err
    assert cli.main(["lab", "down", "--prefix", pre, "--state-dir", sd]) == 0


def _bench_prefix_subnet(tag: str, tmp_path, salt: int):
    prefix = f"{tag}{os.getpid() % 10000:04d}-"
    for k in range(250):
        cand = f"10.78.{(os.getpid() + salt + k) % 250}.0/24"
        try:
            L.Lab(hosts=2, prefix=prefix, subnet=cand, state_dir=tmp_path).check()
        except L.LabError:
            continue
        return prefix, cand
    raise AssertionError("no free 10.78.x.0/24 subnet")


def _bench_lab(tmp_path, capsys, letter: str, start: int, *args):
    """``asyncdni bench --lab ARGS`` on a lab of its own, taken down whatever happens; returns
    the JSON report's lab section and what was printed. Nothing of the lab may be left."""
    prefix, subnet = _bench_prefix_subnet(letter, tmp_path, start)
    out, run_dir = tmp_path / "lab.json", tmp_path / f"run-{letter}"
    try:
        code = cli.main(["bench", "--lab", *args, "--lab-prefix", prefix, "--lab-subnet", subnet, "--json", str(out),
                         "--run-dir", str(run_dir)])
        printed = capsys.readouterr()
        assert code == 0, printed.err
    finally:
        L.down(prefix)
    assert _names(prefix) == {"links": [], "netns": []}
    # the lab bench's own directory holds the same result, its config and its table
    assert json.loads((run_dir / "lab.json").read_text())["lab"]["links"] == json.loads(out.read_text())["lab"]["links"]
    assert (run_dir / "config.toml").exists() and (run_dir / "lab.csv").exists()
    assert f"run directory: {run_dir}" in printed.out
    return json.loads(out.read_text())["lab"], printed


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_bench_lab_runs_every_schedule_over_the_links(needs_lab, tmp_path, no_leftover_processes, capsys):
    from asyncdni import schedules as S
    # no --schedules: every schedule of the table
    res, printed = _bench_lab(tmp_path, capsys, "b", 97, "--links", "100mbit:3", "--layers", "2", "--width", "16",
                              "--steps", "30", "--csv", str(tmp_path / "lab.csv"))
    assert [row["link"] for row in res["links"]] == ["100mbit/3ms"]
    for row in res["links"]:
        assert set(row["runs"]) == set(S.TABLE)
        for s, r in row["runs"].items():
            assert r["samples_per_s"] > 0 and len(r["per_layer"]) == 2 and r["repeats"] == 1
            assert r["load"]["samples"] == 1 and 0 <= r["load"]["other_share"] <= 1     # other work on the machine
            assert r["per_layer"][0]["bytes_sent"] > 0
            # every layer of a schedule that sends gradients back sends bytes; under local the last does not
            assert all(L_["bytes_sent"] > 0 for L_ in r["per_layer"]) or s == "local", (s, r["per_layer"])
            assert (r["sg_lag"] is not None) == (S.TABLE[s].gradient == "synthetic"), (s, r["sg_lag"])
    for r in res["links"][0]["runs"].values():                      # 3 ms: relays, measured
        assert r["relay"]["chunks"] > 0 and abs(r["relay"]["on_time_ms"]["median"] - 3) < 1.5, r["relay"]
    assert "100mbit/3ms" in printed.out and "relay added" in printed.out and "delayed_fixed" in printed.out
    assert (tmp_path / "lab.csv").read_text().count("\n") > 4


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_bench_lab_repeats_and_windows(needs_lab, tmp_path, no_leftover_processes, capsys):
    res, printed = _bench_lab(tmp_path, capsys, "w", 151, "--links", "unshaped:2", "--schedules", "async",
                              "--windows", "1,6", "--repeats", "2", "--layers", "3", "--width", "16", "--steps", "40")
    runs = res["links"][0]["runs"]
    assert list(runs) == ["async w1", "async w6"]
    for w, r in ((1, runs["async w1"]), (6, runs["async w6"])):
        assert r["repeats"] == 2 and len(r["runs"]) == 2 and r["windows_used"] == [w]
        lo, hi = r["samples_per_s_range"]
        assert lo <= r["samples_per_s"] <= hi
        assert r["sg_lag"]["targets"] == 2 * 2 * 40             # 2 repeats x 2 layers with an SG x 40 steps
    # a wider window lets layers run further ahead of their SG targets
    assert runs["async w6"]["sg_lag"]["mean"] > runs["async w1"]["sg_lag"]["mean"]
    assert runs["async w6"]["sg_lag"]["max"] >= 1
    assert "median of 2" in printed.out and "staleness" in printed.out


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_ctrl_c_mid_bench_leaves_nothing_behind(needs_lab, tmp_path, no_leftover_processes):
    """SIGINT to the bench's process group (a terminal's Ctrl-C) in the middle of a run:
    no namespace, veth, bridge, state file or process of the lab is left."""
    prefix, subnet = _bench_prefix_subnet("c", tmp_path, 203)
    p = subprocess.Popen([PY, "-m", "asyncdni.cli", "bench", "--lab", "--links", "unshaped:2", "--schedules",
                          "async,backprop", "--layers", "2", "--width", "16", "--steps", "200000",
                          "--lab-prefix", prefix, "--lab-subnet", subnet],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_repo(),
                         start_new_session=True)
    try:
        line = L._read_line(p.stdout, time.monotonic() + 60)
        assert line and "running async" in line, (line, p.poll())
        state = L.state_path(prefix)
        deadline = time.monotonic() + 30
        pids: set = set()
        while time.monotonic() < deadline:      # wait until the run's relays and workers are up
            st = json.loads(state.read_text()) if state.exists() else {"hosts": [], "procs": [], "relays": []}
            pids = {e["pid"] for e in st["procs"] + st["relays"]}
            for ns in [h["ns"] for h in st["hosts"]]:
                pids |= {int(x) for x in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                        text=True, timeout=10).stdout.split()}
            if st["relays"] and len(pids) >= 2 + 2 + 3:         # 2 agents, 2 relays, feeder + 2 layers
                break
            time.sleep(0.2)
        time.sleep(1.0)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 130, err
        assert err.strip().count("\n") == 0 and "interrupted" in err, err
        assert not pids_gone(sorted(pids), 10)
        assert _names(prefix) == {"links": [], "netns": []}
        assert not state.exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        L.down(prefix)


# ------------------------------------------------------------------ bench --lab: schedules, repeats, windows, plot
def _fake_run(sps, acc, ttt, stt, window=3, lags=None):
    return {"samples_per_s": sps, "train_time_s": 1.0, "test_metric": acc, "time_to_target_s": ttt,
            "steps_to_target": stt, "window": window, "window_auto": False, "target_accuracy": 0.9,
            "per_layer": [{"layer": 1, "bytes_sent": 10}], "relay": {"chunks": 0}, "sg_lag_counts": lags}


def _fake_result(repeats=3, windows=()):
    from asyncdni.bench import lab as LB
    links = []
    for rate, bits, delay in (("unshaped", None, 0.0), ("unshaped", None, 5.0), ("100mbit", 100e6, 0.0)):
        runs = {}
        for label, s, w, _ in LB.variants(["async", "backprop"], list(windows)):
            reps = [_fake_run(1000.0 * (k + 1), 0.9 + 0.01 * k, None if k == 0 else 2.0 * k, None if k == 0 else 100 * k,
                              lags=[5, 3, 2] + [0] * 14 if s == "async" else None) for k in range(repeats)]
            runs[label] = LB.aggregate(label, s, w, reps)
        links.append({"link": LB.link_label(None if rate == "unshaped" else rate, delay), "rate": rate,
                      "rate_bits": bits, "delay_ms": delay, "runs": runs})
    return {"layers": 2, "widths": [4, 3], "batch_size": 8, "steps": 10, "samples": 80, "feeder_host": "shared",
            "target_accuracy": 0.9, "repeats": repeats, "windows": list(windows), "max_inflight": "auto",
            "schedules": ["async", "backprop"], "skipped": {"inprocess": "one process, no network to cross"},
            "links": links, "wall_s": 1.0}


def test_lab_runs_every_schedule_of_the_table_and_says_why_not_inprocess():
    from asyncdni.bench import lab as LB
    from asyncdni import schedules as S
    assert set(LB.LAB_SCHEDULES) == set(S.TABLE) and len(LB.LAB_SCHEDULES) == len(S.TABLE)
    run, skipped = LB.parse_schedules(None)
    assert run == list(LB.LAB_SCHEDULES) and skipped == {}
    run, skipped = LB.parse_schedules("local, delayed_fixed,inprocess,local")
    assert run == ["local", "delayed_fixed"] and "no network" in skipped["inprocess"]
    raises_one_line(cli.C.ConfigError, LB.parse_schedules, "async,gpipe", match_all=("gpipe", "delayed_fixed"))
    raises_one_line(cli.C.ConfigError, LB.parse_schedules, "inprocess", match_all=("nothing",))
    assert LB.parse_windows("2, 4,8,16,4") == [2, 4, 8, 16] and LB.parse_windows(None) == []
    for bad in ("0", "two", "2,-1", ","):
        raises_one_line(cli.C.ConfigError, LB.parse_windows, bad, match_all=("--windows",))
    v = LB.variants(["async", "backprop", "delayed_fixed", "local"], [2, 8])
    assert v == [("async w2", "async", 2, None), ("async w8", "async", 8, None), ("backprop", "backprop", None, None),
                 ("delayed_fixed", "delayed_fixed", None, None), ("local w2", "local", 2, None),
                 ("local w8", "local", 8, None)]
    # codec settings: every variant once per setting, labelled by it
    wires = LB.parse_wires("fp32, int8,fp16/topk:0.1,INT8,aq:int8/int8")
    assert wires == [("fp32", "fp32"), ("int8:row", "int8:row"), ("fp16", "topk:0.1"), ("aq:int8:row", "int8:row")]
    v = LB.variants(["backprop"], [], wires)
    assert [x[0] for x in v] == ["backprop fp32", "backprop int8:row", "backprop fp16/topk:0.1",
                                 "backprop aq:int8:row/int8:row"]
    assert v[2][3] == ("fp16", "topk:0.1") and LB.parse_wires(None) == []
    for bad in ("int4", "fp32/", ",", "aq:int8", "int8/aq:int8"):
        raises_one_line(cli.C.ConfigError, LB.parse_wires, bad, match_all=("--wires",))


def test_repeats_give_medians_spread_and_never_counts_as_never():
    from asyncdni.bench import lab as LB
    reps = [_fake_run(300.0, 0.95, None, None), _fake_run(100.0, 0.93, 4.0, 400), _fake_run(200.0, 0.94, 3.0, 300)]
    a = LB.aggregate("async w4", "async", 4, reps)
    assert a["samples_per_s"] == 200.0 and a["samples_per_s_range"] == [100.0, 300.0]
    assert a["test_metric"] == 0.94 and a["test_metric_range"] == [0.93, 0.95]
    assert a["time_to_target_s"] == 4.0 and a["time_to_target_s_range"] == [3.0, 4.0]     # [3, 4, never]
    assert a["steps_to_target"] == 400 and a["reached_target"] == 2 and a["repeats"] == 3
    assert a["window_asked"] == 4 and len(a["runs"]) == 3
    two_never = [_fake_run(1.0, 0.5, None, None), _fake_run(1.0, 0.5, None, None), _fake_run(1.0, 0.5, 1.0, 9)]
    assert LB.aggregate("x", "async", None, two_never)["time_to_target_s"] is None
    even = LB.aggregate("x", "async", None, [_fake_run(1.0, 0.5, 2.0, 10), _fake_run(3.0, 0.5, 4.0, 30)])
    assert even["samples_per_s"] == 2.0 and even["time_to_target_s"] == 3.0


def test_sg_lag_summary_and_the_layer_counts_lags():
    from asyncdni.bench import lab as LB
    from asyncdni.numerics.layer import SG_LAG_BINS, LayerNode, LayerSpec
    s = LB.lag_summary([2, 6, 2] + [0] * (SG_LAG_BINS - 2))
    assert s["targets"] == 10 and s["median"] == 1 and s["p90"] == 2 and s["max"] == 2 and s["mean"] == 1.0
    assert s["share"][:3] == [0.2, 0.6, 0.2] and not s["max_is_open"]
    assert LB.lag_summary(None) is None and LB.lag_summary([0, 0]) is None
    import numpy as np
    spec = LayerSpec(index=0, n_layers=2, fan_in=3, fan_out=4, activation="relu", init="he", loss="softmax_ce",
                     task="classification", n_out=2, optimizer="sgd", lr=0.1, sg_model="linear", sg_hidden=0,
                     sg_lr=0.1, cond=False, microbatches=1, seed=0)
    node = LayerNode(spec)
    x, y = np.ones((2, 3), np.float32), np.zeros(2, np.int64)
    for t in range(4):                      # 4 forward steps, then the SG targets of steps 0 and 3
        node.forward(t, x, y)
    node.sg_update(0, np.ones((2, 4), np.float32))
    node.sg_update(3, np.ones((2, 4), np.float32))
    assert node.sg_lags[3] == 1 and node.sg_lags[0] == 1 and sum(node.sg_lags) == 2


def test_lab_report_table_csv_and_plot(tmp_path):
    from asyncdni.bench import lab as LB
    res = _fake_result(repeats=3, windows=(2, 4))
    text = LB.format_lab_bench(res)
    assert "3 repeats per cell" in text and "median of 3 [min-max]" in text and "2000 [1000-3000]" in text
    assert "inprocess: not run in the lab (one process, no network to cross)" in text
    assert "async w2" in text and "async w4" in text and "staleness" in text and "(2/3 reached)" in text
    stale = LB.format_staleness(res)
    assert stale.count("async w") == 6 and "0.70/0/2/2" in stale and "50 30 20" in stale     # mean/p50/p90/max
    rows = LB.csv_rows(res)
    top = [r for r in rows if r["layer"] == "" and r["schedule"] == "async w4"]
    assert len(top) == 3 and top[0]["samples_per_s"] == 2000 and top[0]["samples_per_s_min"] == 1000
    assert top[0]["sg_lag_mean"] == pytest.approx(0.7)
    by_rate, by_delay = LB._axes_groups(res)
    assert [r["link"] for r in by_rate] == ["100mbit/0ms", "unshaped/0ms"]
    assert [r["link"] for r in by_delay] == ["unshaped/0ms", "unshaped/5ms"]
    pytest.importorskip("matplotlib", reason="matplotlib (the 'plot' extra) is not installed; plot not drawn")
    path = LB.write_plot(str(tmp_path / "p"), res)
    assert path and Path(path).stat().st_size > 10_000


def test_bench_lab_cli_writes_json_csv_and_says_how_to_get_the_plot(monkeypatch, tmp_path, capsys):
    """Without matplotlib: one line saying how to install it; JSON and CSV are still written."""
    import builtins

    from asyncdni.bench import lab as LB
    seen = {}

    def fake_bench(cfg, schedules, links, **kw):
        seen.update(kw, schedules=schedules, links=links)
        return _fake_result(repeats=kw["repeats"], windows=kw["windows"])

    monkeypatch.setattr(L, "require_root", lambda: None)
    monkeypatch.setattr(LB, "lab_bench", fake_bench)
    real_import = builtins.__import__

    def no_mpl(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    j, c = tmp_path / "r.json", tmp_path / "r.csv"
    code = cli.main(["bench", "--lab", "--schedules", "async,inprocess,local", "--repeats", "3", "--windows", "2,4",
                     "--links", "unshaped:5", "--json", str(j), "--csv", str(c), "--plots", str(tmp_path / "p"),
                     "--run-dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert seen["schedules"] == ["async", "local"] and seen["skipped"] == {"inprocess": LB.NOT_IN_LAB["inprocess"]}
    assert seen["repeats"] == 3 and seen["windows"] == [2, 4] and seen["links"] == [(None, 5.0)]
    assert err.strip() == LB.PLOT_HINT and err.count("\n") == 1 and "pip install matplotlib" in err
    assert json.loads(j.read_text())["lab"]["repeats"] == 3 and c.read_text().count("\n") > 6
    assert not (tmp_path / "p" / "lab.png").exists()
    assert json.loads((tmp_path / "run" / "lab.json").read_text())["lab"]["repeats"] == 3
    for argv, word in ((["--repeats", "0"], "--repeats"), (["--repeats", "x"], "--repeats"),
                       (["--windows", "2,0"], "--windows"), (["--schedules", "nope"], "nope"),
                       (["--lab-burst", "12"], "--lab-burst"), (["--wires", "int4"], "--wires")):
        assert cli.main(["bench", "--lab", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and word in err, err
    monkeypatch.undo()
    assert cli.main(["bench", "--windows", "2"]) == 2          # --repeats goes with every bench; --windows not
    assert "--lab" in capsys.readouterr().err
    assert cli.main(["bench", "--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--repeats" in err, err


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_bench_lab_runs_torch_stages_one_host_each(needs_lab, tmp_path, no_leftover_processes, capsys):
    """--model over emulated links: the lab gets one namespace host per torch stage (three for
    a cnn-like split of the zoo mlp), and the stages train across them."""
    pytest.importorskip("torch")
    res, _ = _bench_lab(tmp_path, capsys, "t", 96, "--links", "unshaped:0", "--model", "mlp", "--split", "3",
                        "--steps", "30", "--schedules", "async")
    assert res["layers"] == 3
    run = res["links"][0]["runs"]["async"]
    assert run["samples_per_s"] > 0 and len(run["per_layer"]) == 3
    assert all(L_["bytes_sent"] > 0 for L_ in run["per_layer"])


def test_traffic_counts_bytes_per_step_each_way_and_link_use():
    from asyncdni import report
    layers = [{"kind_bytes": {"fwd": 4000, "eval": 99999}, "kind_msgs": {}, "bytes_sent": 103999, "dense_bytes": 16000,
               "coded_bytes": 4000},
              {"kind_bytes": {"fwd": 4000, "bwd": 1000}, "kind_msgs": {"bwd": 10}, "bytes_sent": 5000,
               "dense_bytes": 32000, "coded_bytes": 5000},
              {"kind_bytes": {"bwd": 1000, "done": 50, "eval_result": 9999}, "kind_msgs": {"bwd": 10}, "bytes_sent": 11049,
               "dense_bytes": 16000, "coded_bytes": 1000}]
    t = report.traffic({"per_layer": layers, "steps": 10, "train_time_s": 2.0}, rate_bits=100e3)
    assert t["fwd_bytes_per_step"] == 400 and t["bwd_bytes_per_step"] == 100 and t["bwd_msgs_per_step"] == 1
    assert t["compression"] == 64000 / 10000
    assert t["egress_mbit_s"] == pytest.approx(5000 * 8 / 2 / 1e6) and t["link_use"] == pytest.approx(0.2)
    assert report.traffic({"per_layer": layers, "steps": 10, "train_time_s": 2.0})["link_use"] is None


def test_wires_table_sets_each_codec_against_backprop_and_the_baseline():
    from asyncdni.bench import lab as LB
    wires = [("fp32", "fp32"), ("int8:row", "int8:row")]
    runs = {}
    for label, s, w, wire in LB.variants(["async", "backprop"], [], wires):
        coded = wire[0] != "fp32"
        ttt = {"async": 6.0, "backprop": 10.0}[s] / (2 if coded else 1)
        r = _fake_run(1000.0, 0.95 - (0.001 if coded else 0), ttt, 100)
        r["traffic"] = {"fwd_bytes_per_step": 16.6e3 if coded else 66e3, "bwd_bytes_per_step": 16.6e3 if coded else 65.6e3,
                        "compression": 3.9 if coded else 1.0, "link_use": 0.5}
        runs[label] = LB.aggregate(label, s, w, [r])
    res = {**_fake_result(repeats=1), "wires": [list(w) for w in wires], "schedules": ["async", "backprop"],
           "links": [{"link": "100mbit/0ms", "rate": "100mbit", "rate_bits": 100e6, "delay_ms": 0.0, "runs": runs}]}
    text = LB.format_lab_bench(res)
    line = next(x for x in text.splitlines() if x.strip().startswith("async int8:row") and "vs bp" in x)
    assert "vs bp fp32 0.30x" in line and "vs bp int8:row 0.60x" in line and "acc -0.10 pts" in line
    assert "up 0.25x bytes" in line
    assert "coded 3.90x smaller" in text and "16.2/16.2" in text


def test_burst_is_two_ms_of_the_rate_or_a_size():
    assert L.parse_burst("auto", "1gbit") == "250000" and L.parse_burst("auto", "100mbit") == "25000"
    assert L.parse_burst("auto", "10mbit") == str(4 << 10) and L.parse_burst("AUTO", None) == str(4 << 10)
    assert L.parse_burst("64kb", "10mbit") == str(64 << 10) and L.parse_burst("25000", None) == "25000"
    for bad in ("12", "lots", "-5kb", "100gb", "65mb"):
        with pytest.raises(L.LabError, match="burst"):
            L.parse_burst(bad, "10mbit")
