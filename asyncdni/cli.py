"""The ``asyncdni`` command. argv is parsed here and nowhere in the library."""
from __future__ import annotations

import argparse
import sys

from asyncdni import __version__
from asyncdni import config as C
from asyncdni import schedules as S

# flag -> (dotted config field, argparse kwargs)
TRAIN_FLAGS = {
    "--layers": ("model.layers", dict(type=str, metavar="K", help="dense layers = layer processes (default 4)")),
    "--width": ("model.width", dict(type=str, metavar="N", help="width of every hidden layer (default 128; addition preset 256)")),
    "--widths": ("model.widths", dict(type=str, metavar="W1,W2,..", help="explicit hidden widths, K-1 of them")),
    "--activation": ("model.activation", dict(type=str, help="sigmoid, relu, tanh or linear (default relu; addition preset tanh)")),
    "--init": ("model.init", dict(type=str, help="he or xavier (default he)")),
    "--model": ("model.model", dict(type=str, metavar="NAME|FILE.py:FN|MODULE:FN", help="PyTorch stages (the torch extra): a built-in model (mlp, cnn, resnet) or a function returning one module per stage or an nn.Sequential (default: the numpy MLP)")),
    "--split": ("model.split", dict(type=str, metavar="I,J,..|K", help="torch: cut an nn.Sequential before these child indices, or into K near-equal pieces")),
    "--dataset": ("data.dataset", dict(type=str, help="addition (built in), idx, npz, npy or csv (default addition; "
                                                      "with --data-path: from its suffix)")),
    "--data-path": ("data.path", dict(type=str, metavar="PATH", help="FILE.npz, FILE.csv, X.npy (with --labels-path) "
                                                                     "or a directory of IDX files; the kind follows "
                                                                     "from the suffix (docs/data-formats.md)")),
    "--labels-path": ("data.labels_path", dict(type=str, metavar="Y.npy", help="npy: the labels' .npy file beside --data-path X.npy")),
    "--label-column": ("data.label_column", dict(type=str, metavar="NAME|INDEX", help="csv: the label column, a header name or a 0-based index (default: the last column)")),
    "--task": ("data.task", dict(type=str, help="own data: auto (integer labels: classification; float: regression), classification or regression (default auto)")),
    "--bits": ("data.bits", dict(type=str, metavar="N", help="binary addition: bits per operand (default 8)")),
    "--test-fraction": ("data.test_fraction", dict(type=str, metavar="F", help="idx with one file pair, npz/npy/csv with one array set: held-out fraction (default 0.2)")),
    "--data-seed": ("data.seed", dict(type=str, metavar="S", help="seed of the dataset and split")),
    "--schedule": ("train.schedule", dict(type=str, help=f"{', '.join(C.SCHEDULES)} (default async)")),
    "--steps": ("train.steps", dict(type=str, metavar="N", help="training steps (overrides --epochs)")),
    "--epochs": ("train.epochs", dict(type=str, metavar="E", help="epochs over the training set (default 8)")),
    "--batch-size": ("train.batch_size", dict(type=str, metavar="B", help="batch size (default 64)")),
    "--optimizer": ("train.optimizer", dict(type=str, help="sgd, momentum, adam or adamw (default adam)")),
    "--lr": ("train.lr", dict(type=str, help="learning rate of the layers (default 5e-4; addition preset 1e-3)")),
    "--weight-decay": ("train.weight_decay", dict(type=str, metavar="WD", help="decoupled weight decay of the layers (AdamW-style; default 0)")),
    "--lr-schedule": ("train.lr_schedule", dict(type=str, help="constant, cosine (to 0 over the run) or step (default constant)")),
    "--lr-step-size": ("train.lr_step_size", dict(type=str, metavar="N", help="step schedule: updates between decays (default: a third of the run)")),
    "--lr-gamma": ("train.lr_gamma", dict(type=str, metavar="G", help="step schedule: factor per decay (default 0.1)")),
    "--loss": ("train.loss", dict(type=str, help="auto (classification: softmax_ce, bits: sigmoid_bce, regression: mse), softmax_ce, sigmoid_bce or mse")),
    "--sg-model": ("train.sg_model", dict(type=str, help="synthetic-gradient model: linear, mlp or lowrank (default linear)")),
    "--sg-rank": ("train.sg_rank", dict(type=str, metavar="R", help="rank of the lowrank SG model (default 64)")),
    "--sg-every": ("train.sg_every", dict(type=str, metavar="N", help="regress the SG models on every N-th step only (default 1)")),
    "--sg-hidden": ("train.sg_hidden", dict(type=str, metavar="N", help="hidden width of the mlp SG model (default: the layer's width)")),
    "--sg-layers": ("train.sg_layers", dict(type=str, metavar="N", help="hidden layers of the mlp SG model (default 1)")),
    "--sg-clip": ("train.sg_clip", dict(type=str, metavar="K|auto", help="scale a layer's step from its SG by min(1, K x running |target| / |prediction|); 0: off; auto (default): 0.5 with propagated SG targets, 1 with bootstrapped ones")),
    "--sg-target": ("train.sg_target", dict(type=str, metavar="auto|propagate|bootstrap", help="what trains a layer's SG: the target from above passed down through the layer above (propagate) or the layer above's SG prediction (bootstrap, the DNI paper's); auto (default): propagate for plain DNI and for 6 or more stages, else bootstrap")),
    "--sg-damp": ("train.sg_damp", dict(type=str, metavar="K", help="scale an SG model's step by (K x |target| / |prediction|)^2 (running norms) while its predictions exceed K x its targets; 0: off (default 0)")),
    "--sg-lr": ("train.sg_lr", dict(type=str, help="learning rate of the SG models (default 1e-3; the torch zoo's cnn and resnet 3e-4)")),
    "--max-inflight": ("train.max_inflight", dict(type=str, metavar="N|auto", help="async, delayed, local: steps in flight (default 3); auto: sized from the measured round trip and step time, up to --max-inflight-cap")),
    "--max-inflight-cap": ("train.max_inflight_cap", dict(type=str, metavar="N", help="the largest window --max-inflight auto may choose (default 16)")),
    "--microbatches": ("train.microbatches", dict(type=str, metavar="M", help="pipeline: micro-batches per step (default 4)")),
    "--stash-weights": ("train.stash_weights", dict(type=str, metavar="BOOL", help="delayed: input gradient with the forward pass's weights (default false)")),
    "--delay-remedy": ("train.delay_remedy", dict(type=str, help="delayed: none or lr_scale (lr / (1 + delay)) (default none)")),
    "--wire-fwd": ("train.wire_fwd", dict(type=str, metavar="CODEC", help="codec of the activations between layers: fp32, fp16, bf16, int8 (a scale per row), int8:tensor, topk:F, or aq:CODEC: each sample's change since it last crossed (AQ-SGD; both ends keep every sample's activation) (default fp32)")),
    "--wire-bwd": ("train.wire_bwd", dict(type=str, metavar="CODEC", help="codec of the gradients between layers, the same choices; a lossy one carries error feedback (default fp32)")),
    "--aux-features": ("train.aux_features", dict(type=str, metavar="N", help="local: features an auxiliary classifier reads; wider layers are average-pooled (default 256)")),
    "--seed": ("train.seed", dict(type=str, help="seed of initialisation and batching")),
    "--eval-every": ("train.eval_every", dict(type=str, metavar="N", help="evaluate every N steps (off the clock)")),
    "--eval-batch": ("train.eval_batch", dict(type=str, metavar="N", help="evaluation batch size")),
    "--target-accuracy": ("train.target_accuracy", dict(type=str, metavar="A", help="report the time to reach this test accuracy (0-1; not for regression)")),
    "--host": ("runtime.host", dict(type=str, help="address workers bind and are reached at (default 127.0.0.1)")),
    "--hosts": ("runtime.hosts", dict(type=str, metavar="H0,H1,..", help="per-worker host: the feeder, then each layer")),
    "--ports": ("runtime.ports", dict(type=str, metavar="P,..", help="explicit ports: fwd,bwd per worker, then control")),
    "--blas-threads": ("runtime.blas_threads", dict(type=str, metavar="N", help="BLAS and torch threads per worker (default 1)")),
    "--device": ("runtime.device", dict(type=str, help="torch stages: cpu, cuda or cuda:N (default cpu)")),
    "--heartbeat-interval": ("runtime.heartbeat_interval", dict(type=str, metavar="S", help="seconds between heartbeats")),
    "--stall-timeout": ("runtime.stall_timeout", dict(type=str, metavar="S", help="end (or restart) the run when no worker receives a data message for S seconds (default 0: auto, at least 15 s)")),
    "--checkpoint-every": ("runtime.checkpoint_every", dict(type=str, metavar="N", help="checkpoint every N steps")),
    "--checkpoint-dir": ("runtime.checkpoint_dir", dict(type=str, metavar="DIR", help="where checkpoints are written")),
    "--keep-checkpoints": ("runtime.keep_checkpoints", dict(type=str, metavar="N", help="complete checkpoints kept (default 3)")),
    "--resume": ("runtime.resume", dict(type=str, metavar="DIR", help="continue a run directory from its newest complete checkpoint (flags may change steps, epochs, the learning rate and its schedule, and the schedule); or a checkpoint directory, every flag given again")),
    "--launcher": ("runtime.launcher", dict(type=str, help="local, agents (asyncdni agent on each host) or ray (default local)")),
    "--listen": ("runtime.listen", dict(type=str, metavar="ADDR:PORT", help="agents: where the coordinator waits for agents")),
    "--keys": ("runtime.keys", dict(type=str, metavar="DIR", help="CURVE keys from 'asyncdni keys DIR' (agents launcher)")),
    "--ray-address": ("runtime.ray_address", dict(type=str, metavar="ADDR", help="ray: cluster address (default: a local Ray)")),
    "--slow": ("runtime.slow", dict(type=str, metavar="TARGET:FACTOR,..", help="stragglers: every training forward and backward compute of layer TARGET (1..K) or of every layer on host TARGET (as --hosts names it) takes FACTOR (>= 1) times as long, e.g. 2:2 (layer 2 at half speed); communication is not slowed")),
    "--max-restarts": ("runtime.max_restarts", dict(type=str, metavar="N", help="restart from the last checkpoint after a worker failure, up to N times (default 0)")),
}


