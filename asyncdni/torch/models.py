"""Models for torch stages: the zoo, user builders, and cutting a model into stages.

:func:`build_stages` seeds torch's global generator with the run's seed and then builds the
*whole* model, so every stage process (and the in-process reference) gets the same initial
weights whichever stage it keeps. A model is a list of blocks; ``split`` groups consecutive
blocks into stages:

* ``""``: one stage per block (zoo: the natural cut below; a user's ``nn.Sequential``: one
  stage per child);
* ``"K"`` (a plain integer): K near-equal consecutive pieces (the first ones one block longer);
* ``"2,4"``: cut indices into the blocks, strictly increasing, each in 1..n-1 (``"2,"``: one cut).

``mlp`` is the exception: its blocks are its layers, so ``split`` is its stage count (default 4).

A user builder is ``path/to/file.py:fn`` or ``pkg.module:fn``; it is called as
``fn(sample_shape, n_out)`` and returns either a list/tuple of ``nn.Module`` (one per stage;
``split`` must then be empty) or an ``nn.Sequential`` that ``split`` cuts. Every failure is a
:class:`ModelError` with one line that names the problem.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import torch
from torch import nn

from asyncdni.numerics.data import even_ranges

ZOO = ("mlp", "cnn", "resnet")
MLP_WIDTH = 256
MLP_STAGES = 4


class ModelError(ValueError):
    """The model cannot be built or cut into stages (one line, naming the problem)."""


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# ---------------------------------------------------------------------- zoo
def _mlp(sample_shape: tuple, n_out: int, k: int) -> list[nn.Module]:
    """K dense stages: [flatten, linear(d -> 256), ReLU], (K-2) x [linear(256 -> 256), ReLU],
    [linear(256 -> n_out)]: the numpy engine's default network, as torch stages."""
    d = math.prod(sample_shape)
    blocks: list[nn.Module] = [nn.Sequential(nn.Flatten(), nn.Linear(d, MLP_WIDTH), nn.ReLU())]
    for _ in range(k - 2):
        blocks.append(nn.Sequential(nn.Linear(MLP_WIDTH, MLP_WIDTH), nn.ReLU()))
    blocks.append(nn.Sequential(nn.Linear(MLP_WIDTH, n_out)))
    return blocks


def _image_shape(model: str, sample_shape: tuple, min_side: int) -> tuple[int, int, int]:
    if len(sample_shape) != 3:
        raise ModelError(f"model {model!r} needs image samples (C, H, W), got sample shape {sample_shape}")
    c, h, w = sample_shape
    if h < min_side or w < min_side:
        raise ModelError(f"model {model!r} needs images of at least {min_side}x{min_side}, got {h}x{w}")
    return c, h, w


def _cnn(sample_shape: tuple, n_out: int) -> list[nn.Module]:
    """Three stages after the DNI paper's convolutional networks (Jaderberg et al. 2016, MNIST
    and CIFAR: 5x5 convolutions, resolution-preserving padding, batch normalisation, ReLU,
    pooling), cut where the paper puts its synthetic-gradient interfaces, between conv layers:

    1. conv 5x5 (C -> 32, padding 2), BatchNorm, ReLU, max-pool 2
    2. conv 5x5 (32 -> 64, padding 2), BatchNorm, ReLU, max-pool 2
    3. flatten, linear (64 x H/4 x W/4 -> n_out)

    Why these sizes: 32 and 64 filters (the paper uses 64 or 128) keep MNIST training to
    minutes on one core per stage: per 28x28 sample stage 1 is ~1.3 MFLOP forward, stage 2
    ~20 MFLOP and stage 3 ~63 kFLOP, so a batch of 128 costs stage 2 well under a second
    (forward + backward). The stages are unbalanced on purpose, as the paper's are: the
    async speedup bound (total work / slowest stage) is part of what a run reports."""
    c, h, w = _image_shape("cnn", sample_shape, 4)

    def conv(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 5, padding=2), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return [conv(c, 32), conv(32, 64), nn.Sequential(nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), n_out))]


