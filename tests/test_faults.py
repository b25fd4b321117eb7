"""Fault handling: dead and hung workers, restarts, checkpoints and resume, hostile input,
non-finite numbers, and user mistakes that must end in one line, never a traceback or a hang."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from asyncdni.engine import checkpoint as CK
from asyncdni import config
from asyncdni.engine import coordinator
from asyncdni.wire import protocol as P
from asyncdni.engine import reference
from asyncdni.engine.plan import load_datasets, make_plan
from tests.conftest import env_with_repo, pids_gone

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftover_processes")]

BASE = {"model.width": 32, "model.activation": "relu", "data.train_size": 2048, "data.test_size": 256,
        "runtime.progress": False}     # relu: unbounded, so a huge lr overflows (tanh, the addition preset, does not)


def cfg_of(**ov):
    return config.build(overrides={**BASE, **ov})


def kill_when(c, step, sig, index=1):
    """From a thread: send ``sig`` to layer ``index`` once the feeder reports ``step``."""
    done = {"t": None, "pid": None}

    def killer():
        while c.progress_done < step:
            time.sleep(0.005)
        done["pid"] = c.workers[index + 1].pid
        done["t"] = time.monotonic()
        os.kill(done["pid"], sig)

    threading.Thread(target=killer, daemon=True).start()
    return done


# ----------------------------------------------------------------------------- liveness
def test_sigkilled_layer_is_named_at_once():
    cfg = cfg_of(**{"train.steps": 100000})
    box = {}
    with pytest.raises(coordinator.WorkerFailed) as exc:
        coordinator.run(cfg, on_started=lambda c: box.update(k=kill_when(c, 50, signal.SIGKILL)))
    detected = time.monotonic() - box["k"]["t"]
    e = exc.value
    assert e.name == "layer 2" and e.pid == box["k"]["pid"]
    assert "killed by signal 9 while running" in str(e) and f"pid {e.pid} on {e.host}" in str(e)
    assert detected < 3.0


def test_hung_layer_detected_within_3_seconds():
    cfg = cfg_of(**{"train.steps": 100000})
    box = {}
    with pytest.raises(coordinator.WorkerFailed) as exc:
        coordinator.run(cfg, on_started=lambda c: box.update(k=kill_when(c, 50, signal.SIGSTOP, index=2)))
    detected = time.monotonic() - box["k"]["t"]
    e = exc.value
    assert e.name == "layer 3" and e.pid == box["k"]["pid"]
    assert "no heartbeat for" in str(e) and "hung or unreachable" in str(e) and "while running" in str(e)
    assert detected < 3.0, f"hung worker detected after {detected:.2f} s"
    assert pids_gone([e.pid]) == []          # a stopped process is still ended


def test_worker_exits_when_its_coordinator_is_sigkilled(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "asyncdni.cli", "train", "--steps", "100000", "--no-progress"],
                            cwd=tmp_path, env=env_with_repo(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import psutil
    deadline = time.monotonic() + 30
    while len(psutil.Process(proc.pid).children()) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [p.pid for p in psutil.Process(proc.pid).children()]
    assert len(pids) == 5
    proc.kill()
    proc.wait(10)
    assert pids_gone(pids, timeout=5.0) == []


# ----------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("bn", [False, True])
def test_resume_continues_exactly(tmp_path, bn):
    """sequential: 200 steps with checkpoints, then resume to 300 == 300 steps in one go
    (with batch normalisation: its gamma, beta and running statistics carried over too)."""
    seq = {"train.schedule": "sequential", "model.batch_norm": bn}
    whole = coordinator.run(cfg_of(**seq, **{"train.steps": 300}))
    first = coordinator.run(cfg_of(**seq, **{"train.steps": 200, "runtime.checkpoint_every": 100,
                                             "runtime.checkpoint_dir": str(tmp_path)}))
    assert first.checkpoints == [100, 200]
    ck = CK.validate(CK.step_dir(tmp_path, 200), first.config.digest(), 4)
    assert set(ck.files) == {"feeder.npz", "layer-1.npz", "layer-2.npz", "layer-3.npz", "layer-4.npz"}
    rest = coordinator.run(cfg_of(**seq, **{"train.steps": 300, "runtime.resume": str(tmp_path)}))
    assert rest.resumed_from == 200
    for a, b in zip(whole.params, rest.params):
        for k in a:
            assert np.array_equal(a[k], b[k]), k
    assert np.allclose(whole.series["loss"], rest.series["loss"])   # history carried over
    assert rest.layers[0]["updates"] == 300                           # counters carried over
    if bn:
        assert {"bn.gamma", "bn.beta", "bn.mean", "bn.var"} <= set(ck.read_layer(0))
        assert "bn.mean" not in ck.read_layer(3)                       # the output layer does not normalise
        assert np.array_equal(whole.params[0]["bn_var"], rest.params[0]["bn_var"])
        assert rest.final_eval["metric"] == whole.final_eval["metric"]  # evaluation: the restored statistics


def test_resume_skips_corrupt_and_refuses_other_config(tmp_path):
    run = coordinator.run(cfg_of(**{"train.steps": 300, "runtime.checkpoint_every": 100,
                                    "runtime.checkpoint_dir": str(tmp_path)}))
    assert run.checkpoints == [100, 200, 300]
    newest = CK.step_dir(tmp_path, 300) / "layer-2.npz"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    (CK.step_dir(tmp_path, 200) / "manifest.json").unlink()          # 200: incomplete
    logs = []
    res = coordinator.run(cfg_of(**{"train.steps": 400, "runtime.resume": str(tmp_path)}), log=logs.append)
    assert res.resumed_from == 100
    assert any("step-000000300" in line and "checksum" in line for line in logs)
    assert any("step-000000200" in line for line in logs)
    with pytest.raises(CK.CheckpointError, match="different configuration"):
        coordinator.run(cfg_of(**{"train.steps": 400, "model.width": 48, "runtime.resume": str(tmp_path)}))


def test_layer_sigkill_mid_async_run_restarts_from_checkpoint(tmp_path):
    common = {"train.steps": 800, "model.width": 128, "train.eval_every": 0}
    plain = coordinator.run(cfg_of(**common))
    cfg = cfg_of(**common, **{"runtime.checkpoint_every": 100, "runtime.checkpoint_dir": str(tmp_path),
                              "runtime.max_restarts": 1})
    box = {}

    def started(c):
        if "k" not in box:              # only the first attempt is sabotaged
            box["k"] = kill_when(c, 330, signal.SIGKILL)

    res = coordinator.run(cfg, on_started=started)
    assert len(res.restarts) == 1
    r = res.restarts[0]
    assert "layer 2" in r["error"] and "killed by signal 9" in r["error"]
    # the feeder's exact count of completed steps at the failure, and the newest committed
    # checkpoint at or before it: at most one interval is lost (plus the few steps done while
    # a checkpoint is being written, if the failure falls in that window)
    assert r["failed_at_step"] >= 330
    assert r["resumed_from_step"] % 100 == 0 and 300 <= r["resumed_from_step"] <= r["failed_at_step"]
    assert r["steps_lost"] == r["failed_at_step"] - r["resumed_from_step"] <= 100 + 2 * cfg.train.max_inflight
    assert res.resumed_from is None and res.checkpoints[-1] == 800
    assert all(L["updates"] == 800 for L in res.layers)    # every step applied exactly once in the end
    assert res.final_eval["metric"] >= plain.final_eval["metric"] - 0.08   # same accuracy band


def test_coordinator_sigkill_then_resume_by_hand(tmp_path):
    ckdir = tmp_path / "ck"
    args = ["--steps", "4000", "--width", "64", "--checkpoint-every", "200", "--checkpoint-dir", str(ckdir),
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "asyncdni.cli", "train", *args], cwd=tmp_path,
                            env=env_with_repo(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (CK.step_dir(ckdir, 400) / "manifest.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        proc.kill()
        proc.wait(10)
    finally:
        proc.kill()
    out = subprocess.run([sys.executable, "-m", "asyncdni.cli", "train", *args, "--resume", str(ckdir),
                          "--report", "r.json"], cwd=tmp_path, env=env_with_repo(), capture_output=True,
                         text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    rep = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert rep["resumed_from_step"] >= 400
    assert "resuming from step" in out.stderr
    assert rep["checkpoints"][-1] == 4000
    assert rep["test_metric"] > 0.6


# ----------------------------------------------------------------------- hostile input
def _fuzz_frames(n: int, seed: int, shapes) -> list[list[bytes]]:
    """Random and mutated frames, none of which is a message a layer may accept."""
    rng = np.random.default_rng(seed)
    xshape, gshape = shapes
    templates = []
    for _ in range(40):
        bad_step = int(rng.choice([-1, 10**6 + rng.integers(10**6), 10**9]))
        x = rng.standard_normal((4, xshape)).astype(np.float32)
        y = rng.integers(0, 2, (4, 9)).astype(np.float32)
        g = rng.standard_normal((4, gshape)).astype(np.float32)
        nan = x.copy()
        nan[0, 0] = np.nan
        templates += [
            P.encode(P.FWD, bad_step, (x, y)), P.encode(P.BWD, bad_step, (g,)), P.encode(P.ACK, bad_step),
            P.encode(P.MARKER, bad_step, (), {"purpose": "ckpt"}), P.encode(P.FWD, bad_step, (nan, y)),
            P.encode(P.BWD, bad_step, (rng.standard_normal((4, gshape + 1)).astype(np.float32),)),
            P.encode(P.FWD, bad_step, (x.astype(np.float64), y)),
        ]
    templates = [[bytes(f) for f in t] for t in templates]
    out = []
    while len(out) < n:
        kind = rng.integers(6)
        t = templates[rng.integers(len(templates))]
        if kind == 0:
            frames = [rng.bytes(int(rng.integers(0, 200)))]
        elif kind == 1:
            frames = [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 4)))]
        elif kind == 2:
            frames = list(t)
        elif kind == 3:            # bit flips in the header
            h = bytearray(t[0])
            for _ in range(int(rng.integers(1, 4))):
                h[rng.integers(len(h))] ^= 1 << int(rng.integers(8))
            frames = [bytes(h)] + t[1:]
        elif kind == 4:            # truncated or extra frames
            frames = t[:-1] if len(t) > 1 and rng.random() < 0.5 else t + [rng.bytes(8)]
        else:                      # truncated array data
            frames = t[:-1] + [t[-1][: max(0, len(t[-1]) - 1 - int(rng.integers(16)))]] if len(t) > 1 else [t[0][:-1]]
        try:                       # keep only what a layer must refuse: never a valid in-sequence message
            m = P.decode(frames)
            if m.kind == P.EVAL or (m.kind in (P.FWD, P.BWD, P.ACK, P.MARKER) and 0 <= m.step < 10**5
                                    and all(np.isfinite(a).all() for a in m.arrays if a.dtype.kind == "f")):
                continue
        except P.ProtocolError as e:
            # a broken forward message carrying a step of this run could be the one a layer
            # waits for: that ends the run by design (README, "a step that can never complete")
            if e.kind in (P.FWD, P.EVAL) and e.step is not None and 0 <= e.step < 10**5:
                continue
        out.append(frames)
    return out


def test_fuzzed_live_worker_keeps_training_correctly():
    """10,000 random and mutated frames into a layer's two inboxes during a sequential run:
    every one is dropped and counted, and the weights still equal the in-process reference."""
    cfg = cfg_of(**{"train.schedule": "sequential", "train.steps": 1500, "model.layers": 3})
    frames = _fuzz_frames(10_000, seed=7, shapes=(32, 32))
    box = {}

    def blast(c):
        ctx = zmq.Context()
        socks = [ctx.socket(zmq.PUSH) for _ in range(2)]
        try:
            for s, ep in zip(socks, (c.workers[2].endpoints["fwd"], c.workers[2].endpoints["bwd"])):
                s.setsockopt(zmq.LINGER, 5000)
                s.connect(ep)
            for i, f in enumerate(frames):
                socks[i % 2].send_multipart(f)
            box["progress_at_end"] = c.progress_done
        finally:
            for s in socks:
                s.close()
            ctx.term()

    res = coordinator.run(cfg, on_started=lambda c: threading.Thread(target=blast, args=(c,), daemon=True).start())
    assert box["progress_at_end"] < 1500                    # the blast ended while training went on
    rejected = res.layers[1]["rejected"]
    assert sum(rejected.values()) == len(frames), rejected
    assert {"header", "step", "frames", "size", "nonfinite"} <= set(rejected)
    train, _ = load_datasets(cfg)
    ref = reference.train_reference(make_plan(cfg, train), "dni", train, cfg.train.seed)
    for i, node in enumerate(ref.nodes):
        for k, v in node.params().items():
            assert np.allclose(res.params[i][k], v, rtol=1e-5, atol=1e-6), (i, k)


def test_nonfinite_updates_are_skipped_and_counted():
    res = coordinator.run(cfg_of(**{"train.steps": 60, "train.optimizer": "sgd", "train.lr": 1e30,
                                    "train.schedule": "backprop"}))
    skipped = sum(L["nonfinite_skipped"] for L in res.layers)
    zeroed = sum(L["nonfinite_outputs"] for L in res.layers)
    assert skipped > 0 and zeroed > 0
    for L in res.layers:                                    # steps kept flowing: every step completed
        assert L["steps"] == 60


def test_fail_on_nonfinite_stops_cleanly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "asyncdni.cli", "train", "--steps", "60", "--optimizer", "sgd",
                          "--lr", "1e30", "--activation", "relu", "--schedule", "backprop", "--no-progress",
                          "--fail-on-nonfinite"],
                         cwd=tmp_path, env=env_with_repo(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "non-finite" in out.stderr and "fail_on_nonfinite" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------- user mistakes
def _cli(tmp_path, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "asyncdni.cli", "train", "--no-progress", *args], cwd=tmp_path,
                          env=env_with_repo(), capture_output=True, text=True, timeout=timeout)


def _one_line_failure(out, needle):
    assert out.returncode != 0
    assert needle in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_port_in_use_is_one_line(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    try:
        free = []
        for _ in range(11):                                 # fwd + bwd for 5 workers, then control
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            free.append(s)
        ports = [s.getsockname()[1] for s in free]
        for s in free:
            s.close()
        ports[2] = busy                                     # layer 1's forward inbox
        out = _cli(tmp_path, "--steps", "10", "--ports", ",".join(map(str, ports)))
    finally:
        holder.close()
    _one_line_failure(out, f"cannot bind tcp://127.0.0.1:{busy}: address already in use")


def test_control_port_in_use_is_one_line(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    try:
        ports = list(range(41000, 41010)) + [busy]
        out = _cli(tmp_path, "--steps", "10", "--ports", ",".join(map(str, ports)))
    finally:
        holder.close()
    _one_line_failure(out, f"cannot bind tcp://127.0.0.1:{busy}: address already in use")


def test_unreachable_address_is_one_line(tmp_path):
    # 203.0.113.0/24 is TEST-NET-3: never an address of this machine; binding sends no traffic
    out = _cli(tmp_path, "--steps", "10", "--host", "203.0.113.7")
    _one_line_failure(out, "cannot bind")
    assert "203.0.113.7" in out.stderr


def test_start_up_that_never_answers_times_out(tmp_path):
    from asyncdni.launch.base import Launcher

    class SilentLauncher(Launcher):
        """Starts nothing: the workers it was asked for never say hello."""
        def start(self, w):
            pass

        def state(self, name):
            return "running"

        def exit_code(self, name):
            return None

        def log_tail(self, name, lines=15):
            return ""

        def exited(self):
            return []

        def stop(self, grace=0):
            pass

        def wait(self, t):
            return True

    t0 = time.monotonic()
    with pytest.raises(coordinator.RunError, match="start-up timed out after 2 s: no hello from feeder, layer 1"):
        coordinator.run(cfg_of(**{"runtime.start_timeout": 2.0}), launcher=SilentLauncher())
    assert time.monotonic() - t0 < 5


def test_malformed_dataset_file_is_one_line(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") * 3 + b"\x00" * 7)
    (d / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"\x00" * 10)
    out = _cli(tmp_path, "--data-path", str(d), "--steps", "10")
    _one_line_failure(out, "t10k-images-idx3-ubyte")
    assert out.returncode == 2


def test_resume_without_checkpoints_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    out = _cli(tmp_path, "--steps", "10", "--resume", str(tmp_path / "empty"))
    _one_line_failure(out, "no checkpoints")


# ------------------------------------------------------------- review findings, pinned
def test_a_worker_that_starts_late_does_not_break_the_run(tmp_path):
    from asyncdni.launch.local import LocalLauncher

    class LateLauncher(LocalLauncher):
        """layer 2 says hello 3 s after the others (longer than heartbeat_interval * misses),
        and the launcher itself is slow to start layer 3"""
        def argv(self, w):
            argv = super().argv(w)
            if w.name == "layer1":              # layer 2
                i = argv.index("asyncdni.workers.layer")
                argv[i:i + 1] = ["tests.helpers.slow_layer", "3.0"]
            return argv

        def start(self, w):
            if w.name == "layer2":              # layer 3
                time.sleep(2.5)
            return super().start(w)

    res = coordinator.run(cfg_of(**{"train.steps": 30}), launcher=LateLauncher(tmp_path))
    assert all(L["updates"] == 30 for L in res.layers)


def test_sigkilled_layer_under_the_cli_is_always_one_line(tmp_path):
    import psutil
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "asyncdni.cli", "train", "--layers", "3", "--steps", "100000",
                                 "--no-progress"], cwd=tmp_path, env=env_with_repo(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while len(psutil.Process(proc.pid).children()) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
            kids = psutil.Process(proc.pid).children()
            layer2 = [k for k in kids if "asyncdni.workers.layer" in k.cmdline() and k.cmdline()[k.cmdline().index("asyncdni.workers.layer") + 1] == "1"][0]
            layer2.kill()
            _out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert proc.returncode == 1, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "run failed: layer 2" in err and "killed by signal 9" in err
        assert pids_gone([k.pid for k in kids]) == []


def test_fresh_run_refuses_a_directory_with_checkpoints_and_unwritable_ones(tmp_path):
    coordinator.run(cfg_of(**{"train.steps": 20, "runtime.checkpoint_every": 10, "runtime.checkpoint_dir": str(tmp_path)}))
    with pytest.raises(CK.CheckpointError, match="already holds checkpoints; continue them with --resume"):
        coordinator.run(cfg_of(**{"train.steps": 20, "runtime.checkpoint_every": 10,
                                  "runtime.checkpoint_dir": str(tmp_path)}))
    out = subprocess.run([sys.executable, "-m", "asyncdni.cli", "train", "--steps", "20", "--no-progress",
                          "--checkpoint-every", "10", "--checkpoint-dir", "/proc/asyncdni-ckpt"], cwd=tmp_path,
                         env=env_with_repo(), capture_output=True, text=True, timeout=60)
    _one_line_failure(out, "checkpoint directory /proc/asyncdni-ckpt is not writable")


def test_resume_past_the_requested_steps_is_refused(tmp_path):
    coordinator.run(cfg_of(**{"train.steps": 40, "runtime.checkpoint_every": 20, "runtime.checkpoint_dir": str(tmp_path)}))
    with pytest.raises(CK.CheckpointError, match="step 40 is past this run's 30 steps"):
        coordinator.run(cfg_of(**{"train.steps": 30, "runtime.resume": str(tmp_path)}))


def test_resumed_run_keeps_its_evaluation_history(tmp_path):
    ov = {"train.schedule": "sequential", "train.eval_every": 10, "train.target_accuracy": 0.01}
    whole = coordinator.run(cfg_of(**ov, **{"train.steps": 40}))
    coordinator.run(cfg_of(**ov, **{"train.steps": 20, "runtime.checkpoint_every": 20,
                                    "runtime.checkpoint_dir": str(tmp_path)}))
    rest = coordinator.run(cfg_of(**ov, **{"train.steps": 40, "runtime.resume": str(tmp_path)}))
    assert [e["step"] for e in rest.feeder["evals"]] == [e["step"] for e in whole.feeder["evals"]] == [10, 20, 30, 40]
    for a, b in zip(whole.feeder["evals"], rest.feeder["evals"]):
        assert a["metric"] == pytest.approx(b["metric"]) and a["loss"] == pytest.approx(b["loss"])
    assert rest.feeder["time_to_target"] == pytest.approx(rest.feeder["evals"][0]["train_time"])


def test_forged_ack_to_the_feeder_is_counted_not_obeyed():
    """An ACK means nothing to the DNI schedules: it must be dropped, not mark a step done."""
    def forge(c):
        def send():
            ctx = zmq.Context()
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 2000)
            s.connect(c.workers[0].endpoints["bwd"])
            for step in range(5):
                s.send_multipart(P.encode(P.ACK, step))
            s.close()
            ctx.term()
        threading.Thread(target=send, daemon=True).start()

    res = coordinator.run(cfg_of(**{"train.steps": 200}), on_started=forge)
    assert res.feeder["rejected"].get("unexpected") == 5
    assert np.isfinite(res.series["loss"]).all()        # every step's own DONE was counted


def test_pipeline_reports_steps_not_micro_steps():
    res = coordinator.run(cfg_of(**{"train.schedule": "pipeline", "train.microbatches": 3, "train.steps": 30}))
    assert all(L["steps"] == 30 and L["updates"] == 30 for L in res.layers)


# ------------------------------------------------------------------ the data plane stalls
class RelayedInbox:
    """A route that puts a fresh loopback relay (asyncdni.lab.relay, no delay) in front of
    layer 2's forward inbox at each attempt, so that a test can kill the relay mid-run: the
    data plane breaks while every worker still answers the coordinator."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def __call__(self, peers):
        target = peers[2]["fwd"][len("tcp://"):]
        p = subprocess.Popen([sys.executable, "-m", "asyncdni.lab.relay", "--listen", "127.0.0.1:0",
                              "--target", target, "--delay-ms", "0", "--parent-pid", str(os.getpid())],
                             stdout=subprocess.PIPE, env=env_with_repo())
        self.procs.append(p)
        listen = json.loads(p.stdout.readline())["listen"]
        p.stdout.close()
        out = [dict(x) for x in peers]
        out[2]["fwd"] = f"tcp://{listen}"
        return out

    def kill_first_at(self, c, step, box):
        if box:
            return                      # only the first attempt is sabotaged

        def killer():
            while c.progress_done < step:
                time.sleep(0.005)
            box["t"] = time.monotonic()
            self.procs[0].kill()
        box["armed"] = True
        threading.Thread(target=killer, daemon=True).start()

    def close(self):
        for p in self.procs:
            p.kill()
            p.wait(10)