# the --x / --no-x flag pairs of train and bench: argparse dest -> config field
PAIRED_FLAGS = {"cond": "train.cond", "batch_norm": "model.batch_norm", "sg_trust": "train.sg_trust",
                "wire_feedback": "train.wire_feedback"}


class _Parser(argparse.ArgumentParser):
    """No abbreviations (``--delay 5`` must not be read as ``--delay-remedy 5``); errors in one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):      # one line, exit code 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# --help shows the flags in these groups, in this order; a flag's group follows from its field
HELP_GROUPS = ("model", "data", "training", "schedule", "synthetic gradients", "runtime", "across machines",
               "output")
_SCHEDULE_FIELDS = {"train.schedule", "train.max_inflight", "train.max_inflight_cap", "train.microbatches",
                    "train.stash_weights", "train.delay_remedy", "train.aux_features"}
_MACHINE_FIELDS = {"runtime.host", "runtime.hosts", "runtime.ports", "runtime.launcher", "runtime.listen",
                   "runtime.keys", "runtime.ray_address", "train.wire_fwd", "train.wire_bwd"}
_OUTPUT_FIELDS = {"train.eval_every", "train.eval_batch", "train.target_accuracy"}


def help_group(field: str) -> str:
    """The --help group of a config field."""
    section, _, key = field.partition(".")
    if field in _SCHEDULE_FIELDS:
        return "schedule"
    if field in _MACHINE_FIELDS:
        return "across machines"
    if field in _OUTPUT_FIELDS:
        return "output"
    if section == "train":
        return "synthetic gradients" if key.startswith("sg_") else "training"
    return section


def _add_train_flags(p: argparse.ArgumentParser) -> dict:
    """The flags of train and bench, in their --help groups; returns the groups by name."""
    groups = {name: p.add_argument_group(name) for name in HELP_GROUPS}
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with [model] [data] [train] [runtime]")
    for flag, (field, kw) in TRAIN_FLAGS.items():
        groups[help_group(field)].add_argument(flag, dest=flag[2:].replace("-", "_"), default=None, **kw)
    g = groups["synthetic gradients"].add_mutually_exclusive_group()
    g.add_argument("--cond", dest="cond", action="store_const", const=True, default=None,
                   help="label-conditioned synthetic gradients (cDNI, default on)")
    g.add_argument("--no-cond", dest="cond", action="store_const", const=False, help="unconditioned synthetic gradients")
    t = groups["synthetic gradients"].add_mutually_exclusive_group()
    t.add_argument("--sg-trust", dest="sg_trust", action="store_const", const=True, default=None,
                   help="scale a layer's SG step by the running cosine of its SG's predictions with their targets "
                        "(deep nets, plain DNI; default off)")
    t.add_argument("--no-sg-trust", dest="sg_trust", action="store_const", const=False, help="no SG trust scaling")
    w = groups["across machines"].add_mutually_exclusive_group()
    w.add_argument("--wire-feedback", dest="wire_feedback", action="store_const", const=True, default=None,
                   help="a lossy --wire-bwd codec carries error feedback (default on)")
    w.add_argument("--no-wire-feedback", dest="wire_feedback", action="store_const", const=False,
                   help="no error feedback for a lossy --wire-bwd codec")
    bn = groups["model"].add_mutually_exclusive_group()
    bn.add_argument("--batch-norm", dest="batch_norm", action="store_const", const=True, default=None,
                    help="batch normalisation of the hidden layers' pre-activations (default off)")
    bn.add_argument("--no-batch-norm", dest="batch_norm", action="store_const", const=False,
                    help="no batch normalisation")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set any config field, e.g. --set train.sg_lr=3e-4 (repeatable)")
    groups["output"].add_argument("--no-progress", action="store_true", help="no progress display")
    groups["runtime"].add_argument("--fail-on-nonfinite", action="store_true",
                   help="stop cleanly at the first NaN/Inf loss, gradient or output (default: skip and count)")
    groups["output"].add_argument("--report", metavar="FILE.json", help="write the summary as JSON")
    sec = groups["across machines"].add_mutually_exclusive_group()
    sec.add_argument("--insecure", dest="security", action="store_const", const="insecure", default=None,
                     help="no CURVE encryption even where workers bind off loopback")
    sec.add_argument("--curve", dest="security", action="store_const", const="curve",
                     help="CURVE encryption and authentication even on loopback")
    return groups


def overrides_from_args(args) -> dict:
    ov = {}
    for flag, (field, _kw) in TRAIN_FLAGS.items():
        v = getattr(args, flag[2:].replace("-", "_"))
        if v is not None:
            ov[field] = v
    if ov.get("train.max_inflight") == "auto":
        ov["train.max_inflight"] = 0
    if args.data_path is not None and args.dataset is None:
        from asyncdni.numerics.data import infer_format
        ov["data.dataset"] = infer_format(args.data_path)     # FILE.npz/.npy/.csv, else an IDX directory
    for dest, field in PAIRED_FLAGS.items():       # --x / --no-x: None when neither was given
        v = getattr(args, dest)
        if v is not None:
            ov[field] = v
    if args.no_progress:
        ov["runtime.progress"] = False
    if args.fail_on_nonfinite:
        ov["runtime.fail_on_nonfinite"] = True
    if args.security is not None:
        ov["runtime.security"] = args.security
    ov.update(C.parse_set(args.set))
    return ov


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="asyncdni", description="Layer-per-process training with decoupled neural interfaces.")
    p.add_argument("--version", action="version", version=f"asyncdni {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    t = sub.add_parser("train", help="train one network under one schedule and print a summary")
    t_groups = _add_train_flags(t)
    t_groups["across machines"].add_argument(
        "--lab", metavar="PREFIX", default=None,
        help="route the links between hosts through the delay relays of a lab made with 'asyncdni lab up "
             "--delay MS' (its hosts run the agents); root only")
    t_groups["across machines"].add_argument(
        "--lab-state-dir", metavar="DIR", default=None, help="--lab: the lab's state directory (default "
                                                              "that of 'asyncdni lab up')")
    t_groups["output"].add_argument(
        "--tensorboard", action="store_true",
        help="also write the run's curves as TensorBoard event files in RUN_DIR/tensorboard "
             "(needs the tensorboard package: pip install '.[tensorboard]')")
    t_groups["output"].add_argument(
        "--run-dir", metavar="DIR", default=None,
        help="the run's directory: config.toml, report.json, evals.csv and checkpoints/ (default "
             "runs/<UTC time>-<schedule>; with --resume RUN_DIR, that run's); refused if it exists and is not empty")
    ev = sub.add_parser("eval", help="test loss and accuracy of a trained checkpoint, in this process")
    ev.add_argument("target", metavar="RUN_OR_CHECKPOINT",
                    help="a run directory (its newest complete checkpoint), a checkpoint directory or one "
                         "checkpoint's step directory")
    ev.add_argument("--data-path", default=None, metavar="PATH", help="the data, if it is elsewhere now (default: "
                    "the run's data.path)")
    ev.add_argument("--labels-path", default=None, metavar="Y.npy", help="npy: the labels' file, if elsewhere now")
    ev.add_argument("--eval-batch", default=None, metavar="N", help="evaluation batch size (default: the run's)")
    ev.add_argument("--config", default=None, metavar="FILE.toml",
                    help="the run's configuration, for a checkpoint that does not record one")
    ev.add_argument("--json", default=None, metavar="FILE.json", help="also write the result as JSON")
    b = sub.add_parser("bench", help="same model, data and seed under every schedule; speedups and bounds")
    _add_train_flags(b)
    b.add_argument("--schedules", default=None,
                   help=f"comma-separated subset of {','.join(S.BENCH_CHOICES)} (default: "
                        f"{','.join(S.BENCH_ORDER)}; with --lab, those the lab runs)")
    b.add_argument("--straggler", default=None, metavar="TARGET:FACTOR",
                   help="run every schedule twice per repeat, as is and then with layer TARGET (1..K), or every "
                        "layer on host TARGET, computing FACTOR (>= 1) times slower (as --slow, on top of it); "
                        "prints samples/s and time to target with and without, and their ratios")
    b.add_argument("--peer", action="store_true",
                   help="torch stages: also run torch.distributed.pipelining (GPipe, 1F1B) on the same stages")
    b.add_argument("--run-dir", metavar="DIR", default=None,
                   help="the bench's directory: config.toml, bench.json, bench.csv, trace.json and plots/ (default "
                        "runs/<UTC time>-bench; not for --sweep, --transport, --lab); refused if it exists and is not empty")
    b.add_argument("--json", metavar="FILE", help="write all figures as JSON")
    b.add_argument("--csv", metavar="FILE", help="write one row per schedule and layer as CSV")
    b.add_argument("--trace", metavar="FILE", help="write a Chrome Trace Event file (Perfetto, chrome://tracing)")
    b.add_argument("--plots", metavar="DIR", help="write PNG plots (needs matplotlib: pip install '.[plot]')")
    b.add_argument("--sweep", action="store_true", help="sweep layers {2,4,8} x width {256,1024} x batch {32,128}")
    b.add_argument("--transport", action="store_true", help="run the transport micro-benchmark only")
    b.add_argument("--lab", action="store_true", help="every schedule over emulated links: namespace hosts, "
                   "agents, shaped links, delay relays (root only)")
    b.add_argument("--links", default=None, metavar="RATE:MS,..", help="--lab: link settings, rate (unshaped, "
                   "10gbit, 1gbit, 100mbit, ..) and one-way delay per link (default unshaped:0,unshaped:5,1gbit:0,100mbit:0)")
    b.add_argument("--feeder-host", default="shared", choices=("shared", "own"),
                   help="--lab: the feeder shares layer 1's host (default) or has its own")
    b.add_argument("--repeats", default=None, metavar="N",
                   help="run every schedule N times, interleaved (all once, then all again), and report medians "
                        "(default 2; --lab: every cell, default 1; --sweep: every point, default 1)")
    b.add_argument("--windows", default=None, metavar="W,..", help="--lab: run each schedule with an in-flight "
                   "window (async, delayed, local) once per window, e.g. 2,4,8,16; prints the staleness table")
    b.add_argument("--wires", default=None, metavar="CODEC|FWD/BWD,..", help="--lab: run each schedule once per "
                   "codec setting, e.g. fp32,int8,fp16/int8 (the first is the baseline); prints bytes per step, link "
                   "use and times against backprop with the baseline and with the same codecs")
    b.add_argument("--lab-burst", default="auto", metavar="BYTES|auto", help="--lab: tbf's bucket per shaped "
                   "link (default auto: 2 ms of the rate, at least 4 KiB)")
    b.add_argument("--lab-prefix", default="adb-", metavar="P", help="--lab: name prefix of its devices (default adb-)")
    b.add_argument("--lab-subnet", default="10.76.0.0/24", metavar="CIDR", help="--lab: its subnet (default 10.76.0.0/24)")
    a = sub.add_parser("agent", help="run this host's workers for a coordinator (multi-host runs)")
    a.add_argument("--join", required=True, metavar="tcp://HEAD:PORT", help="the coordinator's --listen address")
    a.add_argument("--name", required=True, help="this agent's name, as the coordinator's --hosts names it")
    a.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="address this host's workers bind to, reachable by the other hosts (default 127.0.0.1)")
    a.add_argument("--keys", default="", metavar="DIR",
                   help="CURVE keys: DIR/NAME.key_secret (or agent.key_secret) and DIR/coordinator.key")
    a.add_argument("--wait", default="120", metavar="S", help="seconds to wait for the coordinator (default 120)")
    a.add_argument("--log-dir", default="", metavar="DIR", help="keep worker logs here (default: a temporary directory)")
    a.add_argument("--insecure", action="store_true",
                   help="without --keys, let workers bind off loopback anyway (a trusted network only)")
    a.add_argument("--max-workers", default="16", metavar="N",
                   help="workers this agent runs at once; more launch requests are refused (default 16)")
    a.add_argument("--persist", action="store_true",
                   help="serve run after run: after each run, wait for the next coordinator at --join "
                        "(--wait then only delays a notice); SIGTERM or SIGINT ends it, code 0")
    k = sub.add_parser("keys", help="make CURVE key pairs: the coordinator's and one per agent name")
    k.add_argument("dir", metavar="DIR", help="directory for the key files (created, mode 700)")
    k.add_argument("names", nargs="*", metavar="NAME", help="agent names (default: one shared key named 'agent')")
    lab = sub.add_parser("lab", help="an emulated cluster: network namespace hosts on a bridge (root only)")
    lsub = lab.add_subparsers(dest="lab_command", metavar="up|down|status", parser_class=_Parser)
    up = lsub.add_parser("up", help="make the hosts, bridge and shaping; they stay up until 'lab down'")
    up.add_argument("--hosts", default="5", metavar="N", help="namespace hosts <prefix>h0.. (default 5)")
    up.add_argument("--rate", default=None, metavar="R", help="tc tbf rate per link and direction: "
                    "unshaped (default), 10gbit, 1gbit, 100mbit, ...")
    up.add_argument("--delay", default="0", metavar="MS", help="one-way delay per link, added by the relays "
                    "a run starts through the lab (default 0)")
    up.add_argument("--burst", default="auto", metavar="BYTES|auto", help="tbf's bucket per shaped link: a size "
                    "(25000, 64kb) or auto, 2 ms of the rate and at least 4 KiB (default auto)")
    for lp in (up, lsub.add_parser("down", help="remove the lab: processes, relays, namespaces, veths, bridge"),
               lsub.add_parser("status", help="print the lab's recorded state as JSON")):
        lp.add_argument("--prefix", default="adl-", metavar="P", help="name prefix of the lab's devices (default adl-)")
        lp.add_argument("--state-dir", default="/run/asyncdni-lab", metavar="DIR",
                        help="where the lab records what it made (default /run/asyncdni-lab)")
    up.add_argument("--subnet", default="10.77.0.0/24", metavar="CIDR", help="host addresses; the bridge gets .1 "
                    "(default 10.77.0.0/24)")
    return p


def fail(message: str, code: int) -> int:
    print(f"asyncdni: error: {message}", file=sys.stderr)
    return code


def guarded(fn):
    """Run fn(); map the errors a user can cause or meet to one line and an exit code.
    Returns (value, None) or (None, exit_code)."""
    from asyncdni.engine.checkpoint import CheckpointError
    from asyncdni.engine.coordinator import Interrupted, RunError, WorkerFailed
    from asyncdni.numerics.data import DataError
    from asyncdni.launch.base import LaunchError
    from asyncdni.wire.transport import TransportError
    try:
        return fn(), None
    except KeyboardInterrupt:          # Ctrl-C outside a run (loading data, between restarts)
        return None, fail("interrupted", 130)
    except (C.ConfigError, DataError) as e:
        return None, fail(str(e), 2)
    except CheckpointError as e:
        return None, fail(f"checkpoint: {e}", 1)
    except Interrupted as e:
        return None, fail(str(e), 130)
    except WorkerFailed as e:
        if e.tb:                       # the worker's own traceback: a fault in the engine, not the user's
            print(e.tb.rstrip(), file=sys.stderr)
        return None, fail(f"run failed: {e}", 1)
    except (RunError, LaunchError, TransportError) as e:
        return None, fail(f"run failed: {e}", 1)
    except MemoryError:                # what the size checks at configuration time did not foresee
        return None, fail("out of memory in the coordinator (a smaller model, dataset or --steps may fit)", 1)


def _train_config(args, made: dict):
    """The run's configuration, its data and plan, and its run directory (claimed, recorded
    in ``made``). ``--resume RUN_DIR`` reads RUN_DIR/config.toml under the flags, and refuses
    a flag that changes what determines the model's state, naming the field."""
    from pathlib import Path
    from asyncdni.engine import rundir as R
    from asyncdni.engine.checkpoint import CheckpointError
    from asyncdni.engine.plan import load_datasets, make_plan
    ov = overrides_from_args(args)
    resume_dir = R.run_dir_of(args.resume) if args.resume else None
    config_path, base, defaults = args.config, None, {}
    out_arg = Path(args.run_dir) if args.run_dir else None
    if resume_dir is not None:
        if args.config:
            raise C.ConfigError(f"--config: --resume {args.resume} continues a run directory, whose {R.CONFIG} "
                                "is the configuration; give what changes as flags")
        config_path = str(resume_dir / R.CONFIG)
        base = C.build(config_path)
        ck_root = R.checkpoints_of(resume_dir, base)
        if ck_root is None:
            raise CheckpointError(f"--resume {args.resume}: the run has no checkpoints to continue from (it ran "
                                  "without --checkpoint-every, or stopped before its first)")
        ov["runtime.resume"] = str(ck_root)
        if "runtime.checkpoint_dir" not in ov and ck_root == resume_dir / R.CHECKPOINTS:
            ov["runtime.checkpoint_dir"] = str((out_arg or resume_dir) / R.CHECKPOINTS)
    elif not args.resume:
        defaults = {"runtime.checkpoint_dir": R.PLACEHOLDER}    # the run directory's, once it is chosen
        if args.config:
            ov = {**R.fresh_from(args.config), **ov}           # another run's config.toml: not its checkpoints
    cfg = C.build(config_path, ov, defaults=defaults)
    if base is not None:                       # a refused change: one line naming it, before any data is read
        C.resume_changes(base, cfg, f"--resume {args.resume}")
    made["lab"] = _attach_lab(args, cfg)      # a lab that is not up: one line, before anything is made
    train, test = load_datasets(cfg)
    plan = make_plan(cfg, train)
    cfg = C.with_stages(cfg, plan.n_layers)
    run_dir, made["created"] = R.claim(out_arg, cfg.train.schedule, resume_dir)
    made["dir"] = run_dir
    if cfg.runtime.checkpoint_dir == R.PLACEHOLDER:
        cfg = C.replace(cfg, **{"runtime.checkpoint_dir": str(run_dir / R.CHECKPOINTS)
                                if cfg.runtime.checkpoint_every else ""})
    return cfg, (train, test), plan, run_dir