class ResidualBlock(nn.Module):
    """conv 3x3, BN, ReLU, conv 3x3, BN, plus the input (a 1x1 conv + BN where the shape
    changes), then ReLU (He et al. 2016's basic block)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


def _resnet(sample_shape: tuple, n_out: int) -> list[nn.Module]:
    """A small residual network in four stages:

    1. stem (conv 3x3 C -> 16, BN, ReLU) and a residual block at 16 channels
    2. a residual block 16 -> 32, stride 2
    3. a residual block 32 -> 64, stride 2
    4. global average pooling, flatten, linear (64 -> n_out)

    (the head is its own stage so that three residual stages can be compared with the cnn)."""
    c, _, _ = _image_shape("resnet", sample_shape, 4)
    stem = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), ResidualBlock(16, 16))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, n_out))
    return [stem, ResidualBlock(16, 32, 2), ResidualBlock(32, 64, 2), head]


# --------------------------------------------------------------- splitting
def parse_split(split: str, n: int, what: str) -> list[tuple[int, int]]:
    """[start, stop) block ranges of the stages that ``split`` cuts ``n`` blocks into."""
    s = str(split).strip()
    if not s:
        return [(i, i + 1) for i in range(n)]
    try:
        if "," not in s:
            k = int(s)
            if not 1 <= k <= n:
                raise ModelError(f"split {s!r}: {what} has {n} blocks, so 1..{n} stages, not {k}")
            return even_ranges(n, k)
        cuts = [int(c) for c in s.split(",") if c.strip()]
    except ValueError as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"split {s!r}: expected a stage count or comma-separated cut indices like '2,4'") from None
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ModelError(f"split {s!r}: cut indices must be strictly increasing")
    bad = [c for c in cuts if not 0 < c < n]
    if bad:
        raise ModelError(f"split {s!r}: cut index {bad[0]} is out of range for {what} with {n} blocks (1..{n - 1})")
    bounds = [0] + cuts + [n]
    return list(zip(bounds, bounds[1:]))


def _group(blocks: list[nn.Module], split: str, what: str) -> list[nn.Module]:
    out = []
    for a, b in parse_split(split, len(blocks), what):
        out.append(blocks[a] if b - a == 1 else nn.Sequential(*blocks[a:b]))
    return out


# ------------------------------------------------------------ user builders
def load_builder(ref: str):
    """The function named by ``path/to/file.py:fn`` or ``pkg.module:fn``."""
    where, sep, name = ref.rpartition(":")
    if not sep or not where or not name:
        raise ModelError(f"model {ref!r}: not a zoo name ({', '.join(ZOO)}) "
                         "nor a builder 'path/to/file.py:fn' or 'pkg.module:fn'")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise ModelError(f"model file {str(path)!r} not found")
        modname = f"asyncdni_user_model_{abs(hash(str(path.resolve())))}"
        try:
            spec = importlib.util.spec_from_file_location(modname, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[modname] = module          # dataclasses and pickling-free helpers look it up
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(modname, None)
            raise ModelError(f"model file {str(path)!r} raised on import: {_one_line(e)}") from None
        origin = f"model file {str(path)!r}"
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise ModelError(f"model module {where!r} cannot be imported: {_one_line(e)}") from None
        origin = f"model module {where!r}"
    fn = getattr(module, name, None)
    if fn is None:
        raise ModelError(f"{origin} has no function {name!r}")
    if not callable(fn):
        raise ModelError(f"{origin}: {name!r} is a {type(fn).__name__}, not a function")
    return fn


def _user_stages(ref: str, split: str, sample_shape: tuple, n_out: int) -> list[nn.Module]:
    fn = load_builder(ref)
    try:
        out = fn(sample_shape, n_out)
    except Exception as e:
        raise ModelError(f"model builder {ref!r} raised: {_one_line(e)}") from None
    if isinstance(out, nn.Sequential):
        return _group(list(out.children()), split, f"the nn.Sequential of {ref!r}")
    if isinstance(out, (list, tuple)) and all(isinstance(m, nn.Module) for m in out):
        if str(split).strip():
            raise ModelError(f"model builder {ref!r} returned {len(out)} stages as a list; "
                             f"split {split!r} applies only to an nn.Sequential")
        return list(out)
    raise ModelError(f"model builder {ref!r} returned {type(out).__name__}; "
                     "expected a list of nn.Module (one per stage) or an nn.Sequential")


# ------------------------------------------------------------------ public
def build_stages(model: str, split: str, sample_shape: tuple, n_out: int, seed: int) -> list[nn.Module]:
    """Seed torch with ``seed``, build the whole model and return its stages (in training
    mode, on the CPU), checked: at least two stages, each stage's output feeds the next, the
    last one outputs ``(n_out,)`` per sample."""
    sample_shape = tuple(int(s) for s in sample_shape)
    if not sample_shape:
        raise ModelError("torch stages need the dataset's per-sample input shape (sample_shape is empty)")
    torch.manual_seed(int(seed))
    if model == "mlp":
        s = str(split).strip()
        try:
            k = int(s) if s else MLP_STAGES
        except ValueError:
            raise ModelError(f"split {s!r}: model 'mlp' takes a stage count (its layers), e.g. '4'") from None
        if k < 2:
            raise ModelError(f"split {s!r}: model 'mlp' needs at least 2 stages")
        stages = _mlp(sample_shape, n_out, k)
    elif model in ("cnn", "resnet"):
        blocks = _cnn(sample_shape, n_out) if model == "cnn" else _resnet(sample_shape, n_out)
        stages = _group(blocks, split, f"model {model!r}")
    elif not model:
        raise ModelError(f"torch stages need a model: a zoo name ({', '.join(ZOO)}) or a builder 'file.py:fn'")
    else:
        stages = _user_stages(model, split, sample_shape, n_out)
    if len(stages) < 2:
        raise ModelError(f"model {model!r} has {len(stages)} stage; a network of stages needs at least 2")
    stage_shapes(stages, sample_shape, n_out)
    return stages


def stage_shapes(stages: list[nn.Module], sample_shape: tuple, n_out: int | None = None) -> list[tuple[tuple, tuple]]:
    """Per stage, its (input shape, output shape) per sample, found by running a batch of two
    zero samples through every stage in eval mode under no_grad (modes are restored). With
    ``n_out``, the last stage must output ``(n_out,)``."""
    shape = tuple(int(s) for s in sample_shape)
    out = []
    try:
        p = next(p for m in stages for p in m.parameters())
        dtype, device = p.dtype, p.device
    except StopIteration:
        dtype, device = torch.get_default_dtype(), torch.device("cpu")
    h = torch.zeros((2,) + shape, dtype=dtype, device=device)
    for i, stage in enumerate(stages):
        modes = [m.training for m in stage.modules()]
        stage.eval()
        try:
            with torch.no_grad():
                y = stage(h)
        except Exception as e:
            src = "the input" if i == 0 else f"stage {i}'s output"
            raise ModelError(f"stage {i + 1} cannot take {src} of shape {shape}: {_one_line(e)}") from None
        finally:
            for m, t in zip(stage.modules(), modes):
                m.training = t
        if not isinstance(y, torch.Tensor) or y.dim() < 2 or y.shape[0] != 2:
            what = type(y).__name__ if not isinstance(y, torch.Tensor) else f"a tensor of shape {tuple(y.shape)}"
            raise ModelError(f"stage {i + 1} returned {what}; a stage must return one tensor (batch, ...)")
        out.append((shape, tuple(y.shape[1:])))
        shape, h = tuple(y.shape[1:]), y
    if n_out is not None and shape != (int(n_out),):
        raise ModelError(f"the last stage outputs shape {shape} per sample; expected ({int(n_out)},) (n_out)")
    return out
