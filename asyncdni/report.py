"""Turning a RunResult into what people read: summary tables, JSON, timelines."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
from tqdm import tqdm

from asyncdni import config, files
from asyncdni import schedules as S
from asyncdni.engine.trace import TRACE_NAMES


def metric_names(task: str) -> tuple[str, str]:
    if task == "regression":
        return "RMSE", "R²"
    return ("accuracy", "accuracy") if task == "classification" else ("bit accuracy", "exact-sum accuracy")


def format_metric(task: str, value) -> str:
    """A test metric as printed: accuracies in percent; a regression's RMSE and R² as numbers."""
    if value is None:
        return "-"
    return f"{value:.4g}" if task == "regression" else f"{100 * value:.2f}%"


def _mean(a) -> float:
    a = np.asarray(a, dtype=float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def plan_shapes(plan) -> list | None:
    """Torch stages: the per-sample shapes from the input through every stage's output; None
    for the numpy MLP, whose widths say it."""
    if plan.specs[0].backend != "torch":
        return None
    return [list(plan.in_shape)] + [list(sp.out_shape) for sp in plan.specs]


def network_label(layers: int, widths, shapes) -> str:
    """'3 torch stages 1x28x28 -> 32x14x14 -> ..' or '4 layers 784-256-..-10'."""
    if shapes:
        return f"{layers} torch stages {' -> '.join('x'.join(map(str, sh)) for sh in shapes)}"
    return f"{layers} layers {'-'.join(map(str, widths))}"


def run_summary(result) -> dict:
    """Plain-data summary of one run (what the JSON report holds, minus the config)."""
    loss = result.series["loss"]
    n = len(loss)
    k = max(1, min(50, n // 10))
    ev = result.final_eval
    train_time = result.train_time
    layers = []
    for s in result.layers:
        layers.append({
            "layer": s["index"] + 1, "pid": s["pid"], "host": s["host"],
            "steps": s["steps"], "updates": s["updates"], "sg_updates": s["sg_updates"],
            "busy_s": s["busy"], "comm_s": s["comm"], "wait_s": s["wait"],
            "busy_fraction": s["busy"] / train_time if train_time > 0 else float("nan"),
            "cpu_percent": 100.0 * s["cpu_time"] / s["wall"] if s["wall"] > 0 else float("nan"),
            "peak_rss_mb": s["peak_rss"] / 2**20,
            "msgs_sent": s["msgs_sent"], "bytes_sent": s["bytes_sent"],
            # per message kind (fwd, bwd, ...), and the activations/gradients before and after their codec
            "kind_bytes": s.get("kind_bytes", {}), "kind_msgs": s.get("kind_msgs", {}),
            "dense_bytes": s.get("dense_bytes", 0), "coded_bytes": s.get("coded_bytes", 0),
            "codec_s": s.get("codec_time", 0.0), "wire_state_bytes": s.get("wire_state_bytes", 0),
            "flops_per_batch": s["flops_per_batch"], "sg_loss": s["sg_loss"],
            "rejected": s["rejected"], "cached_steps": s["cached_steps"],
            "nonfinite_skipped": s.get("nonfinite_skipped", 0), "nonfinite_outputs": s.get("nonfinite_outputs", 0),
            "curve": s.get("curve", False), "curve_refused": s.get("curve_refused", 0),
            "delay_mean": s.get("delay_mean"), "delay_max": s.get("delay_max"),
            "stash_peak_bytes": s.get("stash_peak_bytes", 0), "aux_train_metric": s.get("aux_train_metric"),
            "slow": s.get("slow", 1.0), "slow_s": s.get("slow_s", 0.0),
        })
    m1, m2 = metric_names(result.plan.task)
    return {
        "schedule": result.config.train.schedule, "task": result.plan.task,
        "layers": result.plan.n_layers, "widths": list(result.plan.widths),
        "shapes": plan_shapes(result.plan),
        "steps": result.plan.steps, "batch_size": result.plan.batch_size,
        "samples": result.feeder["samples"],
        "train_time_s": train_time, "wall_s": result.wall,
        "samples_per_s": result.samples_per_s,
        "loss_first": _mean(loss[:k]), "loss_last": _mean(loss[-k:]),
        "test_loss": ev["loss"], "test_metric": ev["metric"], "test_metric2": ev["metric2"],
        "metric_name": m1, "metric2_name": m2,
        "time_to_target_s": result.feeder.get("time_to_target"),
        "target_accuracy": result.config.train.target_accuracy or None,
        "evals": result.feeder["evals"],
        "checkpoints": result.checkpoints, "resumed_from_step": result.resumed_from,
        "restarts": result.restarts,
        "launcher": result.config.runtime.launcher,
        "window": result.feeder.get("window"), "window_auto": result.feeder.get("window_auto", False),
        "window_rtt_s": result.feeder.get("window_rtt"), "window_step_s": result.feeder.get("window_step"),
        "curve": bool(layers and all(L["curve"] for L in layers)),
        "curve_refused": sum(L["curve_refused"] for L in layers) + result.feeder.get("curve_refused", 0)
        + getattr(result, "refused", 0),
        "steps_lost": sum(r["steps_lost"] for r in result.restarts),
        "rejected": _merge_counts([L["rejected"] for L in layers] + [result.feeder.get("rejected", {})]),
        "control_rejected": dict(getattr(result, "control_rejected", {}) or {}),
        "nonfinite_skipped": sum(L["nonfinite_skipped"] for L in layers),
        "nonfinite_outputs": sum(L["nonfinite_outputs"] for L in layers),
        "per_layer": layers,
        "preset": preset_values(result.config),
        "in_force": in_force(result.config),
        "uses_sg": uses_sg(result.config),
        "seed": result.config.train.seed,
        "data": dict(getattr(result, "data", None) or {}),
        "changes": list(getattr(result, "changes", None) or []),
        "stragglers": slowed_layers(layers),
    }


def slowed_layers(per_layer) -> dict:
    """{layer number (a string, as JSON keys are): factor} of the layers a straggler setting
    (runtime.slow) slowed; empty when none was."""
    return {str(L["layer"]): L["slow"] for L in per_layer if (L.get("slow") or 1.0) > 1.0}


def format_slow(summary: dict) -> str | None:
    """One line naming the slowed layers and their factors (None when none was slowed)."""
    slow = summary.get("stragglers") or {}
    if not slow:
        return None
    parts = ", ".join(f"layer {k} x{v:g}" for k, v in slow.items())
    return (f"stragglers (--slow): {parts}: training computes take that many times as long (busy time "
            "includes it); communication and evaluations are not slowed")


def preset_values(cfg) -> dict:
    """{dotted field: value} of the fields whose value came from the dataset's preset."""
    out = {}
    for dotted in getattr(cfg, "preset", ()):
        section, _, key = dotted.partition(".")
        out[dotted] = getattr(getattr(cfg, section), key)
    return out


def uses_sg(cfg) -> bool:
    """Whether the run's schedule trains with synthetic gradients (``schedules``: gradient)."""
    return S.get(cfg.train.schedule).gradient == S.SYNTHETIC


def in_force(cfg) -> dict:
    """The learning settings a reader needs to reproduce the run's accuracy: the SG model's
    only under a schedule that uses synthetic gradients, the in-flight window only under one
    that has it, the micro-batches only under one that splits the batch; and the stragglers
    (runtime.slow) when set: they change the run's timing (and so, under the asynchronous
    schedules, how stale its gradients are), not a lock-step schedule's arithmetic."""
    m, t = cfg.model, cfg.train
    sched = S.get(t.schedule)
    if m.model:          # torch stages: the model is the architecture; the numpy MLP's fields do not apply
        out = {"model.model": m.model, **({"model.split": m.split} if m.split else {})}
    else:
        out = {"model.width": m.width if not m.widths else list(m.widths), "model.activation": m.activation}
    out |= {"train.optimizer": t.optimizer, "train.lr": t.lr}
    if t.weight_decay:
        out["train.weight_decay"] = t.weight_decay
    if t.lr_schedule != "constant":
        out["train.lr_schedule"] = t.lr_schedule
    if uses_sg(cfg):
        out["train.sg_model"] = t.sg_model
        if t.sg_model == "lowrank":
            out["train.sg_rank"] = t.sg_rank
        if t.sg_every != 1:
            out["train.sg_every"] = t.sg_every
        # "auto": with what it chose where the configuration knows the stages (numpy MLPs)
        target, clip = config.sg_in_effect(cfg)
        out |= {"train.sg_lr": t.sg_lr, "train.cond": t.cond,
                "train.sg_clip": t.sg_clip if t.sg_clip >= 0 else "auto" if clip < 0 else f"auto({clip:g})"}
        if t.sg_trust:
            out["train.sg_trust"] = True
        out["train.sg_target"] = t.sg_target if t.sg_target != "auto" else "auto" if target == "auto" else f"auto({target})"
        if t.sg_damp:
            out["train.sg_damp"] = t.sg_damp
    if sched.window == "max_inflight":
        out["train.max_inflight"] = t.max_inflight if t.max_inflight else "auto"
    if sched.microbatches:
        out["train.microbatches"] = t.microbatches
    if t.wire_fwd != "fp32":
        out["train.wire_fwd"] = t.wire_fwd
    if t.wire_bwd != "fp32" and sched.sends_backward:
        out["train.wire_bwd"] = t.wire_bwd
        if not t.wire_feedback:
            out["train.wire_feedback"] = False
    if cfg.runtime.slow:                 # stragglers: a measurement setting, shown only when set
        out["runtime.slow"] = list(cfg.runtime.slow)
    return out if m.model else out | {"model.batch_norm": m.batch_norm}


SG_FIELDS_PREFIX = ("train.sg_", "train.cond")


def format_data(summary: dict) -> str | None:
    """One line: the dataset (and its path), how the test set was split off, the sizes and
    the seeds; None when the summary does not say (a result from before it did)."""
    d = summary.get("data") or {}
    if not d:
        return None
    if d["dataset"] == "addition":
        what = f"addition of {d.get('bits')}-bit numbers (built in)"
    else:
        what = f"{d['dataset']} {d['path']}" + (f" + {d['labels_path']}" if d.get("labels_path") else "") \
            + f", {d['task']}"
    split = {"files": "from separate test files",
             "generated": f"drawn apart with data seed {d['data_seed']}",
             "fraction": f"with test fraction {d.get('test_fraction', 0):g} held out by data seed {d['data_seed']}",
             }.get(d.get("split"), f"(data seed {d['data_seed']})")
    return f"data: {what}: {d['train']} train / {d['test']} test {split}; seed {d['seed']}"


def format_changes(changes: list[dict]) -> list[str]:
    """One line per resume that changed something: 'changed on resume at step 200: lr 0.001 -> 0.0005'."""
    by_step: dict = {}
    for c in changes:
        by_step.setdefault(c.get("step"), []).append(c)
    out = []
    for step, cs in by_step.items():
        parts = ", ".join(f"{c['field'].partition('.')[2]} {_show(c['old'])} -> {_show(c['new'])}" for c in cs)
        out.append(f"changed on resume at step {step}: {parts}")
    return out


def _show(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v)) or "()"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v) if v != "" else "''"


def format_settings(summary: dict) -> str:
    """One line: the settings in force, those from the dataset's preset marked with '*'."""
    preset = summary.get("preset") or {}
    parts = []
    for k, v in (summary.get("in_force") or {}).items():
        name = k.partition(".")[2]
        if isinstance(v, list):
            v = ",".join(map(str, v))
        parts.append(f"{name}={v:g}" if isinstance(v, float) else f"{name}={v}")
        if k in preset:
            parts[-1] += "*"
    for k, v in preset.items():          # a preset field not among the usual ones
        if k not in (summary.get("in_force") or {}) and (summary.get("uses_sg", True)
                                                          or not k.startswith(SG_FIELDS_PREFIX)):
            parts.append(f"{k.partition('.')[2]}={v}*")
    line = "settings: " + " ".join(parts)
    if preset:
        line += "   (* from a preset: the dataset's or the model's; flags or TOML override it)"
    return line


def _merge_counts(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


OFF_CLOCK_KINDS = ("eval", "eval_result", "marker")


def traffic(summary: dict, rate_bits: float | None = None) -> dict:
    """What one run moved between its layers: bytes per step each way per link (the mean of
    the K-1 links: layer i's FWD up, layer i+1's BWD down), the codecs' compression (float32
    bytes of the activations and gradients over their bytes on the wire), and the busiest
    host's egress (a layer's training messages: not the evaluations, which are off the clock) as
    Mbit/s and as a share of the rate (a short run can pass 100% within the shaper's burst)."""
    # the bytes of this process's steps: a resumed run's start from its checkpoint
    steps = max(1, summary["steps"] - (summary.get("resumed_from_step") or 0))
    layers, t = summary["per_layer"], summary["train_time_s"]
    fwd = [L["kind_bytes"].get("fwd", 0) for L in layers[:-1]]
    bwd = [L["kind_bytes"].get("bwd", 0) for L in layers[1:]]
    dense = sum(L.get("dense_bytes", 0) for L in layers)
    coded = sum(L.get("coded_bytes", 0) for L in layers)
    # training traffic only: evaluations are off the clock (and so off train_time)
    sent = [sum(v for k, v in L["kind_bytes"].items() if k not in OFF_CLOCK_KINDS) for L in layers]
    egress = max(sent, default=0) * 8 / t / 1e6 if t > 0 else None
    return {"fwd_bytes_per_step": sum(fwd) / len(fwd) / steps if fwd else 0.0,
            "bwd_bytes_per_step": sum(bwd) / len(bwd) / steps if bwd else 0.0,
            "bwd_msgs_per_step": (sum(L["kind_msgs"].get("bwd", 0) for L in layers[1:]) / len(bwd) / steps
                                  if bwd else 0.0),
            "compression": dense / coded if coded else None,
            "codec_s": sum(L.get("codec_s", 0.0) for L in layers),
            "egress_mbit_s": egress,
            "link_use": egress * 1e6 / rate_bits if (egress is not None and rate_bits) else None}


def format_summary(summary: dict) -> str:
    s = summary
    lines = []
    net = network_label(s["layers"], s["widths"], s.get("shapes"))
    lines.append(f"schedule {s['schedule']}: {net}, {s['steps']} steps of {s['batch_size']}")
    if s.get("in_force"):
        lines.append(format_settings(s))
    data = format_data(s)
    if data:
        lines.append(data)
    rows = [
        ("loss (train, first -> last)", f"{s['loss_first']:.4f} -> {s['loss_last']:.4f}"),
        ("test loss", f"{s['test_loss']:.4f}"),
        (f"test {s['metric_name']}", format_metric(s.get("task"), s["test_metric"])),
    ]
    if s["metric2_name"] != s["metric_name"]:
        rows.append((f"test {s['metric2_name']}", format_metric(s.get("task"), s["test_metric2"])))
    rows += [
        ("samples/s", f"{s['samples_per_s']:.0f}"),
        ("training time", f"{s['train_time_s']:.2f} s"),
        ("wall-clock (with start-up)", f"{s['wall_s']:.2f} s"),
    ]
    if s.get("window_auto"):
        how = (f"auto: round trip {1e3 * s['window_rtt_s']:.1f} ms / step {1e3 * s['window_step_s']:.2f} ms"
               if s.get("window_step_s") else "auto: the run ended before the probe did")
        rows.append(("in-flight window", f"{s['window']} ({how})"))
    if s.get("target_accuracy"):
        t = s["time_to_target_s"]
        rows.append((f"time to {100 * s['target_accuracy']:.1f}%", "not reached" if t is None else f"{t:.2f} s"))
    if len(s["per_layer"]) > 1 and "kind_bytes" in s["per_layer"][0]:
        tr = traffic(s)
        coded = f" (codecs: {tr['compression']:.2f}x smaller)" if abs((tr["compression"] or 1) - 1) > 1e-3 else ""
        state = sum(L.get("wire_state_bytes", 0) for L in s["per_layer"])
        if state:       # error-feedback residuals and aq: activation histories, all layers together
            coded += f"; link state {state / 2**20:.1f} MB"
        rows.append(("between layers, per step", f"{tr['fwd_bytes_per_step'] / 1024:.1f} kB up, "
                                                 f"{tr['bwd_bytes_per_step'] / 1024:.1f} kB down{coded}"))
    w = max(len(r[0]) for r in rows)
    lines += [f"  {a:<{w}}  {b}" for a, b in rows]
    lines.append("")
    hosts = len({L["host"] for L in s["per_layer"]}) > 1      # a multi-host run: say where each layer ran
    hw = max([4] + [len(str(L["host"])) for L in s["per_layer"]]) if hosts else 0
    hdr = f"  {'layer':>5} {'pid':>7} " + (f"{'host':<{hw}} " if hosts else "") + \
        f"{'steps':>7} {'updates':>8} {'sg upd':>7} {'busy':>6} {'cpu':>5} {'rss MB':>7} {'sent MB':>8}"
    lines.append(hdr)
    for L in s["per_layer"]:
        lines.append(f"  {L['layer']:>5} {L['pid']:>7} " + (f"{L['host']:<{hw}} " if hosts else "") +
                     f"{L['steps']:>7} {L['updates']:>8} {L['sg_updates']:>7} "
                     f"{100 * L['busy_fraction']:>5.1f}% {L['cpu_percent']:>4.0f}% {L['peak_rss_mb']:>7.1f} "
                     f"{L['bytes_sent'] / 2**20:>8.1f}")
    lines += [f"  {x}" for x in layer_extras(s["per_layer"], s.get("task"))]
    slow = format_slow(s)
    if slow:
        lines.append(f"  {slow}")
    faults = []
    if s["resumed_from_step"] is not None:
        faults.append(f"resumed from the checkpoint at step {s['resumed_from_step']}")
    faults += format_changes(s.get("changes") or [])
    if s["checkpoints"]:
        faults.append(f"checkpoints committed at steps {', '.join(map(str, s['checkpoints'][-5:]))}"
                      + (" (last 5)" if len(s["checkpoints"]) > 5 else ""))
    for i, r in enumerate(s["restarts"], 1):
        least = "" if r.get("exact", True) else "at least "
        faults.append(f"restart {i}: {r['error']} at step {least}{r['failed_at_step']}; resumed from step "
                      f"{r['resumed_from_step']}, {least}{r['steps_lost']} steps lost and redone")
    faults.append("rejected messages: " + (", ".join(f"{k} {v}" for k, v in s["rejected"].items()) or "none"))
    if s.get("curve"):
        faults.append(f"CURVE: on; connections with unknown keys refused: {s['curve_refused']}")
    if s["control_rejected"]:
        faults.append("control messages ignored: " + ", ".join(f"{k} {v}" for k, v in s["control_rejected"].items()))
    faults.append(f"non-finite updates skipped: {s['nonfinite_skipped']}, non-finite outputs zeroed: "
                  f"{s['nonfinite_outputs']}")
    lines.append("")
    lines += [f"  {f}" for f in faults]
    if s.get("run_dir"):
        lines += ["", f"run directory: {s['run_dir']}"]
    return "\n".join(lines)


def layer_extras(per_layer, task: str | None = None) -> list[str]:
    """What the delayed and local schedules report per layer: observed delay (mean, max)
    and stashed-weight memory; auxiliary heads' accuracy (regression: RMSE) next to the network's."""
    aux = "RMSE" if task == "regression" else "acc"
    out = []
    for L in per_layer:
        parts = []
        if L.get("delay_mean") is not None:
            parts.append(f"delay mean {L['delay_mean']:.2f} max {L['delay_max']}")
            if L.get("stash_peak_bytes"):
                parts.append(f"stashed weights peak {L['stash_peak_bytes'] / 2**20:.2f} MB")
        if L.get("aux_train_metric") is not None:
            parts.append(f"aux head train {aux} {format_metric(task, L['aux_train_metric'])}")
        if L.get("aux_test_metric") is not None:
            parts.append(f"aux head test {aux} {format_metric(task, L['aux_test_metric'])}")
        if parts:
            out.append(f"layer {L['layer']}: " + ", ".join(parts))
    return out


def _clean(o):
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.integer):
        return int(o)
    return o


def write_json(path: str, payload: dict) -> None:
    """``payload`` as JSON (NaN and infinities as null), written atomically: a reader never
    sees half a file, and a failure leaves the old one (files.atomic_write)."""
    files.atomic_write(path, json.dumps(_clean(payload), indent=2) + "\n")


EVAL_COLUMNS = ("step", "train_time", "loss", "metric", "metric2", "n")


def evals_csv(evals: list[dict]) -> str:
    """The evaluation curve as CSV, one row per evaluation: step, train_time (seconds of
    training before it), the test loss, metric and metric2 (classification: accuracy twice;
    binary addition: bit and exact-sum accuracy; regression: RMSE and R²) and n, the test
    examples. Numbers as Python writes them (read back exactly); NaN as an empty cell."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(EVAL_COLUMNS)
    for e in evals:
        row = []
        for k in EVAL_COLUMNS:
            v = _clean(e.get(k))
            row.append("" if v is None else repr(v) if isinstance(v, float) else v)
        w.writerow(row)
    return buf.getvalue()


class Progress:
    """Training progress on stderr: a tqdm bar redrawn in place on a terminal, a plain line
    per 10% of the steps otherwise (logs, CI). Called with the feeder's progress fields."""

    def __init__(self, label: str, stream=None, enabled: bool = True, task: str | None = None):
        self.label = label
        self.task = task                  # names the test metric: accuracy, bits, R² (None: "metric")
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.last_decile = -1
        self.bar = None

    def __call__(self, f: dict) -> None:
        if not self.enabled:
            return
        done, total = f["done"], f["total"]
        loss = f.get("loss", float("nan"))
        if self.tty:
            if self.bar is None:                    # first report: a resumed run starts past 0
                try:
                    cols = os.get_terminal_size(self.stream.fileno()).columns
                except (OSError, ValueError, AttributeError):
                    cols = 0
                # a terminal that reports a 0 x 0 size (a bare pty) would get no bar at all
                width = dict(dynamic_ncols=True) if cols else dict(ncols=100, nrows=20)
                self.bar = tqdm(total=total, initial=done, desc=self.label, unit="step", file=self.stream,
                                leave=True, **width)
            self.bar.set_postfix_str(f"loss {loss:.4f}{self.test_part(f)}", refresh=False)
            self.bar.update(done - self.bar.n)      # redraws at most every tqdm.mininterval
        else:
            frac = done / total if total else 1.0
            el = f.get("elapsed", 0.0)
            rate = done / el if el > 0 else 0.0
            decile = int(frac * 10)
            if decile > self.last_decile:
                self.last_decile = decile
                self.stream.write(f"{self.label}: {done}/{total} steps, loss {loss:.4f}{self.test_part(f)}, "
                                  f"{rate:.0f} steps/s\n")
                self.stream.flush()

    def test_part(self, f: dict) -> str:
        """', test accuracy 97.12%' from the newest evaluation a PROGRESS carries (none: ''):
        a regression shows R², binary addition its bit accuracy."""
        if self.task == "regression":
            v = f.get("test_metric2")
            return "" if v is None else f", test R² {v:.4f}"
        v = f.get("test_metric")
        if v is None:
            return ""
        name = metric_names(self.task)[0] if self.task else "metric"
        return f", test {name} {100 * v:.2f}%"

    def interject(self, line: str) -> None:
        """A message on its own line, even while a progress bar is drawn."""
        tqdm.write(line, file=self.stream)
        self.stream.flush()

    def close(self) -> None:
        """End the bar (it stays on screen, at its last state); idempotent."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# timeline event codes, as workers record them (uint8) and as the Chrome trace names them


def chrome_trace(traces_by_run: dict) -> dict:
    """Chrome Trace Event format (opens in Perfetto / chrome://tracing): one process
    track per schedule, one thread per worker, compute and wait intervals as slices."""
    events = []
    for pid, (run, traces) in enumerate(traces_by_run.items(), start=1):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": run}})
        t0 = min((float(t["t"][0]) for t in traces if len(t["t"])), default=0.0)
        for tid, tr in enumerate(traces):
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": tr["name"]}})
            for start, dur, code in zip(tr["t"], tr["d"], tr["c"]):
                events.append({"ph": "X", "name": TRACE_NAMES.get(int(code), str(code)), "pid": pid, "tid": tid,
                               "ts": round((float(start) - t0) * 1e6, 1), "dur": round(float(dur) * 1e6, 1)})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(path: str, traces_by_run: dict) -> None:
    from asyncdni import files
    files.atomic_write(path, json.dumps(chrome_trace(traces_by_run)))


def tensorboard_available() -> bool:
    try:
        import tensorboard.summary.writer.event_file_writer  # noqa: F401
    except ImportError:
        return False
    return True


def write_tensorboard(directory: str, series: dict, evals: list[dict], names: tuple[str, str],
                      start_wall: float) -> str:
    """The run's curves as a TensorBoard event file in ``directory`` (the ``tensorboard``
    package's own writer, no torch needed): ``train/loss`` per step, ``test/loss`` and
    ``test/<metric>`` per evaluation, at the wall time each step completed. Returns the
    directory."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    w = EventFileWriter(directory)
    try:
        def scalar(tag: str, step: int, value: float, t: float) -> None:
            if np.isfinite(value):
                w.add_event(Event(step=int(step), wall_time=float(start_wall + t),
                                  summary=Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])))
        done, loss = np.asarray(series["done_at"], float), np.asarray(series["loss"], float)
        for i in range(len(loss)):
            scalar("train/loss", i + 1, loss[i], done[i] if np.isfinite(done[i]) else 0.0)
        for e in evals:
            t = e.get("train_time") or 0.0
            scalar("test/loss", e["step"], e["loss"], t)
            scalar(f"test/{names[0].replace(' ', '_')}", e["step"], e["metric"], t)
            if names[1] and names[1] != names[0]:
                scalar(f"test/{names[1].replace(' ', '_')}", e["step"], e["metric2"], t)
    finally:
        w.close()
    return directory


