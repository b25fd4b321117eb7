"""The Ray launcher against a real local Ray cluster (ray.cluster_utils.Cluster), not a mock.

One cluster of three nodes serves the whole module. Each node has its own loopback
address (127.0.0.2, .3, .4), so "one worker per node" and ``--hosts`` placement are
visible in the addresses the workers bind, and all traffic stays on loopback. Ray's own
processes (GCS, raylets, agents, idle pool workers) belong to the fixture, which shuts
the cluster down at the end and checks that nothing of it is left.
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from asyncdni import config
from asyncdni.engine import coordinator
from asyncdni.launch.base import LaunchError, WorkerLaunch
from tests.conftest import env_with_repo, pids_gone

try:
    import ray
    from ray.cluster_utils import Cluster
except ImportError:             # the engine runs without Ray; these tests need it
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed: pip install '.[ray]' to test the Ray launcher")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

NODES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
BASE = {"model.width": 32, "model.layers": 2, "data.train_size": 1024, "data.test_size": 128,
        "runtime.progress": False, "runtime.start_timeout": 90.0}


def _children():
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _cmd(p) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


@pytest.fixture(scope="module")
def cluster():
    before = {p.pid for p in _children()}
    t = time.monotonic()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": NODES[0],
                                                      "include_dashboard": False})
    try:
        for ip in NODES[1:]:
            c.add_node(num_cpus=1, node_ip_address=ip)
        c.wait_for_nodes()
        c.startup_s = time.monotonic() - t
        print(f"\nray cluster of {len(NODES)} nodes up in {c.startup_s:.1f} s", file=sys.stderr)
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
    left = [p for p in _children() if p.pid not in {*before} and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    deadline = time.monotonic() + 10
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in left:
        p.kill()
    assert not left, f"the Ray cluster left processes behind: {[(p.pid, _cmd(p)[:80]) for p in left]}"


@pytest.fixture
def no_leftover_workers(cluster):
    """No process a test started is left, except Ray's idle pool workers (the cluster's own)."""
    before = {p.pid for p in _children()}
    yield
    deadline = time.monotonic() + 10
    while True:
        left = [p for p in _children() if p.pid not in before and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE and not _cmd(p).startswith("ray::IDLE")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"processes left behind: {[(p.pid, _cmd(p)[:80]) for p in left]}"
    assert not ray.is_initialized(), "the launcher left its Ray connection open"


def cfg_of(cluster=None, **ov):
    extra = {"runtime.launcher": "ray", "runtime.ray_address": cluster.address} if cluster is not None else {}
    return config.build(overrides={**BASE, **extra, **ov})


def _binds(box):
    def started(c):
        box.setdefault("binds", [w.bind for w in c.workers])
        box.setdefault("hosts", [w.host for w in c.workers])
        box.setdefault("pids", [w.pid for w in c.workers])
        box.setdefault("strategy", c.launcher.strategy)
        box.setdefault("control", c.launcher.control_host(""))
    return started


# ---------------------------------------------------------------------------------- tests
@needs_ray
@pytest.mark.usefixtures("no_leftover_workers")
def test_ray_sequential_matches_the_local_launcher(cluster):
    """Same seed, same schedule: the Ray launcher's run ends with the local launcher's weights;
    the three workers sit one per node (STRICT_SPREAD) and bind their node's address."""
    ov = {"train.schedule": "sequential", "train.steps": 60, "train.seed": 7}
    local = coordinator.run(cfg_of(**ov))
    box = {}
    t = time.monotonic()
    far = coordinator.run(cfg_of(cluster, **ov), on_started=_binds(box))
    print(f"ray run: {time.monotonic() - t:.1f} s", file=sys.stderr)
    assert box["strategy"] == f"STRICT_SPREAD over {len(NODES)} nodes"
    assert sorted(box["binds"]) == sorted(NODES) and box["hosts"] == box["binds"]
    assert box["control"] == NODES[0]                         # the driver's node
    assert len(set(box["pids"])) == 3 and os.getpid() not in box["pids"]
    for i, (a, b) in enumerate(zip(local.params, far.params)):
        assert a.keys() == b.keys() and a
        for name in a:
            assert np.allclose(a[name], b[name], rtol=1e-6, atol=1e-7), (i, name)
    assert np.allclose(local.series["loss"], far.series["loss"], rtol=1e-6)
    assert all(L["updates"] == 60 for L in far.layers)
    assert pids_gone(box["pids"], timeout=5.0) == []


