"""Launchers by name: the built-in ones and any that another installed package declares in
the ``asyncdni.launchers`` entry-point group (as ipyparallel finds its launchers).

A launcher is a :class:`asyncdni.launch.base.Launcher` subclass with a
``from_config(cfg, run_dir)`` class method. The configuration's ``runtime.launcher`` choices
and the CLI's help are derived from :func:`names`; classes are imported only when used.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

GROUP = "asyncdni.launchers"
BUILTIN = {
    "local": "asyncdni.launch.local:LocalLauncher",
    "agents": "asyncdni.launch.agents:AgentsLauncher",
    "ray": "asyncdni.launch.ray:RayLauncher",
}


def available() -> dict[str, str]:
    """Name -> ``module:Class`` of every launcher: built-ins first, then entry points (an
    installed entry point of a built-in's name does not replace it)."""
    out = dict(BUILTIN)
    for ep in entry_points(group=GROUP):
        out.setdefault(ep.name, ep.value)
    return out


def names() -> tuple[str, ...]:
    return tuple(available())


def launcher_class(name: str):
    from asyncdni.launch.base import LaunchError
    target = available().get(name)
    if target is None:
        raise LaunchError(f"unknown launcher {name!r} (known: {', '.join(names())})")
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise LaunchError(f"launcher {name!r}: cannot load {target} ({e})") from None


def make_launcher(cfg, run_dir):
    """The launcher ``cfg.runtime.launcher`` names, built from the configuration."""
    return launcher_class(cfg.runtime.launcher).from_config(cfg, run_dir)
