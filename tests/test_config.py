"""Tests for asyncdni.config (TOML loading, overrides, validation) and model.make_plan."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from tests.conftest import raises_one_line
from asyncdni import config as C
from asyncdni.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    RuntimeConfig,
    TrainConfig,
    build,
    field_names,
    replace,
    validate,
)
from asyncdni.numerics.data import Dataset, binary_addition_split
from asyncdni.engine.plan import make_plan, microbatch_bounds
from asyncdni.numerics.nn import ACTIVATIONS, INITS
from asyncdni.numerics.optim import OPTIMIZERS
from asyncdni.numerics.synthetic import SG_MODELS


def _raises(fn, *args, match_all=(), **kwargs) -> str:
    """Call fn, expect ConfigError, check its message is one line and names every item."""
    return raises_one_line(ConfigError, fn, *args, match_all=match_all, **kwargs)


def _write(tmp_path, text: str, name: str = "run.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.fixture(scope="module")
def addition():
    return binary_addition_split(8, 512, 64, 0)


# --------------------------------------------------------------------------- defaults, digest


def test_defaults_build_and_validate():
    cfg = build(preset=False)
    assert cfg == RunConfig()
    assert validate(RunConfig()) == RunConfig()
    assert cfg.model == ModelConfig() and cfg.data == DataConfig()
    assert cfg.train == TrainConfig() and cfg.runtime == RuntimeConfig()
    assert cfg.model.hidden_widths() == (128, 128, 128)
    assert build(None, {}, preset=False) == cfg


def test_field_names_cover_all_sections():
    names = field_names()
    assert "model.layers" in names and "train.lr" in names and "runtime.ports" in names
    assert {n.split(".")[0] for n in names} == {"model", "data", "train", "runtime"}
    assert len(names) == len(set(names))


def test_digest_stable_and_hex():
    a, b = build().digest(), RunConfig(model=ModelConfig(width=256, activation="tanh"),
                                       train=TrainConfig(lr=1e-3)).digest()
    assert a == b              # the digest is of the values in force (here the addition preset's)
    assert len(a) == 16 and int(a, 16) >= 0
    assert build().digest() == a  # deterministic across calls


@pytest.mark.parametrize("override", [
    {"runtime.progress": False},
    {"runtime.blas_threads": 4},
    {"runtime.heartbeat_interval": 2.0},
    {"runtime.host": "10.0.0.1"},
    {"runtime.ports": list(range(20000, 20011))},
    # how long and in which order training runs does not change what a checkpoint holds
    {"train.schedule": "backprop"},
    {"train.steps": 5},
    {"train.epochs": 2.0},
    {"train.max_inflight": 5},
    # nor the learning rate and its schedule: a resumed run may change them
    {"train.lr": 0.01},
    {"train.lr_schedule": "cosine"},
])
def test_digest_ignores_runtime(override):
    assert build(None, override).digest() == build().digest()


def test_legacy_digest_keeps_the_learning_rate_of_older_checkpoints():
    """Checkpoints written while train.lr was in the digest carry the legacy digest: it
    still names this configuration (digests()), and still tells learning rates apart."""
    then = {"train.sg_target": "bootstrap", "train.sg_clip": 1.0}       # the defaults of that time
    cfg, other = build(None, then), build(None, {**then, "train.lr": 0.01})
    assert cfg.digests() == (cfg.digest(), cfg.digest(legacy=True))
    assert cfg.digest(legacy=True) != cfg.digest()
    assert other.digest(legacy=True) != cfg.digest(legacy=True)
    # the legacy digest is the one of before, pinned: computed by the code of that time
    assert cfg.digest(legacy=True) == "8814ff7d9b2c15ec"
    assert other.digest(legacy=True) == "00d0ebbfdaf4d396"
    assert build(None, {**then, "model.width": 32, "train.schedule": "sequential"}).digest(legacy=True) == "f9b8a11b27122f53"
    # today's default, sg_target and sg_clip "auto", chooses those values for this network:
    # the digest is of the values in effect, so those checkpoints still resume
    assert build().digest() == cfg.digest()
    assert build(None, {"model.layers": 6}).digest() != build(None, {**then, "model.layers": 6}).digest()


@pytest.mark.parametrize("override", [
    {"train.sg_lr": 0.01},
    {"train.optimizer": "sgd"},
    {"train.seed": 1},
    {"model.width": 32},
    {"model.activation": "sigmoid"},
    {"model.widths": [32, 16, 8]},
    {"data.bits": 4},
])
def test_digest_changes_with_model_train_data(override):
    assert build(None, override).digest() != build().digest()


# --------------------------------------------------------------------------- presets


def test_addition_preset_fills_what_the_user_did_not_set():
    cfg = build()
    assert (cfg.model.width, cfg.model.activation, cfg.train.lr) == (256, "tanh", 1e-3)
    assert set(cfg.preset) == set(C.PRESETS["addition"])
    assert cfg.train.sg_lr == TrainConfig().sg_lr                # not part of the preset


@pytest.mark.parametrize("override,field", [
    # set explicitly to the *global default*: the user's value still wins over the preset
    ({"model.activation": "relu"}, "model.activation"),
    ({"model.width": 128}, "model.width"),
    ({"train.lr": "5e-4"}, "train.lr"),
])
def test_explicit_value_beats_preset_even_at_the_global_default(override, field, tmp_path):
    for cfg in (build(None, override),
                build(_write(tmp_path, "[{}]\n{} = {!r}\n".format(*field.split("."), list(override.values())[0]))),
                build(_write(tmp_path, "[model]\nlayers = 4\n"), override)):
        section, key = field.split(".")
        assert str(getattr(getattr(cfg, section), key)) == str(_coerce_like(field, list(override.values())[0]))
        assert field not in cfg.preset
        assert set(C.PRESETS["addition"]) - {field} <= set(cfg.preset)


def _coerce_like(field, v):
    section, key = field.split(".")
    return type(getattr(getattr(RunConfig(), section), key))(v)


def test_explicit_steps_keep_preset_epochs_out():
    cfg = build(None, {"train.steps": 100})
    assert cfg.train.steps == 100 and "train.epochs" not in cfg.preset and "train.lr" in cfg.preset
    assert build().train.epochs == C.PRESETS["addition"]["train.epochs"]


def test_explicit_widths_keep_preset_width_out():
    cfg = build(None, {"model.layers": 3, "model.widths": "32,16"})
    assert cfg.model.hidden_widths() == (32, 16) and "model.width" not in cfg.preset


def test_idx_has_no_preset(tmp_path):
    cfg = build(None, {"data.dataset": "idx", "data.path": str(tmp_path)})
    assert cfg.preset == () and cfg == build(None, {"data.dataset": "idx", "data.path": str(tmp_path)}, preset=False)
    assert cfg.model.activation == "relu" and cfg.train.lr == 5e-4
    cfg = build(_write(tmp_path, '[data]\ndataset = "idx"\npath = "x"\n'))
    assert cfg.preset == () and cfg.model.width == 128


def test_preset_provenance_survives_dict_round_trip_and_is_not_in_the_digest():
    cfg = build()
    again = C.from_dict(cfg.to_dict())
    assert again == cfg and again.preset == cfg.preset
    explicit = build(None, {"model.width": 256, "model.activation": "tanh", "train.lr": 1e-3, "train.epochs": 6.0})
    assert explicit.preset == () and explicit.digest() == cfg.digest()
    _raises(C.from_dict, {"preset": "model.width"}, match_all=("preset",))


def test_batch_norm_field_leaves_older_digests_alone():
    assert build(None, {"model.batch_norm": False}).digest() == build().digest()
    assert build(None, {"model.batch_norm": "true"}).digest() != build().digest()
    _raises(build, None, {"model.batch_norm": "maybe"}, match_all=("model.batch_norm",))


def test_new_sg_layers_field_leaves_older_digests_alone():
    assert build(None, {"train.sg_layers": 1}).digest() == build().digest()
    assert build(None, {"train.sg_layers": 2}).digest() != build().digest()
    _raises(build, None, {"train.sg_layers": 0}, match_all=("train.sg_layers",))


def test_sg_rank_and_sg_every_leave_older_digests_alone_and_are_checked():
    assert build(None, {"train.sg_rank": 64, "train.sg_every": 1}).digest() == build().digest()
    assert build(None, {"train.sg_every": 2}).digest() != build().digest()
    assert build(None, {"train.sg_model": "lowrank", "train.sg_rank": 16}).train.sg_rank == 16
    for name in ("train.sg_rank", "train.sg_every"):
        _raises(build, None, {name: 0}, match_all=(name,))


# --------------------------------------------------------------------------- TOML loading


FULL_TOML = """
[model]
layers = 3
widths = [32, 16]
activation = "tanh"
init = "xavier"