def _attach_lab(args, cfg):
    """``--lab PREFIX``: a handle on that lab (made by ``asyncdni lab up``), whose route() puts
    a relay adding the lab's delay in front of every inbox a peer on another host sends to;
    None without the flag. A lab that is not up, or a run not on it, is one line."""
    if args.lab is None:
        if args.lab_state_dir is not None:
            raise C.ConfigError("--lab-state-dir goes with --lab PREFIX")
        return None
    from asyncdni.lab import namespaces as L
    if cfg.runtime.launcher != "agents":
        raise C.ConfigError("--lab: the run's workers must be on the lab's hosts: --launcher agents, with an "
                            "agent in each namespace (ip netns exec PREFIXhN asyncdni agent ...)")
    try:
        lab = L.Lab.attach(args.lab, args.lab_state_dir or L.STATE_DIR)
    except L.LabError as e:
        raise C.ConfigError(f"--lab: {e}") from None
    if lab.delay_ms <= 0:
        raise C.ConfigError(f"--lab {args.lab}: the lab adds no delay (made without --delay), so there is "
                            f"nothing to route; its shaping applies without --lab")
    return lab


def cmd_train(args) -> int:
    from asyncdni import files
    from asyncdni import report
    from asyncdni.engine import rundir as R
    from asyncdni.engine.coordinator import RunError, run
    made: dict = {}

    if args.tensorboard and not report.tensorboard_available():
        return fail("--tensorboard needs the tensorboard package: .venv/bin/pip install -e '.[tensorboard]'", 2)

    def train():
        cfg, datasets, plan, run_dir = _train_config(args, made)
        progress = report.Progress(cfg.train.schedule, enabled=cfg.runtime.progress, task=plan.task)

        def log(line):
            progress.interject(f"asyncdni: {line}")

        def started(_coordinator):          # the workers are up: the run describes itself from now on
            if not made.get("config"):
                try:
                    R.write_config(run_dir, cfg)
                except OSError as e:
                    raise RunError(f"cannot write {run_dir / R.CONFIG}: {e.strerror or e}") from None
                made["config"] = True

        lab = made.get("lab")
        try:
            result = run(cfg, on_progress=progress, log=log, datasets=datasets, on_started=started,
                         **({"route": lab.route} if lab is not None else {}))
        finally:
            progress.close()                # before the summary, or the one-line error
            if lab is not None:
                made["relays"] = lab.stop_relays(refill=False)
                lab.close()                 # its relays only: the lab stays up
        return cfg, result, run_dir

    out, code = guarded(train)
    if code is not None:
        if made.get("created"):
            R.discard(made["dir"])          # nothing half-made is left behind; a checkpoint is kept
        return code
    cfg, result, run_dir = out
    summary = report.run_summary(result)
    summary["run_dir"] = str(run_dir)
    payload = {"config": cfg.to_dict(), "summary": summary}
    try:
        report.write_json(str(run_dir / R.REPORT), payload)
        files.atomic_write(run_dir / R.EVALS, report.evals_csv(summary["evals"]))
        report.write_trace(str(run_dir / R.TRACE), {cfg.train.schedule: result.traces})
        # plots when matplotlib is there (the `plot` extra); nothing otherwise
        report.write_plots(str(run_dir / R.PLOTS), report.run_plot_input(cfg.train.schedule, result.series, summary))
        if args.tensorboard:
            import time as _time
            report.write_tensorboard(str(run_dir / "tensorboard"), result.series, summary["evals"],
                                     (summary["metric_name"], summary["metric2_name"]), _time.time() - result.wall)
    except OSError as e:
        print(report.format_summary(summary))
        return fail(f"cannot write to run directory {run_dir}: {e.strerror or e}", 1)
    print(report.format_summary(summary))
    if made.get("relays") is not None:
        rel = made["relays"]
        added = rel.get("added_ms") or {}
        print(f"lab {args.lab}: {len(rel['relays'])} relays added a median {added.get('median')} ms "
              f"(p99 {added.get('p99')} ms) to each of {rel['chunks']} chunks, for a set delay of {rel['delay_ms']:g} ms")
    if args.report:
        try:
            report.write_json(args.report, payload)
        except OSError as e:
            return fail(f"cannot write report {args.report}: {e.strerror}", 1)
        print(f"report written to {args.report}")
    return 0


