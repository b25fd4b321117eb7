"""From a RunConfig and a dataset to the concrete network: layer specs, loss, step count."""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

from asyncdni import schedules
from asyncdni.config import RunConfig
from asyncdni.numerics.data import Dataset, binary_addition_split, load_csv, load_idx_dir, load_npy, load_npz
from asyncdni.numerics.data import even_ranges
from asyncdni.numerics.layer import LayerSpec


@dataclass(frozen=True)
class Plan:
    specs: tuple[LayerSpec, ...]
    loss: str
    steps: int
    batch_size: int
    in_dim: int
    n_out: int
    task: str
    # the first layer's per-sample input shape: the feeder, the reference and every evaluation
    # hand it x as (B, *in_shape). The numpy MLP takes (n_features,); a backend with
    # convolutions may take the dataset's (C, H, W)
    in_shape: tuple[int, ...] = ()
    # the codecs between layers (train.wire_fwd, train.wire_bwd) and the gradient codec's error
    # feedback (train.wire_feedback): the reference sends its mailboxes through them as the workers do
    wire: tuple = ("fp32", "fp32", True)
    n_train: int = 0        # training samples (the activation histories of --wire-fwd aq:CODEC)

    def __post_init__(self):
        if not self.in_shape:
            object.__setattr__(self, "in_shape", (self.in_dim,))

    @property
    def n_layers(self) -> int:
        return len(self.specs)

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.in_dim,) + tuple(s.fan_out for s in self.specs)


def load_datasets(cfg: RunConfig) -> tuple[Dataset, Dataset]:
    d = cfg.data
    if d.dataset == "addition":
        return binary_addition_split(d.bits, d.train_size, d.test_size, d.seed)
    if d.dataset == "npz":
        return load_npz(d.path, task=d.task, test_fraction=d.test_fraction, seed=d.seed)
    if d.dataset == "npy":
        return load_npy(d.path, d.labels_path, task=d.task, test_fraction=d.test_fraction, seed=d.seed)
    if d.dataset == "csv":
        return load_csv(d.path, label_column=d.label_column, task=d.task, test_fraction=d.test_fraction,
                        seed=d.seed)
    return load_idx_dir(d.path, test_fraction=d.test_fraction, seed=d.seed)


def data_info(cfg: RunConfig, train: Dataset, test: Dataset) -> dict:
    """What a report says about the data: the dataset kind and path (or binary addition's
    bits), how the test set was split off (``split``: "fraction" with ``test_fraction`` and
    the data seed, "files" for separate test files or arrays, "generated" for binary
    addition's independent draws), the set sizes and the seeds."""
    d = cfg.data
    out = {"dataset": d.dataset, "path": d.path, "name": train.name, "task": train.task,
           "split": train.split, "train": len(train), "test": len(test), "data_seed": d.seed,
           "seed": cfg.train.seed}
    if d.dataset == "addition":
        out["bits"] = d.bits
    if d.labels_path:
        out["labels_path"] = d.labels_path
    if train.split == "fraction":
        out["test_fraction"] = d.test_fraction
    return out


def resolve_loss(cfg: RunConfig, task: str) -> str:
    if cfg.train.loss != "auto":
        return cfg.train.loss
    return {"classification": "softmax_ce", "regression": "mse"}.get(task, "sigmoid_bce")


TARGETS = {"classification": "class labels", "bits": "bit targets", "regression": "float regression targets"}
LOSS_TASKS = {"softmax_ce": ("classification",), "sigmoid_bce": ("bits",), "mse": ("bits", "regression")}


