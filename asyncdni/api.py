"""The Python interface: configure a run with keyword arguments, train it, read the result.

    from asyncdni import api
    result = api.train(model="examples/residual_cnn.py:build", data_path="../shared/data/mnist",
                       schedule="async", epochs=2)
    print(api.summary_line(result))

A keyword is a configuration field, by its name (``lr``, ``schedule``, ``model``) when that
name is unique across the sections, or dotted (``train.lr``) in a ``fields`` mapping; two
spellings are kept for what the command line calls them: ``data_path`` (``data.path``)
and ``epochs``/``steps``. Values are checked exactly as the TOML file and the flags are.
The workers are separate processes, so a model is named as the command line names it (a
built-in name, ``path/to/file.py:fn`` or ``pkg.module:fn``), never passed as an object.
"""
from __future__ import annotations

from asyncdni import config as C
from asyncdni import report
from asyncdni.engine import coordinator

ALIASES = {"data_path": "data.path"}


def field_of(name: str) -> str:
    """The dotted configuration field a keyword names (a ConfigError if none, or several)."""
    if "." in name:
        return name
    if name in ALIASES:
        return ALIASES[name]
    hits = [f for f in C.field_names() if f.split(".", 1)[1] == name]
    if len(hits) != 1:
        what = "no configuration field" if not hits else f"several fields ({', '.join(hits)}); use the dotted name"
        raise C.ConfigError(f"{name}: {what}")
    return hits[0]


def configure(config_file: str | None = None, fields: dict | None = None, **keywords) -> C.RunConfig:
    """A checked RunConfig from an optional TOML file, a ``{dotted: value}`` mapping and keywords."""
    overrides = {field_of(k): v for k, v in (fields or {}).items()}
    overrides.update({field_of(k): v for k, v in keywords.items()})
    overrides.setdefault("runtime.progress", False)
    return C.build(config_file, overrides)


def train(cfg: C.RunConfig | None = None, *, log=None, **keywords) -> coordinator.RunResult:
    """Train under the configuration (or one made by :func:`configure` from the keywords);
    one process per layer, as ``asyncdni train`` does. ``log`` receives progress lines."""
    if cfg is None:
        cfg = configure(**keywords)
    elif keywords:
        raise TypeError("train: give a RunConfig or keywords, not both")
    return coordinator.run(cfg, log=log)


def summary(result: coordinator.RunResult) -> dict:
    """The run's summary as ``asyncdni train --report`` writes it."""
    return report.run_summary(result)


def summary_line(result: coordinator.RunResult) -> str:
    """One line: schedule, model, final test metric, time and samples/s."""
    s = summary(result)
    cfg = result.config
    model = cfg.model.model or f"numpy mlp, {cfg.model.layers} layers"
    return (f"{cfg.train.schedule}: {model}, {result.plan.steps} steps, test {s['metric_name']} "
            f"{100 * s['test_metric']:.2f}%, {s['train_time_s']:.1f} s, {s['samples_per_s']:,.0f} samples/s")
