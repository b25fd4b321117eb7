"""Stragglers: runtime.slow / --slow (a layer, or every layer on a host, computes FACTOR times
slower) and bench --straggler (every schedule with and without one)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from asyncdni import cli
from asyncdni import config as C
from asyncdni import report
from asyncdni.engine import coordinator, reference
from asyncdni.engine.plan import load_datasets, make_plan
from asyncdni.engine.worker import LayerWorker, T_BWD, T_EVAL, T_FWD
from asyncdni.engine.trace import TRACE_LIMIT
from tests.conftest import assert_equals_reference, env_with_repo, raises_one_line
from tests.test_lab import needs_lab  # noqa: F401  (the fixture: root and ip netns, else a skip)

SMALL = {"train.steps": 40, "model.width": 32, "data.train_size": 2048, "data.test_size": 256,
         "runtime.progress": False}


def small(**ov):
    return C.build(overrides={**SMALL, **ov})


# ------------------------------------------------------------------ configuration
def test_slow_is_parsed_from_a_list_and_resolved_per_layer():
    cfg = small(**{"runtime.slow": "2:2, 3:1.5"})
    assert cfg.runtime.slow == ("2:2", "3:1.5")
    assert C.slow_factors(cfg, 4) == [1.0, 2.0, 1.5, 1.0]
    assert C.slow_factors(small(), 4) == [1.0] * 4
    # no runtime.hosts: every layer is on runtime.host, so naming it slows them all
    assert C.slow_factors(small(**{"runtime.slow": "127.0.0.1:3"}), 4) == [3.0] * 4
    # TOML lists and the written configuration read back the same
    assert C.from_dict(cfg.to_dict()) == cfg
    assert C.build(overrides={**SMALL, "runtime.slow": ["2:2", "3:1.5"]}) == cfg


def test_a_host_target_slows_every_layer_on_that_host_and_factors_multiply():
    hosts = "127.0.0.1,127.0.0.1,127.0.0.2,127.0.0.2,127.0.0.3"        # the feeder, then layers 1-4
    cfg = small(**{"runtime.hosts": hosts, "runtime.slow": "127.0.0.2:2,3:1.5"})
    assert C.slow_factors(cfg, 4) == [1.0, 2.0, 3.0, 1.0]               # layer 3: on the host and named
    # agents: K names, the feeder shares layer 1's host
    ag = small(**{"runtime.launcher": "agents", "runtime.listen": "127.0.0.1:5555",
                  "runtime.hosts": "a,b,b,c", "runtime.slow": "b:4"})
    assert C.slow_factors(ag, 4) == [1.0, 4.0, 4.0, 1.0]
    assert C.slow_factors(small(**{"runtime.launcher": "agents", "runtime.listen": "127.0.0.1:5555",
                                   "runtime.hosts": "a,b,b,c", "runtime.slow": "a:2"}), 4) == [2.0, 1.0, 1.0, 1.0]


def test_the_worker_resolves_its_factor_from_the_spec_as_it_travels():
    """The run spec carries the configuration; what a worker rebuilds from the wire gives
    every layer the same factor as the coordinator's configuration."""
    from asyncdni.engine.spec import RunSpec
    cfg = small(**{"runtime.hosts": "127.0.0.1,127.0.0.1,127.0.0.2,127.0.0.1,127.0.0.1",
                   "runtime.slow": "127.0.0.2:2.5,4:2"})
    train, _ = load_datasets(cfg)
    plan = make_plan(cfg, train)
    spec = RunSpec(config=cfg, nodes=(), specs=plan.specs, steps=plan.steps, max_message=1 << 20)
    wire = spec.to_wire()
    wire["nodes"] = [{"role": "feeder" if i == 0 else "layer", "host": h}
                     for i, h in enumerate(cfg.runtime.hosts)]
    got = RunSpec.from_wire(wire, "layer", 1)
    assert C.slow_factors(got.config, got.n_layers) == [1.0, 2.5, 1.0, 2.0]


