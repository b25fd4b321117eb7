"""Run directories: what ``asyncdni train`` leaves behind, and what ``--resume DIR`` and
``asyncdni eval`` read back.

::

    runs/20261212-101500-async/
      config.toml      every value in force (presets applied): --config reads it back
      report.json      the summary, as --report writes it
      evals.csv        the evaluation curve: step, train_time, loss, metric, metric2, n
      checkpoints/     with --checkpoint-every (unless --checkpoint-dir names another place)

Every file is written atomically (a temporary file renamed over it). ``config.toml`` is
written once the workers have started, so a run that never started leaves nothing; a run
that fails before its first checkpoint leaves nothing either (:func:`discard`), and one
that fails after it can be continued with ``--resume DIR``.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from asyncdni import __version__
from asyncdni import config as C
from asyncdni import files
from asyncdni.engine import checkpoint as CK

CONFIG = "config.toml"
REPORT = "report.json"
EVALS = "evals.csv"
TRACE = "trace.json"              # the workers' timelines (Chrome Trace Event format: Perfetto)
PLOTS = "plots"                   # loss / test metric curves and layer utilisation (with matplotlib)
CHECKPOINTS = "checkpoints"
RUNS = "runs"                     # where the default run directories go, under the current directory
# the checkpoint directory of a run directory not yet chosen (cli: replaced once it is)
PLACEHOLDER = "\x00run-dir/checkpoints"


def default_path(schedule: str, now: float | None = None) -> Path:
    """``runs/<UTC time YYYYmmdd-HHMMSS>-<schedule>``, relative to the current directory."""
    return Path(RUNS) / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{schedule}"


def is_run_dir(path) -> bool:
    return (Path(path) / CONFIG).is_file()


def run_dir_of(resume: str) -> Path | None:
    """The run directory that ``--resume PATH`` names: PATH itself when it holds a
    ``config.toml``, or its parent when PATH is a run directory's ``checkpoints``; None for
    a plain checkpoint directory (the older form, every flag given again)."""
    p = Path(resume)
    if is_run_dir(p):
        return p
    if p.name == CHECKPOINTS and is_run_dir(p.parent):
        return p.parent
    return None


def checkpoints_of(run_dir: Path, cfg: C.RunConfig) -> Path | None:
    """Where a run directory's checkpoints are: its ``checkpoints``, or the checkpoint
    directory its configuration named elsewhere; None when there are none."""
    inside = Path(run_dir) / CHECKPOINTS
    if inside.is_dir():
        return inside
    if cfg.runtime.checkpoint_dir and Path(cfg.runtime.checkpoint_dir).is_dir():
        return Path(cfg.runtime.checkpoint_dir)
    return None


def _non_empty(p: Path) -> bool:
    try:
        with os.scandir(p) as it:
            return any(True for _ in it)
    except OSError:
        return True


def claim(path: Path | None, schedule: str, resume_dir: Path | None = None) -> tuple[Path, bool]:
    """The run directory for this run, made if needed: ``path`` (``--run-dir``), else the
    resumed run's own, else a new :func:`default_path` (``-2``, ``-3``, ... when a run of the
    same second has it). Returns (directory, made here). An existing directory that holds
    anything is refused in one line unless it is the run being resumed."""
    if path is None and resume_dir is not None:
        return resume_dir, False
    if path is not None:
        if resume_dir is not None and _same(path, resume_dir):
            return resume_dir, False
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise C.ConfigError(f"--run-dir {path}: exists and is not a directory")
            if _non_empty(path):
                bench = (path / "bench.json").exists() or (path / "lab.json").exists()
                how = (f"continue that run with --resume {path}" if is_run_dir(path) and not bench
                       else "choose a new or empty directory")
                raise C.ConfigError(f"--run-dir {path}: already exists and is not empty; {how}")
            return path, False
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise C.ConfigError(f"--run-dir {path}: cannot create it: {e.strerror or e}") from None
        return path, True
    base = default_path(schedule)
    for i in range(1, 1000):
        candidate = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise C.ConfigError(f"run directory {candidate}: cannot create it: {e.strerror or e} "
                                "(--run-dir DIR puts it elsewhere)") from None
        return candidate, True
    raise C.ConfigError(f"run directory {base}: 999 runs of this second exist already; give --run-dir DIR")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def write_config(run_dir: Path, cfg: C.RunConfig) -> Path:
    """``config.toml``: the whole configuration in force, atomically."""
    path = Path(run_dir) / CONFIG
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    header = (f"asyncdni {__version__}: the configuration in force of this run (presets applied), {stamp}.\n"
              f"asyncdni train --resume {run_dir} continues the run (flags given with it override);\n"
              f"asyncdni train --config {path} starts a new run like it, in a run directory of its own.")
    files.atomic_write(path, C.to_toml(cfg, header))
    return path


def fresh_from(config_path: str) -> dict:
    """Overrides for a new run from another run's ``config.toml`` (``--config``): that run's
    checkpoint directory and resume point are its own, not the new run's. Empty for any
    other TOML file, and for checkpoints the run kept elsewhere (its --checkpoint-dir)."""
    p = Path(config_path)
    if p.name != CONFIG or not p.is_file():
        return {}
    try:
        d = C.load_toml(str(p))
    except C.ConfigError:
        return {}                                    # build() reports it, in its own words
    rt = d.get("runtime") if isinstance(d.get("runtime"), dict) else {}
    out = {}
    if rt.get("resume"):
        out["runtime.resume"] = ""
    ck = rt.get("checkpoint_dir")
    if isinstance(ck, str) and ck and _same(Path(ck), p.parent / CHECKPOINTS):
        out["runtime.checkpoint_dir"] = PLACEHOLDER
    return out


def has_complete_checkpoint(root) -> bool:
    try:
        CK.find_latest(root)
        return True
    except CK.CheckpointError:
        return False


def discard(run_dir: Path) -> bool:
    """After a fresh run failed: remove the run directory made for it, with what this run
    wrote there (``config.toml``, a ``checkpoints`` directory without any complete
    checkpoint), unless it holds a complete checkpoint (then ``--resume`` continues it) or
    anything else. Returns whether it was removed."""
    run_dir = Path(run_dir)
    ck = run_dir / CHECKPOINTS
    if ck.is_dir() and has_complete_checkpoint(ck):
        return False
    try:
        names = set(os.listdir(run_dir))
    except OSError:
        return False
    if not names <= {CONFIG, CHECKPOINTS}:
        return False
    if CHECKPOINTS in names and ck.is_dir() and not ck.is_symlink():
        shutil.rmtree(ck, ignore_errors=True)
    try:
        (run_dir / CONFIG).unlink()
    except OSError:
        pass
    try:
        run_dir.rmdir()
    except OSError:
        return False
    if run_dir.parent.name == RUNS:            # the default runs/ it made, if nothing else is there
        try:
            run_dir.parent.rmdir()
        except OSError:
            pass
    return True


# ------------------------------------------------------------------ asyncdni eval
def _recorded_config(ck: CK.Checkpoint) -> C.RunConfig | None:
    rec = ck.extra.get("config")
    if not isinstance(rec, dict):
        return None
    try:
        return C.validate(C.from_dict(rec))
    except (C.ConfigError, TypeError, ValueError) as e:
        raise CK.CheckpointError(f"checkpoint {ck.directory}: the configuration its manifest records is "
                                 f"not valid: {e}") from None


def locate(target: str, config_path: str | None = None) -> tuple[CK.Checkpoint, C.RunConfig]:
    """The checkpoint ``target`` names and the configuration that made it.

    ``target``: a run directory (its newest complete checkpoint of its configuration), a
    checkpoint directory (its newest complete checkpoint) or one checkpoint's step
    directory. The configuration: ``config_path`` if given, else the one the checkpoint's
    manifest records, else the run directory's ``config.toml``."""
    p = Path(target)
    if not p.exists():
        raise C.ConfigError(f"{target}: no such directory")
    if not p.is_dir():
        raise C.ConfigError(f"{target}: not a directory (a run directory, a checkpoint directory or a step "
                            "directory step-NNNNNNNNN)")
    run_dir = run_dir_of(str(p))
    explicit = C.build(config_path) if config_path else None
    if (p / CK.MANIFEST).exists() or p.name.startswith("step-"):      # one checkpoint
        ck = CK.validate(p)
        run_dir = run_dir_of(str(p.parent))
    elif run_dir is not None and run_dir == p:
        base = explicit or C.build(str(p / CONFIG))
        root = checkpoints_of(p, base)
        if root is None:
            raise CK.CheckpointError(f"run directory {p} holds no checkpoints (the run had no --checkpoint-every, "
                                     "or ended before its first)")
        ck, _ = CK.find_latest(root, base.digests(),
                               explain=lambda extra: C.explain_mismatch(extra.get("config"), base))
    else:
        if not CK.has_checkpoints(p):
            raise CK.CheckpointError(f"{target}: neither a run directory ({CONFIG}) nor a checkpoint directory "
                                     "(step-NNNNNNNNN/ with a manifest.json) nor one checkpoint's step directory")
        ck, _ = CK.find_latest(p)
    if explicit is not None:
        cfg = explicit
        if ck.config_digest not in cfg.digests():
            why = C.explain_mismatch(ck.extra.get("config"), cfg, "in the checkpoint")
            raise CK.CheckpointError(f"checkpoint {ck.directory}: made by a different configuration than "
                                     f"{config_path} (" + (why or f"config digest {ck.config_digest}, "
                                                           f"the file's {cfg.digest()}") + ")")
        return ck, cfg
    cfg = _recorded_config(ck)
    if cfg is None and run_dir is not None:
        cfg = C.build(str(run_dir / CONFIG))
        if ck.config_digest not in cfg.digests():
            cfg = None
    if cfg is None:
        raise CK.CheckpointError(f"checkpoint {ck.directory} records no configuration (written before asyncdni "
                                 "recorded one); give the run's settings with --config FILE.toml")
    return ck, cfg


