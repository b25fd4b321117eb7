"""Run configuration: one frozen dataclass per component, TOML loading, validation.

Nothing here reads argv or the environment: ``cli.py`` turns flags into a dict of dotted
overrides (``{"train.lr": 0.01}``) and calls :func:`build`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from asyncdni import files
from asyncdni.launch import registry as launcher_registry
from asyncdni import schedules as _schedules
from asyncdni.numerics.data import TASK_CHOICES as DATA_TASKS, infer_format
from asyncdni.numerics.nn import ACTIVATIONS, INITS
from asyncdni.numerics.optim import LR_SCHEDULES, OPTIMIZERS
from asyncdni.numerics.synthetic import SG_MODELS
from asyncdni.numerics.synthetic import param_count as sg_param_count
from asyncdni.wire import codec as _codec

SCHEDULES = _schedules.NAMES            # one entry each in schedules.TABLE
SG_TARGETS = ("auto",) + _schedules.SG_TARGETS
DELAY_REMEDIES = ("none", "lr_scale")
TORCH_ZOO = ("mlp", "cnn", "resnet")       # built-in torch models (asyncdni/torch/models.py)
LAUNCHERS = launcher_registry.names()   # built-in launchers plus any installed entry points
SECURITY = ("auto", "curve", "insecure")
DATASETS = ("addition", "idx", "npz", "npy", "csv")
OWN_DATA = ("npz", "npy", "csv")         # a user's own arrays (asyncdni.numerics.data.load_npz, ...)
LOSS_CHOICES = ("auto", "softmax_ce", "sigmoid_bce", "mse")


HEARTBEAT_INTERVAL = 0.5   # seconds between heartbeats, both ways (runtime.heartbeat_interval)
HEARTBEAT_MISSES = 4       # missed beats before a peer is declared dead: 2 s, inside the 3 s promise


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1   # every integer setting travels as a msgpack int64
MAX_CONFIG_BYTES = 16 << 20                  # a TOML file larger than this is not a configuration
MAX_EVAL_BATCH = 2**31 - 1
MAX_EPOCHS = 1e12
FEEDER_BYTES_PER_STEP = 25                   # loss, metric, done_at (float64) and a flag byte per step


class ConfigError(ValueError):
    """Invalid configuration: the message names the field and what is allowed."""


@dataclass(frozen=True)
class ModelConfig:
    layers: int = 4                     # dense layers = layer worker processes
    width: int = 128                    # width of every hidden layer
    widths: tuple[int, ...] = ()        # explicit hidden widths (layers-1 of them); overrides width
    activation: str = "relu"
    init: str = "he"
    batch_norm: bool = False            # hidden layers: h = act(BN(x @ W)), BN's beta replacing the bias
    model: str = ""                     # "": the numpy dense MLP above; else PyTorch stages: a zoo name
                                        # (mlp, cnn, resnet) or a builder, path/to/file.py:fn or pkg.module:fn
    split: str = ""                     # torch: where an nn.Sequential is cut: "2,4" (indices) or "K" (K pieces)

    def hidden_widths(self) -> tuple[int, ...]:
        return self.widths if self.widths else (self.width,) * (self.layers - 1)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "addition"           # "addition" (built in), "idx" (MNIST-format files in `path`), or a
                                        # user's own file: "npz", "npy" or "csv"; inferred from `path`'s suffix
                                        # when only `path` is given (build)
    path: str = ""
    labels_path: str = ""               # npy: the labels' .npy file (`path` holds the features)
    label_column: str = ""              # csv: the label column, a header name or a 0-based index (default: the last)
    task: str = "auto"                  # own data: "auto" (integer labels: classification; floats: regression),
                                        # "classification" or "regression"
    bits: int = 8                       # binary addition: bits per operand
    train_size: int = 16384             # binary addition: training examples
    test_size: int = 2048               # binary addition: test examples
    test_fraction: float = 0.2          # idx with a single file pair, npz/npy/csv with one array set: fraction
                                        # held out as test
    seed: int = 0                       # seed of the dataset (addition samples, the train/test split)


@dataclass(frozen=True)
class TrainConfig:
    schedule: str = "async"
    steps: int = 0                      # 0: derive from epochs
    epochs: float = 8.0
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 5e-4
    weight_decay: float = 0.0           # decoupled weight decay of the layers' weights (AdamW-style)
    lr_schedule: str = "constant"       # constant, cosine (to 0 over the run) or step (x lr_gamma every lr_step_size)
    lr_step_size: int = 0               # step schedule: updates between decays (0: a third of the run)
    lr_gamma: float = 0.1               # step schedule: the factor per decay
    loss: str = "auto"                  # auto: softmax_ce for classification, sigmoid_bce for bits
    sg_model: str = "linear"            # synthetic-gradient model: linear, mlp or lowrank
    sg_rank: int = 64                   # rank of the lowrank SG model
    sg_every: int = 1                   # update (regress) the SG model on every n-th step only
    sg_hidden: int = 0                  # hidden width of the mlp SG model (0: the layer's width)
    sg_layers: int = 1                  # hidden layers of the mlp SG model
    sg_stale_decay: float = 1.0         # weight of an SG target per step of lag (async); 0 drops stale targets
    sg_clip: float = -1.0               # >0: a layer's SG step is scaled by min(1, sg_clip x running |target| / |prediction|);
                                        # 0: off; -1 ("auto", the default): 0.5 with propagated targets, 1 with bootstrapped
                                        # ones (without it deep nets collapse under async, docs/results/depth.md)
    sg_target: str = "auto"             # what trains a layer's SG: "propagate" (the layer above passes down its own
                                        # target, backpropagated through it, when that comes back), "bootstrap" (the
                                        # DNI paper's: the layer above's SG prediction, backpropagated at its forward),
                                        # or "auto": propagate for plain DNI and for 6 or more stages (schedules.
                                        # resolve_sg_target); bootstrapped targets compound with depth, docs/results/depth.md
    sg_trust: bool = False              # a layer's SG step is scaled by the running cosine of its SG's predictions
                                        # with the targets that come back for them (0 when they disagree)
    sg_damp: float = 0.0                # >0: the SG model's step is scaled by min(1, sg_damp x running |target| / running |prediction|)^2
    sg_lr: float = 1e-3
    sg_reuse_prediction: bool = False   # SG regression reuses the forward prediction (faster, less accurate under async)
    cond: bool = True                   # label-conditioned SG (cDNI)
    max_inflight: int = 3               # async: steps in flight between feeder and last layer (staleness bound);
                                        # 0 (--max-inflight auto): sized from measured round trip and step times
    max_inflight_cap: int = 16          # the largest window --max-inflight auto may choose
    microbatches: int = 4               # pipeline: micro-batches per step
    seed: int = 0
    eval_every: int = 0                 # evaluate on the test set every N steps (0: at the end only)
    eval_batch: int = 1000
    target_accuracy: float = 0.0        # report the training time at which test accuracy first reaches this
    stash_weights: bool = False         # delayed: input gradient with the forward pass's weights (PipeDream weight stashing)
    delay_remedy: str = "none"          # delayed: "none" or "lr_scale" (a gradient d updates late: lr / (1 + d))
    aux_features: int = 256             # local: features an auxiliary classifier reads (wider layers are average-pooled)
    wire_fwd: str = "fp32"              # codec of the activations between layers: fp32, fp16, bf16, int8, int8:tensor, topk:F,
                                        # or aq:CODEC (each sample's change since it last crossed, AQ-SGD)
    wire_bwd: str = "fp32"              # codec of the gradients between layers (the same choices)
    wire_feedback: bool = True          # a lossy gradient codec carries error feedback (the residual joins the next step's)


@dataclass(frozen=True)
class RuntimeConfig:
    host: str = "127.0.0.1"             # address every worker binds and is reached at
    hosts: tuple[str, ...] = ()         # per-worker placement (feeder first, then layers): local: bind
                                        # addresses; agents: agent names; ray: node addresses
    launcher: str = "local"             # local, agents (asyncdni agent on each host) or ray
    listen: str = ""                    # agents: ADDR:PORT the coordinator waits for agents on
    keys: str = ""                      # directory of CURVE keys (asyncdni keys DIR): coordinator and agents
    security: str = "auto"              # auto: CURVE iff anything binds off loopback; curve: always; insecure: never
    ray_address: str = ""               # ray: cluster address (empty: start or join a local Ray)
    ports: tuple[int, ...] = ()         # explicit ports, 2 per worker (fwd, bwd) + 1 control; empty: free ports
    blas_threads: int = 1               # BLAS (and torch) threads in each worker
    device: str = "cpu"                 # torch stages: cpu, cuda or cuda:N
    heartbeat_interval: float = HEARTBEAT_INTERVAL   # seconds between heartbeats
    heartbeat_misses: int = HEARTBEAT_MISSES         # missed intervals before a peer is declared dead
    start_timeout: float = 60.0         # seconds for all workers to come up
    stall_timeout: float = 0.0          # seconds with no data-plane message anywhere before the run is
                                        # declared stalled (0: auto, see engine.coordinator.stall_limit)
    progress: bool = True               # progress bar on stderr
    checkpoint_every: int = 0           # steps between checkpoints (0: none)
    checkpoint_dir: str = ""            # where checkpoints go (every worker must see the same path)
    keep_checkpoints: int = 3           # complete checkpoints kept; older ones are pruned
    resume: str = ""                    # checkpoint directory to continue from (newest complete one)
    max_restarts: int = 0               # restarts from the last checkpoint after a worker failure
    fail_on_nonfinite: bool = False     # stop the run at the first non-finite loss, gradient or output
    slow: tuple[str, ...] = ()          # stragglers: "TARGET:FACTOR", TARGET a layer number 1..K or a host of
                                        # runtime.hosts (every layer on it); each training forward/backward
                                        # compute of those layers takes FACTOR times as long (parse_slow)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # dotted names of the fields whose value came from the dataset's preset (PRESETS), not from
    # the TOML file or the flags; provenance only, so it takes no part in ==, nor in the digest
    preset: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self, legacy: bool = False) -> str:
        """Hash of what determines the model's state: architecture, data, optimizer and seeds.
        Not the placement ([runtime]), nor how long or in which order training runs, nor the
        learning rate and its schedule, so a checkpoint can be resumed with more steps, under
        another schedule or at another learning rate. ``legacy``: the digest as it was before
        the learning rate could change on resume (it included ``train.lr``), which the
        checkpoints written then carry (:meth:`digests`)."""
        d = self.to_dict()
        d["train"]["sg_target"], d["train"]["sg_clip"] = sg_in_effect(self)   # "auto" as it applies
        d.pop("runtime")
        d.pop("preset")
        for k in RUN_ONLY_TRAIN_FIELDS:
            if not (legacy and f"train.{k}" in DIGEST_DROPPED):
                d["train"].pop(k)
        for dotted, default in DIGEST_OMIT_AT_DEFAULT.items():
            section, _, key = dotted.partition(".")
            if d[section][key] == default:     # fields added later: at their default they do not
                d[section].pop(key)           # change the digest, so older checkpoints still load
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def digests(self) -> tuple[str, str]:
        """The digests a checkpoint of this configuration may carry: today's, and the one
        written before the learning rate left the digest (:data:`DIGEST_DROPPED`)."""
        return self.digest(), self.digest(legacy=True)


RUN_ONLY_TRAIN_FIELDS = ("schedule", "steps", "epochs", "max_inflight", "max_inflight_cap", "microbatches", "eval_every",
                         "eval_batch", "target_accuracy", "stash_weights", "delay_remedy", "lr_schedule",
                         "lr_step_size", "lr_gamma", "lr")
# fields that were in the digest until they were allowed to change on resume: the legacy
# digest (RunConfig.digest(legacy=True)) keeps them, so that older checkpoints still resume
DIGEST_DROPPED = ("train.lr",)
# what a resumed run may change (and the report records); everything else in the digest
# determines the model's state and is refused on resume (resume_changes)
RESUME_MAY_CHANGE = ("train.steps", "train.epochs", "train.schedule", "train.lr", "train.lr_schedule",
                     "train.lr_step_size", "train.lr_gamma")
# fields added after checkpoints existed, with the value that reproduces the older behaviour
DIGEST_OMIT_AT_DEFAULT = {"train.sg_layers": 1, "train.sg_stale_decay": 1.0, "model.batch_norm": False,
                          "train.sg_rank": 64, "train.sg_every": 1, "train.sg_clip": 0.0, "train.sg_trust": False,
                          "train.sg_target": "bootstrap",
                          "train.sg_damp": 0.0, "model.model": "", "model.split": "", "train.weight_decay": 0.0,
                          "data.labels_path": "", "data.label_column": "", "data.task": "auto",
                          "train.wire_fwd": "fp32", "train.wire_bwd": "fp32", "train.wire_feedback": True}
SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}
_SECTION_CLASSES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "runtime": RuntimeConfig}


def field_names() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)]


def _coerce(name: str, value, tp):
    """Check/convert one value to the annotated type, with an error naming the field."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return tuple(_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        out = None
        if isinstance(value, int):
            out = value
        elif isinstance(value, str):
            try:
                out = int(value)
            except ValueError:
                pass
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        if out is None:
            raise ConfigError(f"{name}: expected an integer, got {value!r:.80}")
        if not INT64_MIN <= out <= INT64_MAX:
            raise ConfigError(f"{name}: {out:.3g} is out of range (a 64-bit integer, at most {INT64_MAX})")
        return out
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {name}")  # programming error


