"""Packaging: the wheel installs workers/ and launch/ inside the package, as
asyncdni.workers and asyncdni.launch, never as top-level `workers` or `launch`.

The wheel is built offline from a copy of the sources (no build isolation, so no download:
the dev extra brings a setuptools that builds wheels by itself), then unpacked and imported
from a directory outside the checkout, so that nothing of the checkout is on the path."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.slow       # builds a wheel, runs subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", minversion="70.1", reason="the dev extra's setuptools builds wheels offline")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    for name in ("asyncdni", "workers", "launch"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    # what `pip wheel --no-deps --no-build-isolation .` does, without pip's start-up
    proc = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                           "build_meta.build_wheel(sys.argv[1])", str(out)],
                          cwd=src, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("asyncdni-*.whl")
    return path


def test_wheel_has_no_top_level_workers_or_launch(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"asyncdni"}, tops
    for module in ("workers/_entry.py", "workers/layer.py", "workers/feeder.py", "workers/inprocess.py",
                   "launch/base.py", "launch/local.py", "launch/agents.py", "launch/ray.py"):
        assert f"asyncdni/{module}" in names, module


def test_worker_module_runs_from_the_unpacked_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    code = ("import importlib.util as u, asyncdni.workers._entry as e, asyncdni.launch.local as l; "
            "print(u.find_spec('workers') is None, u.find_spec('launch') is None, e.__file__, l.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    no_workers, no_launch, entry, local = proc.stdout.split()
    assert (no_workers, no_launch) == ("True", "True")
    assert entry.startswith(str(site)) and local.startswith(str(site))
    # a worker's module path, as the local launcher runs it: argparse names it in its usage
    proc = subprocess.run([sys.executable, "-m", "asyncdni.workers.layer", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "python -m asyncdni.workers.layer" in proc.stdout