def evaluate_checkpoint(target: str, overrides: dict | None = None, config_path: str | None = None) -> dict:
    """Test loss and metrics of the checkpoint ``target`` names (:func:`locate`), in this
    process and without sockets: the plan's nodes (``make_node``), restored from the
    checkpoint's layer files (``checkpoint.restore_node``), evaluated on the test set as the
    feeder evaluates (``reference.evaluate``). ``overrides``: dotted configuration values,
    e.g. ``{"data.path": ...}`` for data that has moved. Every failure is one line: a
    ConfigError or DataError (bad flags, data), or a CheckpointError."""
    from asyncdni.engine.plan import data_info, load_datasets, make_plan
    from asyncdni.engine.reference import evaluate
    from asyncdni.nodes import make_node
    from asyncdni.numerics.data import infer_format
    ck, cfg = locate(target, config_path)
    ov = dict(overrides or {})
    if ov.get("data.path") and "data.dataset" not in ov:
        ov["data.dataset"] = infer_format(ov["data.path"])
    if ov:
        cfg = C.replace(cfg, **ov)
    train, test = load_datasets(cfg)
    plan = make_plan(cfg, train)
    cfg = C.with_stages(cfg, plan.n_layers)
    if ck.n_layers != plan.n_layers:
        raise CK.CheckpointError(f"checkpoint {ck.directory} has {ck.n_layers} layers, but this model and data "
                                 f"make {plan.n_layers}")
    try:
        nodes = [make_node(s) for s in plan.specs]
    except (RuntimeError, ValueError) as e:
        raise CK.CheckpointError(f"cannot build the model of checkpoint {ck.directory}: {e}") from None
    for i, node in enumerate(nodes):
        try:
            CK.restore_node(node, ck.read_layer(i))
        except CK.CheckpointError as e:
            raise CK.CheckpointError(f"checkpoint {ck.directory} does not fit this model and data: {e}") from None
    ev = evaluate(nodes, plan.loss, test, cfg.train.eval_batch, plan.in_shape)
    return {"target": str(target), "checkpoint": str(ck.directory), "step": ck.step, "task": plan.task,
            "schedule": cfg.train.schedule, "data": data_info(cfg, train, test),
            "test_loss": float(ev["loss"]), "test_metric": float(ev["metric"]),
            "test_metric2": float(ev["metric2"]), "n": int(ev["n"])}
