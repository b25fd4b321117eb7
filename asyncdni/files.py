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


def atomic_write(path, data) -> None:
    """Write ``data`` (str: UTF-8, or bytes) to ``path`` atomically (:func:`write_atomically`)."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    write_atomically(path, lambda f: f.write(raw))


def write_atomically(path, write) -> None:
    """Call ``write(f)`` on a temporary file beside ``path`` (created with the usual
    permissions, 0666 less the umask), flush and fsync it, then rename it over ``path``. A
    reader sees the old file or the new one, never half of one; on failure the temporary
    file is removed. Raises OSError."""
    import secrets
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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
