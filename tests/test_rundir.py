"""Runs that describe themselves: run directories (config.toml, report.json, evals.csv,
checkpoints), resuming from a run directory alone (what may change, what is refused and
named), the legacy digest of older checkpoints, ``asyncdni eval``, and the progress line and
summary that say what ran. Unit tests first (no processes); the integration tests at the end
start small real runs (width 32, a few hundred steps)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from asyncdni import cli
from asyncdni import config as C
from asyncdni import files, report
from asyncdni.engine import checkpoint as CK
from asyncdni.engine import coordinator
from asyncdni.engine import reference
from asyncdni.engine import rundir as R
from asyncdni.engine.plan import data_info, load_datasets, make_plan
from asyncdni.wire import protocol as P

SMALL = {"model.width": 32, "model.activation": "relu", "data.train_size": 2048, "data.test_size": 256,
         "runtime.progress": False}
# the same as flags, for the command line
SMALL_FLAGS = ["--width", "32", "--activation", "relu", "--set", "data.train_size=2048", "--set",
               "data.test_size=256", "--no-progress"]


def _one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------ config.toml
@pytest.mark.parametrize("ov", [
    {},                                                         # the addition preset, marked as such
    {"model.layers": 3, "model.widths": "24,16", "train.lr": 1e-5, "train.schedule": "backprop"},
    {"data.path": 'we"ird\\dir\n\té €/x.npz', "data.test_fraction": 0.1, "train.epochs": 2.5},
    {"runtime.ports": list(range(20000, 20011)), "runtime.hosts": "127.0.0.1," * 4 + "127.0.0.2",
     "train.max_inflight": 0, "train.sg_clip": 0.0, "train.target_accuracy": 0.95, "train.weight_decay": 1e-16},
])
def test_config_toml_round_trips(tmp_path, ov):
    cfg = C.build(overrides=ov)
    path = R.write_config(tmp_path, cfg)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# asyncdni ") and "[model]" in text and "[runtime]" in text
    back = C.build(str(path))                    # what --config reads
    assert back == cfg and back.preset == cfg.preset and back.digest() == cfg.digest()
    # every field of every section is written, not only those that differ from a default
    assert sum(1 for line in text.splitlines() if " = " in line and not line.startswith("#")) == \
        len(C.field_names()) + 1                 # + the preset line
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]   # no temporary file left


def test_config_toml_of_a_torch_model_and_a_flag_over_a_preset_field(tmp_path):
    cfg = C.build(overrides={"model.model": "cnn", "data.dataset": "idx", "data.path": "d"})
    assert cfg.preset == ("train.sg_lr",)
    path = R.write_config(tmp_path, cfg)
    assert C.build(str(path)).preset == ("train.sg_lr",)
    # a flag over a field the file's preset filled in: the value is the flag's, no longer the preset's
    again = C.build(str(path), {"train.sg_lr": "1e-3"})
    assert again.train.sg_lr == 1e-3 and again.preset == ()


def test_a_value_toml_cannot_hold_is_one_line():
    cfg = C.build(overrides={"data.path": "bad\udcffname.npz"})
    with pytest.raises(C.ConfigError, match="data.path: .* not UTF-8"):
        C.to_toml(cfg)


def test_build_defaults_fill_only_what_is_not_given(tmp_path):
    assert C.build(defaults={"runtime.checkpoint_dir": "x"}).runtime.checkpoint_dir == "x"
    assert C.build(overrides={"runtime.checkpoint_dir": "y"},
                   defaults={"runtime.checkpoint_dir": "x"}).runtime.checkpoint_dir == "y"
    f = tmp_path / "c.toml"
    f.write_text('[runtime]\ncheckpoint_dir = "z"\n')
    assert C.build(str(f), defaults={"runtime.checkpoint_dir": "x"}).runtime.checkpoint_dir == "z"
    assert C.build(defaults={"runtime.checkpoint_dir": "x"}).preset == C.build().preset   # not a preset


# ------------------------------------------------------------------ what a resume may change
def test_resume_changes_allowed_ones_are_recorded():
    old = C.build(overrides={"train.schedule": "backprop", "train.steps": 100})
    new = C.build(overrides={"train.schedule": "async", "train.steps": 300, "train.lr": 5e-4,
                             "train.lr_schedule": "cosine", "train.eval_every": 50, "runtime.max_restarts": 0})
    ch = C.resume_changes(old, new, "--resume runs/x", step=100)
    assert {c["field"]: (c["old"], c["new"]) for c in ch} == {
        "train.schedule": ("backprop", "async"), "train.steps": (100, 300), "train.lr": (1e-3, 5e-4),
        "train.lr_schedule": ("constant", "cosine"), "train.eval_every": (0, 50)}
    assert all(c["step"] == 100 for c in ch)
    assert C.resume_changes(old, old, "--resume runs/x") == []
    assert set(C.RESUME_MAY_CHANGE) <= {"train." + k for k in C.RUN_ONLY_TRAIN_FIELDS}


@pytest.mark.parametrize("ov, field, keeps", [
    ({"model.width": 128}, "model.width is 256 in the run, 128 here", "its architecture"),
    ({"model.batch_norm": True}, "model.batch_norm is False in the run, True here", "its architecture"),
    ({"data.bits": 4}, "data.bits is 8 in the run, 4 here", "its data"),
    ({"train.optimizer": "sgd"}, "train.optimizer is adam in the run, sgd here", "its optimizer"),
    ({"train.sg_model": "mlp"}, "train.sg_model is linear in the run, mlp here", "its synthetic-gradient models"),
    ({"train.sg_lr": 3e-4}, "train.sg_lr is 0.001 in the run, 0.0003 here", "its synthetic-gradient models"),
    ({"train.seed": 1}, "train.seed is 0 in the run, 1 here", "its seeds"),
    ({"train.batch_size": 32}, "train.batch_size is 64 in the run, 32 here", "its batch size"),
])
def test_resume_refuses_a_change_of_state_naming_the_field(ov, field, keeps):
    old = C.build()
    with pytest.raises(C.ConfigError) as e:
        C.resume_changes(old, C.build(overrides=ov), "--resume runs/x")
    msg = str(e.value)
    assert msg == f"--resume runs/x: {field}; a resumed run keeps {keeps}"


def test_resume_refuses_schedules_that_add_or_drop_state():
    base = C.build()
    with pytest.raises(C.ConfigError, match="train.schedule is async in the run, local here; the local"):
        C.resume_changes(base, C.replace(base, **{"train.schedule": "local"}), "--resume runs/x")
    loc = C.replace(base, **{"train.schedule": "local"})
    with pytest.raises(C.ConfigError, match="train.aux_features is 256 in the run, 64 here"):
        C.resume_changes(loc, C.replace(loc, **{"train.aux_features": 64}), "--resume runs/x")
    # torch stages: SG models only under DNI, and the LR scheduler's state is resumed
    t = C.build(overrides={"model.model": "mlp", "data.dataset": "idx", "data.path": "d",
                           "train.schedule": "backprop"})
    with pytest.raises(C.ConfigError, match="torch stages hold SG models only under the DNI schedules"):
        C.resume_changes(t, C.replace(t, **{"train.schedule": "async"}), "--resume runs/x")
    assert C.resume_changes(t, C.replace(t, **{"train.schedule": "pipeline", "train.lr": 1e-4}), "x")
    with pytest.raises(C.ConfigError, match="train.lr_schedule is constant in the run, cosine here; torch"):
        C.resume_changes(t, C.replace(t, **{"train.lr_schedule": "cosine"}), "--resume runs/x")
    cos = C.replace(t, **{"train.lr_schedule": "cosine"})
    with pytest.raises(C.ConfigError, match="train.lr is 0.0005 in the run, 0.0001 here; torch stages under an LR"):
        C.resume_changes(cos, C.replace(cos, **{"train.lr": 1e-4}), "--resume runs/x")


def test_a_foreign_checkpoint_is_explained_by_its_field():
    cfg = C.build()
    assert C.explain_mismatch(C.build(overrides={"model.width": 64}).to_dict(), cfg) == \
        "model.width is 64 in the checkpoint, 256 here"
    assert C.explain_mismatch(None, cfg) is None and C.explain_mismatch({"bogus": {}}, cfg) is None


# ------------------------------------------------------------------ a checkpoint made in-process
def _trained(ov, steps=20):
    cfg = C.build(overrides={**SMALL, **ov})
    train, test = load_datasets(cfg)
    plan = make_plan(cfg, train)
    res = reference.train_reference(plan, cfg.train.schedule, train, cfg.train.seed, steps=steps)
    return cfg, plan, res.nodes, test


def _commit(root, step, cfg, nodes, extra=None):
    d = CK.step_dir(root, step)
    entries = {CK.layer_file(i): CK.write_arrays(d / CK.layer_file(i), CK.node_state(n)) for i, n in enumerate(nodes)}
    CK.write_manifest(root, step, cfg.digest(), len(nodes), entries,
                      extra={"config": cfg.to_dict()} if extra is None else extra)
    return d


def test_eval_of_a_run_dir_a_checkpoint_dir_and_a_step_dir(tmp_path, capsys):
    cfg, plan, nodes, test = _trained({"train.schedule": "sequential", "model.batch_norm": True})
    run = tmp_path / "run"
    run.mkdir()
    R.write_config(run, cfg)
    step = _commit(run / R.CHECKPOINTS, 20, cfg, nodes)
    want = reference.evaluate(nodes, plan.loss, test, cfg.train.eval_batch, plan.in_shape)
    for target in (run, run / R.CHECKPOINTS, step):
        out = R.evaluate_checkpoint(str(target))
        assert out["step"] == 20 and out["checkpoint"] == str(step) and out["n"] == 256
        assert out["test_metric"] == want["metric"] and out["test_loss"] == want["loss"]
    assert cli.main(["eval", str(run), "--json", str(tmp_path / "e.json")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{step}: step 20, test loss ") and "test bit accuracy" in line
    assert json.loads((tmp_path / "e.json").read_text())["test_metric"] == pytest.approx(want["metric"])
    # the checkpoint alone, without a recorded configuration: --config gives it
    bare = tmp_path / "bare"
    _commit(bare, 20, cfg, nodes, extra={})
    with pytest.raises(CK.CheckpointError, match="records no configuration.*--config"):
        R.evaluate_checkpoint(str(bare))
    assert R.evaluate_checkpoint(str(bare), config_path=str(run / R.CONFIG))["test_metric"] == want["metric"]
    other = tmp_path / "other.toml"
    other.write_text(C.to_toml(C.replace(cfg, **{"model.width": 48})))
    with pytest.raises(CK.CheckpointError, match="different configuration than .*model.width is 32 in the "
                                                 "checkpoint, 48 here|different configuration than"):
        R.evaluate_checkpoint(str(bare), config_path=str(other))


def test_eval_on_garbage_is_one_line(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "nowhere")]) == 2
    _one_line_error(capsys, "no such directory")
    (tmp_path / "f").write_text("x")
    assert cli.main(["eval", str(tmp_path / "f")]) == 2
    _one_line_error(capsys, "not a directory")
    assert cli.main(["eval", str(tmp_path)]) == 1
    _one_line_error(capsys, "neither a run directory")
    # a damaged manifest, a run directory without checkpoints, a garbage config.toml
    cfg, plan, nodes, test = _trained({})
    step = _commit(tmp_path / "ck", 20, cfg, nodes)
    (step / CK.MANIFEST).write_text("{not json")
    assert cli.main(["eval", str(step)]) == 1
    _one_line_error(capsys, "manifest.json: not valid JSON")
    assert cli.main(["eval", str(tmp_path / "ck")]) == 1
    _one_line_error(capsys, "no usable checkpoint")
    run = tmp_path / "run"
    run.mkdir()
    R.write_config(run, cfg)
    assert cli.main(["eval", str(run)]) == 1
    _one_line_error(capsys, "holds no checkpoints")
    (run / R.CONFIG).write_text("[model\n")
    assert cli.main(["eval", str(run)]) == 2
    _one_line_error(capsys, "invalid TOML")
    # wrong data: a file that is not there, and data of another shape than the checkpoint's
    good = _commit(tmp_path / "ck2", 20, cfg, nodes)
    assert cli.main(["eval", str(good), "--data-path", str(tmp_path / "missing.npz")]) == 2
    _one_line_error(capsys, "missing.npz")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "other.npz", x=rng.standard_normal((300, 5)).astype(np.float32), y=rng.integers(0, 3, 300))
    assert cli.main(["eval", str(good), "--data-path", str(tmp_path / "other.npz")]) == 1
    _one_line_error(capsys, "does not fit this model and data", "'W' has shape")


def test_torch_stage_resumes_a_changed_constant_learning_rate():
    """A torch stage's optimizer carries its learning rate in the checkpoint; a constant one
    is the spec's again on restore, so that --lr on resume takes effect."""
    pytest.importorskip("torch")
    from asyncdni.nodes import make_node
    from asyncdni.numerics.layer import LayerSpec
    base = dict(index=0, n_layers=2, fan_in=6, fan_out=8, activation="relu", init="he", loss="softmax_ce",
                task="classification", n_out=3, optimizer="adam", lr=1e-2, sg_model="linear", sg_hidden=0,
                sg_lr=1e-2, cond=False, microbatches=1, seed=3, backend="torch", model="mlp", split="2",
                sample_shape=(6,), schedule="sequential")
    a = make_node(LayerSpec(**base))
    st = a.state_arrays()
    same = make_node(LayerSpec(**base))
    same.load_state_arrays(st)
    assert same.opt.param_groups[0]["lr"] == 1e-2
    changed = make_node(LayerSpec(**{**base, "lr": 5e-4}))
    changed.load_state_arrays(st)
    assert changed.opt.param_groups[0]["lr"] == 5e-4