def cmd_eval(args) -> int:
    from asyncdni import report
    from asyncdni.engine import rundir as R
    ov = {}
    if args.data_path is not None:
        ov["data.path"] = args.data_path
    if args.labels_path is not None:
        ov["data.labels_path"] = args.labels_path
    if args.eval_batch is not None:
        ov["train.eval_batch"] = args.eval_batch
    out, code = guarded(lambda: R.evaluate_checkpoint(args.target, ov, args.config))
    if code is not None:
        return code
    task = out["task"]
    m1, m2 = report.metric_names(task)
    d = out["data"]
    data = f"addition, {d['bits']} bits" if d["dataset"] == "addition" else f"{d['dataset']} {d['path']}"
    metrics = f"test {m1} {report.format_metric(task, out['test_metric'])}"
    if m2 != m1:
        metrics += f", test {m2} {report.format_metric(task, out['test_metric2'])}"
    print(f"{out['checkpoint']}: step {out['step']}, test loss {out['test_loss']:.4f}, {metrics} "
          f"({out['n']} test examples of {data})")
    if args.json:
        try:
            report.write_json(args.json, {**out, "metric_name": m1, "metric2_name": m2})
        except OSError as e:
            return fail(f"cannot write {args.json}: {e.strerror or e}", 1)
    return 0