def test_a_dead_relay_ends_the_run_in_one_line_naming_the_link():
    """Before progress detection this run waited forever: the heartbeats stayed healthy."""
    relay, box = RelayedInbox(), {}
    cfg = cfg_of(**{"train.steps": 100000, "runtime.stall_timeout": 3.0})
    try:
        with pytest.raises(coordinator.Stalled) as exc:
            coordinator.run(cfg, route=relay, on_started=lambda c: relay.kill_first_at(c, 50, box))
    finally:
        relay.close()
    waited = time.monotonic() - box["t"]
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("data plane stalled: no worker received a data message for 3.")
    assert "the first break is the forward link layer 1 (127.0.0.1) -> layer 2 (127.0.0.1)" in msg
    assert "--max-restarts" in msg               # says how a run recovers from it
    assert 3.0 < waited < 8.0


def test_a_stall_is_replayed_from_the_last_checkpoint_under_max_restarts(tmp_path):
    relay, box = RelayedInbox(), {}
    cfg = cfg_of(**{"train.steps": 1500, "runtime.stall_timeout": 3.0, "runtime.checkpoint_every": 100,
                    "runtime.checkpoint_dir": str(tmp_path), "runtime.max_restarts": 1})
    try:
        res = coordinator.run(cfg, route=relay, on_started=lambda c: relay.kill_first_at(c, 250, box))
    finally:
        relay.close()
    (r,) = res.restarts
    assert r["error"].startswith("data plane stalled") and r["resumed_from_step"] >= 200
    assert res.feeder["completed"] == 1500 and all(L["updates"] == 1500 for L in res.layers)


def test_stall_limit_is_the_flag_or_an_automatic_bound():
    rt = config.build(overrides={"runtime.heartbeat_interval": 0.5}).runtime
    assert coordinator.stall_limit(rt, 0.0) == coordinator.STALL_MIN
    assert coordinator.stall_limit(rt, 2.0) == 40.0                  # 20 x the longest pause seen
    assert coordinator.stall_limit(rt, 1e6) == coordinator.STALL_MAX_AUTO
    slow = config.build(overrides={"runtime.heartbeat_interval": 5.0}).runtime
    assert coordinator.stall_limit(slow, 0.0) == 4 * 5.0 * slow.heartbeat_misses
    fixed = config.build(overrides={"runtime.stall_timeout": 7.5}).runtime
    assert coordinator.stall_limit(fixed, 1e6) == 7.5
    for bad in ("-1", "nan", "1e9"):
        with pytest.raises(config.ConfigError, match="runtime.stall_timeout"):
            config.build(overrides={"runtime.stall_timeout": bad})
