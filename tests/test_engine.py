"""Integration tests: real worker processes, real sockets, a hard timeout each."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from asyncdni import config
from asyncdni.engine import coordinator
from asyncdni.engine import reference
from asyncdni.engine.plan import load_datasets, make_plan
from asyncdni.launch.local import LocalLauncher
from tests.conftest import env_with_repo, pids_gone

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90), pytest.mark.usefixtures("no_leftover_processes")]

SMALL = {"train.steps": 40, "model.width": 32, "data.train_size": 2048, "data.test_size": 256,
         "runtime.progress": False}


def small(**ov):
    return config.build(overrides={**SMALL, **ov})


@pytest.mark.parametrize("schedule,ref_schedule,bn", [("sequential", "dni", False), ("backprop", "backprop", False),
                                                      ("pipeline", "pipeline", False), ("sequential", "dni", True),
                                                      ("backprop", "backprop", True)])
def test_multiprocess_matches_in_process_reference(schedule, ref_schedule, bn):
    cfg = small(**{"train.schedule": schedule, "train.seed": 3, "train.microbatches": 3, "model.batch_norm": bn})
    result = coordinator.run(cfg)
    train, test = load_datasets(cfg)
    ref = reference.train_reference(make_plan(cfg, train), ref_schedule, train, cfg.train.seed, test=test,
                                    eval_batch=cfg.train.eval_batch)
    if bn:   # hidden layers: gamma, beta and the running statistics instead of the bias
        assert set(result.params[0]) == {"W", "bn_gamma", "bn_beta", "bn_mean", "bn_var", "sg0", "sg1", "sg2"}
        assert not np.allclose(result.params[0]["bn_mean"], 0)       # the running statistics moved
    # the workers' evaluation (batch normalisation: with the running statistics) is the reference's
    assert result.final_eval["metric"] == pytest.approx(ref.evals[-1]["metric"], abs=1e-9)
    assert result.final_eval["loss"] == pytest.approx(ref.evals[-1]["loss"], rel=1e-4)
    assert len(result.params) == cfg.model.layers
    for i, node in enumerate(ref.nodes):
        for name, want in node.params().items():
            got = result.params[i][name]
            assert got.shape == want.shape
            assert np.allclose(got, want, rtol=1e-5, atol=1e-6), (schedule, i, name)
        # the weights really moved away from their initialisation
    init = reference.train_reference(make_plan(cfg, train), ref_schedule, train, cfg.train.seed, steps=0)
    assert not np.allclose(init.nodes[0].dense.W, result.params[0]["W"])
    assert np.allclose(ref.losses, result.series["loss"], rtol=1e-5)


def test_lowrank_sg_every_over_sockets_matches_reference_and_counts_sg_updates():
    """The low-rank SG regressed every 3rd step: sequential over sockets is the in-process
    math exactly; under async every layer still updates every step, the SG models on steps
    0, 3, .., 39 only (14 of 40), and no skipped step's state is left behind."""
    ov = {"train.sg_model": "lowrank", "train.sg_rank": 4, "train.sg_every": 3, "train.seed": 1}
    # (under sequential --sg-every needs the bootstrapped targets: test_sg_target)
    cfg = small(**ov, **{"train.schedule": "sequential", "train.sg_target": "bootstrap"})
    result = coordinator.run(cfg)
    train, _ = load_datasets(cfg)
    ref = reference.train_reference(make_plan(cfg, train), "dni", train, cfg.train.seed)
    for i, node in enumerate(ref.nodes):
        for name, want in node.params().items():
            assert np.allclose(result.params[i][name], want, rtol=1e-5, atol=1e-6), (i, name)
    assert [n.sg_updates for n in ref.nodes] == [14, 14, 14, 0]
    r = coordinator.run(small(**ov, **{"train.schedule": "async"}))
    for i, s in enumerate(r.layers):
        assert (s["updates"], s["sg_updates"], s["cached_steps"]) == (40, 14 if i < 3 else 0, 0)


def test_pipeline_equals_backprop_up_to_rounding():
    r_bp = coordinator.run(small(**{"train.schedule": "backprop"}))
    r_pp = coordinator.run(small(**{"train.schedule": "pipeline", "train.microbatches": 4}))
    for a, b in zip(r_bp.params, r_pp.params):
        assert np.allclose(a["W"], b["W"], rtol=1e-4, atol=1e-5)


def test_async_trains_and_reports():
    cfg = small(**{"train.steps": 1000, "model.width": 128, "train.max_inflight": 3})
    r = coordinator.run(cfg)
    loss = r.series["loss"]
    assert np.isfinite(loss).all()
    assert loss[-30:].mean() < loss[:30].mean() - 0.5      # the loss falls
    assert r.final_eval["metric"] > 0.6                      # bit accuracy well above chance (0.5)
    assert r.feeder["samples"] == 1000 * cfg.train.batch_size
    for i, s in enumerate(r.layers):
        assert s["steps"] == 1000 and s["updates"] == 1000
        assert s["sg_updates"] == (1000 if i < cfg.model.layers - 1 else 0)
        assert s["cached_steps"] == 0                        # every SG target arrived and was used
        assert s["rejected"] == {}
        assert 0 < s["busy"] < r.wall
    # one distinct process per layer plus the feeder
    assert len({s["pid"] for s in r.layers} | {r.feeder["pid"]}) == cfg.model.layers + 1


