"""The node for a layer spec, by backend: ``LayerNode`` (numpy, built in) or ``TorchNode``
(``asyncdni.torch``, imported only when a spec asks for it, so that torch stays optional)."""
from __future__ import annotations

from asyncdni.numerics.layer import LayerNode, LayerSpec

BACKENDS = ("numpy", "torch")


def make_node(spec: LayerSpec, fail_on_nonfinite: bool = False):
    """``LayerNode`` for backend "numpy", ``asyncdni.torch.node.TorchNode`` for "torch"."""
    backend = getattr(spec, "backend", "numpy")
    if backend == "numpy":
        return LayerNode(spec, fail_on_nonfinite=fail_on_nonfinite)
    if backend == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise RuntimeError("torch stages need the torch extra: pip install 'asyncdni[torch]'") from None
        from asyncdni.torch.node import TorchNode
        return TorchNode(spec, fail_on_nonfinite=fail_on_nonfinite)
    raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