# ------------------------------------------------------------------ run directories
def test_claiming_a_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, made = R.claim(None, "async")
    b, _ = R.claim(None, "async")
    assert made and a.parent == Path("runs") and a.name.endswith("-async") and a.is_dir()
    assert b != a and b.is_dir()                 # the same second: a suffix, never a shared directory
    (a / "x").write_text("")
    with pytest.raises(C.ConfigError, match=f"--run-dir {a}: already exists and is not empty; choose a new"):
        R.claim(a, "async")
    R.write_config(b, C.build())
    with pytest.raises(C.ConfigError, match=f"continue that run with --resume {b}"):
        R.claim(b, "async")
    assert R.claim(b, "async", resume_dir=b) == (b, False)     # the run being resumed
    assert R.claim(None, "async", resume_dir=b) == (b, False)
    (tmp_path / "empty").mkdir()
    assert R.claim(Path("empty"), "async") == (Path("empty"), False)


def test_a_failed_fresh_run_leaves_nothing_but_a_resumable_one_stays(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def failing(commit):
        def fake_run(cfg, **kw):
            kw["on_started"](None)               # config.toml is written once the workers are up
            if commit:
                _, plan, nodes, _ = _trained({}, steps=2)
                _commit(cfg.runtime.checkpoint_dir, 2, cfg, nodes)
            raise coordinator.RunError("layer 2 died")
        return fake_run

    monkeypatch.setattr(coordinator, "run", failing(False))
    assert cli.main(["train", *SMALL_FLAGS, "--run-dir", "a", "--checkpoint-every", "2"]) == 1
    _one_line_error(capsys, "run failed: layer 2 died")
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(coordinator, "run", failing(True))
    assert cli.main(["train", *SMALL_FLAGS, "--run-dir", "b", "--checkpoint-every", "2"]) == 1
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoints", "config.toml"]
    _one_line_error(capsys, "run failed: layer 2 died")
    # a mistake is refused before anything is made
    assert cli.main(["train", "--width", "0", "--run-dir", "c"]) == 2
    _one_line_error(capsys, "model.width: must be >= 1, got 0")
    assert not (tmp_path / "c").exists() and not (tmp_path / "runs").exists()
    assert cli.main(["train", "--run-dir", "b"]) == 2
    _one_line_error(capsys, "--run-dir b: already exists and is not empty; continue that run with --resume b")


def test_the_config_of_another_run_starts_a_new_run(tmp_path, monkeypatch):
    """--config runs/old/config.toml: old's values, but not its checkpoints nor its resume point."""
    monkeypatch.chdir(tmp_path)
    Path("old").mkdir()
    R.write_config(Path("old"), C.build(overrides={**SMALL, "runtime.checkpoint_every": 10, "train.lr": 0.02,
                                                   "runtime.checkpoint_dir": "old/checkpoints",
                                                   "runtime.resume": "old/checkpoints"}))
    seen = []

    def fake_run(cfg, **kw):
        seen.append(cfg)
        raise coordinator.RunError("stop here")

    monkeypatch.setattr(coordinator, "run", fake_run)
    assert cli.main(["train", "--config", "old/config.toml", "--run-dir", "new"]) == 1
    assert seen[-1].train.lr == 0.02 and seen[-1].runtime.resume == ""
    assert seen[-1].runtime.checkpoint_dir == str(Path("new") / "checkpoints")
    assert cli.main(["train", "--config", "old/config.toml", "--run-dir", "new", "--checkpoint-dir", "elsewhere"]) == 1
    assert seen[-1].runtime.checkpoint_dir == "elsewhere"
    assert not Path("new").exists()                  # neither run got as far as a checkpoint


def test_atomic_write_leaves_no_partial_file(tmp_path):
    p = tmp_path / "r.json"
    files.atomic_write(p, "one")
    files.atomic_write(p, b"two")
    assert p.read_text() == "two" and os.listdir(tmp_path) == ["r.json"]
    with pytest.raises(OSError):
        files.atomic_write(tmp_path / "no" / "r.json", "x")
    report.write_json(str(p), {"a": float("nan")})
    assert json.loads(p.read_text()) == {"a": None} and os.listdir(tmp_path) == ["r.json"]


def test_evals_csv_reads_back():
    evals = [{"step": 100, "train_time": 0.25, "loss": 1.5, "metric": 0.5, "metric2": 0.125, "n": 256},
             {"step": 200, "train_time": 0.5, "loss": float("nan"), "metric": 0.75, "metric2": 0.25, "n": 256}]
    rows = list(csv.DictReader(io.StringIO(report.evals_csv(evals))))
    assert list(rows[0]) == ["step", "train_time", "loss", "metric", "metric2", "n"]
    assert float(rows[0]["train_time"]) == 0.25 and rows[1]["loss"] == "" and int(rows[1]["step"]) == 200


# ------------------------------------------------------------------ what the summary and progress say
def test_progress_line_carries_the_latest_test_metric():
    out = io.StringIO()
    p = report.Progress("async", stream=out, task="classification")
    p({"done": 0, "total": 10, "loss": 2.0, "elapsed": 0.0})
    p({"done": 5, "total": 10, "loss": 1.0, "elapsed": 1.0, "test_metric": 0.9712, "test_metric2": 0.9712,
       "test_step": 5})
    lines = out.getvalue().splitlines()
    assert lines[0] == "async: 0/10 steps, loss 2.0000, 0 steps/s"
    assert lines[1] == "async: 5/10 steps, loss 1.0000, test accuracy 97.12%, 5 steps/s"
    reg = io.StringIO()
    q = report.Progress("async", stream=reg, task="regression")
    q({"done": 5, "total": 10, "loss": 1.0, "elapsed": 1.0, "test_metric": 0.3, "test_metric2": 0.875})
    assert "test R² 0.8750" in reg.getvalue()


def test_progress_message_schema_takes_the_test_fields_strictly():
    ok = {"done": 5, "total": 10, "loss": 0.5, "test_metric": 0.75, "test_metric2": -3.5, "test_step": 5}
    assert P.decode(P.encode(P.PROGRESS, -1, (), ok)).fields == ok
    for bad in ({"test_metric": -0.1}, {"test_metric2": 1.5}, {"test_step": -1}, {"test_metric": "high"},
                {"test_accuracy": 0.5}, {"test_metric": float("nan")}):
        with pytest.raises(P.ProtocolError):
            P.decode(P.encode(P.PROGRESS, -1, (), {"done": 5, "total": 10, **bad}))


def test_summary_names_data_split_seed_and_sg_only_where_used(tmp_path):
    cfg = C.build(overrides={"train.schedule": "backprop", "train.seed": 7})
    train, test = load_datasets(cfg)
    line = report.format_data({"data": data_info(cfg, train, test)})
    assert line == "data: addition of 8-bit numbers (built in): 16384 train / 2048 test drawn apart with data seed 0; seed 7"
    forced = report.in_force(cfg)
    assert not any(k.startswith(("train.sg_", "train.cond", "train.max_inflight")) for k in forced)
    assert {"train.sg_model", "train.sg_lr", "train.cond", "train.max_inflight"} <= set(report.in_force(C.build()))
    assert "train.microbatches" in report.in_force(C.replace(cfg, **{"train.schedule": "pipeline"}))
    assert "train.max_inflight" not in report.in_force(C.replace(cfg, **{"train.schedule": "sequential"}))
    # a torch model's SG preset is not listed under a schedule without SG models
    t = C.build(overrides={"model.model": "cnn", "data.dataset": "idx", "data.path": "d", "train.schedule": "backprop"})
    s = {"in_force": report.in_force(t), "preset": report.preset_values(t), "uses_sg": report.uses_sg(t)}
    assert "sg_lr" not in report.format_settings(s)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((100, 3)).astype(np.float32), y=rng.integers(0, 2, 100))
    c2 = C.build(overrides={"data.path": str(tmp_path / "d.npz"), "data.test_fraction": 0.25, "data.seed": 3})
    line = report.format_data({"data": data_info(c2, *load_datasets(c2))})
    assert line == (f"data: npz {tmp_path / 'd.npz'}, classification: 75 train / 25 test with test fraction 0.25 "
                    "held out by data seed 3; seed 0")
    np.savez(tmp_path / "s.npz", x_train=rng.standard_normal((80, 3)).astype(np.float32),
             y_train=rng.integers(0, 2, 80), x_test=rng.standard_normal((20, 3)).astype(np.float32),
             y_test=rng.integers(0, 2, 20))
    c3 = C.build(overrides={"data.path": str(tmp_path / "s.npz")})
    assert "80 train / 20 test from separate test files" in report.format_data({"data": data_info(c3, *load_datasets(c3))})
    assert report.format_changes([{"field": "train.lr", "old": 1e-3, "new": 5e-4, "step": 100},
                                  {"field": "train.schedule", "old": "backprop", "new": "async", "step": 100}]) == \
        ["changed on resume at step 100: lr 0.001 -> 0.0005, schedule backprop -> async"]