def _printable(key: str) -> str:
    """A key as typed, or its repr when it holds characters that would break a one-line message."""
    return key if key.isprintable() else repr(key)


def parse_set(items) -> dict:
    """``--set SECTION.KEY=VALUE`` items as dotted overrides; ConfigError for a malformed one."""
    ov = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        ov[key.strip()] = value.strip()
    return ov


AUTO_NUMBERS = {"train.sg_clip": -1.0}    # numeric settings that also take "auto", and its number


def _section(cls, name: str, values: dict):
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown setting {name}.{_printable(key)}; allowed in [{name}]: {', '.join(allowed)}")
        if isinstance(value, str) and value.strip().lower() == "auto" and f"{name}.{key}" in AUTO_NUMBERS:
            value = AUTO_NUMBERS[f"{name}.{key}"]
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def from_dict(d: dict) -> RunConfig:
    if not isinstance(d, dict):
        raise ConfigError("configuration must be a table of sections")
    sections = {}
    for key, value in d.items():
        if key == "preset":            # provenance written by to_dict(); a list of dotted names
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"preset: expected a list of field names, got {value!r}")
            sections["preset"] = tuple(value)
            continue
        if key not in _SECTION_CLASSES:
            raise ConfigError(f"unknown section [{_printable(key)}]; allowed: {', '.join(_SECTION_CLASSES)}")
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table of settings, got {value!r}")
        sections[key] = _section(_SECTION_CLASSES[key], key, value)
    return RunConfig(**sections)