[data]
dataset = "addition"
bits = 6
train_size = 1000
test_size = 100
seed = 7

[train]
schedule = "pipeline"
epochs = 2.5
batch_size = 32
optimizer = "sgd"
lr = 0.05
microbatches = 4
cond = true
target_accuracy = 0.9

[runtime]
host = "127.0.0.2"
hosts = ["a", "b", "c", "d"]
ports = [30000, 30001, 30002, 30003, 30004, 30005, 30006, 30007, 30008]
heartbeat_interval = 1
progress = false
"""


def test_toml_all_sections(tmp_path):
    cfg = build(_write(tmp_path, FULL_TOML))
    assert cfg.model == ModelConfig(layers=3, widths=(32, 16), activation="tanh", init="xavier")
    assert cfg.model.hidden_widths() == (32, 16)
    assert cfg.data.bits == 6 and cfg.data.train_size == 1000 and cfg.data.seed == 7
    assert cfg.train.schedule == "pipeline" and cfg.train.epochs == 2.5
    assert cfg.train.optimizer == "sgd" and cfg.train.lr == 0.05 and cfg.train.cond is True
    assert cfg.runtime.hosts == ("a", "b", "c", "d")
    assert cfg.runtime.ports == tuple(range(30000, 30009))
    # int in TOML for a float field is coerced to float
    assert cfg.runtime.heartbeat_interval == 1.0 and isinstance(cfg.runtime.heartbeat_interval, float)
    assert cfg.runtime.progress is False
    # unspecified fields keep their defaults
    assert cfg.train.sg_model == "linear" and cfg.model.width == 128   # widths given: no preset width


def test_toml_empty_file_gives_defaults(tmp_path):
    assert build(_write(tmp_path, "")) == build()
    assert build(_write(tmp_path, ""), preset=False) == RunConfig()


def test_toml_unknown_section(tmp_path):
    path = _write(tmp_path, "[bogus]\nx = 1\n")
    _raises(build, path, match_all=("bogus", "model", "data", "train", "runtime"))


@pytest.mark.parametrize("section,cls", [
    ("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig), ("runtime", RuntimeConfig),
])
def test_toml_unknown_key_names_field_and_allowed(tmp_path, section, cls):
    path = _write(tmp_path, f"[{section}]\nnot_a_setting = 1\n")
    allowed = [f.name for f in dataclasses.fields(cls)]
    _raises(build, path, match_all=(f"{section}.not_a_setting", *allowed))


def test_toml_section_not_a_table(tmp_path):
    _raises(build, _write(tmp_path, "train = 3\n"), match_all=("[train]",))


def test_toml_invalid(tmp_path):
    path = _write(tmp_path, "[train]\nlr = \n")
    _raises(build, path, match_all=(path, "invalid TOML"))


def test_toml_invalid_multiline_string(tmp_path):
    path = _write(tmp_path, '[train]\nschedule = """async\n')
    _raises(build, path, match_all=(path,))


