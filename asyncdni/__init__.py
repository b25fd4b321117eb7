"""asyncdni: layer-per-process training with decoupled neural interfaces over ZeroMQ."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("asyncdni")
except PackageNotFoundError:          # run from a source tree that was never installed
    __version__ = "0+unknown"
