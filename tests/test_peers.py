"""The peer API of ``DeltaSAM``: davda54/sam's and pytorch_optimizer's two-step calls and backward closure,
per-parameter-group ``rho`` / ``adaptive``, all routed through the one engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_deltasam import DeltaSAM, ProbeWeights, SAMConfig
from tests.helpers import make_data, make_net, per_sample_ce

RHO, LR, STEPS = 0.05, 0.05, 3


class ReferenceSAM(torch.optim.Optimizer):
    """SAM / ASAM as davda54/sam writes it (T = |w| + eta; davda54's own is eta = 0), with per-group rho."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, eta=0.01, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        scaled = [
            ((p.abs() + g["eta"]) if g["adaptive"] else 1.0) * p.grad
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None
        ]
        norm = torch.sqrt(sum((s.double() ** 2).sum() for s in scaled))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                t2 = (p.abs() + group["eta"]) ** 2 if group["adaptive"] else 1.0
                self.state[p]["old_p"] = p.data.clone()
                p.add_((t2 * p.grad * group["rho"] / norm).to(p.dtype))

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.data = self.state[p].pop("old_p")
        self.base_optimizer.step()


def _mean_loss(net, x, y):
    return F.cross_entropy(net(x), y)


def _run(path: str, adaptive: bool, groups: bool = False) -> nn.Module:
    """STEPS AdamW-based steps of SAM / ASAM on one net through ``path``; returns the net."""
    x, y = make_data(n=16)
    net = make_net()
    params = (
        [{"params": net[0].parameters()}, {"params": net[-1].parameters(), "rho": 3 * RHO}]
        if groups
        else net.parameters()
    )
    opt = (
        ReferenceSAM(params, torch.optim.AdamW, rho=RHO, adaptive=adaptive, lr=LR)
        if path == "reference"
        else DeltaSAM(params, torch.optim.AdamW, SAMConfig(rho=RHO, adaptive=adaptive), lr=LR)
    )
    for _ in range(STEPS):
        if path == "per-instance":
            opt.step(lambda: per_sample_ce(net, x, y))
            continue
        opt.zero_grad()
        _mean_loss(net, x, y).backward()
        if path == "closure":

            def closure():
                loss = _mean_loss(net, x, y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt.first_step(zero_grad=True) if path == "two-step" else opt.first_step()
            if path == "reference":
                opt.zero_grad()
            _mean_loss(net, x, y).backward()
            opt.second_step(zero_grad=True) if path == "two-step" else opt.second_step()
    return net


@pytest.mark.parametrize("groups", [False, True], ids=["one-group", "group-rho"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_two_step_and_backward_closure_match_reference_and_per_instance_path(adaptive, groups):
    reference = dict(_run("reference", adaptive, groups).named_parameters())
    for path in ("two-step", "closure", "per-instance"):
        net = _run(path, adaptive, groups)
        for name, p in net.named_parameters():
            torch.testing.assert_close(p.detach(), reference[name].detach(), atol=1e-6, rtol=0, msg=f"{path}: {name}")


def test_matches_pytorch_optimizer_sam():
    """The same update as pytorch_optimizer.SAM (its ASAM has T = |w|: eta = 0)."""
    pt = pytest.importorskip("pytorch_optimizer")
    x, y = make_data(n=16)
    for adaptive in (False, True):
        nets = [make_net(), make_net()]
        opts = [
            pt.SAM(nets[0].parameters(), torch.optim.AdamW, rho=RHO, adaptive=adaptive, lr=LR, perturb_eps=0.0),
            DeltaSAM(nets[1].parameters(), torch.optim.AdamW, SAMConfig(rho=RHO, adaptive=adaptive, eta=0.0), lr=LR),
        ]
        for net, opt in zip(nets, opts):
            for _ in range(STEPS):
                opt.zero_grad()
                _mean_loss(net, x, y).backward()

                def closure(net=net, opt=opt):
                    opt.zero_grad()
                    loss = _mean_loss(net, x, y)
                    loss.backward()
                    return loss

                opt.step(closure)
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=0)


def test_each_group_gets_its_own_radius():
    """eps restricted to group k is rho_k d_k / ||d||, d = g (SAM groups) or T^2 g (ASAM groups), ||d|| = ||(T g or g)||
    over all groups, as in davda54/sam and pytorch_optimizer; group options override the global ones."""
    torch.manual_seed(0)
    a, b, c = (
        torch.randn(4, 3, requires_grad=True),
        torch.randn(5, requires_grad=True),
        torch.randn(6, requires_grad=True),
    )
    groups = [{"params": [a]}, {"params": [b], "rho": 0.2}, {"params": [c], "rho": 0.5, "adaptive": True, "eta": 0.1}]
    opt = DeltaSAM(groups, torch.optim.SGD, SAMConfig(rho=0.05), lr=0.0)
    grads = [torch.randn_like(p) for p in (a, b, c)]
    before = [p.detach().clone() for p in (a, b, c)]
    for p, g in zip((a, b, c), grads):
        p.grad = g.clone()
    opt.first_step()
    t = before[2].abs() + 0.1
    norm = torch.sqrt((grads[0] ** 2).sum() + (grads[1] ** 2).sum() + ((t * grads[2]) ** 2).sum())
    expected = [0.05 * grads[0] / norm, 0.2 * grads[1] / norm, 0.5 * t * t * grads[2] / norm]
    for p, p0, e in zip((a, b, c), before, expected):
        torch.testing.assert_close(p.detach() - p0, e, atol=1e-6, rtol=1e-5)
    for p, g in zip((a, b, c), grads):  # first_step took the gradient at w: this stands for the one at w + eps
        p.grad = g.clone()
    opt.second_step()  # lr 0: the restore is exact, bit for bit
    for p, p0 in zip((a, b, c), before):
        assert torch.equal(p.detach(), p0)


def test_group_rho_schedule_and_validation():
    net = make_net()
    x, y = make_data(n=8)
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=0.05), lr=0.0)
    opt.param_groups[0]["rho"] = 0.3  # a rho schedule writes the group's value
    _mean_loss(net, x, y).backward()
    opt.first_step()
    _mean_loss(net, x, y).backward()  # the backward at w + eps (first_step took the gradient at w)
    opt.second_step(zero_grad=True)
    assert opt.last_stats.eps_norm == pytest.approx(0.3, rel=1e-5)
    opt.param_groups[0]["rho"] = -1.0
    _mean_loss(net, x, y).backward()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['rho'\]=-1.0 must be >= 0"):
        opt.first_step()
    opt.param_groups[0]["rho"], opt.param_groups[0]["adaptive"] = 0.05, "yes"
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['adaptive'\]='yes' must be True or False"):
        opt.first_step()


