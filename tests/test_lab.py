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
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from asyncdni import cli, lab as L
from asyncdni.relay import parse_hostport
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
    p = lab.run_in(host, [PY, "-m", "asyncdni.netprobe", kind, "--bind", f"{lab.addresses[host]}:0",
                          "--count", str(count)], stdout=subprocess.PIPE, env=env_with_repo())
    line = L._read_line(p.stdout, time.monotonic() + 20)
    assert line, f"probe {kind} did not start in host {host}"
    return p, json.loads(line)["listen"]


def _client(lab: L.Lab, host: int, args: list[str], timeout: float = 40) -> dict:
    p = lab.run_in(host, [PY, "-m", "asyncdni.netprobe", *args], stdout=subprocess.PIPE,
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
    argv = [PY, "-m", "asyncdni.relay", "--listen", "127.0.0.1:0", "--target", target,
            "--delay-ms", str(delay_ms), "--stats", str(stats), "--parent-pid", str(os.getpid())]
    if local:
        argv += ["--local", local]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env_with_repo())
    line = L._read_line(p.stdout, time.monotonic() + 20)
    p.stdout.close()
    return p, json.loads(line)["listen"]


def _probe(kind: str, *args, **kw):
    return subprocess.Popen([PY, "-m", "asyncdni.netprobe", kind, *args], env=env_with_repo(), **kw)


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
        out = subprocess.run([PY, "-m", "asyncdni.netprobe", "ping", "--to", rl, "--count", "20"],
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
    r = subprocess.run([PY, "-m", "asyncdni.relay", "--listen", "nowhere", "--target", "127.0.0.1:1",
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
        out = subprocess.run([PY, "-m", "asyncdni.netprobe", "ping", "--to", listen, "--count", "5"],
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
                assert "tbf" in out and "rate 100Mbit" in out and "burst 256Kb" in out, out
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
from asyncdni.lab import Lab
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


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_bench_lab_runs_every_schedule_over_the_links(needs_lab, tmp_path, no_leftover_processes, capsys):
    prefix = f"b{os.getpid() % 10000:04d}-"
    subnet = None
    for k in range(250):
        cand = f"10.78.{(os.getpid() + 97 + k) % 250}.0/24"
        try:
            L.Lab(hosts=2, prefix=prefix, subnet=cand, state_dir=tmp_path).check()
        except L.LabError:
            continue
        subnet = cand
        break
    assert subnet
    out = tmp_path / "lab.json"
    try:
        code = cli.main(["bench", "--lab", "--links", "100mbit:3", "--schedules", "async,backprop",
                         "--layers", "2", "--width", "16", "--steps", "30", "--lab-prefix", prefix,
                         "--lab-subnet", subnet, "--json", str(out), "--csv", str(tmp_path / "lab.csv")])
        printed = capsys.readouterr()
        assert code == 0, printed.err
    finally:
        L.down(prefix)
    assert _names(prefix) == {"links": [], "netns": []}
    res = json.loads(out.read_text())["lab"]
    assert [row["link"] for row in res["links"]] == ["100mbit/3ms"]
    for row in res["links"]:
        assert set(row["runs"]) == {"async", "backprop"}
        for r in row["runs"].values():
            assert r["samples_per_s"] > 0 and len(r["per_layer"]) == 2
            assert all(L_["bytes_sent"] > 0 for L_ in r["per_layer"])
    for r in res["links"][0]["runs"].values():                      # 3 ms: relays, measured
        assert r["relay"]["chunks"] > 0 and abs(r["relay"]["on_time_ms"]["median"] - 3) < 1.5, r["relay"]
    assert "100mbit/3ms" in printed.out and "relay added" in printed.out
    assert (tmp_path / "lab.csv").read_text().count("\n") > 4
