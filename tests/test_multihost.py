"""Multi-host runs on one machine: per-host agents (real `asyncdni agent` processes) and
CURVE. The agents here all live on loopback; tests/test_netns.py runs them in network
namespaces with their own addresses."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import zmq

from asyncdni import config
from asyncdni.engine import coordinator
from asyncdni.engine import reference
from asyncdni.wire import protocol as P
from asyncdni.engine.plan import load_datasets, make_plan
from asyncdni.launch.base import HostLost
from tests.conftest import env_with_repo, pids_gone

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftover_processes")]

SMALL = {"train.steps": 40, "model.width": 32, "data.train_size": 2048, "data.test_size": 256,
         "runtime.progress": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agents:
    """`asyncdni agent` processes for the duration of a with-block; always ended by pid."""

    def __init__(self, names, port, *, keys="", bind="127.0.0.1", wait=60, netns=None, persist=False):
        self.names, self.port, self.keys, self.bind, self.wait = names, port, keys, bind, wait
        self.netns = netns or {}
        self.persist = persist
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name, join_host="127.0.0.1", bind=None):
        argv = [sys.executable, "-m", "asyncdni.cli", "agent", "--join", f"tcp://{join_host}:{self.port}",
                "--name", name, "--bind", bind or self.bind, "--wait", str(self.wait)]
        if self.keys:
            argv += ["--keys", self.keys]
        if self.persist:
            argv += ["--persist"]
        if name in self.netns:
            argv = ["ip", "netns", "exec", self.netns[name], *argv]
        self.procs[name] = subprocess.Popen(argv, env=env_with_repo(), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return self.procs[name]

    def __enter__(self):
        for n in self.names:
            self.start(n)
        return self

    def pids(self) -> list[int]:
        """The agents and every worker they started."""
        out = []
        for p in self.procs.values():
            try:
                pp = psutil.Process(p.pid)
                out += [pp.pid] + [c.pid for c in pp.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return out

    def __exit__(self, *exc):
        for p in self.procs.values():
            try:
                for c in psutil.Process(p.pid).children(recursive=True):
                    c.kill()
            except psutil.NoSuchProcess:
                pass
            if p.poll() is None:
                p.kill()
            p.wait(10)
        return False


def cfg_of(port, hosts, **ov):
    return config.build(overrides={**SMALL, "runtime.launcher": "agents", "runtime.listen": f"127.0.0.1:{port}",
                                   "runtime.hosts": hosts, "runtime.start_timeout": 30.0, **ov})


# ---------------------------------------------------------------------------- equality
@pytest.mark.parametrize("schedule,ref_schedule", [("sequential", "dni"), ("backprop", "backprop")])
def test_agents_run_equals_in_process_reference(schedule, ref_schedule):
    port = free_port()
    cfg = cfg_of(port, "a,a,b,b,b", **{"train.schedule": schedule, "train.seed": 5})
    with Agents(["a", "b"], port) as ag:
        result = coordinator.run(cfg)
        # the run is over: every agent was released and exits by itself
        for p in ag.procs.values():
            assert p.wait(10) == 0
    train, _ = load_datasets(cfg)
    ref = reference.train_reference(make_plan(cfg, train), ref_schedule, train, cfg.train.seed)
    for i, node in enumerate(ref.nodes):
        for name, want in node.params().items():
            assert np.allclose(result.params[i][name], want, rtol=1e-5, atol=1e-6), (schedule, i, name)
    hosts = {L["host"] for L in result.layers}
    assert hosts == {"127.0.0.1"}                    # the agents' bind address


def test_k_host_names_put_the_feeder_with_layer_1():
    cfg = cfg_of(free_port(), "a,b,b,b")
    assert cfg.runtime.hosts == ("a", "a", "b", "b", "b")


def test_missing_agent_times_out_with_its_name(tmp_path):
    port = free_port()
    cfg = cfg_of(port, "a,ghost,a,a,a", **{"runtime.start_timeout": 2.0})
    with Agents(["a"], port):
        t0 = time.monotonic()
        with pytest.raises(Exception) as ei:
            coordinator.run(cfg)
        assert time.monotonic() - t0 < 15                 # the 2 s start-up timeout, plus a loaded machine
    msg = str(ei.value)
    assert "no agent named ghost joined" in msg and "asyncdni agent --join" in msg and "\n" not in msg


# ---------------------------------------------------------------------------- failures
def test_killed_remote_worker_is_detected_and_restarted(tmp_path):
    port = free_port()
    cfg = cfg_of(port, "a,a,b,b,b", **{"train.steps": 400, "train.schedule": "sequential",
                                       "runtime.checkpoint_every": 100, "runtime.checkpoint_dir": str(tmp_path / "ck"),
                                       "runtime.max_restarts": 1})
    box = {}

    def on_started(c):
        if box:
            return                                     # only in the first attempt

        def killer():
            while c.progress_done < 150:
                time.sleep(0.005)
            box["pid"] = c.workers[3].pid              # layer 3, on agent b
            box["t"] = time.monotonic()
            os.kill(box["pid"], signal.SIGKILL)
        box["started"] = True
        threading.Thread(target=killer, daemon=True).start()

    logs = []
    with Agents(["a", "b"], port):
        result = coordinator.run(cfg, on_started=on_started, log=logs.append)
    assert len(result.restarts) == 1
    r = result.restarts[0]
    assert "layer 3" in r["error"] and "killed by signal 9" in r["error"] and "on b (127.0.0.1)" in r["error"]
    # the newest checkpoint before the kill: 100, or 200 when a busy machine let the run pass
    # step 200 before the killer thread saw step 150
    assert r["resumed_from_step"] in (100, 200) and r["resumed_from_step"] <= r["failed_at_step"]
    assert all(L["updates"] + 0 >= 300 for L in result.layers)
    assert result.feeder["completed"] == 400


def test_detection_of_a_killed_remote_worker_is_under_3_s():
    port = free_port()
    cfg = cfg_of(port, "a,a,b,b,b", **{"train.steps": 100000})
    box = {}

    def on_started(c):
        def killer():
            while c.progress_done < 50:
                time.sleep(0.005)
            box["t"] = time.monotonic()
            os.kill(c.workers[2].pid, signal.SIGKILL)
        threading.Thread(target=killer, daemon=True).start()

    with Agents(["a", "b"], port):
        with pytest.raises(coordinator.WorkerFailed) as ei:
            coordinator.run(cfg, on_started=on_started)
        detected = time.monotonic() - box["t"]
    assert ei.value.name == "layer 2" and "killed by signal 9 while running" in str(ei.value)
    assert detected < 3.0, detected


def test_killed_agent_ends_the_run_with_one_line_naming_it(tmp_path):
    port = free_port()
    cfg = cfg_of(port, "a,a,b,b,b", **{"train.steps": 100000, "runtime.checkpoint_every": 1000,
                                       "runtime.checkpoint_dir": str(tmp_path), "runtime.max_restarts": 3})
    box = {}
    with Agents(["a", "b"], port) as ag:
        def on_started(c):
            def killer():
                while c.progress_done < 50:
                    time.sleep(0.005)
                box["t"] = time.monotonic()
                ag.procs["b"].kill()
            threading.Thread(target=killer, daemon=True).start()
        with pytest.raises(HostLost) as ei:
            coordinator.run(cfg, on_started=on_started)
        detected = time.monotonic() - box["t"]
        pids = ag.pids()
    msg = str(ei.value)
    assert "agent b (127.0.0.1) lost" in msg and "\n" not in msg
    assert detected < 3.0, detected
    assert pids_gone(pids) == []


def test_killed_coordinator_leaves_nothing_behind_on_any_host(tmp_path):
    port = free_port()
    with Agents(["a", "b"], port) as ag:
        cli = subprocess.Popen([sys.executable, "-m", "asyncdni.cli", "train", "--launcher", "agents",
                                "--listen", f"127.0.0.1:{port}", "--hosts", "a,b,b,b", "--steps", "100000",
                                "--no-progress"], cwd=tmp_path, env=env_with_repo(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 40
            while len(ag.pids()) < 2 + 5 and time.monotonic() < deadline:
                time.sleep(0.1)
            pids = ag.pids()
            assert len(pids) == 7, pids                  # 2 agents + feeder + 4 layers
            time.sleep(1.0)
            cli.kill()
            cli.wait(10)
            assert pids_gone(pids, timeout=15.0) == []
            assert all(p.poll() == 3 for p in ag.procs.values())   # "the coordinator is gone"
        finally:
            if cli.poll() is None:
                cli.kill()


def test_cli_agents_errors_are_one_line(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "asyncdni.cli", *args], cwd=tmp_path, env=env_with_repo(),
                              capture_output=True, text=True, timeout=60)
    for args, want in [
        (["train", "--launcher", "agents", "--hosts", "a,a,a,a"], "runtime.listen"),
        (["train", "--launcher", "agents", "--listen", "127.0.0.1:1"], "runtime.hosts"),
        (["train", "--launcher", "agents", "--listen", "nope", "--hosts", "a,a,a,a"], "not ADDR:PORT"),
        (["train", "--launcher", "teleport"], "runtime.launcher"),
        (["train", "--launcher", "agents", "--listen", "10.0.0.1:5555", "--hosts", "a,a,a,a", "--steps", "5"],
         "--keys DIR"),
        (["agent", "--join", "tcp://127.0.0.1:5", "--name", "a", "--bind", "192.0.2.1"], "not an address of this host"),
        (["agent", "--join", "127.0.0.1:5", "--name", "a"], "expected tcp://HOST:PORT"),
        (["agent", "--join", "tcp://127.0.0.1:5", "--name", "a/b"], "--name"),
        (["agent", "--join", "tcp://127.0.0.1:5", "--name", "a", "--keys", str(tmp_path / "none")], "not found"),
    ]:
        out = cli(*args)
        assert out.returncode in (1, 2), (args, out.stderr)
        err = out.stderr.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1 and want in err, (args, err)


def test_agent_without_a_coordinator_gives_up_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "asyncdni.cli", "agent", "--join", f"tcp://127.0.0.1:{free_port()}",
                          "--name", "a", "--wait", "1"], env=env_with_repo(), capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1
    assert "no answer from a coordinator" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------- persistent agents (issue 20)
def _workers_of(ag) -> list[int]:
    """The pids of the workers the agents run now (their children)."""
    agents = {p.pid for p in ag.procs.values()}
    return [pid for pid in ag.pids() if pid not in agents]


def _agent_tempdirs(ag) -> list[str]:
    import glob
    import tempfile
    return [d for p in ag.procs.values() for n in ag.procs
            for d in glob.glob(os.path.join(tempfile.gettempdir(), f"asyncdni-agent-{n}-{p.pid}-*"))]


def _wait_until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _terminate(ag) -> dict[str, str]:
    """SIGTERM every persistent agent: each exits 0, promptly, leaving no process and no temp dir.
    Returns what each said."""
    pids = ag.pids()
    dirs = _agent_tempdirs(ag)
    assert dirs                                        # each had its own, while it ran
    t0 = time.monotonic()
    for p in ag.procs.values():
        p.send_signal(signal.SIGTERM)
    said = {}
    for name, p in ag.procs.items():
        said[name], _ = p.communicate(timeout=10)
        assert p.returncode == 0, (name, said[name])
        assert "Traceback" not in said[name], said[name]
    assert time.monotonic() - t0 < 5.0
    assert pids_gone(pids, timeout=2.0) == []
    assert [d for d in dirs if os.path.exists(d)] == []
    return said


@pytest.mark.timeout(180)
def test_persistent_agents_serve_two_runs_in_a_row_then_exit_on_sigterm():
    """Two `asyncdni train`s in a row (each its own launcher, as from the command line) through
    the same two agents: both complete; between them the first run's workers and logs are gone
    and the agents stay up; SIGTERM then ends them with code 0 and nothing left behind."""
    port = free_port()
    with Agents(["a", "b"], port, persist=True) as ag:
        for _ in range(2):
            result = coordinator.run(cfg_of(port, "a,a,b,b,b"))
            assert result.feeder["completed"] == SMALL["train.steps"]
            assert _wait_until(lambda: not _workers_of(ag), 10), _workers_of(ag)
            # the run's log directory is removed; the agents' own directories are empty again
            assert _wait_until(lambda: all(not os.listdir(d) for d in _agent_tempdirs(ag)), 10)
            assert all(p.poll() is None for p in ag.procs.values())   # still up, for the next run
        said = _terminate(ag)
    for out in said.values():       # each run ended by the head's RELEASE, not by its silence
        assert out.count("released: run over") == 2 and "is gone" not in out, out
        assert "(run 2)" in out and out.strip().splitlines()[-1].endswith("stopped; workers ended"), out


@pytest.mark.timeout(180)
def test_persistent_agent_outlives_a_killed_coordinator_and_serves_the_next(tmp_path):
    port = free_port()
    with Agents(["a", "b"], port, persist=True) as ag:
        cli = subprocess.Popen([sys.executable, "-m", "asyncdni.cli", "train", "--launcher", "agents",
                                "--listen", f"127.0.0.1:{port}", "--hosts", "a,b,b,b", "--steps", "100000",
                                "--no-progress"], cwd=tmp_path, env=env_with_repo(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert _wait_until(lambda: len(_workers_of(ag)) == 5, 40), ag.pids()   # feeder + 4 layers
            workers = _workers_of(ag)
            time.sleep(1.0)
            cli.kill()
            cli.wait(10)
            t0 = time.monotonic()
            assert pids_gone(workers, timeout=10.0) == []
            assert time.monotonic() - t0 < 8.0         # the 2 s deadline, then SIGTERM (2 s grace)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait(10)
        assert all(p.poll() is None for p in ag.procs.values())       # the agents stay
        result = coordinator.run(cfg_of(port, "a,a,b,b,b"))
        assert result.feeder["completed"] == SMALL["train.steps"]
        said = _terminate(ag)
    assert all("is gone" in out and "(run 2)" in out for out in said.values()), said


@pytest.mark.timeout(180)
def test_a_sweep_runs_through_the_same_persistent_agents():
    port = free_port()
    with Agents(["a", "b"], port, persist=True) as ag:
        pids = []                                      # each run's workers
        for schedule, ref_schedule in [("sequential", "dni"), ("backprop", "backprop")]:
            cfg = cfg_of(port, "a,a,b,b,b", **{"train.schedule": schedule, "train.seed": 5})
            result = coordinator.run(cfg, on_started=lambda c: pids.append({w.pid for w in c.workers}))
            train, _ = load_datasets(cfg)
            ref = reference.train_reference(make_plan(cfg, train), ref_schedule, train, cfg.train.seed)
            for i, node in enumerate(ref.nodes):
                for name, want in node.params().items():
                    assert np.allclose(result.params[i][name], want, rtol=1e-5, atol=1e-6), (schedule, i, name)
        assert len(pids) == 2 and not pids[0] & pids[1] and None not in pids[0]   # fresh workers per run
        _terminate(ag)


@pytest.mark.timeout(120)
def test_sigterm_mid_run_ends_a_persistent_agent_and_its_workers():
    port = free_port()
    cfg = cfg_of(port, "a,a,b,b,b", **{"train.steps": 100000})
    box = {}
    with Agents(["a", "b"], port, persist=True) as ag:
        def on_started(c):
            def stopper():
                while c.progress_done < 50:
                    time.sleep(0.005)
                b = ag.procs["b"]
                box["pids"] = [b.pid] + [w.pid for w in psutil.Process(b.pid).children(recursive=True)]
                box["dirs"] = [d for d in _agent_tempdirs(ag) if f"-b-{b.pid}-" in d]
                box["t"] = time.monotonic()
                b.send_signal(signal.SIGTERM)
            threading.Thread(target=stopper, daemon=True).start()
        with pytest.raises((HostLost, coordinator.WorkerFailed)):   # no run goes on without host b
            coordinator.run(cfg, on_started=on_started)
        b = ag.procs["b"]
        assert b.wait(10) == 0 and time.monotonic() - box["t"] < 5.0
        assert len(box["pids"]) == 4 and pids_gone(box["pids"], timeout=2.0) == []   # b and its 3 layers
        assert box["dirs"] and not any(os.path.exists(d) for d in box["dirs"])
        assert ag.procs["a"].poll() is None             # a waits for the next coordinator
        del ag.procs["b"]
        _terminate(ag)


def test_persist_agent_without_a_coordinator_keeps_waiting_and_says_so_once():
    """Under --persist, --wait bounds nothing: after it, one line says nobody answers, and the
    agent goes on waiting; SIGINT ends it with code 0."""
    agent = subprocess.Popen([sys.executable, "-m", "asyncdni.cli", "agent", "--join",
                              f"tcp://127.0.0.1:{free_port()}", "--name", "a", "--wait", "1", "--persist"],
                             env=env_with_repo(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.5)
        assert agent.poll() is None                     # still waiting, past --wait
        agent.send_signal(signal.SIGINT)
        _, err = agent.communicate(timeout=10)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0 and "Traceback" not in err, err
    assert err.count("no answer from a coordinator") == 1 and "still waiting" in err, err


# ---------------------------------------------------------------------------- CURVE
def make_keys(tmp_path, *names):
    out = subprocess.run([sys.executable, "-m", "asyncdni.cli", "keys", str(tmp_path / "keys"), *names],
                         env=env_with_repo(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return str(tmp_path / "keys")


def test_curve_run_refuses_unknown_keys_and_plain_strangers(tmp_path):
    """CURVE on (forced on loopback): the run equals an unencrypted one; a client with a key
    not in the allowlist is refused and counted on the agent port, the control port and a
    layer's inbox; a plain-TCP stranger sending well-formed frames reaches nothing."""
    keys = make_keys(tmp_path, "a", "b")
    port = free_port()
    ov = {"train.schedule": "sequential", "train.steps": 300, "runtime.keys": keys}
    plain = coordinator.run(config.build(overrides={**SMALL, **{k: v for k, v in ov.items() if k != "runtime.keys"}}))
    cfg = cfg_of(port, "a,a,b,b,b", **ov, **{"runtime.security": "curve"})
    attacks = {}

    def on_started(c):
        def attack():
            ctx = zmq.Context()
            socks = []
            try:
                stranger = zmq.curve_keypair()
                targets = {"agent": f"tcp://127.0.0.1:{port}",
                           "control": c.ctrl.getsockopt_string(zmq.LAST_ENDPOINT),
                           "inbox": c.workers[2].endpoints["fwd"]}
                server_keys = {"agent": _coordinator_public(keys), "control": c.server.public,
                               "inbox": c.workers[2].endpoints["key"].encode()}
                for what, ep in targets.items():
                    # 1. a CURVE client with a key the run does not know
                    s = ctx.socket(zmq.DEALER if what != "inbox" else zmq.PUSH)
                    s.linger = 0
                    s.curve_publickey, s.curve_secretkey = stranger
                    s.curve_serverkey = server_keys[what]
                    s.connect(ep)
                    socks.append(s)
                    # 2. a plain TCP stranger sending a well-formed message
                    t = ctx.socket(zmq.PUSH if what == "inbox" else zmq.DEALER)
                    t.linger = 0
                    t.connect(ep)
                    socks.append(t)
                    frames = P.encode(P.FWD, 10**6, (np.zeros((64, 32), np.float32), np.zeros(64, np.int64)))
                    for sock in (s, t):
                        try:
                            sock.send_multipart(frames, flags=zmq.NOBLOCK)
                        except zmq.Again:
                            pass
                time.sleep(1.0)
                attacks["sent"] = True
            finally:
                for s in socks:
                    s.close(0)
                ctx.term()
        threading.Thread(target=attack, daemon=True).start()

    with Agents(["a", "b"], port, keys=keys):
        result = coordinator.run(cfg, on_started=on_started)
    assert attacks.get("sent")
    assert all(L["curve"] for L in result.layers)
    for a, b in zip(plain.params, result.params):      # training untouched by the strangers
        for k in a:
            assert np.array_equal(a[k], b[k]), k
    assert all(not L["rejected"] for L in result.layers)   # nothing reached a layer's decoder
    assert result.refused >= 1                              # the control port refused the stranger's key
    assert result.layers[1]["curve_refused"] >= 1           # so did layer 2's inbox


