"""The peer a user would pick instead: PyTorch's own ``torch.distributed.pipelining``, as a bench row.

:func:`run_pipelining` trains the same stages with ``ScheduleGPipe`` or ``Schedule1F1B``:
one OS process per stage (``python -m asyncdni.bench.pipelining --child``), backend gloo,
world size = number of stages, each process on one thread, M micro-batches per step,
cross-entropy on integer labels, ``torch.optim.Adam`` on each stage's parameters stepped
after every ``schedule.step``. The stages come from a factory named ``"module:function"``
that every process imports and calls as ``fn(sample_shape, n_out)`` after
``torch.manual_seed(seed)``, so every process builds identical weights.

Everything listens on loopback only: the bench process binds the rendezvous socket on
127.0.0.1 (a free port) and hands it to rank 0's ``TCPStore`` (``master_listen_fd``; a
``TCPStore`` that binds its own port listens on every address), and gloo is pinned to
the loopback interface. Children report back through small JSON files in a temporary
directory that is removed afterwards; a failure or the ``timeout`` kills every child and
raises one line naming the rank and the last line of its stderr.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}
DEFAULT_FACTORY = "asyncdni.bench.pipelining:mlp_stages"
MNIST_SHAPE = (784,)
WIDTH = 256
POLL_S = 0.05               # how often the bench process looks at its children
SETTLE_S = 2.0             # after a child fails, how long the others have to fail before one is named
TERM_GRACE_S = 3.0          # SIGTERM, then this long, then SIGKILL
LINE_CHARS = 300            # the most of a child's stderr line that goes into an error


def available() -> str | None:
    """None when torch and ``torch.distributed.pipelining`` (with gloo) can be used here,
    else one line saying why not (the bench skips the row with it)."""
    try:
        import torch
    except Exception as e:          # ImportError, or a broken install
        return f"torch is not importable: {type(e).__name__}: {e}".splitlines()[0]
    try:
        import torch.distributed as dist
        from torch.distributed import pipelining
        for name in ("PipelineStage", *SCHEDULES.values()):
            getattr(pipelining, name)
    except Exception as e:
        return (f"torch.distributed.pipelining is not importable in torch {torch.__version__}: "
                f"{type(e).__name__}: {e}").splitlines()[0]
    if not dist.is_available() or not dist.is_gloo_available():
        return f"torch {torch.__version__} has no gloo backend for torch.distributed"
    return None


# the factory the bench uses for its own model: every child builds the same torch stages as
# the engine's workers (asyncdni.torch.models.build_stages), named by these variables
PEER_FACTORY = "asyncdni.bench.pipelining:configured_stages"
PEER_ENV = ("ASYNCDNI_PEER_MODEL", "ASYNCDNI_PEER_SPLIT", "ASYNCDNI_PEER_SEED")


def configured_stages(sample_shape, n_out):
    """The stages of the model that ``ASYNCDNI_PEER_MODEL`` / ``_SPLIT`` / ``_SEED`` name (a zoo
    name or a builder), built exactly as the engine's torch stages are."""
    import os

    from asyncdni.torch.models import build_stages
    model, split, seed = (os.environ.get(k, "") for k in PEER_ENV)
    return build_stages(model, split, tuple(sample_shape), n_out, int(seed or 0))


def mlp_stages(sample_shape, n_out):
    """The 4-stage MLP 784-256-256-256-10 (input width: the product of ``sample_shape``,
    output width ``n_out``) as four ``nn.Sequential``. Seed torch before calling it
    (the children call ``torch.manual_seed(seed)`` first) to get the same weights."""
    from torch import nn
    n_in = math.prod(sample_shape)
    return [nn.Sequential(nn.Flatten(), nn.Linear(n_in, WIDTH), nn.ReLU()),
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()),
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()),
            nn.Sequential(nn.Linear(WIDTH, n_out))]


def load_factory(spec: str):
    """The callable named by ``"module:function"``."""
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise ValueError(f"stages factory {spec!r} is not of the form 'module:function'")
    obj = importlib.import_module(mod)
    for part in fn.split("."):
        obj = getattr(obj, part)
    return obj


def _one_line(text) -> str:
    """``text`` (a message, an exception) on one line of at most ``LINE_CHARS``."""
    line = " ".join(str(text).split())
    return line if len(line) <= LINE_CHARS else line[:LINE_CHARS - 3] + "..."


