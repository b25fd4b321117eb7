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
from asyncdni.launch.base import LaunchError
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


# ---------------------------------------------------------------- a broken data plane
def small_cfg(lab, port, **ov):
    base = {"model.width": 64, "data.train_size": 4096, "data.test_size": 512, "runtime.progress": False,
            "runtime.launcher": "agents", "runtime.listen": f"{lab.bridge_ip}:{port}",
            "runtime.hosts": "h0,h1,h2,h3,h4", "runtime.keys": lab.keys, "runtime.start_timeout": 60.0,
            "runtime.stall_timeout": 4.0}
    return config.build(overrides={**base, **ov})


def run_and_break(lab, cfg, port, breaker, at_step=100, **kw):
    """Run ``cfg`` through the lab's agents; once the feeder reports ``at_step``, call
    ``breaker()`` (once, first attempt only). Returns (result or exception, seconds from the
    break to the end of the run, what breaker returned)."""
    box = {}

    def on_started(c):
        if box:
            return
        box["armed"] = True

        def go():
            while c.progress_done < at_step:
                time.sleep(0.005)
            box["t"] = time.monotonic()
            box["out"] = breaker()
        threading.Thread(target=go, daemon=True).start()

    agents = start_agents(lab, port)
    try:
        try:
            out = coordinator.run(cfg, on_started=on_started, **kw)
        except coordinator.RunError as e:
            out = e
    finally:
        end(agents)
    return out, time.monotonic() - box["t"], box.get("out")


def ns_run(lab, host, argv):
    return subprocess.run(["ip", "netns", "exec", lab.names[host], *argv], capture_output=True, text=True, timeout=30)


def test_a_partitioned_data_plane_ends_the_run_naming_the_link(lab):
    """Layer 1's host loses its route to layer 2's host; both still reach the head, so the
    heartbeats stay healthy. Before progress detection: no output, ever."""
    port, a1, a2 = PORT + 5, lab.addresses[1], lab.addresses[2]
    cut = ["ip", "route", "add", "blackhole", f"{a2}/32"]
    try:
        out, waited, _ = run_and_break(lab, small_cfg(lab, port, **{"train.steps": 100000}), port,
                                       lambda: ns_run(lab, 1, cut))
    finally:
        ns_run(lab, 1, ["ip", "route", "del", "blackhole", f"{a2}/32"])
    assert isinstance(out, coordinator.Stalled), out
    assert f"the first break is the forward link layer 1 ({a1}) -> layer 2 ({a2})" in str(out)
    assert 4.0 < waited < 15.0


def test_a_short_cut_of_the_data_plane_recovers(lab):
    port, a2 = PORT + 6, lab.addresses[2]

    def cut_for_two_seconds():
        ns_run(lab, 1, ["ip", "route", "add", "blackhole", f"{a2}/32"])
        time.sleep(2.0)
        ns_run(lab, 1, ["ip", "route", "del", "blackhole", f"{a2}/32"])
    out, _, _ = run_and_break(lab, small_cfg(lab, port, **{"train.steps": 1500, "runtime.stall_timeout": 12.0}),
                              port, cut_for_two_seconds)
    assert not isinstance(out, Exception), out
    assert out.feeder["completed"] == 1500 and not out.restarts


def test_reset_connections_are_replayed_from_a_checkpoint(lab, tmp_path):
    """TCP resets on every connection between layer 1's and layer 2's hosts, several times:
    a message in flight is lost; the run must end, here by replaying from its checkpoint."""
    port, a1 = PORT + 7, lab.addresses[1]

    def reset_five_times():
        killed = 0
        for _ in range(5):
            r = ns_run(lab, 2, ["ss", "-K", "dst", a1])
            killed += max(0, len(r.stdout.strip().splitlines()) - 1)      # one line per socket, after the header
            time.sleep(0.2)
        return killed
    cfg = small_cfg(lab, port, **{"train.steps": 1500, "runtime.checkpoint_every": 100, "runtime.max_restarts": 5,
                                  "runtime.checkpoint_dir": str(tmp_path / "ck")})
    out, waited, killed = run_and_break(lab, cfg, port, reset_five_times)
    assert killed >= 1, "ss -K reset no connection"
    assert not isinstance(out, Exception), out
    assert out.feeder["completed"] == 1500 and all(L["updates"] == 1500 for L in out.layers)
    assert all(r["error"].startswith("data plane stalled") for r in out.restarts), out.restarts


def test_a_dead_relay_between_hosts_ends_the_run(lab):
    port = PORT + 8
    relays = []

    def route(peers):                   # layer 2's forward inbox behind a relay on the bridge
        out = [dict(p) for p in peers]
        out[2]["fwd"] = "tcp://" + lab.relay(peers[2]["fwd"], delay_ms=1.0)
        relays.append(lab._relays[-1]["proc"])
        return out

    try:
        out, waited, _ = run_and_break(lab, small_cfg(lab, port, **{"train.steps": 100000}), port,
                                       lambda: relays[0].kill(), route=route)
    finally:
        lab.stop_relays(refill=False)
    assert isinstance(out, coordinator.Stalled), out
    assert f"-> layer 2 ({lab.addresses[2]})" in str(out) and 4.0 < waited < 15.0


def test_agents_on_loopback_across_hosts_are_refused_in_one_line(lab):
    port = PORT + 9
    procs = [lab.run_in(i, [sys.executable, "-m", "asyncdni.cli", "agent", "--join", f"tcp://{lab.bridge_ip}:{port}",
                            "--name", f"h{i}", "--bind", bind, "--wait", "30", "--insecure"],
                        env=env_with_repo(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, bind in ((0, "127.0.0.1"), (1, "0.0.0.0"))]
    cfg = config.build(overrides={"model.width": 32, "runtime.progress": False, "runtime.launcher": "agents",
                                  "runtime.listen": f"{lab.bridge_ip}:{port}", "runtime.hosts": "h0,h1,h1,h1,h1",
                                  "runtime.security": "insecure", "runtime.start_timeout": 30.0})
    t0 = time.monotonic()
    try:
        with pytest.raises(LaunchError) as exc:
            coordinator.run(cfg)
    finally:
        end(procs)
    msg = str(exc.value)
    assert "\n" not in msg and "cannot reach" in msg and "--bind ADDR" in msg
    assert ("agent h0" in msg and "127.0.0.1" in msg) or ("agent h1" in msg and "0.0.0.0" in msg)
    assert time.monotonic() - t0 < 25