@pytest.mark.parametrize("entry, needle", [
    ("5:2", "there is no layer 5; layers are numbered from 1 to 4"),
    ("0:2", "there is no layer 0"),
    ("-1:2", "there is no layer -1"),
    ("2:0.5", "the factor must be >= 1"),
    ("2:0", "the factor must be >= 1"),
    ("2:nan", "the factor is NaN"),
    ("2:inf", "must be finite"),
    ("2:fast", "the factor 'fast' is not a number"),
    ("2", "is not TARGET:FACTOR"),
    ("2:", "is not TARGET:FACTOR"),
    (":2", "is not TARGET:FACTOR"),
    ("elsewhere:2", "'elsewhere' is neither a layer number nor one of the run's hosts (127.0.0.1)"),
    ("2:2,2:3", "layer 2 is slowed twice"),
])
def test_bad_entries_are_one_line_naming_the_entry(entry, needle):
    bad = entry.split(",")[-1]
    raises_one_line(C.ConfigError, small, **{"runtime.slow": entry}, match_all=("runtime.slow", repr(bad), needle))


def test_a_host_that_runs_only_the_feeder_is_refused():
    raises_one_line(C.ConfigError, small, **{"runtime.hosts": "127.0.0.9,127.0.0.1,127.0.0.1,127.0.0.1,127.0.0.1",
                                             "runtime.slow": "127.0.0.9:2"},
                    match_all=("'127.0.0.9:2'", "runs no layer (only the feeder)"))


def test_stage_counts_known_later_are_checked_then():
    """Torch models whose stages come from the model: the layer number is checked once the
    plan knows K (config.with_stages), still in one line."""
    cfg = C.RunConfig()
    assert C.parse_slow(("7:2",), cfg, None) == [(7, 2.0)]             # K not known yet
    raises_one_line(C.ConfigError, C.parse_slow, ("7:2",), cfg, 3, match_all=("'7:2'", "numbered from 1 to 3"))


def test_slow_is_not_in_the_digest_and_is_shown_only_when_set():
    plain, slowed = small(), small(**{"runtime.slow": "2:3"})
    assert plain.digest() == slowed.digest()                 # checkpoints of either resume under the other
    assert "runtime.slow" not in report.in_force(plain)
    assert report.in_force(slowed)["runtime.slow"] == ["2:3"]
    assert "slow=2:3" in report.format_settings({"in_force": report.in_force(slowed)})


# ------------------------------------------------------------------ the worker's wait
def _bare_worker(factor: float, hb_interval: float = 0.5) -> LayerWorker:
    w = LayerWorker.__new__(LayerWorker)
    w.slow, w.slow_owed, w.slow_s, w.busy, w.hb_interval = factor, 0.0, 0.0, 0.0, hb_interval
    w.trace_t, w.trace_d, w.trace_c = (np.zeros(TRACE_LIMIT), np.zeros(TRACE_LIMIT), np.zeros(TRACE_LIMIT, np.uint8))
    w.n_trace = 0
    return w


def _spin(d):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < d:
        pass


def test_a_slowed_compute_waits_factor_minus_one_times_it_counted_busy_and_traced():
    w = _bare_worker(3.0)
    w._timed(T_FWD, _spin, 0.02)
    assert 0.05 <= w.busy < 0.2 and w.slow_s == pytest.approx(0.04, abs=0.02)
    assert w.n_trace == 1 and w.trace_d[0] == pytest.approx(w.busy)   # one compute slice, the wait in it
    busy = w.busy
    w._timed(T_EVAL, _spin, 0.02)                    # evaluations are off the clock: not slowed
    assert w.busy == busy and w.trace_d[1] < 0.04
    # many computes shorter than a sleep's resolution: the owed time is paid across them
    w = _bare_worker(2.0)
    for _ in range(400):
        w._timed(T_BWD, _spin, 0.0001)
    assert w.slow_s == pytest.approx(0.04, rel=0.35)