def test_toml_missing_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    _raises(build, path, match_all=(path, "no such file"))


def test_toml_directory(tmp_path):
    _raises(build, str(tmp_path), match_all=(str(tmp_path), "directory"))


def test_toml_wrong_type_in_file(tmp_path):
    _raises(build, _write(tmp_path, '[model]\nlayers = "four"\n'), match_all=("model.layers",))
    _raises(build, _write(tmp_path, "[runtime]\nprogress = 1\n"), match_all=("runtime.progress",))
    _raises(build, _write(tmp_path, "[model]\nactivation = 3\n"), match_all=("model.activation",))
    _raises(build, _write(tmp_path, "[model]\nwidths = 5\n"), match_all=("model.widths",))
    _raises(build, _write(tmp_path, '[model]\nlayers = 3\nwidths = [32, "x"]\n'),
            match_all=("model.widths[1]",))


@pytest.mark.parametrize("text", ['[train]\n"a\\nb" = 1\n', '["x\\ny"]\na = 1\n'])
def test_toml_unknown_key_with_newline_is_one_line(tmp_path, text):
    _raises(build, _write(tmp_path, text))


# --------------------------------------------------------------------------- overrides


def test_overrides_take_precedence_over_file(tmp_path):
    path = _write(tmp_path, "[train]\nlr = 0.5\nbatch_size = 16\n[model]\nwidth = 8\n")
    cfg = build(path, {"train.lr": 0.01, "model.width": 12})
    assert cfg.train.lr == 0.01
    assert cfg.model.width == 12
    assert cfg.train.batch_size == 16  # from the file, not overridden