@needs_ray
@pytest.mark.usefixtures("no_leftover_workers")
def test_ray_hosts_pin_workers_and_curve_on_demand(cluster):
    """--hosts names node addresses (here 2 names for 2 layers: the feeder shares layer 1's);
    with --curve the secret keys reach the actors through their run call and the run works."""
    box = {}
    hosts = (NODES[2], NODES[1])
    res = coordinator.run(cfg_of(cluster, **{"train.steps": 40, "runtime.hosts": hosts, "runtime.security": "curve"}),
                          on_started=_binds(box))
    assert box["strategy"] == "--hosts (node affinity)"
    assert box["binds"] == [NODES[2], NODES[2], NODES[1]]
    assert all(L["updates"] == 40 for L in res.layers)
    assert all(L["curve"] for L in res.layers)


@needs_ray
@pytest.mark.usefixtures("no_leftover_workers")
def test_ray_actor_blas_is_pinned_and_an_orphan_worker_exits(cluster):
    """Straight through the launcher: the actor's BLAS runs 1 thread (threadpoolctl inside the
    actor) and a worker whose coordinator never answers ends by itself with a log tail."""
    from asyncdni.launch.ray import RayLauncher
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))               # a port nobody listens on
    port = dead.getsockname()[1]
    dead.close()
    lau = RayLauncher(cluster.address, blas_threads=1)
    try:
        lau.prepare({"layer0": NODES[1]}, 60)
        lau.start(WorkerLaunch("layer0", "layer", 0, f"tcp://127.0.0.1:{port}", 1, start_timeout=1.0))
        assert lau.state("layer0") == "running" and lau.host("layer0") == NODES[1]
        assert lau.wait(60), "the orphan worker did not end by itself"
        assert lau.exited() == ["layer0"] and lau.exit_code("layer0") == 3
        assert "coordinator" in lau.log_tail("layer0")
        a = lau.actors["layer0"]
        where = ray.get(a.handle.where.remote(), timeout=30)
        assert all(v == "1" for v in where["env"].values()) and where["ip"] == NODES[1]
        blas = ray.get(a.handle.blas_threads.remote(), timeout=60)
        assert blas and all(n == 1 for _, n in blas), blas
        pid = lau.pid("layer0")
        assert pid == where["pid"]
    finally:
        lau.close()
    assert lau.state("layer0") == "after" and pids_gone([pid], timeout=5.0) == []


@needs_ray
@pytest.mark.usefixtures("no_leftover_workers")
def test_ray_sigkilled_actor_is_named_within_3s_and_the_run_restarts(cluster, tmp_path):
    steps = 400
    cfg = cfg_of(cluster, **{"train.steps": steps, "model.width": 64, "runtime.checkpoint_every": 50,
                             "runtime.checkpoint_dir": str(tmp_path), "runtime.max_restarts": 1})
    box = {"logs": []}

    def killer(c):
        while c.progress_done < 120:
            time.sleep(0.005)
        box["pid"], box["host"] = c.workers[2].pid, c.workers[2].host
        box["t"] = time.monotonic()
        os.kill(box["pid"], signal.SIGKILL)

    def started(c):
        if "thread" not in box:                 # only the first attempt is sabotaged
            box["thread"] = threading.Thread(target=killer, args=(c,), daemon=True)
            box["thread"].start()

    def log(line):
        box["logs"].append((time.monotonic(), line))

    res = coordinator.run(cfg, on_started=started, log=log)
    assert len(res.restarts) == 1
    err = res.restarts[0]["error"]
    assert err.startswith(f"layer 2 (pid {box['pid']} on {box['host']}): its Ray actor process died"), err
    assert "while running" in err and box["host"] in NODES
    detected = next(t for t, line in box["logs"] if line.startswith("restart 1/1")) - box["t"]
    print(f"ray actor death detected in {detected:.2f} s", file=sys.stderr)
    assert detected < 3.0
    assert res.restarts[0]["resumed_from_step"] >= 100
    assert all(L["updates"] == steps for L in res.layers)
    assert res.checkpoints[-1] == steps