def cmd_bench(args) -> int:
    from asyncdni.bench import compare as bench
    from asyncdni import report

    def log(line):
        print(line, flush=True)

    if args.straggler is not None and (args.sweep or args.transport):
        return fail(f"bench: --straggler does not go with {'--sweep' if args.sweep else '--transport'}", 2)
    if args.lab:
        return _bench_lab(args, log)
    if args.windows:
        return fail("bench: --windows goes with --lab", 2)
    if args.wires:
        return fail("bench: --wires goes with --lab (without it, --wire-fwd/--wire-bwd apply to every run)", 2)
    if args.transport:
        if args.repeats is not None:
            return fail("bench: --repeats does not go with --transport (it takes medians of its own trials)", 2)
        from asyncdni.bench import transport as transport_bench
        log("transport: protocol vs raw pyzmq, same sockets, loopback TCP (medians of 41 short paired trials)")
        rows = transport_bench.run(log=log)
        if args.json:
            report.write_json(args.json, {"transport": rows})
        return 0

    from pathlib import Path
    from asyncdni.engine import rundir as R
    made: dict = {}

    def measure():
        ov = overrides_from_args(args)
        ov.setdefault("runtime.progress", False)
        cfg = C.build(args.config, ov)
        repeats = bench.parse_repeats(args.repeats if args.repeats is not None else 1 if args.sweep else bench.REPEATS)
        if args.run_dir and args.sweep:
            raise C.ConfigError("--run-dir: not for --sweep (use --json / --csv)")
        if args.straggler is not None:     # checked before the directory is claimed (bench: again, with K)
            bench.parse_straggler(args.straggler, cfg, cfg.model.layers if C.stages_known(cfg) else None)
        if not args.sweep:        # claimed before anything runs: a bad directory fails at once
            made["dir"], made["created"] = R.claim(Path(args.run_dir) if args.run_dir else None, "bench")
        if args.sweep:
            log("sweep: samples/s of sequential, async and backprop")
            return cfg, None, bench.sweep(cfg, log=log, repeats=repeats)
        schedules = [s.strip() for s in (args.schedules or ",".join(S.BENCH_ORDER)).split(",") if s.strip()]
        for s in schedules:
            if s not in bench.BENCH_CHOICES:
                raise C.ConfigError(f"--schedules: {s!r} is not one of {', '.join(bench.BENCH_CHOICES)}")
        # no --eval-every: the bench evaluates periodically anyway (bench.default_eval_every)
        # unless the config file set an interval; --eval-every 0 evaluates at the end only
        every = cfg.train.eval_every if "train.eval_every" in ov else None
        if args.peer and not cfg.model.model:
            raise C.ConfigError("--peer: torch.distributed.pipelining runs torch stages; give --model")
        return cfg, bench.bench(cfg, schedules, log=log, eval_every=every, peers=args.peer, repeats=repeats,
                                straggler=args.straggler), None

    out, code = guarded(measure)
    if code is not None:
        if made.get("created"):
            R.discard(made["dir"])          # nothing half-made is left behind
        return code
    cfg, res, sweep_rows = out
    if sweep_rows is not None:
        if args.json:
            report.write_json(args.json, {"sweep": sweep_rows})
        if args.csv:
            report.write_csv(args.csv, sweep_rows)
        return 0
    print(bench.format_bench(res))
    public = {k: v for k, v in res.items() if not k.startswith("_")}
    run_dir = made["dir"]
    rows = bench.bench_rows(res)
    try:
        # the bench's own directory first: it describes the bench whatever else was asked for
        R.write_config(run_dir, cfg)
        report.write_json(str(run_dir / "bench.json"), {"config": cfg.to_dict(), "bench": public})
        report.write_csv(str(run_dir / "bench.csv"), rows)
        report.write_trace(str(run_dir / R.TRACE), res["_traces"])
        plotted = report.write_plots(str(run_dir / R.PLOTS), res)
        if args.json:
            report.write_json(args.json, {"config": cfg.to_dict(), "bench": public})
        if args.csv:
            report.write_csv(args.csv, rows)
        if args.trace:
            report.write_trace(args.trace, res["_traces"])
        if args.plots:
            plotted = report.write_plots(args.plots, res)
        if args.plots and not plotted:
            print("plots skipped: matplotlib is not installed (pip install '.[plot]')", file=sys.stderr)
    except OSError as e:
        return fail(f"cannot write output: {e}", 1)
    print(f"run directory: {run_dir}")
    return 0