def test_override_adds_section_missing_from_file(tmp_path):
    path = _write(tmp_path, "[train]\nlr = 0.5\n")
    cfg = build(path, {"runtime.progress": "off"})
    assert cfg.runtime.progress is False and cfg.train.lr == 0.5


def test_override_does_not_mutate_file_dict():
    base = {"train": {"lr": 0.5}}
    out = C.merge(base, {"train.lr": 0.1})
    assert out == {"train": {"lr": 0.1}}
    assert base == {"train": {"lr": 0.5}}


@pytest.mark.parametrize("key,raw,expected", [
    ("train.lr", "0.01", 0.01),
    ("train.epochs", "3", 3.0),
    ("model.layers", "3", 3),
    ("train.batch_size", "32", 32),
    ("train.cond", "true", True),
    ("train.cond", "TRUE", True),
    ("train.cond", "yes", True),
    ("train.cond", "1", True),
    ("runtime.progress", "off", False),
    ("runtime.progress", "false", False),
    ("runtime.progress", "0", False),
    ("runtime.progress", "no", False),
    ("model.widths", "32,16,8", (32, 16, 8)),
    ("model.widths", "32 16 8", (32, 16, 8)),
    ("model.widths", "", ()),
    ("runtime.hosts", "a,b,c,d,e", ("a", "b", "c", "d", "e")),
    ("model.activation", "tanh", "tanh"),
    ("train.steps", 7.0, 7),
])
def test_override_string_coercion(key, raw, expected):
    cfg = build(None, {key: raw})
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    assert got == expected
    assert type(got) is type(expected)
    if isinstance(expected, tuple):
        assert all(type(a) is type(b) for a, b in zip(got, expected))


def test_override_widths_tuple_of_ints_with_layers():
    cfg = build(None, {"model.layers": "3", "model.widths": "32,16"})
    assert cfg.model.widths == (32, 16)
    assert all(isinstance(w, int) for w in cfg.model.widths)


@pytest.mark.parametrize("key,raw", [
    ("train.lr", "abc"),
    ("train.lr", True),
    ("train.lr", [1.0]),
    ("model.layers", True),
    ("model.layers", 2.5),
    ("model.layers", "2.5"),
    ("model.layers", "x"),
    ("train.cond", "maybe"),
    ("train.cond", 1),
    ("model.activation", 3),
    ("model.widths", "32,x"),
    ("model.widths", 32),
    ("runtime.ports", [True] * 11),
])
def test_override_wrong_type_names_field(key, raw):
    _raises(build, None, {key: raw}, match_all=(key,))


def test_override_unknown_key_and_section():
    _raises(build, None, {"train.lrr": 0.1}, match_all=("train.lrr", "lr", "sg_lr", "schedule"))
    _raises(build, None, {"nope.x": 1}, match_all=("nope", "model", "runtime"))


# --------------------------------------------------------------------------- validate(): one rule each

P = pytest.param