def make_plan(cfg: RunConfig, train: Dataset) -> Plan:
    from asyncdni.config import ConfigError, check_resources
    t = cfg.train
    if t.batch_size > len(train):
        raise ConfigError(f"train.batch_size: {t.batch_size} is larger than the training set ({len(train)} examples)")
    loss = resolve_loss(cfg, train.task)
    if train.task not in LOSS_TASKS[loss]:
        need = " or ".join(TARGETS[k] for k in LOSS_TASKS[loss])
        raise ConfigError(f"train.loss: {loss} needs {need}, but dataset {train.name!r} has {TARGETS[train.task]}"
                          + (" (use mse or auto)" if train.task == "regression" else ""))
    if train.task == "regression" and t.target_accuracy:
        raise ConfigError(f"train.target_accuracy: dataset {train.name!r} is a regression (reported: test RMSE "
                          "and R²), it has no accuracy to reach; leave it at 0")
    in_dim = train.n_features
    sched = schedules.get(t.schedule)
    steps_per_epoch = len(train) // t.batch_size
    steps = t.steps if t.steps > 0 else max(1, round(t.epochs * steps_per_epoch))
    # what every layer shares, whatever the backend
    common = dict(
        init=cfg.model.init, loss=loss, task=train.task, n_out=train.n_out,
        optimizer=t.optimizer, lr=t.lr, sg_model=t.sg_model, sg_hidden=t.sg_hidden, sg_lr=t.sg_lr,
        cond=t.cond, microbatches=t.microbatches if sched.microbatches else 1, seed=t.seed,
        sg_reuse=t.sg_reuse_prediction, schedule=sched.name, stash=t.stash_weights,
        delay_remedy=t.delay_remedy, aux_features=t.aux_features,
        sg_layers=t.sg_layers, sg_stale_decay=t.sg_stale_decay, sg_rank=t.sg_rank, sg_every=t.sg_every,
        sg_clip=t.sg_clip, sg_damp=t.sg_damp, sg_trust=t.sg_trust, weight_decay=t.weight_decay, lr_schedule=t.lr_schedule,
        lr_step_size=t.lr_step_size or max(1, steps // 3), lr_gamma=t.lr_gamma, total_steps=steps)
    if cfg.model.model:
        specs, in_shape = _torch_specs(cfg, train, common)
    else:
        widths = (in_dim,) + cfg.model.hidden_widths() + (train.n_out,)
        K = cfg.model.layers
        specs = [LayerSpec(
            index=i, n_layers=K, fan_in=widths[i], fan_out=widths[i + 1],
            # the last layer: logits, or for mse on bits probabilities; regression is linear
            activation=("sigmoid" if loss == "mse" and train.task == "bits" else "linear") if i == K - 1
            else cfg.model.activation, batch_norm=cfg.model.batch_norm, **common) for i in range(K)]
        in_shape = (in_dim,)
        check_resources(cfg, in_dim, train.n_out, steps)
    # train.sg_target / sg_clip "auto" as they apply to this many stages (schedules.resolve_*)
    target = schedules.resolve_sg_target(t.sg_target, len(specs), t.cond, sched, t.sg_every)
    specs = [dataclasses.replace(s, sg_target=target, sg_clip=schedules.resolve_sg_clip(t.sg_clip, target))
             for s in specs]
    return Plan(tuple(specs), loss, steps, t.batch_size, in_dim, train.n_out, train.task, in_shape=in_shape,
                wire=(t.wire_fwd, t.wire_bwd, t.wire_feedback), n_train=len(train))


def _torch_specs(cfg: RunConfig, train: Dataset, common: dict) -> tuple[list[LayerSpec], tuple[int, ...]]:
    """Torch stages: the model is built once here (seeded as every stage's process builds it)
    to learn the stages and their per-sample shapes; each spec names the model, its split and
    its stage's shapes. The first stage reads the dataset's own sample shape (C, H, W for images)."""
    from asyncdni.config import ConfigError
    try:
        from asyncdni.torch.models import ModelError, build_stages, stage_shapes
    except ImportError:
        raise ConfigError("model.model: torch stages need the torch extra: pip install 'asyncdni[torch]'") from None
    m = cfg.model
    split = m.split or (str(m.layers) if m.model == "mlp" else "")
    sample_shape = tuple(int(d) for d in train.sample_shape)
    try:
        stages = build_stages(m.model, split, sample_shape, train.n_out, cfg.train.seed)
        shapes = stage_shapes(stages, sample_shape, train.n_out)
    except ModelError as e:
        raise ConfigError(f"model.model: {e}") from None
    K = len(stages)
    specs = [LayerSpec(index=i, n_layers=K, fan_in=math.prod(a), fan_out=math.prod(b), activation="linear",
                       backend="torch", model=m.model, split=split, sample_shape=sample_shape, in_shape=tuple(a),
                       out_shape=tuple(b), device=cfg.runtime.device, **common)
             for i, (a, b) in enumerate(shapes)]
    return specs, sample_shape


def microbatch_bounds(batch: int, m: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges of m near-equal micro-batches."""
    return even_ranges(batch, m)