def test_periodic_evaluation_and_time_to_target():
    cfg = small(**{"train.steps": 600, "model.width": 128, "train.eval_every": 150, "train.target_accuracy": 0.55})
    r = coordinator.run(cfg)
    evals = r.feeder["evals"]
    assert [e["step"] for e in evals] == [150, 300, 450, 600]
    times = [e["train_time"] for e in evals]
    assert times == sorted(times)
    reached = [e for e in evals if e["metric"] >= 0.55]
    assert reached and r.feeder["time_to_target"] == pytest.approx(reached[0]["train_time"])


def test_worker_exception_ends_run_with_its_error(tmp_path):
    class FaultyLauncher(LocalLauncher):
        def argv(self, w):
            argv = super().argv(w)
            if w.name == "layer1":              # layer 2
                argv[argv.index("asyncdni.workers.layer")] = "tests.helpers.faulty_layer"
                argv += ["--fail-step", "7"]
            return argv

    cfg = small(**{"train.steps": 100})
    with pytest.raises(coordinator.WorkerFailed) as exc:
        coordinator.run(cfg, launcher=FaultyLauncher(tmp_path))
    err = exc.value
    assert err.name == "layer 2"
    assert "ZeroDivisionError: injected failure at step 7" in str(err)
    assert "dni_forward" in err.tb                           # the worker's own traceback came back


def test_worker_crash_on_start_is_reported(tmp_path):
    class BrokenLauncher(LocalLauncher):
        def module(self, w):
            return "tests.helpers.no_such_module" if w.name == "layer2" else super().module(w)   # layer 3

    with pytest.raises(coordinator.WorkerFailed, match=r"layer 3 .*exited with code 1 during start-up"):
        coordinator.run(small(), launcher=BrokenLauncher(tmp_path))


def _start_cli(tmp_path, *args):
    return subprocess.Popen([sys.executable, "-m", "asyncdni.cli", "train", *args],
                            cwd=tmp_path, env=env_with_repo(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_workers(proc, n, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = psutil.Process(proc.pid).children(recursive=True)
        if len(kids) >= n:
            time.sleep(1.0)             # let them get into the training loop
            return [k.pid for k in psutil.Process(proc.pid).children(recursive=True)]
        time.sleep(0.05)
    raise AssertionError("workers did not start")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 130)])
def test_signal_stops_everything(tmp_path, sig, code):
    proc = _start_cli(tmp_path, "--steps", "100000", "--no-progress")
    try:
        pids = _wait_for_workers(proc, 5)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == code
    assert "interrupted" in err
    assert "Traceback" not in err
    assert pids_gone(pids) == []


def test_coordinator_sigkill_leaves_no_orphans(tmp_path):
    proc = _start_cli(tmp_path, "--steps", "100000", "--no-progress")
    try:
        pids = _wait_for_workers(proc, 5)
        proc.kill()
        proc.wait(10)
    finally:
        proc.kill()
    assert pids_gone(pids, timeout=5.0) == []