def test_scalar_closure_with_delta_sam_is_refused_clearly():
    net = make_net()
    x, y = make_data(n=8)
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO, reweight=ProbeWeights(score="loss")), lr=0.1)
    _mean_loss(net, x, y).backward()

    def closure():
        loss = _mean_loss(net, x, y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="reweight='probes' needs per-instance losses"):
        opt.step(closure)
    with pytest.raises(ValueError, match="reweight='probes' needs per-instance losses"):
        opt.first_step()
    opt.zero_grad()
    with pytest.raises(ValueError, match="reweight='probes' needs per-instance losses"):
        opt.step(closure)  # no backward before: the per-instance contract, and the closure returned a scalar
    assert all(torch.equal(p.detach(), b) for p, b in zip(net.parameters(), before))


def test_scalar_closure_without_a_first_backward_says_how_to_call():
    net = make_net()
    x, y = make_data(n=8)
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO), lr=0.1)
    with pytest.raises(ValueError, match=r"loss\.backward\(\) before step\(closure\)"):
        opt.step(lambda: _mean_loss(net, x, y))


def test_per_instance_steps_after_each_other_are_not_mistaken_for_backward_closures():
    """The descent gradient a step leaves in .grad is not a new first-pass gradient."""
    x, y = make_data(n=16)
    a, b = make_net(), make_net()
    opt_a = DeltaSAM(a.parameters(), torch.optim.SGD, SAMConfig(rho=RHO), lr=LR)
    opt_b = DeltaSAM(b.parameters(), torch.optim.SGD, SAMConfig(rho=RHO), lr=LR)
    for _ in range(2):
        opt_a.step(lambda: per_sample_ce(a, x, y))  # .grad left set in between
        opt_b.zero_grad()
        opt_b.step(lambda: per_sample_ce(b, x, y))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_two_step_order_is_enforced():
    net = make_net()
    x, y = make_data(n=8)
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO), lr=0.1)
    with pytest.raises(RuntimeError, match="second_step"):
        opt.second_step()
    _mean_loss(net, x, y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="found no gradient"):  # no backward at w + eps: refused, w restored
        opt.second_step()
    with pytest.raises(RuntimeError, match="second_step"):  # and that step is over
        opt.second_step()


def test_backward_closure_keeps_the_exact_restore_and_skips_non_finite_steps():
    net = make_net()
    x, y = make_data(n=8)
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]

    def failing():
        raise KeyboardInterrupt

    _mean_loss(net, x, y).backward()
    with pytest.raises(KeyboardInterrupt):
        opt.step(failing)
    assert all(torch.equal(p.detach(), b) for p, b in zip(net.parameters(), before))

    def nan_closure():
        loss = _mean_loss(net, x, y) * float("nan")
        loss.backward()
        return loss

    opt.zero_grad()
    _mean_loss(net, x, y).backward()
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step(nan_closure)
    assert all(torch.equal(p.detach(), b) for p, b in zip(net.parameters(), before))
    assert opt.engine.skipped_steps == 1
    opt.zero_grad()
    for p in net.parameters():  # non-finite first-pass gradient: no perturbation, the step is skipped
        p.grad = torch.full_like(p, float("inf"))
    opt.first_step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(net.parameters(), before))
    _mean_loss(net, x, y).backward()
    opt.second_step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(net.parameters(), before))
    assert opt.engine.skipped_steps == 2


def test_two_step_keeps_the_first_pass_running_statistics():
    x, y = make_data(n=16)
    net, ref = make_net(batchnorm=True), make_net(batchnorm=True)
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO), lr=0.1, module=net)
    _mean_loss(net, x, y).backward()
    ref(x)  # one training-mode forward: the statistics a first pass leaves
    opt.first_step(zero_grad=True)
    _mean_loss(net, x, y).backward()
    opt.second_step()
    for name, b in net.named_buffers():
        assert torch.equal(b, dict(ref.named_buffers())[name]), name


def test_phases_are_profiler_ranges():
    """The engine's phases show up as deltasam.<phase> ranges (benchmarks/speed.py times them this way)."""
    x, y = make_data(n=8)
    net = make_net()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO), lr=0.1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step(lambda: per_sample_ce(net, x, y))
    names = {e.name for e in prof.events()}
    for phase in (
        "backup",
        "first_pass",
        "ascent_norm",
        "perturb",
        "second_pass",
        "restore",
        "finite_check",
        "base_step",
    ):
        assert f"deltasam.{phase}" in names
