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

import numpy as np
import psutil
import pytest

from asyncdni import config, coordinator
from launch.base import LaunchError, WorkerLaunch
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
    from launch.ray import RayLauncher
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
    raises_one_line(LaunchError, coordinator.run, cfg_of(cluster, **{"runtime.hosts": ("127.0.0.9", NODES[1])}),
                    match_all=("--hosts: no live Ray node has address 127.0.0.9", NODES[0]))
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