def _bench_lab(args, log) -> int:
    from asyncdni.lab import namespaces as L
    from asyncdni.bench import lab as labbench
    from asyncdni.bench.compare import parse_repeats
    from asyncdni import report
    try:
        L.require_root()
        L.parse_prefix(args.lab_prefix)
        L.parse_subnet(args.lab_subnet, 2)
    except L.LabError as e:
        return fail(f"bench --lab: {e}", 2)

    from pathlib import Path
    from asyncdni.engine import rundir as R
    made: dict = {}

    def measure():
        ov = overrides_from_args(args)
        ov.setdefault("runtime.progress", False)
        cfg = C.build(args.config, ov)
        links = labbench.parse_links(args.links or labbench.DEFAULT_LINKS)
        schedules, skipped = labbench.parse_schedules(args.schedules)
        repeats = parse_repeats("1" if args.repeats is None else args.repeats)
        windows = labbench.parse_windows(args.windows)
        wires = labbench.parse_wires(args.wires)
        for rate, _delay in links:
            try:
                L.parse_burst(args.lab_burst, rate)
            except L.LabError as e:
                raise C.ConfigError(f"--lab-burst: {e}") from None
        # claimed before anything runs: a bad directory fails at once
        made["dir"], made["created"] = R.claim(Path(args.run_dir) if args.run_dir else None, "lab")
        return cfg, labbench.lab_bench(cfg, schedules, links, feeder_host=args.feeder_host, prefix=args.lab_prefix,
                                       subnet=args.lab_subnet, repeats=repeats, windows=windows, wires=wires,
                                       skipped=skipped, straggler=args.straggler, burst=args.lab_burst, log=log)

    try:
        out, code = guarded(measure)
    except L.LabError as e:
        out, code = None, fail(f"bench --lab: {e}", 1)
    if code is not None:
        if made.get("created"):
            R.discard(made["dir"])          # nothing half-made is left behind
        return code
    cfg, res = out
    print(labbench.format_lab_bench(res))
    run_dir = made["dir"]
    try:
        # the lab bench's own directory: config.toml, lab.json, lab.csv, plots/lab.png
        R.write_config(run_dir, cfg)
        report.write_json(str(run_dir / "lab.json"), {"config": cfg.to_dict(), "lab": res})
        report.write_csv(str(run_dir / "lab.csv"), labbench.csv_rows(res))
        labbench.write_plot(str(run_dir / R.PLOTS), res)
        if args.json:
            report.write_json(args.json, {"config": cfg.to_dict(), "lab": res})
        if args.csv:
            report.write_csv(args.csv, labbench.csv_rows(res))
        if args.plots:
            path = labbench.write_plot(args.plots, res)
            print(labbench.PLOT_HINT if path is None else f"plot written to {path}",
                  file=sys.stderr if path is None else sys.stdout)
    except OSError as e:
        return fail(f"cannot write output: {e}", 1)
    print(f"run directory: {run_dir}")
    return 0