def _describe(e: BaseException) -> str:
    """``Type: message`` on one line, with the exception that caused it, if any."""
    text = f"{type(e).__name__}: {' '.join(str(e).split()) or repr(e)}"
    cause = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if cause is not None:
        text += f" (caused by {type(cause).__name__}: {' '.join(str(cause).split())})"
    return _one_line(text)


def count_stages(stages_factory: str, sample_shape, n_out: int) -> int:
    """How many stages the factory builds, found in this process (on the meta device, so
    that no weights are allocated, where the factory allows it)."""
    import torch
    try:
        fn = load_factory(stages_factory)
    except Exception as e:
        raise RuntimeError(f"stages factory {stages_factory!r} cannot be loaded: {_describe(e)}") from None
    try:
        with torch.device("meta"):
            stages = fn(tuple(sample_shape), n_out)
    except Exception:
        try:
            with torch.random.fork_rng():
                stages = fn(tuple(sample_shape), n_out)
        except Exception as e:
            raise RuntimeError(f"stages factory {stages_factory!r} failed: {_describe(e)}") from None
    stages = list(stages)
    if not stages or not all(isinstance(m, torch.nn.Module) for m in stages):
        raise RuntimeError(f"stages factory {stages_factory!r} must return a non-empty list of nn.Module")
    return len(stages)


def _loopback_ifname() -> str:
    """The name of the interface that holds 127.0.0.1 (gloo binds only there)."""
    try:
        import psutil
        for name, addrs in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
                return name
    except Exception:
        pass
    return "lo"


def _child_env() -> dict:
    from asyncdni.launch.local import worker_env
    env = worker_env(1)                         # BLAS / OpenMP pinned to one thread, checkout importable
    env["GLOO_SOCKET_IFNAME"] = _loopback_ifname()
    env["MASTER_ADDR"] = "127.0.0.1"
    env.pop("TORCH_DISTRIBUTED_DEBUG", None)
    return env


def _last_line(path: Path) -> str:
    try:
        lines = [s.strip() for s in path.read_text(errors="replace").splitlines() if s.strip()]
    except OSError:
        lines = []
    if not lines:
        return "(no stderr output)"
    line = lines[-1]
    return line if len(line) <= LINE_CHARS else line[:LINE_CHARS - 3] + "..."


def _stop(procs) -> None:
    """SIGTERM every child still running, then SIGKILL what is left; reap them all."""
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass
    deadline = time.monotonic() + TERM_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:       # cannot happen after SIGKILL short of a stuck kernel
            pass


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _first_failure(d: Path, failed: list[int]) -> int:
    """Of the ranks that have failed, the one that failed first by its own clock, taken when
    its exception was caught and before it left the process group (the others usually fail
    because it went away); the lowest rank where none said when."""
    stamped = [(_read_json(d / f"error-{r}.json").get("t"), r) for r in failed]
    stamped = [(t, r) for t, r in stamped if isinstance(t, (int, float))]
    return min(stamped)[1] if stamped else min(failed)