def load_toml(path: str) -> dict:
    """A TOML file as a dict. Only a regular file is read (a FIFO or a device would block or
    never end), and at most MAX_CONFIG_BYTES of it; every failure is a one-line ConfigError."""
    try:
        f = files.open_regular(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except files.NotRegularFile as e:
        raise ConfigError(f"config file {path}: " + ("is a directory" if e.is_dir else "not a regular file")) from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    with f:
        try:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a configuration")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: invalid TOML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: invalid TOML: nested too deeply") from None


def merge(base: dict, overrides: dict[str, object]) -> dict:
    """Apply dotted overrides (``"train.lr" -> 0.01``) to a nested dict (copied)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise ConfigError(f"[{section}] must be a table of settings")
        out[section][key] = value
    return out


def _choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


def _positive(name, value, minimum=1):
    if value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")


def stages_known(cfg: RunConfig) -> bool:
    """Whether model.layers is the number of layer processes: always for the numpy MLP and the
    torch zoo's mlp without a split; for other torch models the stages come from the model itself, and the
    coordinator sets model.layers from the plan (:func:`with_stages`)."""
    return not cfg.model.model or (cfg.model.model == "mlp" and not cfg.model.split)


def check_worker_counts(cfg: RunConfig) -> RunConfig:
    """runtime.hosts and runtime.ports against the worker count (model.layers + the feeder);
    K host names for K layers mean the feeder shares layer 1's host (agents, ray)."""
    m, r = cfg.model, cfg.runtime
    n_workers = m.layers + 1
    if r.hosts and len(r.hosts) == m.layers and r.launcher != "local":
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(r, hosts=(r.hosts[0], *r.hosts)))
        r = cfg.runtime               # K names: the feeder shares layer 1's host
    if r.hosts and len(r.hosts) != n_workers:
        also = "" if r.launcher == "local" else f" or {m.layers} (the feeder then shares layer 1's host)"
        raise ConfigError(f"runtime.hosts: {len(r.hosts)} hosts given, need {n_workers} (the feeder, then one "
                          f"per layer){also}")
    if r.ports and len(r.ports) != 2 * n_workers + 1:
        raise ConfigError(f"runtime.ports: {len(r.ports)} ports given, need {2 * n_workers + 1} (fwd and bwd per "
                          f"worker, then the control port)")
    return cfg


def with_stages(cfg: RunConfig, n_layers: int) -> RunConfig:
    """The configuration with model.layers set to the model's real stage count (torch models
    whose stages come from the model), its worker counts and stragglers checked."""
    if cfg.model.layers == n_layers:
        if stages_known(cfg):
            return cfg
        cfg = check_worker_counts(cfg)
    elif stages_known(cfg):
        raise ConfigError(f"model.layers: {cfg.model.layers}, but the model has {n_layers} stages")
    else:
        cfg = check_worker_counts(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, layers=n_layers)))
    parse_slow(cfg.runtime.slow, cfg, n_layers)
    return cfg


SLOW_FORM = "TARGET:FACTOR, TARGET a layer number or a host, FACTOR a number >= 1 (2: half speed), e.g. 2:2"


def layer_hosts(cfg: RunConfig, n_layers: int) -> list[str]:
    """The host of each layer as runtime.hosts names it (the feeder's entry first there);
    runtime.host for every layer when no hosts are given."""
    r = cfg.runtime
    if r.hosts and len(r.hosts) == n_layers + 1:
        return list(r.hosts[1:])
    if r.hosts and len(r.hosts) == n_layers:      # K names: before check_worker_counts
        return list(r.hosts)
    return [r.host] * n_layers