@pytest.mark.parametrize("args,needle", [
    (["--schedule", "bogus"], "train.schedule: 'bogus' is not one of async, sequential, backprop, pipeline, delayed, delayed_fixed, local"),
    (["--lr", "abc"], "train.lr: expected a number"),
    (["--layers", "3", "--widths", "8"], "model.widths"),
    (["--data-path", "/nonexistent/dir"], "/nonexistent/dir"),
    (["--set", "train.nope=1"], "unknown setting train.nope"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--config", "missing.toml"], "missing.toml: no such file"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    proc = subprocess.run([sys.executable, "-m", "asyncdni.cli", "train", *args], cwd=tmp_path,
                          env=env_with_repo(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_train_with_toml_and_json_report(tmp_path):
    (tmp_path / "run.toml").write_text(
        "[model]\nlayers = 3\nwidth = 24\n[train]\nsteps = 60\nschedule = \"backprop\"\n"
        "[data]\ntrain_size = 1024\ntest_size = 128\n")
    proc = subprocess.run([sys.executable, "-m", "asyncdni.cli", "train", "--config", "run.toml", "--lr", "0.002",
                           "--batch-norm", "--no-progress", "--report", "out.json"], cwd=tmp_path, env=env_with_repo(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "schedule backprop: 3 layers 16-24-24-9, 60 steps of 64" in proc.stdout
    # the settings in force; only the activation came from the addition preset (width: TOML, lr: flag)
    assert "width=24 activation=tanh* optimizer=adam lr=0.002 " in proc.stdout
    assert " batch_norm=True" in proc.stdout
    assert "from a preset: the dataset's or the model's" in proc.stdout
    rep = json.loads((tmp_path / "out.json").read_text())
    assert rep["config"]["preset"] == ["model.activation"] and rep["summary"]["preset"] == {"model.activation": "tanh"}
    assert rep["config"]["train"]["lr"] == 0.002 and rep["config"]["model"]["width"] == 24
    assert rep["config"]["model"]["batch_norm"] is True
    s = rep["summary"]
    assert s["steps"] == 60 and len(s["per_layer"]) == 3
    assert s["samples_per_s"] > 0 and 0 <= s["test_metric"] <= 1
    assert all(L["updates"] == 60 for L in s["per_layer"])


def test_idx_dataset_end_to_end(tmp_path):
    from asyncdni.numerics.data import write_idx
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600).astype(np.uint8)
    images = (rng.random((600, 4, 5)) * 60).astype(np.uint8)
    images[np.arange(600), labels, 0] = 255                   # learnable: a bright pixel per class
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    cfg = config.build(overrides={"data.dataset": "idx", "data.path": str(tmp_path), "train.steps": 300,
                                  "model.width": 32, "train.lr": 3e-3, "train.schedule": "backprop",
                                  "runtime.progress": False})
    r = coordinator.run(cfg)
    assert r.plan.in_dim == 20 and r.plan.n_out == 3
    assert r.final_eval["n"] == 120                            # 20% of 600 held out
    assert r.final_eval["metric"] > 0.8


def test_max_inflight_auto_sizes_the_window_from_measured_times():
    from asyncdni.engine.worker import auto_window
    assert auto_window(0.040, 0.005, 16) == 8           # a 40 ms round trip over 5 ms steps
    assert auto_window(0.041, 0.005, 16) == 9           # rounded up: the slowest stage never idles
    assert auto_window(0.5, 0.001, 16) == 16            # capped
    assert auto_window(0.001, 0.005, 16) == 1
    assert auto_window(0.0, 0.0, 5) == 5                # nothing measured: the cap
    r = coordinator.run(small(**{"train.steps": 200, "train.max_inflight": 0, "train.max_inflight_cap": 6}))
    f = r.feeder
    assert f["window_auto"] and f["window_rtt"] > 0 and f["window_step"] > 0
    assert f["window"] == auto_window(f["window_rtt"], f["window_step"], 6)
    assert r.feeder["completed"] == 200 and np.isfinite(r.series["loss"]).all()


def test_max_inflight_auto_on_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "asyncdni.cli", "train", "--max-inflight", "auto", "--steps", "60",
                          "--width", "32", "--no-progress"], cwd=tmp_path, env=env_with_repo(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "in-flight window" in out.stdout and "auto: round trip" in out.stdout


# ------------------------------------------------------------------ the run spec
def _wire_spec(**changes):
    from asyncdni.engine.spec import NodeAddress, RunSpec
    cfg = config.build(None, {"train.steps": 5})
    train, _ = load_datasets(cfg)
    plan = make_plan(cfg, train)
    nodes = tuple(NodeAddress("feeder" if j == 0 else "layer", "127.0.0.1", 0, 0) for j in range(plan.n_layers + 1))
    wire = RunSpec(config=cfg, nodes=nodes, specs=plan.specs, steps=plan.steps, max_message=1 << 20).to_wire()
    wire.update(changes)
    return wire, plan


def test_run_spec_round_trips_through_msgpack():
    import msgpack

    from asyncdni.engine.spec import RunSpec
    wire, plan = _wire_spec()
    back = RunSpec.from_wire(msgpack.unpackb(msgpack.packb(wire)), "layer", 2)
    assert back.specs == plan.specs and back.steps == plan.steps and back.resume is None and back.curve_keys is None
    assert back.to_wire() == wire


@pytest.mark.parametrize("change, message", [
    ({"steps": "5"}, "'steps' missing or not a int"),
    ({"steps": 0}, "steps and max_message must be positive"),
    ({"resume": {"dir": "x", "step": -1}}, "malformed resume entry"),
    ({"curve": {"keys": ["short"]}}, "malformed CURVE key list"),
    ({"nodes": []}, "nodes do not match the layers"),
])
def test_run_spec_refuses_malformed_maps(change, message):
    from asyncdni.engine.spec import RunSpec, SpecError
    wire, _ = _wire_spec(**change)
    with pytest.raises(SpecError, match=message):
        RunSpec.from_wire(wire, "layer", 0)


def test_run_spec_refuses_unknown_layer_fields_and_bad_ports():
    from asyncdni.engine.spec import RunSpec, SpecError
    wire, _ = _wire_spec()
    wire["specs"][1]["evil"] = 1
    with pytest.raises(SpecError, match=r"layer 1 has unknown fields \['evil'\]"):
        RunSpec.from_wire(wire, "layer", 0)
    wire, _ = _wire_spec()
    wire["nodes"][0]["fwd_port"] = 70000
    with pytest.raises(SpecError, match="port out of range"):
        RunSpec.from_wire(wire, "feeder", 0)
    with pytest.raises(SpecError, match="no layer 9"):
        RunSpec.from_wire(_wire_spec()[0], "layer", 9)
