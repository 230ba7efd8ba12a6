"""Momentum-SAM against a reference step written from the authors' code (MarlonBecker/MSAM, optimizer/msam.py and
optimizer/adamW_msam.py), in float64 over several steps, with SGD-momentum and AdamW bases; its refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_deltasam import DeltaSAM, SAMConfig
from lightning_deltasam.ascent.msam import MomentumSAM, MomentumSAMOptions
from tests.helpers import make_data, make_net, per_sample_ce

STEPS, LR, RHO, TOL = 6, 0.05, 0.3, 1e-6


class AuthorsSGD:
    """optimizer/msam.py's MSAM.step (weight_decay=0, nesterov off): the weights kept at w - rho v/||v|| between
    steps; ``move_back`` puts them at w. (With weight decay the authors decay the gradient with the perturbed
    weights, a base-optimizer detail torch's SGD does at w; the tests compare without decay.)"""

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float, rho: float) -> None:
        self.params, self.lr, self.momentum, self.rho = params, lr, momentum, rho
        self.buf = [torch.zeros_like(p) for p in params]
        self.inverse_norm = 0.0

    @torch.no_grad()
    def step(self) -> None:
        for p, b in zip(self.params, self.buf):
            p.add_(b, alpha=self.rho * self.inverse_norm)  # back to w
            b.mul_(self.momentum).add_(p.grad)
            p.add_(b, alpha=-self.lr)
        self.inverse_norm = 1 / (torch.norm(torch.stack([b.norm() for b in self.buf])).item() + 1e-12)
        for p, b in zip(self.params, self.buf):
            p.sub_(b, alpha=self.rho * self.inverse_norm)  # to the next step's w - rho v/||v||

    @torch.no_grad()
    def move_back(self) -> None:
        for p, b in zip(self.params, self.buf):
            p.add_(b, alpha=self.rho * self.inverse_norm)


class AuthorsAdamW:
    """optimizer/adamW_msam.py's adamW_msam (weight_decay=0: the authors decay after the update, torch's AdamW
    before it, a base-optimizer detail)."""

    def __init__(self, params: list[torch.Tensor], lr: float, rho: float, betas=(0.9, 0.999), eps=1e-8) -> None:
        self.params, self.lr, self.rho, self.betas, self.eps = params, lr, rho, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t, self.norm_factor = 0, 0.0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v):
            p.add_(m, alpha=self.norm_factor)
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(1 - b2**self.t)).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1**self.t))
        self.norm_factor = self.rho / (torch.norm(torch.stack([m.norm() for m in self.m])).item() + 1e-12)
        for p, m in zip(self.params, self.m):
            p.sub_(m, alpha=self.norm_factor)

    @torch.no_grad()
    def move_back(self) -> None:
        for p, m in zip(self.params, self.m):
            p.add_(m, alpha=self.norm_factor)


BASES = {
    "sgd": (lambda ps: AuthorsSGD(ps, LR, 0.9, RHO), torch.optim.SGD, dict(lr=LR, momentum=0.9)),
    "adamw": (lambda ps: AuthorsAdamW(ps, LR, RHO), torch.optim.AdamW, dict(lr=LR, weight_decay=0.0)),
}


def _setup():
    x, y = make_data(n=16)
    return make_net().double(), x.double(), y


def _reference(base: str) -> list[list[torch.Tensor]]:
    """The authors' loop: the gradient at the weights as they are kept (w - rho v/||v||), step, weights at w."""
    net, x, y = _setup()
    opt = BASES[base][0](list(net.parameters()))
    history = []
    for _ in range(STEPS):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.move_back()
        history.append([p.detach().clone() for p in net.parameters()])
        with torch.no_grad():  # the authors move up again (move_up_to_momentumAscent) before the next forward
            for p, d in zip(net.parameters(), _ascent_of(opt)):
                p.sub_(d)
    return history


def _ascent_of(opt) -> list[torch.Tensor]:
    if isinstance(opt, AuthorsSGD):
        return [b * (opt.rho * opt.inverse_norm) for b in opt.buf]
    return [m * opt.norm_factor for m in opt.m]


