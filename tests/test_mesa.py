"""MESA against a reference step written from the authors' code (AngusDujw/SAF, MESA_train.py: the KL term of
its train loop, timm's ModelEmaV2 for the EMA), in float64 over several steps, with SGD-momentum and AdamW bases,
with dropout (the teacher runs in eval mode); the mixin's step; its checkpoint; its refusals."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_deltasam import DeltaSAM, DeltaSAMCallback, SAMConfig
from lightning_deltasam.ascent.mesa import MESA, MESAOptions
from tests.helpers import QUIET, MixinClassifier, make_data, make_loader, make_net

STEPS, LR, TOL = 6, 0.05, 1e-6
OPTIONS = MESAOptions(weight=0.3, temperature=5.0, decay=0.9, start_step=2)
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=LR, momentum=0.9)),
    "adamw": (torch.optim.AdamW, dict(lr=LR, weight_decay=0.01)),
}


def _setup():
    x, y = make_data(n=16)
    return make_net(dropout=0.3).double(), x.double(), y


def _reference(base: str, options: MESAOptions = OPTIONS) -> list[list[torch.Tensor]]:
    """MESA_train.py's loop: the EMA model (a deep copy in eval mode, ModelEmaV2) gives ema_output without grad;
    loss += reinforce * KL(softmax(ema / T) || softmax(output / T)) * T^2 once the KL starts; the base step; then
    ``model_ema.update(model)``: ema = decay * ema + (1 - decay) * model, every state entry."""
    net, x, y = _setup()
    ema = copy.deepcopy(net).eval()
    cls, kw = BASES[base]
    opt = cls(net.parameters(), **kw)
    torch.manual_seed(1)
    history = []
    for step in range(STEPS):
        with torch.no_grad():
            ema_output = ema(x)
        output = net(x)
        loss = F.cross_entropy(output, y)
        if step >= options.start_step:
            t = options.temperature
            kl = F.kl_div(F.softmax(output / t, -1).log(), F.softmax(ema_output / t, -1), reduction="none")
            loss = loss + kl.sum(-1).mean() * (t**2) * options.weight
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, m in zip(ema.state_dict().values(), net.state_dict().values()):
                e.copy_(options.decay * e + (1.0 - options.decay) * m)
        history.append([p.detach().clone() for p in net.parameters()])
    return history


def _closure(net, x, y):
    def closure():
        logits = net(x)
        return F.cross_entropy(logits, y, reduction="none"), logits

    return closure


def _ours(base: str, options: MESAOptions = OPTIONS) -> list[list[torch.Tensor]]:
    net, x, y = _setup()
    cls, kw = BASES[base]
    opt = DeltaSAM(net.parameters(), cls, SAMConfig(variant=options), module=net, **kw)
    torch.manual_seed(1)
    history = []
    for _ in range(STEPS):
        opt.step(_closure(net, x, y))
        history.append([p.detach().clone() for p in net.parameters()])
        assert net.training  # the teacher's eval mode does not leak
    return history


@pytest.mark.parametrize("base", list(BASES))
def test_mesa_equals_the_authors_step(base):
    for ours, ref in zip(_ours(base), _reference(base)):
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=TOL, atol=1e-12)


@pytest.mark.parametrize(
    "wrong",
    ["teacher in train mode", "KL reversed"],
)
def test_a_wrong_step_fails_the_reference(wrong, monkeypatch):
    """Controls: the teacher's forward with dropout on, or KL(student || teacher), is caught by the comparison."""
    if wrong == "teacher in train mode":
        from lightning_deltasam import teacher

        monkeypatch.setattr(teacher, "evaluating", lambda module: _nothing())
    else:
        original = MESA.outputs_term

        def reversed_kl(self, outputs, teacher_outputs):
            if teacher_outputs is None:
                return original(self, outputs, None)
            return original(self, teacher_outputs.detach(), outputs) * 0 + original(self, outputs.detach(), outputs)

        monkeypatch.setattr(MESA, "outputs_term", reversed_kl)
    with pytest.raises(AssertionError):
        test_mesa_equals_the_authors_step("adamw")


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_weight_zero_is_the_base_optimizer():
    plain = _reference("adamw", MESAOptions(weight=0.0))
    ours = _ours("adamw", MESAOptions(weight=0.0))
    for a, b in zip(ours[-1], plain[-1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_teacher_forward_leaves_w_and_the_running_statistics_bitwise():
    net = make_net(batchnorm=True, dropout=0.2).double()
    x, y = (t.double() if t.is_floating_point() else t for t in make_data(n=16))
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(variant=OPTIONS), module=net, lr=0.0)
    seen = []

    def closure():
        seen.append([b.clone() for b in net.buffers()])
        logits = net(x)
        return F.cross_entropy(logits, y, reduction="none"), logits

    before = [p.clone() for p in net.parameters()]
    for _ in range(3):
        opt.step(closure)
    for a, b in zip(net.parameters(), before):
        assert torch.equal(a, b)  # lr 0: only the teacher's swaps touched w
    # the student's forward (the second call of each step) sees the statistics the teacher's left untouched
    assert all(torch.equal(a, b) for a, b in zip(seen[-1], seen[-2]))


def test_resume_is_bitwise():
    def run(steps, state=None):
        net, x, y = _setup()
        opt = DeltaSAM(net.parameters(), torch.optim.AdamW, SAMConfig(variant=OPTIONS), module=net, lr=LR)
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


class _MixinWithLogits(MixinClassifier):
    def per_sample_loss(self, batch):
        x, y = batch
        logits = self.net(x)
        return F.cross_entropy(logits, y, reduction="none"), logits


def test_mixin_equals_the_optimizer():
    sam = SAMConfig(variant=OPTIONS)
    mixin = _MixinWithLogits(sam=sam)
    L.Trainer(max_steps=STEPS, **QUIET).fit(mixin, make_loader())
    net = make_net(seed=0)
    opt = DeltaSAM(net.parameters(), torch.optim.AdamW, sam, lr=1e-2, module=net)
    batches = [b for _ in range(2) for b in make_loader()][:STEPS]  # Lightning's 6 steps: an epoch and a half
    for x, y in batches:
        opt.step(_closure(net, x, y))
    for a, b in zip(mixin.net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_refusals_name_the_fix():
    net, x, y = _setup()
    sam = SAMConfig(variant=MESAOptions())
    with pytest.raises(ValueError, match="module=model"):
        DeltaSAM(net.parameters(), torch.optim.AdamW, sam, lr=LR)
    with pytest.raises(ValueError, match="DeltaSAMMixin"):
        DeltaSAMCallback(sam)
    opt = DeltaSAM(net.parameters(), torch.optim.AdamW, sam, module=net, lr=LR)
    with pytest.raises(TypeError, match=r"\(per-instance losses \[B\], outputs"):
        opt.step(lambda: F.cross_entropy(net(x), y, reduction="none"))
    with pytest.raises(ValueError, match="regression"):
        opt.step(lambda: (F.cross_entropy(net(x), y, reduction="none"), net(x)[:, :1]))
    for bad, match in [(dict(decay=1.0), "decay"), (dict(temperature=0.0), "temperature"), (dict(weight=-1), "weight")]:
        with pytest.raises(ValueError, match=match):
            MESAOptions(**bad)
    with pytest.raises(ValueError, match="mesa"):
        SAMConfig(variant=MESAOptions(), m=1)
    with pytest.raises(ValueError):
        opt.first_step()
    with pytest.raises(TypeError, match="variant='mesa'"):
        DeltaSAM(net.parameters(), torch.optim.AdamW, SAMConfig(), module=net, lr=LR).step(_closure(net, x, y))


def test_a_non_finite_term_skips_the_step_and_the_ema_stays():
    net, x, y = _setup()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(variant=OPTIONS), module=net, lr=LR)
    for _ in range(3):  # past start_step: the KL term is on
        opt.step(_closure(net, x, y))
    before = [p.clone() for p in net.parameters()]
    ema = [t.clone() for t in (opt.engine.rule.state[p]["ema"] for p in net.parameters())]

    def closure():
        logits = net(x)
        return F.cross_entropy(logits, y, reduction="none"), logits * float("inf")

    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), before))
    assert all(torch.equal(opt.engine.rule.state[p]["ema"], e) for p, e in zip(net.parameters(), ema))


def test_a_failing_teacher_forward_leaves_w_and_the_training_mode():
    net, x, y = _setup()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(variant=OPTIONS), module=net, lr=LR)
    for _ in range(3):
        opt.step(_closure(net, x, y))
    before = [(p, p.data_ptr(), p.clone()) for p in net.parameters()]

    def failing():
        if not net.training:  # the teacher's forward
            raise RuntimeError("teacher forward failed")
        return _closure(net, x, y)()

    with pytest.raises(RuntimeError, match="teacher forward failed"):
        opt.step(failing)
    assert net.training and all(p.data_ptr() == d and torch.equal(p, c) for p, d, c in before)
