"""The torch.distributed.pipelining row (asyncdni/bench/pipelining.py): GPipe and 1F1B runs of
the 4-stage MLP, and every failure path ends in one line with no process or file left."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

torch = pytest.importorskip("torch")

from asyncdni.bench import pipelining as P  # noqa: E402
from tests.conftest import raises_one_line  # noqa: E402

HERE = "tests.test_bench_pipelining"
SHAPE, N_OUT = (784,), 10


class Broken(torch.nn.Module):
    """A stage that builds but cannot run a forward pass with autograd on."""

    def forward(self, x):
        if torch.is_grad_enabled():
            raise ValueError("stage 2 is broken on purpose")
        return x


def broken_stages(sample_shape, n_out):
    """Ranks 0-3 start; rank 2 fails while it sets up its stage, the others wait on it."""
    s = P.mlp_stages(sample_shape, n_out)
    s[2] = Broken()
    return s


def sleepy_stages(sample_shape, n_out):
    """Counted at once in the bench process (meta device); sleeps in every child."""
    if torch.empty(0).device.type != "meta":
        time.sleep(600)
    return P.mlp_stages(sample_shape, n_out)


def _children() -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process().children(recursive=True)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


def _no_pipelining_dirs(tmp) -> list[str]:
    return [p.name for p in tmp.iterdir() if p.name.startswith("asyncdni-pipelining-")]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The run's temporary directory goes under tmp_path, so that a test can see it is removed."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_available_here():
    assert P.available() is None


def test_mlp_stages_shapes():
    torch.manual_seed(0)
    stages = P.mlp_stages(SHAPE, N_OUT)
    assert len(stages) == 4 and all(isinstance(m, torch.nn.Sequential) for m in stages)
    h = torch.zeros(3, 1, 28, 28)
    widths = []
    for m in stages:
        h = m(h)
        widths.append(h.shape[1])
    assert widths == [256, 256, 256, 10]
    torch.manual_seed(0)
    again = P.mlp_stages((1, 28, 28), N_OUT)
    assert all(torch.equal(a, b) for s, t in zip(stages, again)
               for a, b in zip(s.parameters(), t.parameters()))


def test_arguments_checked_before_any_process():
    with pytest.raises(ValueError, match="schedule"):
        P.run_pipelining(P.DEFAULT_FACTORY, SHAPE, N_OUT, 16, 2, "zb")
    with pytest.raises(ValueError, match="micro-batches"):
        P.run_pipelining(P.DEFAULT_FACTORY, SHAPE, N_OUT, 10, 2, "gpipe", microbatches=4)
    assert not _children()


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_run_mlp(schedule, private_tmp, no_leftover_processes):
    logs = []
    r = P.run_pipelining(P.DEFAULT_FACTORY, SHAPE, N_OUT, batch=16, steps=6, schedule=schedule, warmup=2,
                         timeout=100, log=logs.append)
    assert r["name"] == f"torch-pipelining-{schedule}"
    assert r["samples_per_s"] > 0 and r["wall"] > 0
    assert math.isclose(r["samples_per_s"], 6 * 16 / r["wall"])
    assert (r["steps"], r["batch"], r["microbatches"], r["stages"]) == (6, 16, 4, 4)
    assert r["torch"] == torch.__version__
    # a fixed random batch of 16 over 10 classes: starts near ln 10 and goes down
    assert math.isfinite(r["final_loss"]) and 0 <= r["final_loss"] < 2.5
    assert logs and schedule in logs[0]
    assert not _no_pipelining_dirs(private_tmp)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_missing_factory_one_line_no_children(private_tmp):
    before = {p.pid for p in _children()}
    msg = raises_one_line(RuntimeError, P.run_pipelining, "nope:missing", SHAPE, N_OUT, 16, 2, "gpipe",
                          match_all=("nope:missing", "ModuleNotFoundError"))
    assert "nope" in msg
    assert not [p for p in _children() if p.pid not in before]
    assert not _no_pipelining_dirs(private_tmp)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_failing_stage_names_its_rank(private_tmp, no_leftover_processes):
    """Rank 2 fails; ranks 0, 1 and 3 block on it and are killed; the error names rank 2."""
    raises_one_line(RuntimeError, P.run_pipelining, f"{HERE}:broken_stages", SHAPE, N_OUT, 16, 2, "1f1b",
                    warmup=1, timeout=100, match_all=("rank 2 of 4", "stage 2 is broken on purpose"))
    assert not _no_pipelining_dirs(private_tmp)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_timeout_kills_every_child(private_tmp, no_leftover_processes):
    t0 = time.monotonic()
    raises_one_line(RuntimeError, P.run_pipelining, f"{HERE}:sleepy_stages", SHAPE, N_OUT, 16, 2, "gpipe",
                    timeout=5, match_all=("timed out after 5 s", "rank 0 of 4"))
    assert time.monotonic() - t0 < 5 + P.TERM_GRACE_S + 20
    assert not _no_pipelining_dirs(private_tmp)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_keyboard_interrupt_leaves_nothing(tmp_path):
    """Ctrl-C in the bench process while the children run: every child and the temp dir go."""
    code = ("import sys\n"
            "from asyncdni.bench import pipelining as P\n"
            "try:\n"
            f"    P.run_pipelining('{HERE}:sleepy_stages', (784,), 10, 16, 2, 'gpipe', timeout=100)\n"
            "except KeyboardInterrupt:\n"
            "    sys.exit(42)\n")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL)
    try:
        bench = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        kids = []
        while time.monotonic() < deadline and len(kids) < 4:
            kids = bench.children()
            time.sleep(0.1)
        assert len(kids) == 4, "the bench process did not start its 4 children"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 42
        gone, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive, f"children left: {[p.pid for p in alive]}"
        assert not _no_pipelining_dirs(tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
