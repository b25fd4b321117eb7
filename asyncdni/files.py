"""Reading files a user or another host may have got wrong, without blocking or flooding.

One mechanism for every reader of untrusted paths (configuration files, checkpoints):
open read-only and non-blocking, then accept only a regular file, so that a FIFO is
refused rather than waited on and a device (``/dev/zero``) is never read.
"""
from __future__ import annotations

import os
import stat


class NotRegularFile(OSError):
    """The path is a FIFO, a device or a socket; ``is_dir`` when it is a directory."""

    def __init__(self, path, is_dir: bool):
        super().__init__(f"{path}: " + ("is a directory" if is_dir else "not a regular file"))
        self.is_dir = is_dir


def open_regular(path):
    """``path`` opened for binary reading if it is a regular file (after symlinks).
    Raises FileNotFoundError, :class:`NotRegularFile`, or another OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(path, stat.S_ISDIR(mode))
    return os.fdopen(fd, "rb")


def make_writable_dir(directory) -> None:
    """Create ``directory`` (and its parents) if needed and prove it writable by writing and
    removing a probe file, before a run depends on it. Raises OSError."""
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".asyncdni-probe-{os.getpid()}")
    with open(probe, "wb"):
        pass
    os.unlink(probe)


def private_tempdir(kind: str) -> str:
    """A new private directory ``asyncdni-KIND-PID-XXXX`` in the system's temporary directory.
    The owner's pid in the name lets the next one clean up after a process that could not
    (SIGKILL, power loss): the ``asyncdni-KIND-PID-*`` of this user whose process is gone are
    removed first."""
    import tempfile
    remove_stale_tempdirs(kind)
    return tempfile.mkdtemp(prefix=f"asyncdni-{kind}-{os.getpid()}-")


def remove_stale_tempdirs(kind: str | None = None) -> list[str]:
    """Remove this user's ``asyncdni-KIND-PID-XXXX`` directories (any kind when ``kind`` is None)
    whose process is gone; returns their paths."""
    import re
    import shutil
    import tempfile
    base = tempfile.gettempdir()
    # KIND, then exactly PID-SUFFIX (mkdtemp's suffix has no '-'), so that agent "h" never
    # takes agent "h-1"'s directory for its own
    pattern = re.compile(r"asyncdni-(%s)-(\d+)-[A-Za-z0-9_]+" % (re.escape(kind) if kind else r"run|logs|agent-.+"))
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if not m:
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not _alive(int(m.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