# ------------------------------------------------------------------ real runs


def _train(monkeypatch, *argv) -> coordinator.RunResult:
    """``asyncdni train ARGV`` in this process (the workers are processes); its RunResult."""
    got = []
    real = coordinator.run

    def spy(cfg, **kw):
        got.append(real(cfg, **kw))
        return got[-1]

    monkeypatch.setattr(coordinator, "run", spy)
    code = cli.main(["train", *argv])
    monkeypatch.setattr(coordinator, "run", real)
    assert code == 0
    return got[-1]


def _same_params(a, b):
    for x, y in zip(a.params, b.params):
        assert x.keys() == y.keys()
        for k in x:
            assert np.array_equal(x[k], y[k]), k


def _legacy(root: Path, cfg: C.RunConfig) -> None:
    """Make the checkpoints under root look as older versions wrote them: the digest with
    train.lr in it, no configuration recorded."""
    for m in root.glob("step-*/manifest.json"):
        d = json.loads(m.read_text())
        d["config_digest"] = cfg.digest(legacy=True)
        d["extra"] = {k: v for k, v in d["extra"].items() if k not in ("config", "changes")}
        m.write_text(json.dumps(d))


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("no_leftover_processes")
def test_resume_from_the_run_dir_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """sequential (deterministic): 200 steps with checkpoints, then --resume DIR to 300 ends
    with the weights of 300 steps in one go; so does the older form from legacy checkpoints."""
    monkeypatch.chdir(tmp_path)
    seq = [*SMALL_FLAGS, "--schedule", "sequential"]
    whole = _train(monkeypatch, *seq, "--steps", "300", "--run-dir", "whole")
    first = _train(monkeypatch, *seq, "--steps", "200", "--checkpoint-every", "100", "--run-dir", "split")
    assert first.checkpoints == [100, 200] and sorted(os.listdir("split")) == \
        ["checkpoints", "config.toml", "evals.csv", "plots", "report.json", "trace.json"]
    # the run shows itself: the workers' timelines (Chrome trace), and plots (matplotlib is a test dependency)
    trace = json.loads(Path("split/trace.json").read_text())
    named = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    assert {"feeder", "layer 1"} <= named and any(e.get("ph") == "X" for e in trace["traceEvents"])
    assert sorted(os.listdir("split/plots")) == ["loss_accuracy.png", "utilisation.png"]
    out = capsys.readouterr().out
    assert out.rstrip().endswith("run directory: split")
    assert "data: addition of 8-bit numbers (built in): 2048 train / 256 test drawn apart with data seed 0; seed 0" in out
    rest = _train(monkeypatch, "--resume", "split", "--steps", "300")        # the directory alone, and the new length
    assert rest.resumed_from == 200 and rest.config.train.schedule == "sequential"
    _same_params(whole, rest)
    assert np.allclose(whole.series["loss"], rest.series["loss"])
    rep = json.loads(Path("split/report.json").read_text())
    assert rep["summary"]["resumed_from_step"] == 200 and rep["config"]["train"]["steps"] == 300
    assert rep["summary"]["changes"] == [{"field": "train.steps", "old": 200, "new": 300, "step": 200}]
    assert C.build("split/config.toml") == rest.config       # continued in the same directory, config updated
    assert sorted(os.listdir("split/checkpoints")) == ["step-000000100", "step-000000200", "step-000000300"]
    # eval of the run directory: its newest checkpoint, the report's final test metric
    assert cli.main(["eval", "split", "--json", "e.json"]) == 0
    ev = json.loads(Path("e.json").read_text())
    assert ev["step"] == 300 and ev["test_metric"] == pytest.approx(rep["summary"]["test_metric"], abs=1e-12)
    assert ev["test_loss"] == pytest.approx(rep["summary"]["test_loss"], rel=1e-9)
    # the older form: a checkpoint directory with every flag given again, from checkpoints
    # written before the learning rate left the digest
    legacy = tmp_path / "legacy"
    _train(monkeypatch, *seq, "--steps", "200", "--checkpoint-every", "100", "--checkpoint-dir", str(legacy))
    _legacy(legacy, whole.config)
    # a legacy digest holds the learning rate: another one is another configuration there
    with pytest.raises(CK.CheckpointError, match="different configuration"):
        coordinator.run(C.build(overrides={**SMALL, "train.schedule": "sequential", "train.steps": 300,
                                           "train.lr": 5e-4, "runtime.resume": str(legacy)}))
    old = _train(monkeypatch, *seq, "--steps", "300", "--checkpoint-every", "100", "--resume", str(legacy))
    assert old.resumed_from == 200 and old.changes == []
    _same_params(whole, old)
    assert (legacy / "step-000000300").is_dir()      # the older form keeps checkpointing in place


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("no_leftover_processes")
def test_lr_and_schedule_change_on_resume_take_effect_and_are_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seq = [*SMALL_FLAGS, "--schedule", "sequential"]
    _train(monkeypatch, *seq, "--steps", "100", "--checkpoint-every", "100", "--run-dir", "lr")
    res = _train(monkeypatch, "--resume", "lr", "--steps", "200", "--lr", "5e-4")
    # the same in one process: 100 steps at the preset's 1e-3, then 100 more at 5e-4
    cfg_a = C.build(overrides={**SMALL, "train.schedule": "sequential", "train.steps": 100})
    cfg_b = C.replace(cfg_a, **{"train.steps": 200, "train.lr": 5e-4})
    train, _ = load_datasets(cfg_a)
    a = reference.train_reference(make_plan(cfg_a, train), "sequential", train, 0)
    plan_b = make_plan(cfg_b, train)
    from asyncdni.nodes import make_node
    nodes = [make_node(s) for s in plan_b.specs]
    for n, m in zip(nodes, a.nodes):
        CK.restore_node(n, CK.node_state(m))
    b = reference.train_reference(plan_b, "sequential", train, 0, start=100, nodes=nodes)
    for p, n in zip(res.params, b.nodes):
        for k, v in n.params().items():
            assert np.array_equal(p[k], v), k
    rep = json.loads(Path("lr/report.json").read_text())["summary"]
    assert {"field": "train.lr", "old": 1e-3, "new": 5e-4, "step": 100} in rep["changes"]
    out = capsys.readouterr()
    assert "changed on resume at step 100: steps 100 -> 200, lr 0.001 -> 0.0005" in out.out
    assert "asyncdni: changed on resume: train.lr 0.001 -> 0.0005" in out.err
    # backprop warm-up, then DNI: the schedule changes, the history of changes is kept
    _train(monkeypatch, *SMALL_FLAGS, "--schedule", "backprop", "--steps", "100", "--checkpoint-every", "50",
           "--run-dir", "warm")
    assert "sg_model" not in capsys.readouterr().out.split("settings:")[1].splitlines()[0]   # no SG under backprop
    monkeypatch.setenv("COLUMNS", "100")
    res = _train(monkeypatch, "--resume", "warm", "--schedule", "async", "--steps", "200", "--eval-every", "50",
                 "--set", "runtime.progress=true")
    assert res.config.train.schedule == "async" and all(L["updates"] == 200 for L in res.layers)
    assert math.isfinite(res.final_eval["metric"])
    err = capsys.readouterr().err
    assert "async: " in err and "test bit accuracy" in err        # the progress line: the latest evaluation
    res2 = _train(monkeypatch, "--resume", "warm", "--steps", "250", "--lr", "2e-3")
    rep = json.loads(Path("warm/report.json").read_text())["summary"]
    assert [(c["field"], c["step"]) for c in rep["changes"]] == [
        ("train.schedule", 100), ("train.steps", 100), ("train.eval_every", 100),
        ("train.steps", 200), ("train.lr", 200)]
    assert res2.resumed_from == 200 and [e["step"] for e in rep["evals"]] == [100, 150, 200, 250]
    with open("warm/evals.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [e["step"] for e in rep["evals"]]


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_leftover_processes")
def test_refused_changes_on_resume_name_their_field(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _train(monkeypatch, *SMALL_FLAGS, "--steps", "20", "--checkpoint-every", "20", "--run-dir", "x")
    capsys.readouterr()
    for flags, needle in ((["--width", "64"], "--resume x: model.width is 32 in the run, 64 here; a resumed run "
                                              "keeps its architecture"),
                          (["--optimizer", "sgd"], "train.optimizer is adam in the run, sgd here"),
                          (["--sg-model", "mlp"], "train.sg_model is linear in the run, mlp here"),
                          (["--seed", "3"], "train.seed is 0 in the run, 3 here; a resumed run keeps its seeds"),
                          (["--bits", "4"], "data.bits is 8 in the run, 4 here; a resumed run keeps its data"),
                          (["--schedule", "local"], "train.schedule is async in the run, local here"),
                          (["--config", "x/config.toml"], "--config: --resume x continues a run directory")):
        assert cli.main(["train", "--resume", "x", "--steps", "40", *flags]) == 2, flags
        _one_line_error(capsys, needle)
    assert sorted(os.listdir("x/checkpoints")) == ["step-000000020"]      # nothing was started
    assert cli.main(["train", "--resume", "x", "--data-path", "gone.npz"]) == 2   # refused before it is read
    _one_line_error(capsys, "data.dataset is addition in the run, npz here; a resumed run keeps its data")
    # a branch: continue x in a new run directory, x left as it was
    res = _train(monkeypatch, "--resume", "x", "--run-dir", "y", "--steps", "40", "--lr", "2e-3")
    assert res.resumed_from == 20 and res.changes[-1] == {"field": "train.lr", "old": 1e-3, "new": 2e-3, "step": 20}
    assert sorted(os.listdir("y")) == ["checkpoints", "config.toml", "evals.csv", "plots", "report.json", "trace.json"]
    assert sorted(os.listdir("y/checkpoints")) == ["step-000000040"]
    assert sorted(os.listdir("x/checkpoints")) == ["step-000000020"] and C.build("x/config.toml").train.lr == 1e-3
    capsys.readouterr()
    os.rename("x/checkpoints", "x/moved")
    assert cli.main(["train", "--resume", "x", "--steps", "40"]) == 1
    _one_line_error(capsys, "--resume x: the run has no checkpoints to continue from")


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("no_leftover_processes")
def test_a_bench_writes_its_own_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", *SMALL_FLAGS, "--steps", "40", "--schedules", "sequential,async", "--repeats", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    (made,) = os.listdir("runs")
    assert made.endswith("-bench") and out.rstrip().endswith(f"run directory: runs/{made}")
    d = Path("runs") / made
    assert sorted(os.listdir(d)) == ["bench.csv", "bench.json", "config.toml", "plots", "trace.json"]
    rep = json.loads((d / "bench.json").read_text())
    assert {"sequential", "async"} <= set(rep["bench"]["runs"])
    assert C.build(str(d / "config.toml")).model.width == 32
    # a bench directory is not a run to resume: the refusal says to choose another
    assert cli.main([*argv, "--run-dir", str(d)]) == 2
    err = capsys.readouterr().err
    assert "already exists and is not empty; choose a new or empty directory" in err and "--resume" not in err


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_leftover_processes")
def test_tensorboard_log_holds_the_runs_curves(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.chdir(tmp_path)
    res = _train(monkeypatch, *SMALL_FLAGS, "--steps", "60", "--eval-every", "20", "--run-dir", "tb", "--tensorboard")
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "test/loss", "test/bit_accuracy", "test/exact-sum_accuracy"} <= tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 61))
    assert [e.value for e in loss] == pytest.approx([float(v) for v in res.series["loss"]], rel=1e-6)
    rep = json.loads((tmp_path / "tb" / "report.json").read_text())
    bits = acc.Scalars("test/bit_accuracy")
    assert [e.step for e in bits] == [20, 40, 60] and bits[-1].value == pytest.approx(rep["summary"]["test_metric"])


def test_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report, "tensorboard_available", lambda: False)
    assert cli.main(["train", *SMALL_FLAGS, "--steps", "5", "--tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--tensorboard needs the tensorboard package" in err
    assert not (tmp_path / "runs").exists()                     # refused before anything was made