def parse_slow(entries, cfg: RunConfig, n_layers: int | None,
               name: str = "runtime.slow") -> list[tuple[int | str, float]]:
    """Check straggler entries ``TARGET:FACTOR`` (runtime.slow, --slow, bench --straggler)
    and return them as (target, factor), the target an int (a layer number) or a str (a
    host). TARGET: a layer number 1..K (K checked when ``n_layers`` is known; None: torch
    stages whose count comes from the model, checked again in :func:`with_stages`), or a
    host of the run (runtime.hosts, else runtime.host) on which a layer runs; a target of
    digits is always a layer number. FACTOR: a finite number >= 1. A malformed entry, an
    unknown layer or host, or a target named twice is a one-line ConfigError naming it."""
    out: list[tuple[int | str, float]] = []
    seen: set = set()
    for entry in entries:
        e = str(entry)
        shown = repr(e) if e.isprintable() else ascii(e)
        target, sep, factor = e.strip().rpartition(":")
        target = target.strip()
        if not sep or not target or not factor.strip():
            raise ConfigError(f"{name}: {shown} is not {SLOW_FORM}")
        try:
            f = float(factor)
        except ValueError:
            raise ConfigError(f"{name}: {shown}: the factor {factor.strip()!r:.40} is not a number "
                              f"(expected {SLOW_FORM})") from None
        if math.isnan(f):
            raise ConfigError(f"{name}: {shown}: the factor is NaN; expected a number >= 1 (2: half speed)")
        if not f >= 1:
            raise ConfigError(f"{name}: {shown}: the factor must be >= 1 (1: full speed, 2: half speed), got {f:g}")
        if not math.isfinite(f):
            raise ConfigError(f"{name}: {shown}: the factor must be finite (a layer slowed without end never "
                              "finishes a step)")
        if target.lstrip("+-").isdigit() and target.isascii():
            n = int(target)
            if n < 1 or (n_layers is not None and n > n_layers):
                k = f" to {n_layers}" if n_layers is not None else " up"
                raise ConfigError(f"{name}: {shown}: there is no layer {n}; layers are numbered from 1{k}")
            key: int | str = n
        else:
            every = list(dict.fromkeys(cfg.runtime.hosts or (cfg.runtime.host,)))
            if target not in every:
                raise ConfigError(f"{name}: {shown}: {target!r:.60} is neither a layer number nor one of the run's "
                                  f"hosts ({', '.join(every)})")
            if n_layers is not None and target not in layer_hosts(cfg, n_layers):
                raise ConfigError(f"{name}: {shown}: host {target!r:.60} runs no layer (only the feeder)")
            key = target
        if key in seen:
            raise ConfigError(f"{name}: {shown}: {'layer' if isinstance(key, int) else 'host'} {key} is slowed "
                              "twice; give each target once")
        seen.add(key)
        out.append((key, f))
    return out


def slow_factors(cfg: RunConfig, n_layers: int) -> list[float]:
    """Each layer's slowdown (index 0: layer 1) under runtime.slow: the product of the factors
    of the entries that name it, by number or by its host (1.0: full speed)."""
    hosts = layer_hosts(cfg, n_layers)
    out = [1.0] * n_layers
    for target, f in parse_slow(cfg.runtime.slow, cfg, n_layers):
        for i in range(n_layers):
            if target == i + 1 if isinstance(target, int) else target == hosts[i]:
                out[i] *= f
    return out