def _coordinator_public(keys):
    from asyncdni.wire import security
    return security.load_public(keys, "coordinator")


def test_keys_command_refuses_to_overwrite(tmp_path):
    make_keys(tmp_path, "a")
    out = subprocess.run([sys.executable, "-m", "asyncdni.cli", "keys", str(tmp_path / "keys"), "a"],
                         env=env_with_repo(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "already exists" in out.stderr and "Traceback" not in out.stderr
    assert oct(os.stat(tmp_path / "keys" / "a.key_secret").st_mode & 0o777) == "0o600"


def test_agent_with_unknown_key_is_refused_and_counted(tmp_path):
    keys = make_keys(tmp_path, "a")
    other = make_keys(tmp_path / "other", "a")            # a key pair the coordinator never saw
    import shutil
    shutil.copy(os.path.join(keys, "coordinator.key"), os.path.join(other, "coordinator.key"))
    port = free_port()
    cfg = cfg_of(port, "a,a,a,a,a", **{"runtime.keys": keys, "runtime.security": "curve",
                                       "runtime.start_timeout": 3.0})
    from asyncdni.launch.agents import AgentsLauncher
    launcher = AgentsLauncher.from_config(cfg)
    with Agents(["a"], port, keys=other):
        try:
            with pytest.raises(Exception, match="no agent named a joined"):
                coordinator.run(cfg, launcher=launcher)
        finally:
            launcher.close()
    assert launcher.refused >= 1


@pytest.mark.parametrize("role,index", [("layer", 2), ("feeder", 0)])
def test_a_server_key_that_starts_with_a_dash_reaches_the_worker(role, index):
    """Issue 18.6: about 1 in 80 fresh z85 public keys begins with '-'; on argv as
    '--server-key -...' argparse read it as an option and the CURVE start failed. Every value
    now travels as --flag=VALUE."""
    from asyncdni.launch.base import WorkerLaunch
    from asyncdni.workers._entry import parse
    key = b"-" + b"x" * 39
    w = WorkerLaunch(f"{role}{index}", role, index, "tcp://127.0.0.1:5555", 1, 60.0,
                     server_key=key, secret_key=b"s" * 40)
    args = parse(role, w.args())
    assert args.server_key == key.decode() and args.key_stdin and args.control == "tcp://127.0.0.1:5555"
    assert all(not a.startswith("--server-key") or "=" in a for a in w.args())
    assert key.decode() not in " ".join(a for a in w.args() if not a.startswith("--server-key="))


# ------------------------------------------------------- a head that lies (issue 18.3)
class FakeHead:
    """A ROUTER on loopback that speaks the agent protocol by hand."""

    def __init__(self):
        import zmq
        from asyncdni.wire import protocol as P
        from asyncdni.wire import transport
        self.P, self.transport, self.zmq = P, transport, zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")

    def recv(self, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                ident, *frames = self.sock.recv_multipart()
                return ident, self.P.decode(frames)
        raise AssertionError("the agent sent nothing")

    def send(self, ident, kind, **fields):
        self.transport.send(self.sock, kind, -1, (), fields, prefix=(ident,))

    def close(self):
        self.sock.close(0)
        self.ctx.term()


def _agent(port, *extra):
    return subprocess.Popen([sys.executable, "-m", "asyncdni.cli", "agent", "--join", f"tcp://127.0.0.1:{port}",
                             "--name", "h1", "--wait", "20", *extra], env=env_with_repo(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.parametrize("deadline", [float("nan"), float("inf"), 1e308, -1.0])
def test_an_agent_refuses_an_impossible_deadline(deadline):
    head = FakeHead()
    agent = _agent(head.port)
    try:
        ident, msg = head.recv()
        assert msg.kind == head.P.AGENT_HELLO
        head.send(ident, head.P.AGENT_WELCOME, heartbeat_interval=0.5, deadline=deadline)
        _, err = agent.communicate(timeout=30)
        assert agent.returncode == 1
        lines = err.strip().splitlines()
        assert "Traceback" not in err and "impossible deadline" in lines[-1], err
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        head.close()


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_leftover_processes")
def test_an_agent_refuses_a_launch_that_would_outlive_the_head():
    head = FakeHead()
    agent = _agent(head.port)
    try:
        ident, msg = head.recv()
        head.send(ident, head.P.AGENT_WELCOME, heartbeat_interval=0.5, deadline=5.0)
        head.send(ident, head.P.LAUNCH, name="layer0", role="layer", index=0, control="tcp://127.0.0.1:1",
                  blas_threads=1, start_timeout=1e308, server_key="", secret_key="")
        while True:
            ident, msg = head.recv()
            if msg.kind != head.P.HEARTBEAT:
                break
        assert msg.kind == head.P.LAUNCH_FAILED and msg.fields["name"] == "layer0"
        assert psutil.Process(agent.pid).children() == []          # no worker was started
    finally:
        agent.kill()
        agent.wait()
        head.close()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_an_agent_key_speaks_only_for_its_own_name(tmp_path):
    """Issue 18.1: a client holding only agent a's key pair connected with routing identity b
    and AGENT_HELLO name=b was welcomed as b (and would have been sent b's LAUNCH messages
    with their CURVE secret keys). ZAP's User-Id (the sender's public key) must be b's key."""
    import zmq

    from asyncdni.launch.agents import AgentsLauncher
    from asyncdni.wire import protocol as P
    from asyncdni.wire import security, transport
    keys = make_keys(tmp_path, "a", "b")
    port = free_port()
    launcher = AgentsLauncher.from_config(cfg_of(port, "a,a,b,b,b", **{"runtime.keys": keys,
                                                                        "runtime.security": "curve"}))
    launcher._bind()
    ctx = zmq.Context()
    server = security.load_public(keys, security.COORDINATOR)
    a_keys = security.load_secret(keys, "a")
    socks = []
    try:
        for ident in ("b", "a"):                  # the impostor first, then a's rightful claim
            s = transport.connect(ctx, zmq.DEALER, f"tcp://127.0.0.1:{port}", identity=ident.encode(),
                                  curve=(a_keys, server))
            socks.append(s)
            transport.send(s, P.AGENT_HELLO, -1, (), {"name": ident, "bind": "127.0.0.1", "host": "x", "pid": 1})
        deadline = time.monotonic() + 10
        while "a" not in launcher.agents and time.monotonic() < deadline:
            launcher._pump(100)
        assert "a" in launcher.agents                           # its own name: welcomed
        assert "b" not in launcher.agents and launcher.impostors >= 1
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        launcher.close()


def test_an_agent_is_judged_on_the_configured_heartbeat_deadline():
    """Issue 18.7: the head declared an agent lost after a fixed 1.5 s of silence while telling
    the agent to wait runtime.heartbeat_interval x heartbeat_misses (8 s with an interval of 2);
    a 1.8 s SIGSTOP of one agent ended a run whose workers were still training."""
    from types import SimpleNamespace

    from asyncdni.launch.agents import AgentInfo, AgentsLauncher
    from asyncdni.launch.base import HostLost
    cfg = cfg_of(free_port(), "a,a,a,a,a", **{"runtime.heartbeat_interval": 2.0, "runtime.security": "insecure"})
    launcher = AgentsLauncher.from_config(cfg)
    assert launcher.heartbeat_deadline == 8.0
    launcher.workers = {"layer0": SimpleNamespace(agent="a")}
    launcher.agents = {"a": AgentInfo("a", "127.0.0.1", "h", 1, time.monotonic() - 1.8)}
    launcher._check_agents()                                  # 1.8 s of silence: still there
    launcher.agents["a"].last_seen = time.monotonic() - 8.5
    with pytest.raises(HostLost, match="agent a .* lost: no heartbeat for 8.5 s"):
        launcher._check_agents()


def test_an_agent_without_keys_says_so_and_stays_on_loopback(tmp_path):
    """Issue 18.2: without --keys an agent trusts whatever answers at --join. It says so in one
    line at start, and refuses to bind its workers off loopback unless --insecure is given."""
    out = subprocess.run([sys.executable, "-m", "asyncdni.cli", "agent", "--join", f"tcp://127.0.0.1:{free_port()}",
                          "--name", "a", "--wait", "1"], env=env_with_repo(), capture_output=True, text=True, timeout=30)
    assert "does not authenticate the coordinator" in out.stderr.splitlines()[0]
    addrs = [a.address for nic in psutil.net_if_addrs().values() for a in nic
             if a.family == socket.AF_INET and not a.address.startswith("127.")]
    if not addrs:
        pytest.skip("this host has no address off loopback to try")
    addr = addrs[0]
    out = subprocess.run([sys.executable, "-m", "asyncdni.cli", "agent", "--join", "tcp://127.0.0.1:5", "--name", "a",
                          "--bind", addr, "--wait", "1"], env=env_with_repo(), capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "--insecure" in out.stderr, out.stderr


@pytest.mark.integration
@pytest.mark.timeout(90)
@pytest.mark.usefixtures("no_leftover_processes")
def test_an_agent_caps_the_workers_it_runs():
    """Issue 18.2: a fake head sent 100 LAUNCH messages and got 100 workers. --max-workers caps
    them; the launch past the cap is refused with a reason."""
    head = FakeHead()
    agent = _agent(head.port, "--max-workers", "2")
    try:
        ident, _ = head.recv()
        head.send(ident, head.P.AGENT_WELCOME, heartbeat_interval=0.5, deadline=5.0)
        for i in range(3):
            head.send(ident, head.P.LAUNCH, name=f"layer{i}", role="layer", index=i,
                      control=f"tcp://127.0.0.1:{free_port()}", blas_threads=1, start_timeout=30.0,
                      server_key="", secret_key="")
        answers = {}
        while len(answers) < 3:
            _, msg = head.recv()
            if msg.kind in (head.P.STARTED, head.P.LAUNCH_FAILED):
                answers[msg.fields["name"]] = msg
        assert [answers[f"layer{i}"].kind for i in range(3)] == [head.P.STARTED, head.P.STARTED,
                                                                   head.P.LAUNCH_FAILED]
        assert "--max-workers 2" in answers["layer2"].fields["error"]
    finally:
        agent.kill()
        agent.wait()
        head.close()


@pytest.mark.parametrize("args, want", [
    (["agent", "--join", "tcp://:", "--name", "a"], "expected tcp://HOST:PORT"),
    (["agent", "--join", "tcp://127.0.0.1:abc", "--name", "a"], "expected tcp://HOST:PORT"),
    (["agent", "--join", "tcp://127.0.0.1 :5555", "--name", "a"], "no spaces"),
    (["agent", "--join", "tcp://127.0.0.1:5", "--name", "n" * 300], "1 to 64 letters"),
    (["keys", "KEYDIR", "x" * 300], "1 to 64 letters"),
    (["keys", "KEYDIR", "coordinator"], "the coordinator's own"),
    (["keys", "KEYDIR", "a", "a"], "given twice"),
    (["train", "--launcher", "agents", "--listen", "127.0.0.1:5", "--hosts", "a,b/../x,a,a,a"], "runtime.hosts[1]"),
    # it timed out with no hint: workers are told the --listen address to connect back to
    (["train", "--launcher", "agents", "--listen", "0.0.0.0:5", "--hosts", "a,a,a,a,a"], "every address"),
    # it waited the whole --wait, then suggested CURVE
    (["agent", "--join", "tcp://no-such-host.invalid:5555", "--name", "a"], "cannot resolve"),
])
def test_bad_agent_and_key_input_is_one_line_and_writes_nothing(tmp_path, args, want):
    """Issue 18.9: these gave tracebacks or wrote keys (a second 'a', or a 'coordinator' agent
    that would hold the coordinator's secret key)."""
    args = [str(tmp_path / "keys") if a == "KEYDIR" else a for a in args]
    out = subprocess.run([sys.executable, "-m", "asyncdni.cli", *args], env=env_with_repo(), capture_output=True,
                         text=True, timeout=30, cwd=tmp_path)
    err = out.stderr.strip()
    assert out.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1 and want in err, err
    assert not (tmp_path / "keys").exists()


def test_agent_log_dir_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    out = subprocess.run([sys.executable, "-m", "asyncdni.cli", "agent", "--join", "tcp://127.0.0.1:5", "--name", "a",
                          "--log-dir", str(f)], env=env_with_repo(), capture_output=True, text=True, timeout=30)
    err = out.stderr.strip()
    assert out.returncode == 2 and "Traceback" not in err and "--log-dir" in err.splitlines()[-1], err


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_leftover_processes")
def test_an_agent_with_keys_against_a_plain_head_honours_wait(tmp_path):
    """Issue 18.5: the CURVE handshake fails, libzmq drops the connection, and the agent's
    blocking HELLO never returned: still running at 40 s with --wait 5. Now it gives up at
    --wait, in one line that names the likely cause."""
    keys = make_keys(tmp_path, "h1")
    head = FakeHead()                                     # plain TCP: no CURVE
    t0 = time.monotonic()
    agent = _agent(head.port, "--keys", keys, "--wait", "2")
    try:
        _, err = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        head.close()
    assert agent.returncode == 1 and time.monotonic() - t0 < 15
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "within 2 s" in last and "key mismatch" in last, err