RULES = [
    # (overrides, field named in message, further strings that must appear)
    P({"model.layers": 0}, "model.layers", (), id="layers>=1"),
    P({"model.width": 0}, "model.width", (), id="width>=1"),
    P({"model.layers": 3, "model.widths": [32]}, "model.widths", ("3",), id="widths-len-short"),
    P({"model.layers": 3, "model.widths": [32, 16, 8]}, "model.widths", (), id="widths-len-long"),
    P({"model.layers": 3, "model.widths": [32, 0]}, "model.widths[1]", (), id="widths-positive"),
    P({"model.activation": "gelu"}, "model.activation", ACTIVATIONS, id="activation"),
    P({"model.init": "zeros"}, "model.init", INITS, id="init"),
    P({"data.dataset": "cifar"}, "data.dataset", ("addition", "idx"), id="dataset"),
    P({"data.dataset": "idx"}, "data.path", ("idx",), id="idx-needs-path"),
    P({"data.bits": 0}, "data.bits", (), id="bits-low"),
    P({"data.bits": 31}, "data.bits", (), id="bits-high"),
    P({"data.train_size": 0}, "data.train_size", (), id="train_size"),
    P({"data.test_size": -1}, "data.test_size", (), id="test_size"),
    P({"data.test_fraction": 0.0}, "data.test_fraction", (), id="test_fraction-0"),
    P({"data.test_fraction": 1.0}, "data.test_fraction", (), id="test_fraction-1"),
    P({"data.test_fraction": -0.1}, "data.test_fraction", (), id="test_fraction-neg"),
    P({"data.test_fraction": "nan"}, "data.test_fraction", (), id="test_fraction-nan"),
    P({"train.schedule": "greedy"}, "train.schedule", C.SCHEDULES, id="schedule"),
    P({"train.steps": -1}, "train.steps", (), id="steps>=0"),
    P({"train.epochs": 0}, "train.epochs", (), id="epochs-0"),
    P({"train.epochs": -1.0}, "train.epochs", (), id="epochs-neg"),
    P({"train.epochs": "inf"}, "train.epochs", (), id="epochs-inf"),
    P({"train.batch_size": 0}, "train.batch_size", (), id="batch_size"),
    P({"train.optimizer": "rmsprop"}, "train.optimizer", OPTIMIZERS, id="optimizer"),
    P({"train.loss": "hinge"}, "train.loss", C.LOSS_CHOICES, id="loss"),
    P({"train.sg_model": "rnn"}, "train.sg_model", SG_MODELS, id="sg_model"),
    P({"train.lr": 0}, "train.lr", (), id="lr-0"),
    P({"train.lr": -1e-3}, "train.lr", (), id="lr-neg"),
    P({"train.lr": "inf"}, "train.lr", (), id="lr-inf"),
    P({"train.lr": "nan"}, "train.lr", (), id="lr-nan"),
    P({"train.sg_lr": 0}, "train.sg_lr", (), id="sg_lr"),
    P({"train.sg_hidden": -1}, "train.sg_hidden", (), id="sg_hidden"),
    P({"train.max_inflight": -1}, "train.max_inflight", (), id="max_inflight"),
    P({"train.microbatches": 0}, "train.microbatches", (), id="microbatches>=1"),
    P({"train.schedule": "pipeline", "train.batch_size": 4, "train.microbatches": 5},
      "train.microbatches", ("5", "4"), id="microbatches>batch-pipeline"),
    P({"train.eval_every": -1}, "train.eval_every", (), id="eval_every"),
    P({"train.eval_batch": 0}, "train.eval_batch", (), id="eval_batch"),
    P({"train.target_accuracy": -0.01}, "train.target_accuracy", (), id="target_accuracy-low"),
    P({"train.target_accuracy": 1.01}, "train.target_accuracy", (), id="target_accuracy-high"),
    P({"runtime.host": ""}, "runtime.host", (), id="host-empty"),
    P({"runtime.hosts": ["a", "b"]}, "runtime.hosts", ("2", "5"), id="hosts-count"),
    P({"runtime.ports": list(range(20000, 20010))}, "runtime.ports", ("10", "11"), id="ports-count"),
    P({"runtime.ports": [0] + list(range(20001, 20011))}, "runtime.ports[0]", ("1-65535",),
      id="port-zero"),
    P({"runtime.ports": list(range(20000, 20010)) + [65536]}, "runtime.ports[10]", ("1-65535",),
      id="port-too-big"),
    P({"runtime.ports": [20000] * 2 + list(range(20002, 20011))}, "runtime.ports", ("distinct",),
      id="ports-duplicate"),
    P({"runtime.blas_threads": 0}, "runtime.blas_threads", (), id="blas_threads"),
    P({"runtime.heartbeat_interval": 0}, "runtime.heartbeat_interval", (), id="hb-interval-0"),
    P({"runtime.heartbeat_interval": -1}, "runtime.heartbeat_interval", (), id="hb-interval-neg"),
    P({"runtime.heartbeat_interval": "nan"}, "runtime.heartbeat_interval", (), id="hb-interval-nan"),
    P({"runtime.heartbeat_misses": 0}, "runtime.heartbeat_misses", (), id="hb-misses"),
    P({"runtime.start_timeout": 0}, "runtime.start_timeout", (), id="start_timeout"),
]


