"""asyncdni.files: private temporary directories, and their clean-up after a killed owner."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from asyncdni import files


def test_private_tempdir_removes_only_dead_owners_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"asyncdni-agent-h-{dead}-abc_12"
    alive = tmp_path / f"asyncdni-agent-h-{os.getpid()}-xyz"
    other = tmp_path / f"asyncdni-agent-h-1-{dead}-abc"      # agent "h-1", not agent "h"
    for d in (stale, alive, other):
        d.mkdir()
        (d / "layer0.log").write_text("x")
    new = files.private_tempdir("agent-h")
    assert os.path.isdir(new) and os.path.basename(new).startswith(f"asyncdni-agent-h-{os.getpid()}-")
    assert not stale.exists() and alive.exists() and other.exists()
    assert files.remove_stale_tempdirs() == [str(other)]
    assert alive.exists()


def test_make_writable_dir(tmp_path):
    files.make_writable_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
