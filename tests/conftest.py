import os

# The in-process reference must use the same BLAS threading as the workers (1 thread),
# so that both sum in the same order; set before numpy is first imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import time  # noqa: E402
from pathlib import Path

import psutil  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"


def _children():
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def pytest_collection_modifyitems(items):
    """A test that checks for left-over processes starts processes: mark it integration,
    so that `make test-fast` (-m "not integration and not slow") leaves it out."""
    for item in items:
        if "no_leftover_processes" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def no_leftover_processes():
    """Fails the test if any process it started is still alive afterwards."""
    before = {p.pid for p in _children()}
    yield
    deadline = time.monotonic() + 5
    while True:
        left = [p for p in _children() if p.pid not in before and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in left:
        p.kill()
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


@pytest.fixture
def mnist_dir():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("MNIST files not present in ../shared/data/mnist")
    return MNIST_DIR


def raises_one_line(exc_type, fn, *args, match_all=(), **kwargs) -> str:
    """Call fn, expect exc_type with a one-line message containing every item of match_all."""
    with pytest.raises(exc_type) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    assert "\n" not in msg, f"multi-line message: {msg!r}"
    for s in match_all:
        assert s in msg, f"{s!r} not in {msg!r}"
    return msg


def pids_gone(pids, timeout=5.0) -> list[int]:
    """Wait until none of pids is alive; returns the ones still alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def env_with_repo():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session", autouse=True)
def no_leftover_tempdirs():
    """Tests that SIGKILL a coordinator or an agent on purpose leave its private temporary
    directory behind (a killed process cannot clean up; the next one of its kind does). At the
    end of the session every such directory whose process is gone is removed, so the suite
    leaves nothing in the temporary directory."""
    yield
    from asyncdni import files
    files.remove_stale_tempdirs()


def assert_equals_reference(result, ref, what=()) -> None:
    """A run through the workers ended with the in-process reference's weights and losses
    (float32 rounding apart); ``what`` labels a failing assertion."""
    import numpy as np
    for i, node in enumerate(ref.nodes):
        for name, want in node.params().items():
            assert np.allclose(result.params[i][name], want, rtol=1e-5, atol=1e-6), (*what, i, name)
    assert np.allclose(ref.losses, result.series["loss"], rtol=1e-5)


def forge_later(c, index: int, inbox: str, frames_list) -> None:
    """From a thread: push each message of ``frames_list`` into worker ``index``'s ``inbox``
    ("fwd" or "bwd") of the running coordinator ``c`` (an ``on_started`` callback's use)."""
    import threading
    import zmq

    def send():
        ctx = zmq.Context()
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 2000)
        s.connect(c.workers[index].endpoints[inbox])
        for frames in frames_list:
            s.send_multipart(frames)
        s.close()
        ctx.term()
    threading.Thread(target=send, daemon=True).start()