def run_pipelining(stages_factory: str, sample_shape: tuple, n_out: int, batch: int, steps: int, schedule: str,
                   microbatches: int = 4, seed: int = 0, lr: float = 5e-4, warmup: int = 5,
                   timeout: float = 300.0, log=None) -> dict:
    """Train the factory's stages with ``torch.distributed.pipelining`` for ``warmup`` untimed
    and ``steps`` timed steps, one process per stage; returns the row.

    The time is rank 0's ``time.perf_counter`` from a ``dist.barrier()`` before the first
    timed step to a ``dist.barrier()`` after the last (so every stage's last backward and
    optimizer step are inside it). ``final_loss``: the last stage's mean loss over the
    micro-batches of the last step. Raises ``RuntimeError`` (one line) when torch or its
    pipelining is missing, the factory fails, a child fails or the timeout passes;
    ``ValueError`` for arguments out of range."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
    for name, v, least in (("batch", batch, 1), ("steps", steps, 1), ("microbatches", microbatches, 1),
                           ("warmup", warmup, 0), ("n_out", n_out, 1)):
        if int(v) != v or v < least:
            raise ValueError(f"{name} must be an integer >= {least}, not {v!r}")
    if batch % microbatches:
        raise ValueError(f"batch {batch} does not split into {microbatches} equal micro-batches")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, not {timeout!r}")
    reason = available()
    if reason:
        raise RuntimeError(reason)
    import torch
    K = count_stages(stages_factory, sample_shape, n_out)
    name = f"torch-pipelining-{schedule}"
    if log:
        log(f"{name}: {K} processes (gloo, 1 thread each), batch {batch} in {microbatches} micro-batches, "
            f"{warmup} + {steps} steps")
    procs: list[subprocess.Popen] = []
    errs = []
    listener = None
    with tempfile.TemporaryDirectory(prefix="asyncdni-pipelining-") as tmp:
        d = Path(tmp)
        try:
            # the rendezvous socket: bound here on loopback and handed to rank 0's TCPStore, so no
            # other process can take the port in between and nothing listens off loopback
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(max(16, K))
            port = listener.getsockname()[1]
            spec = {"factory": stages_factory, "sample_shape": [int(s) for s in sample_shape], "n_out": int(n_out),
                    "batch": int(batch), "steps": int(steps), "warmup": int(warmup), "schedule": schedule,
                    "microbatches": int(microbatches), "seed": int(seed), "lr": float(lr), "world": K,
                    "port": port, "timeout": float(timeout), "parent": os.getpid()}
            (d / "spec.json").write_text(json.dumps(spec))
            env = _child_env()
            for rank in range(K):
                argv = [sys.executable, "-m", "asyncdni.bench.pipelining", "--child", str(d), "--rank", str(rank)]
                fds = ()
                if rank == 0:
                    argv += ["--listen-fd", str(listener.fileno())]
                    fds = (listener.fileno(),)
                errs.append(open(d / f"stderr-{rank}.txt", "wb"))
                procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                              stderr=errs[-1], pass_fds=fds, start_new_session=True))
            listener.close()
            listener = None
            deadline = time.monotonic() + timeout
            while True:
                codes = [p.poll() for p in procs]
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    # the others usually fail soon after, because it went away: let them say when
                    settle = time.monotonic() + SETTLE_S
                    while time.monotonic() < settle and any(p.poll() is None for p in procs):
                        time.sleep(POLL_S)
                    failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
                    r = _first_failure(d, failed)
                    raise RuntimeError(f"{name}: rank {r} of {K} failed (exit {procs[r].returncode}): "
                                       f"{_last_line(d / f'stderr-{r}.txt')}")
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    r = next(r for r, c in enumerate(codes) if c is None)
                    raise RuntimeError(f"{name}: timed out after {timeout:g} s, rank {r} of {K} still running; "
                                       f"its last stderr line: {_last_line(d / f'stderr-{r}.txt')}")
                time.sleep(POLL_S)
            first, last = _read_json(d / "result-0.json"), _read_json(d / f"result-{K - 1}.json")
            if "wall" not in first or "final_loss" not in last:
                raise RuntimeError(f"{name}: the children exited but left no result "
                                   f"(rank 0 stderr: {_last_line(d / 'stderr-0.txt')})")
        finally:
            if listener is not None:
                listener.close()
            _stop(procs)
            for f in errs:
                f.close()
    wall = float(first["wall"])
    return {"name": name, "samples_per_s": steps * batch / wall, "wall": wall, "steps": int(steps),
            "batch": int(batch), "microbatches": int(microbatches), "stages": K, "torch": torch.__version__,
            "final_loss": float(last["final_loss"])}


# ---------------------------------------------------------------- the child process


def _watch_parent(parent: int) -> None:
    """End this child when the bench process that started it is gone."""
    def loop():
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(1.0)
    threading.Thread(target=loop, daemon=True, name="watch-parent").start()


def child_main(d: Path, rank: int, listen_fd: int | None) -> None:
    spec = json.loads((d / "spec.json").read_text())
    _watch_parent(spec["parent"])
    import datetime

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed import pipelining

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    K, M, B = spec["world"], spec["microbatches"], spec["batch"]
    shape = tuple(spec["sample_shape"])
    timeout = datetime.timedelta(seconds=spec["timeout"])
    store = dist.TCPStore("127.0.0.1", spec["port"], K, rank == 0, timeout=timeout,
                          master_listen_fd=listen_fd if rank == 0 else None)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=K, timeout=timeout)
    try:
        torch.manual_seed(spec["seed"])
        stages = list(load_factory(spec["factory"])(shape, spec["n_out"]))
        if len(stages) != K:
            raise RuntimeError(f"the factory built {len(stages)} stages in rank {rank}, {K} in the bench process")
        module = stages[rank]
        # example tensors of one micro-batch, for the stage's static shapes
        # (requires_grad as in training: gloo buffers for gradients exist only for those)
        with torch.no_grad():
            h = torch.zeros((B // M, *shape))
            for m in stages[:rank]:
                h = m(h)
        example_in = h.detach().requires_grad_(rank > 0)
        out = module(example_in)
        example_out = out.detach().requires_grad_(out.requires_grad)
        del out
        del stages[rank + 1:], stages[:rank]
        stage = pipelining.PipelineStage(module, rank, K, torch.device("cpu"), input_args=example_in,
                                         output_args=example_out)
        sched = getattr(pipelining, SCHEDULES[spec["schedule"]])(stage, n_microbatches=M, loss_fn=F.cross_entropy)
        gen = torch.Generator().manual_seed(spec["seed"])
        x = torch.randn((B, *shape), generator=gen)
        y = torch.randint(0, spec["n_out"], (B,), generator=gen)
        opt = torch.optim.Adam(module.parameters(), lr=spec["lr"])
        first, last = rank == 0, rank == K - 1

        def step():
            opt.zero_grad(set_to_none=True)
            losses = [] if last else None
            args = (x,) if first else ()
            kw = {"target": y, "losses": losses} if last else {}
            sched.step(*args, return_outputs=False, **kw)
            opt.step()
            return losses

        for _ in range(spec["warmup"]):
            step()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            losses = step()
        dist.barrier()
        wall = time.perf_counter() - t0
        out = {"rank": rank, "wall": wall}
        if last:
            out["final_loss"] = float(torch.stack([v.detach().float() for v in losses]).mean())
        tmp = d / f"result-{rank}.json.tmp"
        tmp.write_text(json.dumps(out))
        tmp.replace(d / f"result-{rank}.json")
    except BaseException:
        _mark_failed(d, rank)           # before the peers see this rank leave
        raise
    finally:
        dist.destroy_process_group()


def _mark_failed(d: Path, rank: int) -> None:
    path = d / f"error-{rank}.json"
    if path.exists():
        return
    try:
        path.write_text(json.dumps({"t": time.time()}))
    except OSError:
        pass


def _child(argv) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--child", required=True, type=Path)
    ap.add_argument("--rank", required=True, type=int)
    ap.add_argument("--listen-fd", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        child_main(a.child, a.rank, a.listen_fd)
    except BaseException as e:
        import traceback
        _mark_failed(a.child, a.rank)
        traceback.print_exc()
        # the last line of stderr is what the bench reports
        print(_describe(e), file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--child" in argv:
        return _child(argv)
    ap = argparse.ArgumentParser(prog="python -m asyncdni.bench.pipelining", allow_abbrev=False,
                                 description="Train stages with torch.distributed.pipelining (one process per "
                                             "stage, gloo, one thread each) and print samples/s.")
    ap.add_argument("--schedule", choices=tuple(SCHEDULES), default="gpipe")
    ap.add_argument("--steps", type=int, default=50, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--factory", default=DEFAULT_FACTORY, help="module:function returning the stages")
    ap.add_argument("--sample-shape", default=",".join(map(str, MNIST_SHAPE)), help="e.g. 784 or 1,28,28")
    ap.add_argument("--n-out", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=300.0)
    a = ap.parse_args(argv)
    reason = available()
    if reason:
        print(f"torch pipelining unavailable: {reason}", file=sys.stderr)
        return 2
    try:
        shape = tuple(int(s) for s in a.sample_shape.split(","))
        r = run_pipelining(a.factory, shape, a.n_out, a.batch, a.steps, a.schedule, microbatches=a.microbatches,
                           seed=a.seed, lr=a.lr, warmup=a.warmup, timeout=a.timeout)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"{r['name']}: {r['samples_per_s']:.0f} samples/s ({r['stages']} stages, batch {r['batch']} in "
          f"{r['microbatches']} micro-batches, {r['steps']} steps in {r['wall']:.2f} s, final loss "
          f"{r['final_loss']:.4f}, torch {r['torch']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
