"""Figures that know the machine was busy (issue 20): the load sampler, the bench's busy
marks, and verdicts withheld between rows taken under different load."""
import math
import os
import subprocess
import sys
import time

import psutil
import pytest

from asyncdni import config
from asyncdni.bench import compare as bench
from asyncdni.bench import load
from tests.conftest import pids_gone

# burns CPU until killed; gives up by itself after 90 s so that a crashed test leaves nothing for long
BURN = "import time\nend = time.monotonic() + 90\nwhile time.monotonic() < end:\n    pass\n"
# starts one burner in a session of its own and exits: the burner is then no descendant of the test
DETACH = ("import subprocess, sys\n"
          "p = subprocess.Popen([sys.executable, '-c', sys.argv[1]], start_new_session=True,\n"
          "                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
          "print(p.pid)\n")


def _burners_needed() -> int:
    """Enough burners for other work to take well over BUSY_SHARE of this process's CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, math.ceil(3 * load.BUSY_SHARE * cpus))


class Neighbours:
    """CPU-burning processes that are not this process's descendants (other work on the
    machine, as far as the sampler can tell); killed and checked gone on exit."""

    def __init__(self, n: int):
        self.n, self.pids = n, []

    def __enter__(self):
        try:
            for _ in range(self.n):
                out = subprocess.run([sys.executable, "-c", DETACH, BURN], capture_output=True, text=True, timeout=30,
                                     check=True)
                self.pids.append(int(out.stdout.strip()))
            mine = {p.pid for p in psutil.Process().children(recursive=True)}
            assert not mine & set(self.pids), "the neighbour is a descendant of the test"
        except BaseException:
            self.__exit__()
            raise
        return self

    def cpu_s(self) -> float:
        total = 0.0
        for pid in self.pids:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        return total

    def __exit__(self, *exc):
        for pid in self.pids:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        assert pids_gone(self.pids, timeout=10) == [], f"neighbours left running: {self.pids}"


# ------------------------------------------------------------------ the sampler
@pytest.mark.timeout(60)
def test_a_neighbour_counts_as_other_work(no_leftover_processes):
    with Neighbours(_burners_needed()) as nb:
        time.sleep(0.2)
        with load.LoadSampler() as ld:
            n0 = nb.cpu_s()
            time.sleep(1.5)
            n1 = nb.cpu_s()
        s = ld.result
    ran = n1 - n0
    assert ran > 0.3, f"the neighbours hardly ran ({ran:.2f} CPU s in 1.5 s)"
    # everything the neighbours used inside the window is other work (clock ticks: 1/100 s)
    assert s["other_cpu_s"] >= 0.95 * ran - 0.05, (s, ran)
    assert s["other_share"] >= ran / (s["wall_s"] * s["cpus"]) - 0.03
    assert s["other_share"] > load.BUSY_SHARE and load.is_busy(s)
    assert "busy: other work took" in load.busy_note(s)
    assert 1.5 <= s["wall_s"] < 5 and s["cpus"] >= 1 and s["load1_start"] is not None
    assert s["busy_cpu_s"] >= s["other_cpu_s"] + s["own_cpu_s"] - 0.05


@pytest.mark.timeout(60)
def test_our_own_descendants_are_not_other_work(no_leftover_processes):
    """A child that burns a second and exits (reaped) inside the window counts as ours: its
    CPU time is in own_cpu_s, and other_cpu_s is what the machine was busy with beside it."""
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0:\n    pass\nprint(time.process_time())"
    with load.LoadSampler() as ld:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    child = float(out.stdout)
    s = ld.result
    assert s["own_cpu_s"] >= 0.95 * child - 0.05, (s, child)
    # /proc/stat counts clock ticks, so busy can read a tick below own: other is clamped at 0
    assert s["other_cpu_s"] == pytest.approx(max(0.0, s["busy_cpu_s"] - s["own_cpu_s"]), abs=1e-9)


def test_sampler_copes_with_vanished_processes():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert load.tree_cpu_s(gone.pid) == 0.0
    with pytest.raises(RuntimeError):
        load.LoadSampler().stop()
    assert load.combine([]) is None and load.combine([None]) is None
    a = {"other_share": 0.02, "other_cpu_s": 0.1, "wall_s": 2.0, "cpus": 2, "load1_start": 0.5, "load1_end": 1.5}
    b = dict(a, other_share=0.34, load1_end=2.5)
    c = load.combine([a, b])
    assert c["other_share"] == 0.34 and c["other_share_min"] == 0.02 and c["busy"] and c["samples"] == 2
    assert c["load1_max"] == 2.5 and c["wall_s"] == 4.0


def test_verdict_rules():
    quiet, quiet2, busy = {"other_share": 0.02}, {"other_share": 0.08}, {"other_share": 0.34}
    assert load.not_a_verdict(quiet, quiet2) == ""
    assert load.not_a_verdict(quiet, busy) == "not a verdict: taken under different load, other work 2% vs 34%"
    assert "the machine was busy" in load.not_a_verdict(busy, dict(busy, other_share=0.30))
    assert load.not_a_verdict(None, busy) == ""               # an old report without loads
    assert load.busy_note(quiet) == "" and load.busy_note(busy) == "busy: other work took 34% of the CPU"
    assert not load.is_busy({"other_share": load.BUSY_SHARE})  # more than the threshold is busy


# ------------------------------------------------------------------ the bench's printout
def _row(sps, share=None, per_layer=()):
    r = {"samples_per_s": sps, "train_time_s": 1000 / sps, "loss_last": 0.5, "test_metric": 0.9,
         "test_metric2": 0.0, "time_to_target_s": 1000 / sps, "steps_to_target": 50, "per_layer": list(per_layer),
         "blas_threads": 1, "repeats": 2}
    if share is not None:
        r["load"] = {"other_share": share, "samples": 2}
    return r


def _result(shares: dict, speed_seq: float = 0.9):
    runs = {"sequential": _row(1000, shares.get("sequential")), "async": _row(1000 * speed_seq, shares.get("async")),
            bench.BASELINE_ALL: _row(500, shares.get(bench.BASELINE_ALL))}
    a = runs["async"]["samples_per_s"]
    return {"runs": runs, "task": "classification", "layers": 4, "widths": [8, 16, 16, 16, 9], "batch_size": 64,
            "steps": 100, "samples": 6400, "machine": {"cores": 2}, "eval_every": 25, "repeats": 2,
            "target_accuracy": 0.9, "target_auto": False, "flops_per_sample": {s: 1e6 for s in runs},
            "work_bound_samples_per_s": {}, "async_bound": 1.0, "layer_balance": 1.0,
            "async_speedup": {s: a / r["samples_per_s"] for s, r in runs.items() if s != "async"},
            "vs_inprocess_backprop": {bench.BASELINE_ALL: {
                s: {"samples_per_s": r["samples_per_s"] / 500, "time_to_target": 1.0}
                for s, r in runs.items() if s != bench.BASELINE_ALL}}}


def _line(text, start, has):
    return next(x for x in text.splitlines() if x.startswith(start) and has in x)


def test_quiet_rows_give_verdicts():
    text = bench.format_bench(_result({"sequential": 0.02, "async": 0.03, bench.BASELINE_ALL: 0.01}))
    assert "busy:" not in text and "not a verdict" not in text
    assert "async BEATS inprocess-backprop-all" in text
    assert "efficiency 90%" in text and "median of 2 runs" in text


def test_busy_row_is_marked_and_gives_no_verdict():
    text = bench.format_bench(_result({"sequential": 0.02, "async": 0.02, bench.BASELINE_ALL: 0.34}))
    row = _line(text, f"  {bench.BASELINE_ALL} ", "%")
    assert row.endswith("busy: other work took 34% of the CPU")
    assert "busy:" not in _line(text, "  async ", "%")
    v = _line(text, "  async ", bench.BASELINE_ALL + ":")
    assert "BEATS" not in v and "LOSES TO" not in v
    assert v.endswith("(not a verdict: taken under different load, other work 2% vs 34%)")
    assert "not a verdict" in _line(text, "  speedup async / " + bench.BASELINE_ALL, "x")
    assert "not a verdict" not in _line(text, "  speedup async / sequential", "x")
    assert "no verdict is drawn from it" in text


def test_impossible_efficiency_is_flagged_not_printed():
    """The printout of issue 20: async 4.49x sequential on a bound of 1.00 (the sequential
    row was slowed by other work)."""
    text = bench.format_bench(_result({"sequential": 0.45, "async": 0.02, bench.BASELINE_ALL: 0.02}, speed_seq=4.49))
    line = _line(text, "  speedup async / sequential", "x")
    assert "efficiency impossible: the machine's load changed between rows" in line
    assert "efficiency 449%" not in text and "not a verdict" in line
    # even with no loads recorded (an old report), more than the bound is not printed as a figure
    old = _result({}, speed_seq=4.49)
    assert "efficiency impossible" in bench.format_bench(old)
    assert "async BEATS" in bench.format_bench(old)              # no load known: the verdict as before


def test_repeats_aggregate_to_medians_and_keep_every_load():
    reps = [dict(_row(s), load_sample={"other_share": sh, "other_cpu_s": 0.0, "wall_s": 1.0, "cpus": 2,
                                       "load1_start": 1.0, "load1_end": 1.0}) for s, sh in ((300, 0.01), (100, 0.3))]
    reps[1]["time_to_target_s"] = None
    row, k = bench.aggregate_repeats(reps)
    assert row["samples_per_s"] == 200 and row["samples_per_s_range"] == [100, 300] and k == 1
    assert row["time_to_target_s"] is None            # median of [3.33, never]: never
    assert row["repeats"] == 2 and [r["load"]["other_share"] for r in row["repeat_runs"]] == [0.01, 0.3]
    assert row["load"]["other_share"] == 0.3 and "load_sample" not in row
    one, _ = bench.aggregate_repeats(reps[:1])
    assert one["samples_per_s"] == 300 and "samples_per_s_range" not in one
    for bad in (0, 101, "x", None):
        with pytest.raises(config.ConfigError, match="--repeats"):
            bench.parse_repeats(bad)


# ------------------------------------------------------------------ a real bench under a neighbour
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bench_under_a_neighbour_marks_its_rows(no_leftover_processes):
    cfg = config.build(overrides={"train.steps": 20, "model.width": 16, "data.train_size": 512,
                                  "data.test_size": 64, "runtime.progress": False})
    with Neighbours(_burners_needed()):
        res = bench.bench(cfg, ("async", "inprocess-backprop"), eval_every=0, repeats=2)
    runs = res["runs"]
    for s, r in runs.items():
        assert r["repeats"] == 2 and len(r["repeat_runs"]) == 2
        assert all(x["load"]["other_share"] > load.BUSY_SHARE for x in r["repeat_runs"]), (s, r["repeat_runs"])
        assert r["load"]["busy"] and r["load"]["samples"] == 2
        sps = sorted(x["samples_per_s"] for x in r["repeat_runs"])
        assert r["samples_per_s"] == pytest.approx(sum(sps) / 2)
    assert set(res["busy_rows"]) == set(runs) and res["repeats"] == 2
    text = bench.format_bench(res)
    for s in runs:
        assert "busy: other work took" in _line(text, f"  {s} ", "%")
    v = _line(text, "  async ", "inprocess-backprop:")
    assert "not a verdict" in v and "BEATS" not in v and "LOSES TO" not in v


# ------------------------------------------------------------------ the lab bench
def test_lab_rows_record_load_and_busy_cells_are_marked():
    from asyncdni.bench import lab as LB

    def rep(sps, share):
        return {"samples_per_s": sps, "train_time_s": 1.0, "test_metric": 0.9, "time_to_target_s": 1000 / sps,
                "steps_to_target": 50, "window": 3, "window_auto": False, "target_accuracy": 0.9,
                "per_layer": [], "relay": {"chunks": 0}, "sg_lag_counts": None,
                "load_sample": {"other_share": share, "other_cpu_s": 0.0, "wall_s": 1.0, "cpus": 2,
                                "load1_start": 1.0, "load1_end": 1.0}}
    runs = {"async": LB.aggregate("async", "async", None, [rep(900, 0.02), rep(1000, 0.03)]),
            "backprop": LB.aggregate("backprop", "backprop", None, [rep(500, 0.01), rep(450, 0.34)])}
    assert runs["backprop"]["load"]["other_share"] == 0.34 and "load_sample" not in runs["backprop"]
    assert [r["load"]["other_share"] for r in runs["async"]["runs"]] == [0.02, 0.03]
    res = {"layers": 2, "widths": [4, 3], "batch_size": 8, "steps": 10, "samples": 80, "feeder_host": "shared",
           "target_accuracy": 0.9, "repeats": 2, "windows": [], "max_inflight": "auto",
           "schedules": ["async", "backprop"], "skipped": {},
           "links": [{"link": "unshaped/0ms", "rate": "unshaped", "rate_bits": None, "delay_ms": 0.0, "runs": runs}],
           "wall_s": 1.0}
    text = LB.format_lab_bench(res)
    assert _line(text, "    backprop ", "%").endswith("busy: other work took 34% of the CPU")
    assert "busy:" not in _line(text, "    async ", "%")
    ratio = _line(text, "    unshaped/0ms ", "backprop ")
    assert "(not a verdict: taken under different load, other work 3% vs 34%)" in ratio
    assert "not a verdict" in _line(text, "    unshaped/0ms ", " in ")
    assert {r["schedule"]: r["other_share"] for r in LB.csv_rows(res) if r.get("layer") == ""} == \
        {"async": 0.03, "backprop": 0.34}
    quiet = dict(res, links=[dict(res["links"][0], runs={"async": runs["async"]})])
    assert "busy" not in LB.format_lab_bench(quiet) and "not a verdict" not in LB.format_lab_bench(quiet)


def test_sweep_row_says_busy_instead_of_loses():
    row = {"layers": 2, "width": 256, "batch": 32, "sequential_sps": 100.0, "async_sps": 150.0, "backprop_sps": 120.0,
           "inprocess_backprop_all_sps": 300.0, "speedup_vs_sequential": 1.5, "speedup_vs_backprop": 1.25,
           "speedup_vs_inprocess_backprop_all": 0.5, "bound": 2.0, "peak_rss_mb": 50.0, "other_share": 0.02}
    assert "(async LOSES)" in bench.format_sweep_row(row) and "busy" not in bench.format_sweep_row(row)
    busy = bench.format_sweep_row(dict(row, other_share=0.4))
    assert "(async LOSES)" not in busy and busy.endswith("busy: other work took up to 40% of the CPU")