def test_a_long_wait_keeps_heartbeating():
    w = _bare_worker(3.0, hb_interval=0.1)
    calls = []
    w.handle_ctrl = lambda: calls.append("ctrl")
    w.heartbeat = lambda now: calls.append("hb")
    assert w.slow_down(0.1) == pytest.approx(0.2, abs=0.05)
    assert calls.count("hb") >= 3 and calls.count("ctrl") == calls.count("hb")


# ------------------------------------------------------------------ the command line
@pytest.mark.parametrize("argv, needle", [
    (["train", "--slow", "9:2"], "'9:2': there is no layer 9"),
    (["train", "--slow", "2:0.5,3:2"], "'2:0.5': the factor must be >= 1"),
    (["train", "--slow", "2:nan"], "'2:nan': the factor is NaN"),
    (["train", "--slow", "h9:2"], "'h9:2': 'h9' is neither a layer number nor one of the run's hosts"),
    (["bench", "--straggler", "9:2"], "--straggler: '9:2': there is no layer 9"),
    (["bench", "--straggler", "2:0.9"], "--straggler: '2:0.9': the factor must be >= 1"),
    (["bench", "--straggler", "2:2", "--slow", "2:3"], "layer 2 is slowed twice"),
    (["bench", "--straggler", "2:2", "--sweep"], "--straggler does not go with --sweep"),
    (["bench", "--straggler", "2:2", "--transport"], "--straggler does not go with --transport"),
])
def test_cli_refuses_in_one_line_without_a_traceback(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*argv, "--steps", "5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []          # no run directory left behind


def test_flags_reach_the_configuration():
    p = cli.make_parser()
    args = p.parse_args(["train", "--slow", "2:2,3:1.5"])
    assert C.build(overrides=cli.overrides_from_args(args)).runtime.slow == ("2:2", "3:1.5")
    args = p.parse_args(["bench", "--slow", "1:2", "--straggler", "3:4"])
    assert cli.overrides_from_args(args)["runtime.slow"] == "1:2" and args.straggler == "3:4"


def test_summary_names_the_slowed_layers():
    per_layer = [{"layer": 1, "slow": 1.0}, {"layer": 2, "slow": 3.0}]
    assert report.slowed_layers(per_layer) == {"2": 3.0}
    line = report.format_slow({"stragglers": {"2": 3.0}})
    assert "layer 2 x3" in line and "communication" in line
    assert report.format_slow({"stragglers": {}}) is None


# ------------------------------------------------------------------ real runs
@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule, ref_schedule", [("sequential", "dni"), ("backprop", "backprop")])
def test_a_slowed_lock_step_run_ends_with_the_reference_weights(no_leftover_processes, schedule, ref_schedule):
    cfg = small(**{"train.schedule": schedule, "train.seed": 2, "runtime.slow": "2:3"})
    result = coordinator.run(cfg)
    train, test = load_datasets(cfg)
    ref = reference.train_reference(make_plan(cfg, train), ref_schedule, train, cfg.train.seed, test=test,
                                    eval_batch=cfg.train.eval_batch)
    assert_equals_reference(result, ref, (schedule,))
    assert [s["slow"] for s in result.layers] == [1.0, 3.0, 1.0, 1.0]
    summ = report.run_summary(result)
    assert summ["stragglers"] == {"2": 3.0} and summ["in_force"]["runtime.slow"] == ["2:3"]
    assert "stragglers (--slow): layer 2 x3" in report.format_summary(summ)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_slowed_layer_is_busier_than_the_others_relative_to_an_unslowed_run(no_leftover_processes):
    """Behaviour, not a timing target: with layer 2 at a third of its speed, its busy time
    against the other layers' grows well beyond what it is in the same run unslowed."""
    ov = {"train.schedule": "sequential", "train.steps": 60, "model.width": 64}

    def share(r):
        busy = [s["busy"] for s in r.layers]
        return busy[1] / np.mean([busy[0], busy[2], busy[3]])
    plain = coordinator.run(small(**ov))
    slowed = coordinator.run(small(**ov, **{"runtime.slow": "2:3"}))
    assert share(slowed) > 1.6 * share(plain), (share(plain), share(slowed))
    s2 = slowed.layers[1]
    assert 1.5 < s2["slow_s"] / (s2["busy"] - s2["slow_s"]) < 2.5        # (factor - 1) x its own compute
    assert all(s["slow_s"] == 0.0 for i, s in enumerate(slowed.layers) if i != 1)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_bench_straggler_smoke_writes_ratios_to_json_and_csv(tmp_path, no_leftover_processes):
    out = tmp_path / "b"
    proc = subprocess.run([sys.executable, "-m", "asyncdni.cli", "bench", "--schedules", "sequential,inprocess-backprop",
                           "--straggler", "2:2", "--repeats", "1", "--steps", "30", "--width", "16",
                           "--set", "data.train_size=1024", "--set", "data.test_size=128", "--target-accuracy", "0.3",
                           "--run-dir", str(out)],
                          cwd=tmp_path, env=env_with_repo(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr
    assert "straggler 2:2 (layer 2 x2" in proc.stdout and "inprocess-backprop: one process, no worker to slow" \
        in proc.stdout
    st = json.loads((out / "bench.json").read_text())["bench"]["straggler"]
    assert st["entries"] == ["2:2"] and st["layers"] == {"2": 2.0} and list(st["runs"]) == ["sequential"]
    q = st["ratios"]["sequential"]
    assert q["samples_per_s"] > 0 and q["time_to_target"] > 0
    assert [L["slow"] for L in st["runs"]["sequential"]["per_layer"]] == [1.0, 2.0, 1.0, 1.0]
    rows = list(csv.DictReader((out / "bench.csv").open()))
    slowed = [r for r in rows if r["straggler"] == "2:2" and r["layer"] == ""]
    assert [r["schedule"] for r in slowed] == ["sequential"]
    assert float(slowed[0]["slowdown_samples_per_s"]) > 0 and float(slowed[0]["slowdown_time_to_target"]) > 0
    assert float(slowed[0]["samples_per_s"]) > 0
    assert {r["schedule"] for r in rows if r["straggler"] == "" and r["layer"] == ""} == \
        {"sequential", "inprocess-backprop"}
    # the slowed runs are in the trace file, beside the others
    names = {e["args"]["name"] for e in json.loads((out / "trace.json").read_text())["traceEvents"]
             if e["name"] == "process_name"}
    assert names == {"sequential", "sequential + straggler 2:2"}


# ------------------------------------------------------------------ bench --lab --straggler
def test_lab_straggler_targets_are_layers_or_the_labs_hosts():
    from asyncdni.bench import lab as LB
    cfg = small(**{"model.layers": 3})
    assert LB.host_names(3) == ["h0", "h1", "h2"] and LB.host_names(3, "own") == ["h0", "h1", "h2", "h3"]
    assert LB.parse_straggler("h1:2", cfg) == ("h1:2",) and LB.parse_straggler("3:2", cfg, "own") == ("3:2",)
    assert LB.straggler_info(cfg, ("h1:2",))["layers"] == {"2": 2.0}          # shared feeder: layer i on h(i-1)
    assert LB.straggler_info(cfg, ("h1:2",), "own")["layers"] == {"1": 2.0}   # own feeder on h0: layer i on h(i)
    raises_one_line(C.ConfigError, LB.parse_straggler, "h7:2", cfg, match_all=("--straggler", "'h7:2'", "h0, h1, h2"))
    raises_one_line(C.ConfigError, LB.parse_straggler, "h0:2", cfg, "own", match_all=("'h0:2'", "only the feeder"))
    raises_one_line(C.ConfigError, LB.parse_straggler, "4:2", cfg, match_all=("'4:2'", "numbered from 1 to 3"))


def test_lab_straggler_table_and_csv():
    from asyncdni.bench import compare
    from asyncdni.bench import lab as LB

    def cell(label, sps, ttt):
        return LB.aggregate(label, label, None, [{"samples_per_s": sps, "train_time_s": 1.0, "test_metric": 0.9,
                                                  "time_to_target_s": ttt, "steps_to_target": 10, "window": 3,
                                                  "per_layer": [{"layer": 1, "slow": 1.0}, {"layer": 2, "slow": 1.0}],
                                                  "relay": {"chunks": 0}}])
    runs = {"async": cell("async", 1000.0, 2.0), "backprop": cell("backprop", 500.0, None)}
    slowed = {"async": cell("async", 600.0, 3.0), "backprop": cell("backprop", 250.0, None)}
    for r in slowed.values():
        r["per_layer"][1]["slow"] = 2.0
    row = {"link": "unshaped/0ms", "rate": "unshaped", "rate_bits": None, "delay_ms": 0.0, "runs": runs,
           "straggler_runs": slowed, "straggler_ratios": compare.straggler_ratios(runs, slowed)}
    res = {"layers": 2, "widths": [4, 3], "batch_size": 8, "steps": 10, "samples": 80, "feeder_host": "shared",
           "target_accuracy": 0.9, "repeats": 1, "windows": [], "max_inflight": 3, "schedules": ["async", "backprop"],
           "skipped": {}, "links": [row], "wall_s": 1.0,
           "straggler": {"entries": ["2:2"], "label": "2:2", "layers": {"2": 2.0}}}
    text = LB.format_lab_bench(res)
    assert "straggler 2:2 (layer 2 x2)" in text and "with the straggler" in text
    line = next(x for x in text.splitlines() if "0.60x" in x)
    assert "async" in line and "1000" in line and "600" in line and "1.50x" in line
    rows = LB.csv_rows(res)
    top = [r for r in rows if r["layer"] == "" and r["straggler"] == "2:2"]
    assert [r["schedule"] for r in top] == ["async", "backprop"]
    assert top[0]["slowdown_samples_per_s"] == pytest.approx(0.6) and top[0]["slowdown_time_to_target"] == 1.5
    assert top[1]["slowdown_samples_per_s"] == pytest.approx(0.5) and top[1]["slowdown_time_to_target"] is None
    assert [r["slow"] for r in rows if r["straggler"] == "2:2" and r["layer"] != ""] == [1.0, 2.0, 1.0, 2.0]
    assert all(r["straggler"] == "" for r in rows[:6])        # the runs without it first, as before


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("needs_lab")
def test_bench_lab_straggler_runs_each_schedule_with_and_without(tmp_path, no_leftover_processes, capsys):
    from tests.test_lab import _bench_lab
    res, printed = _bench_lab(tmp_path, capsys, "s", 213, "--links", "unshaped:1", "--schedules", "sequential",
                              "--layers", "2", "--width", "16", "--steps", "30", "--straggler", "h1:3",
                              "--target-accuracy", "0.3", "--csv", str(tmp_path / "lab.csv"))
    assert res["straggler"] == {"entries": ["h1:3"], "label": "h1:3", "layers": {"2": 3.0}}
    row = res["links"][0]
    assert [L["slow"] for L in row["straggler_runs"]["sequential"]["per_layer"]] == [1.0, 3.0]
    assert [L["slow"] for L in row["runs"]["sequential"]["per_layer"]] == [1.0, 1.0]
    q = row["straggler_ratios"]["sequential"]
    assert q["samples_per_s"] > 0 and q["time_to_target"] > 0
    assert "with the straggler" in printed.out
    rows = list(csv.DictReader((tmp_path / "lab.csv").open()))
    assert [float(r["slowdown_samples_per_s"]) > 0 for r in rows if r["straggler"] == "h1:3" and r["layer"] == ""] \
        == [True]
