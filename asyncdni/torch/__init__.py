"""The PyTorch stage backend: any ``nn.Module`` as a stage, with the node interface of
``asyncdni.numerics.layer.LayerNode`` (``node.TorchNode``). torch is an optional extra
(``pip install 'asyncdni[torch]'``); importing this package does not import torch, its
modules do. See docs/torch-stages.md."""


def pin_threads(n: int) -> None:
    """Use ``n`` intra-op threads (``torch.set_num_threads``) and, if torch still allows it
    (before any parallel work has run in this process), ``n`` inter-op threads."""
    import torch
    n = max(1, int(n))
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:            # only possible once, before inter-op work has started
        pass
