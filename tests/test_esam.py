"""ESAM against a reference step written from the authors' code (dydjw9/Efficient_SAM, utils/Esam.py), in float64
over several steps, with SGD-momentum and AdamW bases and dropout; the mixin's row selection; its refusals.

Two deliberate differences from the authors' code, both in the reference below: the tensors left out of eps are
drawn at each step from SAMConfig's seed (the authors draw with Python's ``random`` after a step, for the next, and
perturb every tensor at the first step), and the data selection takes the floor(gamma B) largest loss rises (the
authors' strict ``> cutoff`` keeps one fewer)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_deltasam import DeltaSAM, DeltaSAMCallback, SAMConfig
from lightning_deltasam.ascent.esam import ESAM, ESAMOptions
from tests.helpers import QUIET, MixinClassifier, make_data, make_loader, make_net

STEPS, LR, RHO, TOL, SEED = 6, 0.05, 0.1, 1e-6, 3
OPTIONS = ESAMOptions(beta=0.6, gamma=0.5)
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=LR, momentum=0.9)),
    "adamw": (torch.optim.AdamW, dict(lr=LR, weight_decay=0.01)),
}


def _setup():
    x, y = make_data(n=16)
    return make_net(dropout=0.1).double(), x.double(), y


def _drawn(step: int, n: int, beta: float) -> list[bool]:
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + step)
    return (torch.rand(n, generator=generator, dtype=torch.float64) < beta).tolist()


def _reference(base: str, options: ESAMOptions = OPTIONS) -> list[list[torch.Tensor]]:
    """utils/Esam.py's step(): loss at w (per instance, kept), backward of its mean; first_step on the tensors with
    a gradient (those drawn), eps = rho g / (||g|| + 1e-7) / beta; the losses at w + eps without grad; the second
    forward and backward on the selected rows; w restored; the base step."""
    net, x, y = _setup()
    params = list(net.parameters())
    cls, kw = BASES[base]
    opt = cls(params, **kw)
    torch.manual_seed(1)
    history = []
    for step in range(STEPS):
        opt.zero_grad()
        l_before = F.cross_entropy(net(x), y, reduction="none")
        l_before.mean().backward()
        l_before = l_before.detach()
        for p, keep in zip(params, _drawn(step, len(params), options.beta)):
            if not keep:  # the authors' requires_grad=False for this pass: no gradient, not perturbed
                p.grad = None
        with torch.no_grad():
            grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params if p.grad is not None]), p=2)
            scale = RHO / (grad_norm + 1e-7) / options.beta
            e_w = [p.grad * scale if p.grad is not None else torch.zeros_like(p) for p in params]
            for p, e in zip(params, e_w):
                p.add_(e)
        opt.zero_grad()
        with torch.no_grad():
            sharpness = F.cross_entropy(net(x), y, reduction="none") - l_before
        position = int(len(y) * options.gamma)
        indices = sharpness.argsort(descending=True)[:position].sort().values  # (topk's rows)
        F.cross_entropy(net(x[indices]), y[indices]).backward()
        with torch.no_grad():
            for p, e in zip(params, e_w):
                p.sub_(e)
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history


def _closure(net, x, y):
    def closure(instances=None):
        rows = slice(None) if instances is None else instances
        return F.cross_entropy(net(x[rows]), y[rows], reduction="none")

    return closure


def _ours(base: str, options: ESAMOptions = OPTIONS) -> list[list[torch.Tensor]]:
    net, x, y = _setup()
    cls, kw = BASES[base]
    opt = DeltaSAM(net.parameters(), cls, SAMConfig(rho=RHO, variant=options, seed=SEED), module=net, **kw)
    torch.manual_seed(1)
    history = []
    for _ in range(STEPS):
        opt.step(_closure(net, x, y))
        history.append([p.detach().clone() for p in net.parameters()])
    return history


@pytest.mark.parametrize("base", list(BASES))
def test_esam_equals_the_authors_step(base):
    for ours, ref in zip(_ours(base), _reference(base)):
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=TOL, atol=1e-9)


@pytest.mark.parametrize("wrong", ["no 1/beta", "the smallest rises", "every tensor"])
def test_a_wrong_step_fails_the_reference(wrong, monkeypatch):
    """Controls: eps without the 1/beta scale, the rows whose loss rose least, or eps on every tensor."""
    if wrong == "no 1/beta":
        monkeypatch.setattr(ESAM, "radius", lambda self, group, rho: rho)
    elif wrong == "every tensor":
        monkeypatch.setattr(ESAM, "ascent_of", lambda self, *a: super(ESAM, self).ascent_of(*a))
    else:
        original = torch.topk
        monkeypatch.setattr(torch, "topk", lambda t, k: original(-t, k))
    with pytest.raises(AssertionError):
        test_esam_equals_the_authors_step("adamw")


def test_every_tensor_and_row_is_sam():
    """beta = gamma = 1: SAM's step (to the authors' 1e-7 in the norm), one pass at w and one at w + eps (no
    forward without grad)."""
    net, x, y = _setup()
    sam_net = copy.deepcopy(net)
    calls = []
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO, variant=ESAMOptions(1.0, 1.0)), lr=LR)
    sam = DeltaSAM(sam_net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO), lr=LR)
    for _ in range(3):
        torch.manual_seed(0)
        opt.step(lambda instances=None: calls.append(instances) or _closure(net, x, y)(instances))
        torch.manual_seed(0)
        sam.step(_closure(sam_net, x, y))
    assert calls == [None] * 6
    for a, b in zip(net.parameters(), sam_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_the_second_pass_runs_on_gamma_of_the_batch():
    net, x, y = _setup()
    rows = []
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO, variant=ESAMOptions(gamma=0.3)), lr=LR)

    def closure(instances=None):
        rows.append(None if instances is None else instances.tolist())
        return _closure(net, x, y)(instances)

    opt.step(closure)
    assert rows[:2] == [None, None] and len(rows) == 3 and len(rows[2]) == 4  # floor(0.3 * 16)
    assert rows[2] == sorted(rows[2])


class _Batch(dict):
    """A dict batch (as a tokenizer's): the mixin selects the rows of every field."""


class _DictMixin(MixinClassifier):
    def per_sample_loss(self, batch):
        if isinstance(batch, dict):
            batch = (batch["x"], batch["y"])
        return super().per_sample_loss(batch)


def test_mixin_equals_the_optimizer():
    sam = SAMConfig(rho=RHO, variant=OPTIONS, seed=SEED)
    mixin = MixinClassifier(sam=sam)
    L.Trainer(max_steps=STEPS, **QUIET).fit(mixin, make_loader())
    net = make_net(seed=0)
    opt = DeltaSAM(net.parameters(), torch.optim.AdamW, sam, lr=1e-2, module=net)
    for x, y in [b for _ in range(2) for b in make_loader()][:STEPS]:
        opt.step(_closure(net, x, y))
    for a, b in zip(mixin.net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_the_mixin_selects_rows_of_nested_batches():
    module = _DictMixin(sam=SAMConfig(variant=OPTIONS))
    x, y = make_data(n=8)
    batch = _Batch(x=x, y=y, meta={"ids": torch.arange(8), "vocab": torch.zeros(3)}, names=[torch.ones(8, 2)])
    rows = torch.tensor([1, 4, 6])
    out = module.select_instances(batch, rows)
    assert isinstance(out, _Batch) and torch.equal(out["x"], x[rows]) and torch.equal(out["y"], y[rows])
    assert torch.equal(out["meta"]["ids"], rows) and out["meta"]["vocab"].shape == (3,)  # 3 rows: not the batch's
    assert out["names"][0].shape == (3, 2)
    with pytest.raises(ValueError, match="Override select_instances"):
        from lightning_deltasam.batch_rows import select_rows

        select_rows({"x": torch.zeros(5)}, rows, 8)


def test_refusals_name_the_fix():
    net, x, y = _setup()
    sam = SAMConfig(variant=ESAMOptions())
    with pytest.raises(ValueError, match="DeltaSAMMixin"):
        DeltaSAMCallback(sam)
    opt = DeltaSAM(net.parameters(), torch.optim.AdamW, sam, lr=LR)
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"closure\(instances=None\)"):
        opt.step(lambda: F.cross_entropy(net(x), y, reduction="none"))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), before))
    with pytest.raises(ValueError, match="chosen instances"):
        opt.first_step()
    for bad in (dict(beta=0.0), dict(gamma=1.5), dict(beta=-1)):
        with pytest.raises(ValueError, match="probability"):
            ESAMOptions(**bad)
    with pytest.raises(ValueError, match="esam"):
        SAMConfig(variant=ESAMOptions(), m=1)
    with pytest.raises(ValueError, match=r"on 8 instances returned shape \(16,\)"):  # a closure ignoring the rows
        opt.step(lambda instances=None: F.cross_entropy(net(x), y, reduction="none"))


def test_resume_is_bitwise():
    """The drawn tensors come from the seed and the step count, which the checkpoint keeps."""

    def run(steps, state=None):
        net, x, y = _setup()
        opt = DeltaSAM(net.parameters(), torch.optim.AdamW, SAMConfig(rho=RHO, variant=OPTIONS, seed=SEED), lr=LR)
        if state is not None:
            net.load_state_dict(state[0])
            opt.load_state_dict(state[1])
        for i in range(steps):
            torch.manual_seed(100 + i + (0 if state is None else 3))
            opt.step(_closure(net, x, y))
        return net, opt

    whole, _ = run(6)
    half, opt = run(3)
    resumed, _ = run(3, (copy.deepcopy(half.state_dict()), copy.deepcopy(opt.state_dict())))
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_non_finite_selected_loss_skips_the_step_with_w_unchanged():
    net, x, y = _setup()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO, variant=OPTIONS), lr=LR)
    before = [p.clone() for p in net.parameters()]

    def closure(instances=None):
        losses = _closure(net, x, y)(instances)
        return losses * float("nan") if instances is not None else losses

    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), before))
    assert opt.engine.skipped_steps == 1