@pytest.mark.parametrize("overrides,field,extra", RULES)
def test_validation_rule(overrides, field, extra):
    _raises(build, None, overrides, match_all=(field, *extra))


@pytest.mark.parametrize("overrides,field,extra", RULES)
def test_validation_rule_via_validate_and_replace(overrides, field, extra):
    """The same rules fire from validate() on a hand-built config and from replace()."""
    raw = C.from_dict(C.merge({}, overrides))  # coerced, not yet validated
    _raises(validate, raw, match_all=(field,))
    _raises(replace, RunConfig(), **overrides, match_all=(field,))


def test_heartbeat_interval_inf_rejected():
    _raises(build, None, {"runtime.heartbeat_interval": "inf"}, match_all=("runtime.heartbeat_interval",))


@pytest.mark.parametrize("overrides", [
    {"model.layers": 1},
    {"model.layers": 3, "model.widths": "32,16"},
    {"data.dataset": "idx", "data.path": "/somewhere"},
    {"data.bits": 1}, {"data.bits": 30},
    {"data.test_fraction": 0.5},
    {"train.steps": 10, "train.epochs": 0},          # epochs irrelevant when steps given
    {"train.microbatches": 100, "train.batch_size": 4},  # only checked for pipeline
    {"train.schedule": "pipeline", "train.microbatches": 4, "train.batch_size": 4},
    {"train.target_accuracy": 0.0}, {"train.target_accuracy": 1.0},
    {"train.sg_hidden": 0}, {"train.eval_every": 0},
    {"runtime.hosts": ["h"] * 5},
    {"runtime.ports": [1] + list(range(20001, 20010)) + [65535]},
    {"model.layers": 2, "runtime.ports": list(range(40000, 40007)), "runtime.hosts": "a,b,c"},
])
def test_boundary_values_accepted(overrides):
    build(None, overrides)