def run_plot_input(schedule: str, series: dict, summary: dict) -> dict:
    """One training run in the shape :func:`write_plots` takes (a bench result with one row)."""
    return {"_series": {schedule: series},
            "runs": {schedule: {"evals": summary.get("evals") or [], "per_layer": summary.get("per_layer") or []}}}


def write_csv(path: str, rows: list[dict]) -> None:
    import csv
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: _clean(v) if not isinstance(v, (dict, list)) else json.dumps(_clean(v)) for k, v in r.items()})


def write_plots(directory: str, res: dict) -> list[str]:
    """Loss and accuracy vs wall-clock per schedule, and layer utilisation. Needs matplotlib
    (the optional `plot` extra); returns the files written, [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    import os
    os.makedirs(directory, exist_ok=True)
    written = []

    def save(fig, name: str) -> str:
        path = os.path.join(directory, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for s, ser in res.get("_series", {}).items():
        t, loss = np.asarray(ser["done_at"]), np.asarray(ser["loss"])
        ok = np.isfinite(t) & np.isfinite(loss)
        k = max(1, ok.sum() // 100)
        sm = np.convolve(loss[ok], np.ones(k) / k, mode="valid")
        ax[0].plot(t[ok][k - 1:], sm, label=s)
    for s, r in res["runs"].items():
        ev = r.get("evals") or []
        if ev:
            ax[1].plot([e["train_time"] for e in ev], [e["metric"] for e in ev], marker="o", label=s)
    ax[0].set(xlabel="training time (s)", ylabel="training loss", title="loss vs wall-clock")
    ax[1].set(xlabel="training time (s)", ylabel="test accuracy", title="accuracy vs wall-clock")
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend()
    written.append(save(fig, "loss_accuracy.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [s for s in res["runs"] if res["runs"][s]["per_layer"]]
    width = 1 / (len(names) + 1)
    n_layers = 0
    for j, s in enumerate(names):
        fr = [L["busy_fraction"] for L in res["runs"][s]["per_layer"]]
        n_layers = max(n_layers, len(fr))
        ax.bar(np.arange(len(fr)) + (j - (len(names) - 1) / 2) * width, fr, width=width, label=s)
    ax.set_xticks(np.arange(n_layers), [f"layer {i + 1}" for i in range(n_layers)])
    ax.set(ylabel="busy fraction of training time", title="layer utilisation")
    ax.legend()
    written.append(save(fig, "utilisation.png"))
    return written
