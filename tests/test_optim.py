"""numerics/optim.py: decoupled weight decay, AdamW, and the learning-rate schedules, against
their closed forms and, where PyTorch is installed, against torch.optim itself."""
from __future__ import annotations

import math

import numpy as np
import pytest

from asyncdni.numerics.optim import LR_SCHEDULES, OPTIMIZERS, lr_factor, make_optimizer


def test_weight_decay_shrinks_with_a_zero_gradient():
    for name in OPTIMIZERS:
        p = np.full((3, 2), 2.0, np.float32)
        opt = make_optimizer(name, [p], lr=0.1, weight_decay=0.5)
        assert opt.step([np.zeros_like(p)])
        np.testing.assert_allclose(p, 2.0 * (1 - 0.05), rtol=1e-6, err_msg=name)


def test_no_weight_decay_by_default():
    p = np.full(4, 2.0, np.float32)
    opt = make_optimizer("sgd", [p], lr=0.1)
    opt.step([np.zeros_like(p)])
    assert (p == 2.0).all()


@pytest.mark.parametrize("t, want", [(0, 1.0), (50, 0.5), (100, 0.0), (150, 0.0)])
def test_cosine_closed_form(t, want):
    assert lr_factor("cosine", t, 100) == pytest.approx(want, abs=1e-12)


def test_step_and_constant():
    assert [lr_factor("step", t, 0, step_size=3, gamma=0.5) for t in range(7)] == [1, 1, 1, .5, .5, .5, .25]
    assert lr_factor("constant", 10**6, 5) == 1.0
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'warm'"):
        lr_factor("warm", 0, 1)
    assert set(LR_SCHEDULES) == {"constant", "cosine", "step"}


def test_schedules_match_torch():
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    for sched, make in (("cosine", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20)),
                        ("step", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.3))):
        opt = torch.optim.SGD([p], lr=1.0)
        s = make(opt)
        for t in range(20):
            assert opt.param_groups[0]["lr"] == pytest.approx(lr_factor(sched, t, 20, 4, 0.3), abs=1e-9), (sched, t)
            opt.step()
            s.step()


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 4)).astype(np.float64)
    grads = [rng.standard_normal((5, 4)) for _ in range(6)]
    mine = w.copy()
    opt = make_optimizer("adamw", [mine], lr=0.01, weight_decay=0.1)
    tw = torch.nn.Parameter(torch.tensor(w))
    topt = torch.optim.AdamW([tw], lr=0.01, weight_decay=0.1, eps=1e-8)
    for g in grads:
        assert opt.step([g])
        tw.grad = torch.tensor(g)
        topt.step()
    # the same update; eps enters at a slightly different place (after vs before the bias
    # correction of v), hence a tolerance rather than equality
    np.testing.assert_allclose(mine, tw.detach().numpy(), rtol=1e-6, atol=1e-8)
    assert not math.isclose(float(np.abs(mine - w).max()), 0.0)