@pytest.mark.parametrize("schedule", C.SCHEDULES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_all_choices_accepted(schedule, activation):
    cfg = build(None, {"train.schedule": schedule, "model.activation": activation})
    assert cfg.train.schedule == schedule and cfg.model.activation == activation


def test_every_choice_list_accepted():
    for opt in OPTIMIZERS:
        build(None, {"train.optimizer": opt})
    for sg in SG_MODELS:
        build(None, {"train.sg_model": sg})
    for loss in C.LOSS_CHOICES:
        build(None, {"train.loss": loss})
    for init in INITS:
        build(None, {"model.init": init})


# --------------------------------------------------------------------------- replace, frozen


def test_replace_returns_validated_copy():
    orig = build()
    new = replace(orig, **{"train.schedule": "backprop", "model.width": 16})
    assert new.train.schedule == "backprop" and new.model.width == 16
    assert orig.train.schedule == "async" and orig.model.width == 256
    assert orig == build()
    assert new.preset == ("model.activation", "train.lr", "train.epochs")   # width is no longer the preset's
    assert new.data == orig.data and new.runtime == orig.runtime
    assert new.digest() != orig.digest()
    # tuples survive the dict round trip
    w = replace(build(None, {"model.layers": 3, "model.widths": [8, 4]}), **{"train.lr": 0.1})
    assert w.model.widths == (8, 4)
    assert replace(orig) == orig


def test_replace_validates():
    _raises(replace, RunConfig(), match_all=("train.schedule",), **{"train.schedule": "nope"})
    _raises(replace, RunConfig(), match_all=("model.widths",), **{"model.widths": [1, 2]})


def test_configs_are_frozen():
    cfg = build()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.layers = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.bits = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.runtime.host = "x"
    assert cfg == build()


def test_to_dict_roundtrip():
    cfg = build(None, {"model.layers": 3, "model.widths": "8,4", "runtime.hosts": "a,b,c,d"})
    assert C.from_dict(cfg.to_dict()) == cfg


# --------------------------------------------------------------------------- make_plan


def _chain_ok(plan, in_dim, n_out):
    specs = plan.specs
    assert specs[0].fan_in == in_dim
    assert specs[-1].fan_out == n_out
    for a, b in zip(specs, specs[1:]):
        assert a.fan_out == b.fan_in
    assert [s.index for s in specs] == list(range(len(specs)))
    assert all(s.n_layers == len(specs) for s in specs)
    assert plan.widths == (in_dim,) + tuple(s.fan_out for s in specs)


def test_make_plan_default_addition(addition):
    train, _ = addition
    cfg = build(None, {"train.batch_size": 64}, preset=False)
    plan = make_plan(cfg, train)
    assert plan.n_layers == cfg.model.layers == 4
    assert plan.in_dim == 16 and plan.n_out == 9 and plan.task == "bits"
    _chain_ok(plan, 16, 9)
    assert plan.widths == (16, 128, 128, 128, 9)
    assert plan.loss == "sigmoid_bce"
    assert plan.specs[-1].activation == "linear"
    assert all(s.activation == "relu" for s in plan.specs[:-1])
    assert all(s.loss == "sigmoid_bce" and s.task == "bits" and s.n_out == 9 for s in plan.specs)
    assert all(s.microbatches == 1 for s in plan.specs)  # schedule is async
    assert plan.batch_size == 64
    assert plan.steps == round(TrainConfig().epochs * (512 // 64)) == 64


def test_make_plan_explicit_widths(addition):
    train, _ = addition
    cfg = build(None, {"model.layers": 3, "model.widths": "32,16", "model.activation": "tanh"})
    plan = make_plan(cfg, train)
    _chain_ok(plan, 16, 9)
    assert plan.widths == (16, 32, 16, 9)
    assert [s.activation for s in plan.specs] == ["tanh", "tanh", "linear"]


def test_make_plan_single_layer(addition):
    train, _ = addition
    plan = make_plan(build(None, {"model.layers": 1}), train)
    _chain_ok(plan, 16, 9)
    assert plan.specs[0].activation == "linear"


def test_make_plan_mse_last_sigmoid(addition):
    train, _ = addition
    plan = make_plan(build(None, {"train.loss": "mse"}), train)
    assert plan.loss == "mse" and plan.specs[-1].activation == "sigmoid"


@pytest.mark.parametrize("schedule", C.SCHEDULES)
def test_make_plan_microbatches_only_for_pipeline(addition, schedule):
    train, _ = addition
    plan = make_plan(build(None, {"train.schedule": schedule, "train.microbatches": 3}), train)
    expected = 3 if schedule == "pipeline" else 1
    assert {s.microbatches for s in plan.specs} == {expected}


@pytest.mark.parametrize("epochs,batch", [(4.0, 64), (1.3, 50), (2.5, 64), (0.5, 100), (1.0, 512)])
def test_make_plan_steps_from_epochs(addition, epochs, batch):
    train, _ = addition
    plan = make_plan(build(None, {"train.epochs": epochs, "train.batch_size": batch}), train)
    assert plan.steps == max(1, round(epochs * (len(train) // batch)))


def test_make_plan_steps_at_least_one(addition):
    train, _ = addition
    plan = make_plan(build(None, {"train.epochs": 0.001}), train)
    assert plan.steps == 1


def test_make_plan_explicit_steps(addition):
    train, _ = addition
    plan = make_plan(build(None, {"train.steps": 123, "train.epochs": 99.0}), train)
    assert plan.steps == 123


def test_make_plan_passes_train_settings(addition):
    train, _ = addition
    cfg = build(None, {"train.optimizer": "sgd", "train.lr": 0.2, "train.sg_model": "mlp",
                       "train.sg_hidden": 7, "train.sg_lr": 0.03, "train.cond": True,
                       "train.seed": 5, "model.init": "xavier"})
    for s in make_plan(cfg, train).specs:
        assert (s.optimizer, s.lr, s.sg_model, s.sg_hidden, s.sg_lr, s.cond, s.seed, s.init) == \
            ("sgd", 0.2, "mlp", 7, 0.03, True, 5, "xavier")


def test_make_plan_batch_larger_than_train(addition):
    train, _ = addition
    cfg = build(None, {"train.batch_size": 513})
    _raises(make_plan, cfg, train, match_all=("train.batch_size", "513", "512"))
    make_plan(build(None, {"train.batch_size": 512}), train)  # equal is fine


def test_make_plan_softmax_on_bits(addition):
    train, _ = addition
    _raises(make_plan, build(None, {"train.loss": "softmax_ce"}), train,
            match_all=("train.loss", "softmax_ce"))


def _classification(n=100, d=5, k=3):
    rng = np.random.default_rng(0)
    return Dataset(rng.standard_normal((n, d)).astype(np.float32),
                   rng.integers(0, k, n).astype(np.int64), "classification", k, "toy")


@pytest.mark.parametrize("loss", ["sigmoid_bce", "mse"])
def test_make_plan_bit_loss_on_classification(loss):
    _raises(make_plan, build(None, {"train.loss": loss, "train.batch_size": 10}), _classification(),
            match_all=("train.loss", loss))


def test_make_plan_classification_auto_loss():
    plan = make_plan(build(None, {"train.batch_size": 10, "model.layers": 2, "model.width": 4}),
                     _classification())
    assert plan.loss == "softmax_ce" and plan.task == "classification"
    _chain_ok(plan, 5, 3)
    assert plan.specs[-1].activation == "linear"


# --------------------------------------------------------------------------- microbatch_bounds


@pytest.mark.parametrize("batch,m", [(64, 4), (64, 1), (10, 3), (7, 7), (65, 4), (5, 2), (100, 7), (1, 1)])
def test_microbatch_bounds(batch, m):
    b = microbatch_bounds(batch, m)
    assert len(b) == m
    assert b[0][0] == 0 and b[-1][1] == batch
    for (_, e0), (s1, _) in zip(b, b[1:]):
        assert e0 == s1
    sizes = [e - s for s, e in b]
    assert all(sz >= 1 for sz in sizes)
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == batch
    assert sizes == sorted(sizes, reverse=True)  # larger ones first


def test_microbatch_bounds_exhaustive_small():
    for batch in range(1, 40):
        for m in range(1, batch + 1):
            b = microbatch_bounds(batch, m)
            rows = [r for s, e in b for r in range(s, e)]
            assert rows == list(range(batch))
            sizes = [e - s for s, e in b]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
            assert math.isclose(sum(sizes) / m, batch / m)


def test_torch_conv_models_take_a_lower_sg_learning_rate_unless_given():
    """The torch preset (config.TORCH_PRESET) applies over the dataset's, is marked as a preset,
    and never overrides a value the user gave."""
    cfg = C.build(None, {"model.model": "cnn", "data.dataset": "idx", "data.path": "d"})
    assert cfg.train.sg_lr == C.TORCH_PRESET["train.sg_lr"] and "train.sg_lr" in cfg.preset
    cfg = C.build(None, {"model.model": "cnn", "data.dataset": "idx", "data.path": "d", "train.sg_lr": 2e-3})
    assert cfg.train.sg_lr == 2e-3 and "train.sg_lr" not in cfg.preset
    assert C.build(None, {}).train.sg_lr == 1e-3
    assert C.build(None, {"model.model": "mlp"}).train.sg_lr == 1e-3          # conv models only


def test_stage_count_of_torch_models():
    """The zoo's mlp without a split has model.layers stages; with a split, or any other torch
    model, the plan's count replaces model.layers (and a numpy MLP's count must agree)."""
    mlp = C.build(None, {"model.model": "mlp"})
    assert C.stages_known(mlp) and C.with_stages(mlp, 4) == mlp
    with pytest.raises(C.ConfigError, match="model.layers: 4, but the model has 3 stages"):
        C.with_stages(mlp, 3)
    split = C.build(None, {"model.model": "mlp", "model.split": "3"})
    assert not C.stages_known(split) and C.with_stages(split, 3).model.layers == 3
    cnn = C.build(None, {"model.model": "cnn", "runtime.hosts": "a,b,c", "runtime.launcher": "agents",
                         "runtime.listen": "127.0.0.1:5555"})
    assert C.with_stages(cnn, 3).runtime.hosts == ("a", "a", "b", "c")   # the feeder shares layer 1's host
    with pytest.raises(C.ConfigError, match="runtime.hosts: 3 hosts given, need 6"):
        C.with_stages(cnn, 5)