def _ours(base: str) -> list[list[torch.Tensor]]:
    net, x, y = _setup()
    _, cls, kw = BASES[base]
    opt = DeltaSAM(net.parameters(), cls, SAMConfig(rho=RHO, variant=MomentumSAMOptions()), module=net, **kw)
    history = []
    for _ in range(STEPS):
        opt.step(lambda: per_sample_ce(net, x, y))
        history.append([p.detach().clone() for p in net.parameters()])
    return history


@pytest.mark.parametrize("base", list(BASES))
def test_momentum_sam_equals_the_authors_step(base):
    for ours, ref in zip(_ours(base), _reference(base)):
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=TOL, atol=1e-12)


@pytest.mark.parametrize("base", list(BASES))
def test_a_wrong_step_fails_the_reference(base, monkeypatch):
    """Control: the perturbation along +v instead of -v (the usual mistake) is caught by the comparison."""
    original = MomentumSAM.ascent_without_pass

    def flipped(self, param_groups, params):
        ascent = original(self, param_groups, params)
        for group in ascent.groups:
            torch._foreach_neg_(group.direction)
        return ascent

    monkeypatch.setattr(MomentumSAM, "ascent_without_pass", flipped)
    with pytest.raises(AssertionError):
        test_momentum_sam_equals_the_authors_step(base)


def test_the_first_step_is_the_base_step_and_one_pass_per_step():
    """No momentum yet: eps = 0 (the authors' first step); every step runs exactly one forward."""
    net, x, y = _setup()
    plain = make_net().double()
    calls = []
    opt = DeltaSAM(
        net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO, variant=MomentumSAMOptions()), lr=LR, momentum=0.9
    )
    base = torch.optim.SGD(plain.parameters(), lr=LR, momentum=0.9)

    def closure():
        calls.append(1)
        return per_sample_ce(net, x, y)

    opt.step(closure)
    F.cross_entropy(plain(x), y).backward()
    base.step()
    for a, b in zip(net.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    opt.step(closure)
    assert len(calls) == 2


def test_a_base_optimizer_without_momentum_is_refused_with_w_untouched():
    net, x, y = _setup()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO, variant=MomentumSAMOptions()), lr=LR)
    opt.step(lambda: per_sample_ce(net, x, y))
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"variant='msam' perturbs along the base optimizer's momentum.*keeps none"):
        opt.step(lambda: per_sample_ce(net, x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_what_momentum_sam_cannot_do_is_refused():
    msam = MomentumSAMOptions()
    with pytest.raises(ValueError, match="variant='msam' with m=1"):
        SAMConfig(variant=msam, m=1)
    net, x, y = _setup()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(variant=msam), lr=LR, momentum=0.9)
    F.cross_entropy(net(x), y).backward()
    with pytest.raises(ValueError, match="variant='msam' perturbs before the step's only pass"):
        opt.first_step()
    with pytest.raises(ValueError, match="variant='msam' perturbs before the step's only pass"):
        opt.step(lambda: F.cross_entropy(net(x), y))  # a backward closure: the gradient at w is already taken


def test_resume_is_bitwise():
    """The momentum is the base optimizer's state: a resumed run equals an uninterrupted one bit for bit."""
    x, y = make_data(n=16)

    def run(split: bool) -> list[torch.Tensor]:
        net = make_net()
        sam = SAMConfig(rho=RHO, variant=MomentumSAMOptions())
        opt = DeltaSAM(net.parameters(), torch.optim.AdamW, sam, lr=LR, module=net)
        for i in range(4):
            if split and i == 2:
                state, weights = opt.state_dict(), net.state_dict()
                net = make_net()
                net.load_state_dict(weights)
                opt = DeltaSAM(net.parameters(), torch.optim.AdamW, sam, lr=LR, module=net)
                opt.load_state_dict(state)
            opt.step(lambda: per_sample_ce(net, x, y))
        return [p.detach().clone() for p in net.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))