def validate(cfg: RunConfig) -> RunConfig:
    m, d, t, r = cfg.model, cfg.data, cfg.train, cfg.runtime
    _positive("model.layers", m.layers, 1)
    _positive("model.width", m.width, 1)
    if m.widths:
        if len(m.widths) != m.layers - 1:
            raise ConfigError(f"model.widths: {len(m.widths)} hidden widths given, model.layers={m.layers} needs {m.layers - 1}")
        for i, w in enumerate(m.widths):
            _positive(f"model.widths[{i}]", w, 1)
    _choice("model.activation", m.activation, ACTIVATIONS)
    if m.model:
        zoo = m.model in TORCH_ZOO
        if not zoo and ":" not in m.model:
            raise ConfigError(f"model.model: {m.model!r} is neither a built-in model ({', '.join(TORCH_ZOO)}) "
                              f"nor a builder path/to/file.py:fn or pkg.module:fn")
        if m.batch_norm or m.widths:
            raise ConfigError("model.model: torch stages take their architecture from the model; "
                              "model.batch_norm and model.widths apply to the numpy MLP only")
    elif m.split:
        raise ConfigError("model.split: only torch stages (model.model) are split")
    _choice("model.init", m.init, INITS)
    _choice("data.dataset", d.dataset, DATASETS)
    if d.dataset == "idx" and not d.path:
        raise ConfigError("data.path: required when data.dataset is 'idx' (a directory of IDX files)")
    if d.dataset in OWN_DATA and not d.path:
        raise ConfigError(f"data.path: required when data.dataset is '{d.dataset}' (the .{d.dataset} file; --data-path)")
    if d.dataset == "npy" and not d.labels_path:
        raise ConfigError("data.labels_path: required when data.dataset is 'npy' (the labels' .npy file beside "
                          "the features in data.path; --labels-path)")
    if d.labels_path and d.dataset != "npy":
        raise ConfigError(f"data.labels_path: only for data.dataset 'npy' (features and labels in two .npy files), "
                          f"not '{d.dataset}'")
    if d.label_column and d.dataset != "csv":
        raise ConfigError(f"data.label_column: only for data.dataset 'csv', not '{d.dataset}'")
    _choice("data.task", d.task, DATA_TASKS)
    if d.task != "auto" and d.dataset not in OWN_DATA and not (d.dataset == "idx" and d.task == "classification"):
        raise ConfigError(f"data.task: {d.task} needs data of your own (npz, npy or csv); dataset "
                          f"'{d.dataset}' is {'bits (binary addition)' if d.dataset == 'addition' else 'classification'}")
    if not 1 <= d.bits <= 30:
        raise ConfigError(f"data.bits: must be between 1 and 30, got {d.bits}")
    _positive("data.train_size", d.train_size)
    _positive("data.test_size", d.test_size)
    if not 0 < d.test_fraction < 1:
        raise ConfigError(f"data.test_fraction: must be between 0 and 1 (exclusive), got {d.test_fraction}")
    _choice("train.schedule", t.schedule, SCHEDULES)
    if t.steps < 0:
        raise ConfigError(f"train.steps: must be >= 0 (0 derives steps from train.epochs), got {t.steps}")
    if t.steps == 0 and not (t.epochs > 0 and math.isfinite(t.epochs)):
        raise ConfigError(f"train.epochs: must be > 0 when train.steps is 0, got {t.epochs}")
    if t.epochs > MAX_EPOCHS:
        raise ConfigError(f"train.epochs: must be at most {MAX_EPOCHS:g}, got {t.epochs:g}")
    _positive("train.batch_size", t.batch_size)
    _choice("train.optimizer", t.optimizer, OPTIMIZERS)
    if not (t.weight_decay >= 0 and math.isfinite(t.weight_decay) and t.lr * t.weight_decay < 1):
        raise ConfigError(f"train.weight_decay: must be >= 0 with train.lr x weight_decay < 1, got {t.weight_decay}")
    _choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _positive("train.lr_step_size", t.lr_step_size, 0)
    if not 0 < t.lr_gamma <= 1:
        raise ConfigError(f"train.lr_gamma: must be in (0, 1], got {t.lr_gamma}")
    _choice("train.loss", t.loss, LOSS_CHOICES)
    _choice("train.sg_model", t.sg_model, SG_MODELS)
    for name, v in (("train.lr", t.lr), ("train.sg_lr", t.sg_lr)):
        if not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"{name}: must be a positive finite number, got {v}")
    _positive("train.sg_hidden", t.sg_hidden, 0)
    _positive("train.sg_layers", t.sg_layers, 1)
    _positive("train.sg_rank", t.sg_rank, 1)
    _positive("train.sg_every", t.sg_every, 1)
    if not 0 <= t.sg_stale_decay <= 1:
        raise ConfigError(f"train.sg_stale_decay: must be between 0 and 1, got {t.sg_stale_decay}")
    if not ((t.sg_clip >= 0 or t.sg_clip == -1) and math.isfinite(t.sg_clip)):
        raise ConfigError(f"train.sg_clip: must be auto, 0 (off) or a positive finite number, got {t.sg_clip}")
    _choice("train.sg_target", t.sg_target, SG_TARGETS)
    if (t.sg_target == "propagate" and t.schedule in SCHEDULES
            and not _schedules.can_propagate(_schedules.get(t.schedule), t.sg_every)):
        raise ConfigError(f"train.sg_every: {t.sg_every} under schedule {t.schedule} needs train.sg_target = "
                          "\"bootstrap\" (--sg-target bootstrap): with propagated targets a step whose SG is "
                          "not regressed has no backward pass to end it")
    if not (t.sg_damp >= 0 and math.isfinite(t.sg_damp)):
        raise ConfigError(f"train.sg_damp: must be 0 (off) or a positive finite number, got {t.sg_damp}")
    wire = {}
    try:
        wire["wire_fwd"] = _codec.wire_name(*_codec.parse_wire(t.wire_fwd))   # canonical: int8 -> int8:row
    except ValueError as e:
        raise ConfigError(f"train.wire_fwd: {e}") from None
    if str(t.wire_bwd).strip().lower().startswith(_codec.AQ_PREFIX):
        raise ConfigError(f"train.wire_bwd: {t.wire_bwd!r}: aq: sends activation changes (--wire-fwd); gradients "
                          "take a codec with error feedback, e.g. int8")
    try:
        wire["wire_bwd"] = _codec.parse(t.wire_bwd).name
    except ValueError as e:
        raise ConfigError(f"train.wire_bwd: {e}") from None
    if any(getattr(t, k) != v for k, v in wire.items()):
        t = dataclasses.replace(t, **wire)
        cfg = dataclasses.replace(cfg, train=t)
    _positive("train.max_inflight", t.max_inflight, 0)
    _positive("train.max_inflight_cap", t.max_inflight_cap, 1)
    _positive("train.microbatches", t.microbatches, 1)
    _choice("train.delay_remedy", t.delay_remedy, DELAY_REMEDIES)
    _positive("train.aux_features", t.aux_features, 1)
    if _schedules.get(t.schedule).microbatches and t.microbatches > t.batch_size:
        raise ConfigError(f"train.microbatches: {t.microbatches} micro-batches cannot split a batch of {t.batch_size}")
    _positive("train.eval_every", t.eval_every, 0)
    _positive("train.eval_batch", t.eval_batch, 1)
    if not 0 <= t.target_accuracy <= 1:
        raise ConfigError(f"train.target_accuracy: must be between 0 and 1, got {t.target_accuracy}")
    _positive("train.seed", t.seed, 0)
    _positive("data.seed", d.seed, 0)
    if t.eval_batch > MAX_EVAL_BATCH:
        raise ConfigError(f"train.eval_batch: must be at most {MAX_EVAL_BATCH}, got {t.eval_batch}")
    if not r.host:
        raise ConfigError("runtime.host: must not be empty")
    _choice("runtime.launcher", r.launcher, LAUNCHERS)
    _choice("runtime.security", r.security, SECURITY)
    if stages_known(cfg):
        cfg = check_worker_counts(cfg)
        r = cfg.runtime
    parse_slow(r.slow, cfg, m.layers if stages_known(cfg) else None)
    if r.launcher == "agents":
        if not r.listen:
            raise ConfigError("runtime.listen: the agents launcher needs ADDR:PORT to wait for agents on (--listen)")
        if not r.hosts:
            raise ConfigError("runtime.hosts: the agents launcher needs the agent name of every worker (--hosts)")
        from asyncdni.wire.security import KeyError_, check_agent_name
        for i, name in enumerate(r.hosts):
            try:
                check_agent_name(name, f"runtime.hosts[{i}]")
            except KeyError_ as e:       # a name no agent can take (agent --name refuses it)
                raise ConfigError(str(e)) from None
    if r.listen:
        host, sep, port = r.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"runtime.listen: {r.listen!r} is not ADDR:PORT")
        if host.strip("[]") in ("0.0.0.0", "::", "*"):
            raise ConfigError(f"runtime.listen: {host} listens on every address, but each worker is told this "
                              f"address to connect back to, and cannot reach {host}; give an address of this "
                              f"host that the agents reach (the one in their --join)")
    if r.ports:
        for i, p in enumerate(r.ports):
            if not 1 <= p <= 65535:
                raise ConfigError(f"runtime.ports[{i}]: {p} is not a TCP port (1-65535)")
        if len(set(r.ports)) != len(r.ports):
            raise ConfigError("runtime.ports: ports must be distinct")
    _positive("runtime.blas_threads", r.blas_threads, 1)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", r.device):
        raise ConfigError(f"runtime.device: {r.device!r} is not cpu, cuda or cuda:N")
    if r.device != "cpu" and not m.model:
        raise ConfigError(f"runtime.device: {r.device} needs torch stages (model.model); the numpy MLP runs on the CPU")
    if not (0 < r.heartbeat_interval <= 60):
        raise ConfigError(f"runtime.heartbeat_interval: must be between 0 and 60 seconds, got {r.heartbeat_interval}")
    _positive("runtime.heartbeat_misses", r.heartbeat_misses, 1)
    if not (0 <= r.stall_timeout <= 86400):      # (NaN fails the comparison too)
        raise ConfigError(f"runtime.stall_timeout: must be 0 (auto) or up to 86400 seconds, got {r.stall_timeout}")
    if not (0 < r.start_timeout <= 3600):
        raise ConfigError(f"runtime.start_timeout: must be between 0 and 3600 seconds, got {r.start_timeout}")
    _positive("runtime.checkpoint_every", r.checkpoint_every, 0)
    _positive("runtime.keep_checkpoints", r.keep_checkpoints, 1)
    _positive("runtime.max_restarts", r.max_restarts, 0)
    if r.checkpoint_every and not (r.checkpoint_dir or r.resume):
        raise ConfigError("runtime.checkpoint_dir: required when runtime.checkpoint_every is set")
    if r.max_restarts and not r.checkpoint_every:
        raise ConfigError("runtime.max_restarts: needs runtime.checkpoint_every (restarts resume from a checkpoint)")
    if d.dataset == "addition":          # the data's shape is known now: check the sizes exactly
        steps = t.steps or max(1, round(t.epochs * (d.train_size // t.batch_size)))
        check_resources(cfg, 2 * d.bits, d.bits + 1, steps)
    else:                                # the smallest possible data: the rest is checked in make_plan
        check_resources(cfg, 1, 2, t.steps)
    return cfg


# arrays of a parameter's size per parameter: itself, its gradient, the optimizer's scratch
# buffer and state (momentum: velocity; adam: two moments)
_OPTIMIZER_COPIES = {"sgd": 3, "momentum": 4, "adam": 5, "adamw": 5}


def _gib(n: float) -> str:
    g = n / 2**30
    if g < 1024:
        return f"{g:.3g} GiB"
    return f"{g / 1024:,.1f} TiB" if g < 2**40 else f"{g / 1024:.2e} TiB"


def layer_param_counts(cfg: RunConfig, in_dim: int, n_out: int) -> list[int]:
    """Scalars per layer worker: the dense layer and, but for the last, its SG model and
    batch normalisation (the arithmetic of ``LayerSpec.param_count``, without building specs)."""
    t = cfg.train
    widths = (in_dim,) + cfg.model.hidden_widths() + (n_out,)
    k = n_out if t.cond else 0
    out = []
    for i in range(len(widths) - 1):
        n = (widths[i] + 1) * widths[i + 1]
        if i < len(widths) - 2:
            n += sg_param_count(t.sg_model, widths[i + 1], k, t.sg_hidden, t.sg_layers, t.sg_rank)
            if cfg.model.batch_norm:
                n += 3 * widths[i + 1]       # gamma and beta instead of b, running mean and variance
        out.append(n)
    return out


def available_memory() -> int:
    import psutil
    return int(psutil.virtual_memory().available)


def check_resources(cfg: RunConfig, in_dim: int, n_out: int, steps: int) -> None:
    """Refuse, with one line, a run whose weights, optimizer state or step history cannot fit
    in this machine's available memory: with all workers on one host, their sum; otherwise the
    largest single worker. A run that would allocate terabytes must fail here, at once, not
    in a worker (a MemoryError there, or an overflow in a size computed from it)."""
    counts = layer_param_counts(cfg, in_dim, n_out)
    per_layer = [4 * n * _OPTIMIZER_COPIES.get(cfg.train.optimizer, 5) for n in counts]
    # the coordinator receives every layer's float32 parameters at the end, and the feeder's history
    feeder = FEEDER_BYTES_PER_STEP * steps
    coordinator = 4 * sum(counts) + 24 * steps
    r = cfg.runtime
    one_host = not r.hosts or len(set(r.hosts)) == 1
    need = sum(per_layer) + feeder + coordinator if one_host else max(per_layer + [feeder, coordinator])
    avail = available_memory()
    if need <= avail:
        return
    if feeder + 24 * steps > sum(per_layer) + 4 * sum(counts):
        raise ConfigError(f"train.steps: {steps} steps need {_gib(feeder + 24 * steps)} of per-step history "
                          f"(feeder and coordinator), more than the {_gib(avail)} of memory available")
    field_ = "model.widths" if cfg.model.widths else "model.width"
    biggest = max(range(len(per_layer)), key=per_layer.__getitem__)
    raise ConfigError(f"{field_}: this network needs {_gib(need)} for weights and {cfg.train.optimizer} state "
                      f"(layer {biggest + 1} alone {_gib(per_layer[biggest])}), more than the {_gib(avail)} "
                      "of memory available")


# Per-dataset defaults, applied under the TOML file and the flags: a field the user set (in
# either, even to the global default) keeps the user's value. Measured in README "Presets".
PRESETS: dict[str, dict[str, object]] = {
    # binary addition: wide tanh layers and a higher learning rate learn every bit of the sum
    # (relu at width 128 / lr 5e-4 stalls at ~94% bits and collapses under async staleness)
    # 6 epochs (1,536 steps of 64): every seed 0-4 reached >= 99.8% bits and >= 98.9% exact sums
    # in 8.8-10.1 s of training on the idle 2-core machine (8 epochs: 99.9% / 99.4%+ in 13.6 s)
    "addition": {"model.width": 256, "model.activation": "tanh", "train.lr": 1e-3, "train.epochs": 6.0},
    # MNIST-format files: the global defaults (relu; tanh costs ~2 points of test accuracy)
    "idx": {},
}


# the zoo's conv models, over the dataset's preset: a lower SG learning rate. Measured
# (2026-12-05, MNIST split, 10 epochs, async cDNI): the cnn ended at 97.25% / 96.85% (seeds
# 0 / 1) with sg_lr 1e-3 and at 97.95% / 97.40% with 3e-4; a user's residual CNN
# (examples/residual_cnn.py, sequential, 200 steps, in-process) 27.5% against 38.3%. Adam moves
# every SG weight by about its learning rate whatever the error, and a conv stage's gradients
# are small. Not for the zoo's mlp: its async run fell from 93.60% to 87.30% at 3e-4.
TORCH_PRESET: dict[str, object] = {"train.sg_lr": 3e-4}
TORCH_PRESET_MODELS = ("cnn", "resnet")


def apply_preset(d: dict) -> tuple[dict, tuple[str, ...]]:
    """The dataset's preset under a nested config dict (TOML + overrides): returns the merged
    dict and the dotted names the preset filled in. The dataset is the one ``d`` names, else
    the default. Fields given in ``d`` are never touched; nor is ``model.width`` when
    ``model.widths`` is given (the explicit list overrides it), nor ``train.epochs`` when
    ``train.steps`` is given."""
    data = d.get("data") if isinstance(d.get("data"), dict) else {}
    dataset = data.get("dataset", DataConfig.dataset)
    preset = dict(PRESETS.get(dataset, {}) if isinstance(dataset, str) else {})
    model = d.get("model") if isinstance(d.get("model"), dict) else {}
    if model.get("model") in TORCH_PRESET_MODELS:
        preset.update(TORCH_PRESET)
    applied = []
    for dotted in preset:
        section, _, key = dotted.partition(".")
        given = d.get(section) if isinstance(d.get(section), dict) else {}
        if key in given or (dotted == "model.width" and given.get("widths")):
            continue
        if dotted == "train.epochs" and given.get("steps"):
            continue                      # an explicit step count makes the epochs moot
        applied.append(dotted)
    return merge(d, {k: preset[k] for k in applied}), tuple(applied)


def infer_dataset(d: dict) -> dict:
    """A nested config dict with ``data.path`` but no ``data.dataset``: the dataset kind from
    the path's suffix (.npz, .npy, .csv; anything else: a directory of IDX files)."""
    data = d.get("data")
    if not isinstance(data, dict) or "dataset" in data or not isinstance(data.get("path"), str) or not data["path"]:
        return d
    return merge(d, {"data.dataset": infer_format(data["path"])})


def build(config_path: str | None = None, overrides: dict | None = None, preset: bool = True,
          defaults: dict | None = None) -> RunConfig:
    """TOML file (optional) + dotted overrides -> validated RunConfig. A ``data.path`` without
    a ``data.dataset`` names its kind by suffix (:func:`infer_dataset`). With ``preset`` (the
    default) the dataset's :data:`PRESETS` fill in what neither the file nor the overrides set.
    ``defaults`` (dotted) fill in, beneath both, what neither sets (``asyncdni train`` puts
    the checkpoints in its run directory that way); unlike a preset's, they are not marked.
    A file written by :func:`to_toml` names its preset fields; one that an override sets is
    no longer the preset's."""
    overrides = overrides or {}
    d = infer_dataset(merge(load_toml(config_path) if config_path else {}, overrides))
    if isinstance(d.get("preset"), list):
        d["preset"] = [k for k in d["preset"] if k not in overrides]
    for dotted, value in (defaults or {}).items():
        section, _, key = dotted.partition(".")
        given = d.get(section)
        if not isinstance(given, dict) or key not in given:
            d = merge(d, {dotted: value})
    applied: tuple[str, ...] = ()
    if preset:
        d, applied = apply_preset(d)
    if applied:
        d["preset"] = list(applied)
    return validate(from_dict(d))


# ------------------------------------------------------------------ TOML writing
def _toml_string(name: str, s: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for ch in s:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\u{o:04x}")
        elif 0xD800 <= o <= 0xDFFF:      # a lone surrogate (undecodable bytes of a path): no TOML for it
            raise ConfigError(f"{name}: {s!r} holds bytes that are not UTF-8 and cannot be written to TOML")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(name: str, v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)                   # '0.001', '1e-05', '1e+16': each a TOML float, read back exactly
    if isinstance(v, str):
        return _toml_string(name, v)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(f"{name}[{i}]", x) for i, x in enumerate(v)) + "]"
    raise TypeError(f"{name}: no TOML form for {type(v).__name__}")   # programming error


def to_toml(cfg: RunConfig, header: str = "") -> str:
    """The whole configuration as TOML, every field of every section (what was in force,
    presets applied), and ``preset``: the fields the preset filled in. ``build(path)`` reads
    it back to an equal RunConfig, provenance included. ``header``: comment lines on top."""
    lines = [f"# {h}" if h else "#" for h in header.splitlines()]
    lines.append(f"preset = {_toml_value('preset', list(cfg.preset))}")
    for section, cls in _SECTION_CLASSES.items():
        lines += ["", f"[{section}]"]
        values = getattr(cfg, section)
        for f in dataclasses.fields(cls):
            lines.append(f"{f.name} = {_toml_value(f'{section}.{f.name}', getattr(values, f.name))}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ resuming
def value_of(cfg: RunConfig, dotted: str):
    """A field's value; train.sg_target and train.sg_clip as they apply (:func:`sg_in_effect`)."""
    if dotted in ("train.sg_target", "train.sg_clip"):
        return sg_in_effect(cfg)[dotted == "train.sg_clip"]
    section, _, key = dotted.partition(".")
    return getattr(getattr(cfg, section), key)


def sg_in_effect(cfg: RunConfig) -> tuple[str, float]:
    """(train.sg_target, train.sg_clip) as they apply: "auto" resolved where the configuration
    alone knows the number of stages (the numpy MLP: model.layers; schedules.resolve_*).
    Torch stages keep "auto" (-1 for the clip): their stage count is the model's, and the
    plan resolves it. A checkpoint's digest and a resume's comparison use these values, so
    a run made with "auto" and one made with what it chose are the same configuration."""
    t = cfg.train
    if cfg.model.model or t.schedule not in SCHEDULES:
        return t.sg_target, t.sg_clip
    target = _schedules.resolve_sg_target(t.sg_target, cfg.model.layers, t.cond, _schedules.get(t.schedule),
                                          t.sg_every)
    return target, _schedules.resolve_sg_clip(t.sg_clip, target)


def state_fields() -> list[str]:
    """The dotted fields that determine a model's state: those in the digest."""
    return [f for f in field_names() if not f.startswith("runtime.")
            and not (f.startswith("train.") and f.partition(".")[2] in RUN_ONLY_TRAIN_FIELDS)]


def show_value(v) -> str:
    """A configuration value as a message prints it."""
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "()"
    if isinstance(v, str):
        return v or "''"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _keeps(dotted: str) -> str:
    section, _, key = dotted.partition(".")
    if section == "model":
        return "its architecture"
    if section == "data":
        return "its data"
    if key == "seed":
        return "its seeds"
    if key.startswith("sg_") or key == "cond":
        return "its synthetic-gradient models"
    if key in ("optimizer", "weight_decay"):
        return "its optimizer"
    return f"its {key.replace('_', ' ')}"


def _differ(a, b) -> bool:
    return a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def state_difference(old: RunConfig, new: RunConfig) -> tuple[str, object, object] | None:
    """The first field that determines the model's state and differs: (field, old, new)."""
    diffs = state_differences(old, new)
    return diffs[0] if diffs else None


def state_differences(old: RunConfig, new: RunConfig) -> list[tuple[str, object, object]]:
    """Every field that determines the model's state and differs: [(field, old, new)]."""
    out = []
    for dotted in state_fields():
        a, b = value_of(old, dotted), value_of(new, dotted)
        if _differ(a, b):
            out.append((dotted, a, b))
    return out


def explain_mismatch(recorded, cfg: RunConfig, where: str = "in the checkpoint") -> str | None:
    """Why a checkpoint whose manifest records configuration ``recorded`` (a ``to_dict()``) is
    not one of ``cfg``'s, naming the field, e.g. 'model.width is 256 in the checkpoint, 128
    here'; None when the record is missing or unreadable."""
    if not isinstance(recorded, dict):
        return None
    # a field the record lacks was added after it was written: the record's run had the
    # behaviour of before, the value DIGEST_OMIT_AT_DEFAULT names (not today's default)
    recorded = {k: dict(v) if isinstance(v, dict) else v for k, v in recorded.items()}
    for dotted, before in DIGEST_OMIT_AT_DEFAULT.items():
        section, _, key = dotted.partition(".")
        if isinstance(recorded.get(section), dict):
            recorded[section].setdefault(key, before)
    try:
        old = from_dict(recorded)
    except (ConfigError, TypeError, ValueError):
        return None
    diffs = state_differences(old, cfg)
    if not diffs:
        return None
    return "; ".join(f"{dotted} is {show_value(a)} {where}, {show_value(b)} here" for dotted, a, b in diffs)


def resume_changes(old: RunConfig, new: RunConfig, where: str, step: int | None = None,
                   old_name: str = "in the run") -> list[dict]:
    """What a resumed run changes against the run it continues, as ``{"field", "old", "new",
    "step"}`` for each field of [model], [data] and [train] that differs (the placement,
    [runtime], is not recorded). A field that determines the model's state (architecture,
    data, optimizer, SG models, seeds) may not change: a ConfigError names it and both
    values in one line. Nor may a change of schedule add or drop state: the local schedule's
    auxiliary heads, or torch stages' SG models (built only under the DNI schedules) and
    their LR scheduler (a torch stage resumes its optimizer's own learning rate under a
    schedule, so lr changes only under ``lr_schedule = "constant"``)."""
    diff = state_difference(old, new)
    if diff is not None:
        dotted, a, b = diff
        raise ConfigError(f"{where}: {dotted} is {show_value(a)} {old_name}, {show_value(b)} here; "
                          f"a resumed run keeps {_keeps(dotted)}")
    to, tn = old.train, new.train
    go, gn = _schedules.get(to.schedule).gradient, _schedules.get(tn.schedule).gradient
    sched = f"{where}: train.schedule is {to.schedule} {old_name}, {tn.schedule} here"
    if (go == _schedules.LOCAL) != (gn == _schedules.LOCAL):
        raise ConfigError(f"{sched}; the local schedule's auxiliary heads are part of each layer's state, so a "
                          "resumed run does not switch into or out of local")
    if go == _schedules.LOCAL and to.aux_features != tn.aux_features:
        raise ConfigError(f"{where}: train.aux_features is {to.aux_features} {old_name}, {tn.aux_features} here; "
                          "a resumed run keeps its auxiliary heads")
    if new.model.model:
        if (go == _schedules.SYNTHETIC) != (gn == _schedules.SYNTHETIC):
            raise ConfigError(f"{sched}; torch stages hold SG models only under the DNI schedules "
                              f"({', '.join(n for n in SCHEDULES if _schedules.get(n).gradient == _schedules.SYNTHETIC)}), "
                              "so a resumed torch run stays with them or without them")
        for k in ("lr_schedule", "lr_step_size", "lr_gamma"):
            if _differ(getattr(to, k), getattr(tn, k)):
                raise ConfigError(f"{where}: train.{k} is {show_value(getattr(to, k))} {old_name}, "
                                  f"{show_value(getattr(tn, k))} here; torch stages resume their LR scheduler's "
                                  "own state, so a resumed torch run keeps its LR schedule")
        if _differ(to.lr, tn.lr) and tn.lr_schedule != "constant":
            raise ConfigError(f"{where}: train.lr is {to.lr:g} {old_name}, {tn.lr:g} here; torch stages under an LR "
                              f"schedule ({tn.lr_schedule}) resume the scheduler's learning rate, so lr changes on "
                              "resume only with lr_schedule constant")
    out = []
    for dotted in field_names():
        if dotted.startswith("runtime."):
            continue
        a, b = value_of(old, dotted), value_of(new, dotted)
        if _differ(a, b):
            out.append({"field": dotted, "old": list(a) if isinstance(a, tuple) else a,
                        "new": list(b) if isinstance(b, tuple) else b, "step": step})
    return out


def replace(cfg: RunConfig, **dotted) -> RunConfig:
    """``replace(cfg, **{"train.schedule": "backprop"})`` -> validated copy."""
    d = merge(cfg.to_dict(), dotted)
    d["preset"] = [k for k in cfg.preset if k not in dotted]
    return validate(from_dict(d))