def cmd_agent(args) -> int:
    import signal

    from asyncdni.launch.agent import Agent, AgentConfig, AgentError
    from asyncdni.wire.security import KeyError_

    def log(line):
        print(f"asyncdni agent: {line}", file=sys.stderr, flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    try:
        wait = float(args.wait)
    except ValueError:
        return fail(f"--wait: expected a number of seconds, got {args.wait!r}", 2)
    try:
        max_workers = int(args.max_workers)
    except ValueError:
        return fail(f"--max-workers: expected a number of workers, got {args.max_workers!r}", 2)
    try:
        agent = Agent(AgentConfig(args.join, args.name, args.bind, args.keys, wait, args.log_dir,
                                  insecure=args.insecure, max_workers=max_workers, persist=args.persist), log=log)
    except (AgentError, KeyError_) as e:
        return fail(str(e), 2)
    try:
        return agent.run()
    except AgentError as e:
        return fail(str(e), 1)
    except KeyboardInterrupt:
        if args.persist:               # the way a persistent agent is meant to end
            log("stopped; workers ended")
            return 0
        log("interrupted; workers ended")
        return 130


def cmd_keys(args) -> int:
    from asyncdni.wire.security import KeyError_, make_keys
    try:
        made = make_keys(args.dir, args.names or ["agent"])
    except KeyError_ as e:
        return fail(str(e), 2)
    for f in made:
        print(f)
    print("copy coordinator.key and each agent's NAME.key_secret to that agent's host; "
          "keep coordinator.key_secret and every *.key on the coordinator's host")
    return 0


def cmd_lab(args) -> int:
    import json
    from asyncdni.lab import namespaces as L
    if args.lab_command is None:
        return fail("lab: expected up, down or status (see asyncdni lab --help)", 2)
    try:                                 # refusals and bad flags: exit code 2
        L.require_root()
        L.parse_prefix(args.prefix)
        if args.lab_command == "up":
            lb = L.Lab(hosts=args.hosts, rate=args.rate, delay_ms=args.delay, prefix=args.prefix,
                       subnet=args.subnet, state_dir=args.state_dir, burst=args.burst)
            lb.check()
    except L.LabError as e:
        return fail(str(e), 2)
    try:
        if args.lab_command == "up":
            lb.up(prestart=False)
            lb.detach()
            shaped = f"tbf {lb.rate} each way" if lb.rate else "unshaped"
            print(f"lab {lb.prefix} up: bridge {lb.bridge} {lb.bridge_ip}, {shaped}, delay {lb.delay_ms:g} ms")
            for name, ip in zip(lb.names, lb.addresses):
                print(f"  {name}  {ip}   (ip netns exec {name} COMMAND)")
            print(f"remove it with: asyncdni lab down --prefix {lb.prefix}")
        elif args.lab_command == "down":
            gone = L.down(args.prefix, args.state_dir)
            print(f"lab {args.prefix} removed" if gone else f"no lab {args.prefix} was up")
        else:
            st = L.status(args.prefix, args.state_dir)
            if st is None:
                print(f"no lab {args.prefix} is up")
                return 1
            print(json.dumps(st, indent=1))
    except L.LabError as e:
        return fail(str(e), 1)
    except KeyboardInterrupt:            # up() has already removed what it made
        return fail("interrupted", 130)
    return 0


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "bench":
        return cmd_bench(args)
    if args.command == "agent":
        return cmd_agent(args)
    if args.command == "keys":
        return cmd_keys(args)
    if args.command == "lab":
        return cmd_lab(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
