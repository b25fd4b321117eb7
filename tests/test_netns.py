"""Multi-host runs across real network stacks: five network-namespace hosts on a bridge
(asyncdni.lab.namespaces), one `asyncdni agent` in each, the coordinator in the root namespace,
CURVE on (every worker binds a non-loopback address). Needs root; skips with one line
where namespaces cannot be made."""
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from asyncdni import config
from asyncdni.engine import coordinator
from asyncdni.engine import reference
from asyncdni.engine.plan import load_datasets, make_plan
from tests.conftest import env_with_repo, pids_gone

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240), pytest.mark.usefixtures("no_leftover_processes")]

PREFIX, SUBNET = "adt-", "10.78.0.0/24"
PORT = 47650


def _netns_allowed() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = subprocess.run(["ip", "netns", "add", "adt-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"network namespaces not allowed here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "adt-probe"], capture_output=True)
    return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    why = _netns_allowed()
    if why:
        pytest.skip(why)
    from asyncdni.lab.namespaces import Lab, down
    down(PREFIX)                                  # a lab left by a killed earlier run
    keys = tmp_path_factory.mktemp("keys") / "k"
    out = subprocess.run([sys.executable, "-m", "asyncdni.cli", "keys", str(keys), "h0", "h1", "h2", "h3", "h4"],
                         env=env_with_repo(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    with Lab(hosts=5, prefix=PREFIX, subnet=SUBNET) as lab:
        lab.keys = str(keys)
        yield lab


def start_agents(lab, port):
    procs = []
    for i in range(5):
        procs.append(lab.run_in(i, [sys.executable, "-m", "asyncdni.cli", "agent",
                                    "--join", f"tcp://{lab.bridge_ip}:{port}", "--name", f"h{i}",
                                    "--bind", lab.addresses[i], "--keys", lab.keys, "--wait", "60"],
                                env=env_with_repo(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def end(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def mnist_cfg(lab, mnist_dir, port, **ov):
    base = {"data.dataset": "idx", "data.path": str(mnist_dir), "model.width": 256, "runtime.progress": False,
            "runtime.launcher": "agents", "runtime.listen": f"{lab.bridge_ip}:{port}",
            "runtime.hosts": "h0,h1,h2,h3,h4", "runtime.keys": lab.keys, "runtime.start_timeout": 60.0}
    return config.build(overrides={**base, **ov})


@pytest.mark.parametrize("schedule,ref_schedule", [("sequential", "dni"), ("backprop", "backprop")])
def test_five_namespace_hosts_equal_the_reference(lab, mnist_dir, schedule, ref_schedule):
    port = PORT + (schedule == "backprop")
    cfg = mnist_cfg(lab, mnist_dir, port, **{"train.schedule": schedule, "train.steps": 60, "train.seed": 2})
    agents = start_agents(lab, port)
    try:
        result = coordinator.run(cfg)
        assert [p.wait(10) for p in agents] == [0] * 5          # released at the end, every one
    finally:
        end(agents)
    assert [L["host"] for L in result.layers] == lab.addresses[1:]  # one layer per namespace host
    assert all(L["curve"] for L in result.layers)                  # off loopback: CURVE by default
    train, _ = load_datasets(cfg)
    ref = reference.train_reference(make_plan(cfg, train), ref_schedule, train, cfg.train.seed)
    for i, node in enumerate(ref.nodes):
        for name, want in node.params().items():
            assert np.allclose(result.params[i][name], want, rtol=1e-5, atol=1e-6), (schedule, i, name)


def test_five_namespace_hosts_async_mnist_accuracy_matches_a_local_run(lab, mnist_dir):
    ov = {"train.epochs": 6.0, "train.seed": 1}    # past the steep part of the curve: 3 epochs ended at 89-91%
    local = coordinator.run(config.build(overrides={"data.dataset": "idx", "data.path": str(mnist_dir),
                                                    "model.width": 256, "runtime.progress": False, **ov}))
    agents = start_agents(lab, PORT + 2)
    try:
        remote = coordinator.run(mnist_cfg(lab, mnist_dir, PORT + 2, **ov))
    finally:
        end(agents)
    a, b = local.final_eval["metric"], remote.final_eval["metric"]
    assert b > 0.92 and abs(a - b) < 0.015, (a, b)    # async arrival order differs; the band is 1.5 points


def test_killed_worker_in_a_namespace_is_detected_and_restarted(lab, mnist_dir, tmp_path):
    port = PORT + 3
    cfg = mnist_cfg(lab, mnist_dir, port, **{"train.steps": 400, "train.schedule": "sequential",
                                             "runtime.checkpoint_every": 100, "runtime.max_restarts": 1,
                                             "runtime.checkpoint_dir": str(tmp_path / "ck")})
    box = {}

    def on_started(c):
        if box:
            return

        def killer():
            while c.progress_done < 150:
                time.sleep(0.005)
            box["t"] = time.monotonic()
            os.kill(c.workers[2].pid, 9)                    # layer 2, in namespace host h2
        box["armed"] = True
        threading.Thread(target=killer, daemon=True).start()

    agents = start_agents(lab, port)
    try:
        result = coordinator.run(cfg, on_started=on_started)
    finally:
        end(agents)
    (r,) = result.restarts
    assert "layer 2" in r["error"] and f"on h2 ({lab.addresses[2]})" in r["error"]
    assert r["resumed_from_step"] == 100 and result.feeder["completed"] == 400
    # the manifest says which worker on which host wrote each file
    import json
    man = json.loads(next((tmp_path / "ck").glob("step-*/manifest.json")).read_text())
    assert lab.addresses[2] in man["extra"]["written_by"]["layer-2.npz"]


def test_killed_coordinator_leaves_nothing_in_any_namespace(lab, tmp_path):
    port = PORT + 4
    agents = start_agents(lab, port)
    cli = subprocess.Popen([sys.executable, "-m", "asyncdni.cli", "train", "--launcher", "agents", "--listen",
                            f"{lab.bridge_ip}:{port}", "--hosts", "h0,h1,h2,h3,h4", "--keys", lab.keys,
                            "--steps", "100000", "--no-progress"], cwd=tmp_path, env=env_with_repo(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        from asyncdni.lab.namespaces import _netns_pids
        while sum(len(_netns_pids(n)) for n in lab.names) < 10 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [p for n in lab.names for p in _netns_pids(n)]
        assert len(pids) >= 10, pids                          # 5 agents + 5 workers
        time.sleep(1.0)
        cli.kill()
        cli.wait(10)
        assert pids_gone(pids, timeout=15.0) == []
        assert [p.wait(15) for p in agents] == [3] * 5          # each: "the coordinator is gone"
    finally:
        if cli.poll() is None:
            cli.kill()
        end(agents)
