"""A user's own model for asyncdni: a small residual CNN cut into three stages.

Each stage is an ordinary ``torch.nn.Module``; asyncdni runs each one in its own process
under any schedule (DNI, cDNI, backprop, pipeline, delayed, local losses). The builder is
called in every stage's process, and by the coordinator to learn the stages' shapes, as
``build(sample_shape, n_out)``; asyncdni seeds torch before calling it, so every process
builds the same initial weights.

Train it on MNIST-format files with the command line::

    .venv/bin/asyncdni train --model examples/residual_cnn.py:build --data-path ../shared/data/mnist

or from Python, as ``python examples/residual_cnn.py ../shared/data/mnist`` does below.
"""
from __future__ import annotations

import sys

from torch import nn


class Residual(nn.Module):
    """x + f(x): two 3x3 convolutions with batch norm, the identity as the shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x + self.f(x))


def build(sample_shape, n_out):
    """Three stages: stem + residual block, downsampling + residual block, the classifier head."""
    channels = sample_shape[0]
    return [
        nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                      Residual(16), nn.MaxPool2d(2)),                            # 16 x 14 x 14
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                      Residual(32), nn.MaxPool2d(2)),                            # 32 x 7 x 7
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, n_out)),
    ]


if __name__ == "__main__":
    from asyncdni import api

    data = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mnist"
    for schedule in ("backprop", "async"):
        result = api.train(model=__file__ + ":build", data_path=data, schedule=schedule, epochs=2)
        print(api.summary_line(result))