@needs_ray
def test_ray_user_mistakes_are_one_line(cluster):
    from tests.conftest import raises_one_line
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    raises_one_line(LaunchError, coordinator.run, cfg_of(**{"runtime.launcher": "ray",
                                                            "runtime.ray_address": f"127.0.0.1:{port}"}),
                    match_all=(f"no Ray cluster answers at 127.0.0.1:{port}",))
    assert not ray.is_initialized()
    raises_one_line(LaunchError, coordinator.run, cfg_of(cluster, **{"runtime.hosts": ("127.0.0.9", NODES[1]),
                                                                     "runtime.start_timeout": 2.0}),
                    match_all=("--hosts: no live Ray node has address 127.0.0.9 after 2 s", NODES[0]))
    assert not ray.is_initialized()


def test_ray_launcher_without_ray_is_one_line(tmp_path):
    """Ray hidden from the interpreter: the CLI says how to install it, in one line."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "from asyncdni.cli import main\n"
            "sys.exit(main(['train', '--launcher', 'ray', '--steps', '5', '--no-progress']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env_with_repo(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode in (1, 2), proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("asyncdni: error: ") and "\n" not in err, err
    assert err.endswith("the Ray launcher needs Ray: pip install 'asyncdni[ray]'"), err


# ------------------------------------------------------ Ray nodes on namespace hosts (root)
NS = "adr-"                      # this file's namespaces, veths and bridge: adr-br, adr-hN, adr-vN/adr-eN
NS_NET = "10.79.0"               # bridge 10.79.0.1 (root namespace: the Ray head and the coordinator)
NS_HOSTS = 5                     # adr-h1..adr-h5 at 10.79.0.11..15: the feeder and 4 layers
NS_TMP = "/tmp/adr-ray"          # one Ray temp dir per node under here


def _sh(*argv, check=True):
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=check)


def _netns_skip_reason():
    if ray is None:
        return "Ray is not installed: pip install '.[ray]' to test the Ray launcher"
    if os.geteuid() != 0:
        return "Ray on namespace hosts needs root (network namespaces)"
    import shutil
    if not shutil.which("ip"):
        return "Ray on namespace hosts needs iproute2 ('ip')"
    probe = f"{NS}probe{os.getpid()}"
    if _sh("ip", "netns", "add", probe, check=False).returncode != 0:
        return "network namespaces are not allowed here"
    _sh("ip", "netns", "del", probe, check=False)
    return None


def _ns_pids(ns: str) -> list[int]:
    out = _sh("ip", "netns", "pids", ns, check=False).stdout
    return [int(x) for x in out.split() if x.isdigit()]


def _ns_down():
    """Remove everything this file's prefix names: processes inside its namespaces (ours),
    the namespaces (their veth ends go with them) and the bridge. Idempotent."""
    for i in range(1, NS_HOSTS + 1):
        ns = f"{NS}h{i}"
        for pid in _ns_pids(ns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _sh("ip", "netns", "del", ns, check=False)
        _sh("ip", "link", "del", f"{NS}v{i}", check=False)
    _sh("ip", "link", "del", f"{NS}br", check=False)


def _ns_up():
    _ns_down()                                      # the remains of an interrupted earlier run
    _sh("ip", "link", "add", f"{NS}br", "type", "bridge")
    _sh("ip", "addr", "add", f"{NS_NET}.1/24", "dev", f"{NS}br")     # before anything connects
    _sh("ip", "link", "set", f"{NS}br", "up")
    for i in range(1, NS_HOSTS + 1):
        ns, v, e = f"{NS}h{i}", f"{NS}v{i}", f"{NS}e{i}"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", v, "type", "veth", "peer", "name", e)
        _sh("ip", "link", "set", e, "netns", ns)
        _sh("ip", "link", "set", v, "master", f"{NS}br", "up")
        _sh("ip", "-n", ns, "addr", "add", f"{NS_NET}.{10 + i}/24", "dev", e)
        _sh("ip", "-n", ns, "link", "set", e, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")


def _end_group(p: subprocess.Popen, grace: float = 5.0) -> None:
    """End a process we started in its own session, and its whole process group, by pid."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(p.pid, signal.SIGKILL)              # what the leader left in its group
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def ray_on_namespaces(tmp_path_factory):
    """A Ray head in the root namespace on the bridge address and one Ray node per namespace
    host, each started with its own --temp-dir by `ray start --block`, ended by pid."""
    import shutil
    why = _netns_skip_reason()
    if why:
        pytest.skip(why)
    ray_bin = str(Path(sys.executable).parent / "ray")
    tmp_path = tmp_path_factory.mktemp("ray-netns")
    procs: list[subprocess.Popen] = []
    shutil.rmtree(NS_TMP, ignore_errors=True)
    before = {p.pid for p in _children()}
    try:
        _ns_up()
        s = socket.socket()
        s.bind((f"{NS_NET}.1", 0))
        port = s.getsockname()[1]
        s.close()
        common = ["--block", "--disable-usage-stats", "--include-dashboard=false"]
        # the nodes authenticate the way this process (the driver) will: Ray's token mode is
        # read from RAY_AUTH_MODE (a local Cluster turns it on here when ~/.ray/auth_token exists)
        env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
               # a loaded 2-core machine: give each raylet's helper agents time to come up
               "RAY_agent_register_timeout_ms": "120000", "RAY_raylet_start_wait_time_s": "120"}

        def start(argv, name, ns=None):
            argv = ([["ip", "netns", "exec", ns]] if ns else [[]])[0] + argv
            log = open(tmp_path / f"{name}.log", "wb")
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, env=env))
            log.close()

        def start_node(argv, name, ns):
            """One node at a time (their helper agents start slowly on a loaded machine), and
            once more if Ray gives up on it: `ray start --block` exits then."""
            for _attempt in range(2):
                start(argv, name, ns)
                deadline = time.monotonic() + 150
                while time.monotonic() < deadline and procs[-1].poll() is None:
                    if b"Ray runtime started" in (tmp_path / f"{name}.log").read_bytes():
                        return
                    time.sleep(0.2)
                _end_group(procs[-1])
                for pid in _ns_pids(ns):
                    os.kill(pid, signal.SIGKILL)
            pytest.fail(f"Ray node {name} did not start: {(tmp_path / f'{name}.log').read_text()[-2000:]}")

        start([ray_bin, "start", "--head", "--node-ip-address", f"{NS_NET}.1", "--port", str(port),
               "--num-cpus", "0", "--temp-dir", f"{NS_TMP}/head", *common], "head")
        deadline = time.monotonic() + 90                # the GCS first (the nodes would retry anyway)
        while True:
            try:
                socket.create_connection((f"{NS_NET}.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    pytest.fail(f"the Ray head did not come up: {(tmp_path / 'head.log').read_text()[-2000:]}")
                time.sleep(0.2)
        for i in range(1, NS_HOSTS + 1):
            start_node([ray_bin, "start", "--address", f"{NS_NET}.1:{port}", "--node-ip-address",
                        f"{NS_NET}.{10 + i}", "--num-cpus", "1", "--temp-dir", f"{NS_TMP}/h{i}", *common[:2]],
                       f"h{i}", f"{NS}h{i}")
        yield f"{NS_NET}.1:{port}", [f"{NS_NET}.{10 + i}" for i in range(1, NS_HOSTS + 1)], procs
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for p in reversed(procs):
            _end_group(p)
        left_ns = {f"{NS}h{i}": _ns_pids(f"{NS}h{i}") for i in range(1, NS_HOSTS + 1)}
        _ns_down()
        shutil.rmtree(NS_TMP, ignore_errors=True)
    left = [p for p in _children() if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {[(p.pid, _cmd(p)[:80]) for p in left]}"
    assert not any(left_ns.values()), f"processes left in namespaces after their Ray node ended: {left_ns}"


def test_ray_mnist_spans_five_namespace_hosts(ray_on_namespaces, mnist_dir):
    """A 4-layer MNIST run under the Ray launcher: the feeder and each layer on its own
    namespace host (--hosts), CURVE on (nothing binds loopback), and `sequential` ends with
    the in-process reference's weights, as it does locally."""
    from asyncdni.engine import reference
    from asyncdni.engine.plan import load_datasets, make_plan
    address, hosts, _ = ray_on_namespaces
    cfg = config.build(overrides={
        "data.dataset": "idx", "data.path": str(mnist_dir), "model.layers": 4, "model.width": 64,
        "train.schedule": "sequential", "train.steps": 60, "train.seed": 11, "runtime.progress": False,
        "runtime.launcher": "ray", "runtime.ray_address": address, "runtime.hosts": tuple(hosts),
        "runtime.start_timeout": 120.0})
    box = {}
    t = time.monotonic()
    res = coordinator.run(cfg, on_started=_binds(box))
    print(f"ray namespace run (nodes joining included): {time.monotonic() - t:.1f} s", file=sys.stderr)
    assert box["binds"] == hosts and box["control"] == address.split(":")[0]
    assert all(L["curve"] for L in res.layers)
    train, _ = load_datasets(cfg)
    ref = reference.train_reference(make_plan(cfg, train), "dni", train, cfg.train.seed)
    for i, node in enumerate(ref.nodes):
        for name, want in node.params().items():
            assert np.allclose(res.params[i][name], want, rtol=1e-5, atol=1e-6), (i, name)
    assert np.allclose(ref.losses, res.series["loss"], rtol=1e-5)
    assert not ray.is_initialized()


def test_ray_lost_namespace_node_ends_the_run_in_one_line(ray_on_namespaces):
    """SIGKILL a whole Ray node (its `ray start` process group in host 5) mid-run: the run
    ends with one line naming layer 4 and its node (or the node alone, if Ray says so first)."""
    from asyncdni.launch.base import HostLost
    address, hosts, procs = ray_on_namespaces
    cfg = config.build(overrides={
        "model.layers": 4, "model.width": 32, "train.steps": 100000, "runtime.progress": False,
        "runtime.launcher": "ray", "runtime.ray_address": address, "runtime.hosts": tuple(hosts),
        "runtime.start_timeout": 120.0})
    box = {}

    def killer(c):
        while c.progress_done < 50:
            time.sleep(0.005)
        box["t"] = time.monotonic()
        os.killpg(procs[-1].pid, signal.SIGKILL)      # host 5's raylet and everything in its group

    def started(c):
        threading.Thread(target=killer, args=(c,), daemon=True).start()

    with pytest.raises((coordinator.WorkerFailed, HostLost)) as ei:
        coordinator.run(cfg, on_started=started)
    detected = time.monotonic() - box["t"]
    line = str(ei.value).splitlines()[0]
    print(f"lost Ray node: {line!r} after {detected:.2f} s", file=sys.stderr)
    assert line.startswith("layer 4 (pid ") or hosts[-1] in line, line
    # the node's actor process outlives its raylet by a moment (it exits when it notices), and
    # Ray's own node-death verdict takes longer still: the coordinator's control socket usually
    # notices first (measured about 4 s on a loaded machine)
    assert detected < 10.0
    assert not ray.is_initialized()


@needs_ray
def test_layers_ask_for_a_gpu_when_torch_stages_run_on_cuda():
    """--device cuda: every layer actor (and its placement-group bundle) asks Ray for one GPU;
    the feeder never does; on the CPU nothing asks for one. No cluster is started."""
    from asyncdni.launch.ray import RayLauncher
    from asyncdni import config as C
    cuda = RayLauncher.from_config(C.build(None, {"model.model": "mlp", "runtime.device": "cuda"}))
    cpu = RayLauncher.from_config(C.build(None, {}))
    assert cuda._resources("layer0")["GPU"] == 1 and "GPU" not in cuda._resources("feeder")
    assert "GPU" not in cpu._resources("layer0")
