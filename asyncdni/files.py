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
