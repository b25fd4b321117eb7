"""Torch stages through the real workers: every schedule runs; the lock-step schedules equal
the in-process torch reference of the same order; checkpoints resume exactly; a bad model
is one line; nothing is left behind. Tiny models and data keep this to seconds a run (each
worker imports torch, about a second)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from asyncdni import config  # noqa: E402
from asyncdni import schedules as S  # noqa: E402
from asyncdni.engine import coordinator, reference  # noqa: E402
from asyncdni.engine.plan import load_datasets, make_plan  # noqa: E402
from tests.conftest import env_with_repo  # noqa: E402

MODEL = '''
from torch import nn


def build(sample_shape, n_out):
    c = sample_shape[0]
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 2 * 2, n_out))
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("torch-engine")
    (d / "tiny.py").write_text(MODEL)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    x = rng.normal(0, 1, (600, 1, 8, 8)).astype(np.float32)
    x[np.arange(600), 0, y, y] += 3.0               # a learnable signal: a bright pixel per class
    np.savez(d / "images.npz", x=x, y=y)
    return d


def cfg_of(files, **ov):
    base = {"model.model": f"{files / 'tiny.py'}:build", "model.split": "4,7", "data.path": str(files / "images.npz"),
            "data.dataset": "npz", "train.steps": 24, "train.batch_size": 16, "train.eval_batch": 200,
            "train.microbatches": 2, "train.lr": 3e-3, "train.sg_lr": 3e-3, "runtime.progress": False}
    return config.build(overrides={**base, **ov})


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.parametrize("schedule,ref,extra", [
    ("sequential", "dni", {}), ("backprop", "backprop", {}), ("pipeline", "pipeline", {}),
    # propagated SG targets: each stage's forward recomputed for the target it passes down
    ("sequential", "dni", {"train.sg_target": "propagate"}),
    ("delayed_fixed", "delayed_fixed", {}), ("local", "local", {}),
    # codecs on feature maps (C, H, W): a scale per row, top-k over a row's C*H*W values;
    # --sg-every 2: the stage above sends every other step's gradient only
    ("sequential", "dni", {"train.wire_fwd": "int8", "train.wire_bwd": "topk:0.25", "train.sg_every": 2,
                           "train.sg_target": "bootstrap"}),
    ("pipeline", "pipeline", {"train.wire_fwd": "bf16", "train.wire_bwd": "int8"}),
])
def test_lockstep_schedules_equal_the_in_process_torch_reference(files, schedule, ref, extra):
    cfg = cfg_of(files, **{"train.schedule": schedule, "train.seed": 2, **extra})
    result = coordinator.run(cfg)
    train, test = load_datasets(cfg)
    plan = make_plan(cfg, train)
    assert plan.n_layers == 3 and plan.in_shape == (1, 8, 8) and plan.specs[1].in_shape == (4, 4, 4)
    want = reference.train_reference(plan, ref, train, cfg.train.seed, test=test, eval_batch=cfg.train.eval_batch)
    # one thread per process and deterministic algorithms: the same float operations in the
    # same order, so the weights are bitwise equal
    for i, node in enumerate(want.nodes):
        for name, w in node.params().items():
            assert np.array_equal(result.params[i][name], w), (schedule, i, name)
    assert np.array_equal(np.asarray(want.losses), result.series["loss"])
    assert result.final_eval["metric"] == want.evals[-1]["metric"]
    init = reference.train_reference(plan, ref, train, cfg.train.seed, steps=0)
    moved = [n for n in init.nodes[0].params() if not np.array_equal(init.nodes[0].params()[n], result.params[0][n])]
    assert moved, "the first stage's weights never moved"


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.parametrize("schedule", ["async", "delayed"])
def test_free_running_schedules_train(files, schedule):
    r = coordinator.run(cfg_of(files, **{"train.schedule": schedule, "train.steps": 120}))
    assert r.feeder["samples"] == 120 * 16
    assert r.final_eval["metric"] > 0.6          # three classes: chance is 1/3
    assert all(s["updates"] == 120 for s in r.layers)


def test_every_schedule_is_covered():
    covered = {"sequential", "backprop", "pipeline", "delayed_fixed", "local", "async", "delayed"}
    assert covered == set(S.NAMES)


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("no_leftover_processes")
def test_checkpoint_resume_equals_an_uninterrupted_run(files, tmp_path):
    ck = tmp_path / "ck"
    full = coordinator.run(cfg_of(files, **{"train.schedule": "sequential", "train.steps": 20}))
    coordinator.run(cfg_of(files, **{"train.schedule": "sequential", "train.steps": 10,
                                     "runtime.checkpoint_every": 10, "runtime.checkpoint_dir": str(ck)}))
    resumed = coordinator.run(cfg_of(files, **{"train.schedule": "sequential", "train.steps": 20,
                                               "runtime.resume": str(ck)}))
    assert resumed.resumed_from == 10
    for a, b in zip(full.params, resumed.params):
        for name in a:
            assert np.array_equal(a[name], b[name]), name


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_broken_builder_is_one_line(files, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('no GPU here')\n")
    out = subprocess.run([sys.executable, "-m", "asyncdni.cli", "train", "--model", f"{bad}:build",
                          "--data-path", str(files / "images.npz"), "--steps", "5"],
                         cwd=tmp_path, env=env_with_repo(), capture_output=True, text=True, timeout=50)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "bad.py" in lines[0] and "no GPU here" in lines[0]
