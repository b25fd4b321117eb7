"""The machine's other work during one measured run (psutil only: no sockets, no numpy).

A bench row is a measurement of the whole machine: when other processes take a share of
the CPUs during one row and not during another, the ratio of the two says more about that
load than about the schedules. :class:`LoadSampler` brackets one run and reports

* ``other_cpu_s``: CPU seconds that processes which are *not* this process or its
  descendants (the run's workers, the in-process row's subprocess, the lab's agents and
  relays) used on this process's CPUs: the CPUs' busy time from ``/proc/stat`` (psutil's
  ``cpu_times``) minus our own process tree's CPU time, both differenced over the run;
* ``load1_start`` / ``load1_end``: the 1-minute load average at either end;
* ``wall_s`` and ``cpus`` (the logical CPUs this process may run on);
* ``other_share`` = other_cpu_s / (wall_s * cpus): the share of the machine other work took.

Our tree's CPU time counts this process, its live descendants, and the descendants that
exited and were reaped (the kernel adds a reaped child's time to its parent's
``children_user`` / ``children_system``). A process that vanishes between being listed and
being read is skipped (its time then shows up as "other" only if it had not been reaped).
"""
from __future__ import annotations

import os
import time

import psutil

BUSY_SHARE = 0.10       # other work above this share of the machine marks a row busy


def _cpu_set() -> list[int] | None:
    """The logical CPUs this process may run on (None: unknown, use all)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _busy(t) -> float:
    """Busy seconds of one ``cpu_times`` record: everything but idle and iowait (guest time
    is already counted in user / nice on Linux)."""
    d = t._asdict()
    return sum(v for k, v in d.items() if k not in ("idle", "iowait", "guest", "guest_nice"))


def machine_busy_s(cpus: list[int] | None) -> float:
    """Busy CPU seconds since boot, summed over ``cpus`` (None: every CPU)."""
    if cpus is not None:
        try:
            per = psutil.cpu_times(percpu=True)
            if per and max(cpus) < len(per):
                return sum(_busy(per[i]) for i in cpus)
        except (OSError, psutil.Error):
            pass
    return _busy(psutil.cpu_times())


def _proc_cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)


def tree_cpu_s(pid: int | None = None) -> float:
    """CPU seconds of a process, its live descendants and the descendants it (or they)
    reaped; processes that vanish or deny access while being read are skipped."""
    try:
        root = psutil.Process(pid or os.getpid())
    except psutil.Error:
        return 0.0
    total = 0.0
    try:
        total += _proc_cpu_s(root)
        kids = root.children(recursive=True)
    except psutil.Error:
        return total
    for c in kids:
        try:
            total += _proc_cpu_s(c)
        except psutil.Error:          # NoSuchProcess, ZombieProcess, AccessDenied
            pass
    return total


def _load1() -> float | None:
    try:
        return float(psutil.getloadavg()[0])
    except (OSError, AttributeError):
        return None


class LoadSampler:
    """Brackets one run: ``with LoadSampler() as ld: run()``, then ``ld.result`` (a plain
    dict, see the module's docstring). ``pid``: the root of "our" process tree (default:
    this process)."""

    def __init__(self, pid: int | None = None):
        self.pid = pid or os.getpid()
        self.result: dict | None = None
        self._t0 = None

    def start(self) -> "LoadSampler":
        cpus = _cpu_set()
        self._cpus = cpus
        self._load0 = _load1()
        self._own0 = tree_cpu_s(self.pid)
        self._busy0 = machine_busy_s(cpus)
        self._t0 = time.monotonic()
        return self

    def stop(self) -> dict:
        if self._t0 is None:
            raise RuntimeError("LoadSampler.stop() before start()")
        wall = time.monotonic() - self._t0
        busy = machine_busy_s(self._cpus) - self._busy0
        own = tree_cpu_s(self.pid) - self._own0
        n = len(self._cpus) if self._cpus else (psutil.cpu_count() or 1)
        other = max(0.0, busy - own)           # clock ticks: a few hundredths either way
        self.result = {"wall_s": wall, "cpus": n, "busy_cpu_s": max(0.0, busy), "own_cpu_s": max(0.0, own),
                       "other_cpu_s": other, "other_share": min(1.0, other / (wall * n)) if wall > 0 else 0.0,
                       "load1_start": self._load0, "load1_end": _load1()}
        return self.result

    def __enter__(self) -> "LoadSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def combine(samples: list[dict]) -> dict | None:
    """The load of a row measured in several repeats: its other share is the most any
    repeat saw (a median over repeats is no cleaner than its busiest repeat); the rest
    summed (CPU seconds, wall) or the extremes (load average). None when no sample."""
    samples = [s for s in samples if s]
    if not samples:
        return None
    loads = [v for s in samples for v in (s.get("load1_start"), s.get("load1_end")) if v is not None]
    return {"other_share": max(s["other_share"] for s in samples),
            "other_share_min": min(s["other_share"] for s in samples),
            "other_cpu_s": sum(s["other_cpu_s"] for s in samples), "wall_s": sum(s["wall_s"] for s in samples),
            "cpus": samples[0]["cpus"], "load1_max": max(loads) if loads else None,
            "load1_min": min(loads) if loads else None, "samples": len(samples),
            "busy": any(s["other_share"] > BUSY_SHARE for s in samples)}


def share(load: dict | None) -> float | None:
    return None if not load else load.get("other_share")


def is_busy(load: dict | None, threshold: float = BUSY_SHARE) -> bool:
    s = share(load)
    return s is not None and s > threshold


def busy_note(load: dict | None, threshold: float = BUSY_SHARE) -> str:
    """'busy: other work took 34% of the CPU' for a busy row; '' otherwise."""
    if not is_busy(load, threshold):
        return ""
    return f"busy: other work took {100 * share(load):.0f}% of the CPU"


def not_a_verdict(a: dict | None, b: dict | None, threshold: float = BUSY_SHARE) -> str:
    """Why a comparison between rows measured under loads ``a`` and ``b`` is no verdict
    ('' when it is one: neither row busy, their other shares within ``threshold``). A row
    with no load recorded (an old report) does not block a verdict."""
    sa, sb = share(a), share(b)
    if sa is None or sb is None:
        return ""
    if abs(sa - sb) >= threshold:
        return f"not a verdict: taken under different load, other work {100 * sa:.0f}% vs {100 * sb:.0f}%"
    if sa > threshold or sb > threshold:
        return f"not a verdict: the machine was busy, other work {100 * sa:.0f}% and {100 * sb:.0f}%"
    return ""
