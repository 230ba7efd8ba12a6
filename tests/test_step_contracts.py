"""What a step does with what it finds, in one process: gradients left from an earlier backward, a GradScaler's
scale (closure, two-step recipe, an overflow in either pass), a restore whose fused kernel fails, a BatchNorm the
optimizer was not told about, a compiled LightningModule, DeepSpeed. Numbers, not timings."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_deltasam import DeltaSAM, FriendlySAMOptions, GramWeights, GSAMOptions, ProbeWeights, SAMConfig
from lightning_deltasam.distributed import shards_of
from lightning_deltasam.lightning_backend import check_strategy
from lightning_deltasam.probing import ProbeNoise
from tests.helpers import QUIET, MixinClassifier, make_data, make_loader, make_net, per_sample_ce

X, Y = make_data(16)
X64 = X.double()


def _weights(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------ gradients left from an earlier backward
@pytest.mark.parametrize(
    "sam, words",
    [
        (SAMConfig(rho=0.05), ["per-instance losses of shape (16,)", "zero_grad()", "restored"]),
        (
            SAMConfig(rho=0.05, reweight=ProbeWeights(score="loss")),
            ["reweight='probes'", "zero_grad()", "Nothing"],
        ),
        (SAMConfig(rho=0.05, m=1), ["m=1", "zero_grad()", "Nothing"]),
    ],
    ids=["sam", "probes", "m"],
)
def test_a_leftover_gradient_with_a_per_instance_closure_is_refused(sam, words):
    net = make_net()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, sam, lr=0.1, module=net)
    per_sample_ce(net, X, Y).mean().backward()  # a backward the step did not ask for
    before = _weights(net)
    with pytest.raises(ValueError) as err:
        opt.step(lambda: per_sample_ce(net, X, Y))
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert "first_step" not in str(err.value)  # it blames the leftover gradient, not a first_step() never called
    assert _same(_weights(net), before)
    opt.zero_grad()  # the fix the message names
    opt.step(lambda: per_sample_ce(net, X, Y))
    assert not _same(_weights(net), before)


def test_the_gradient_the_last_step_left_is_the_optimizers_own_and_dropped():
    """Per-instance closure: what the previous step left in .grad (the descent gradient) is not a new backward."""
    nets = [make_net(), make_net()]
    opts = [DeltaSAM(n.parameters(), torch.optim.SGD, SAMConfig(rho=0.05), lr=0.1, module=n) for n in nets]
    for _ in range(3):
        for i, (net, opt) in enumerate(zip(nets, opts)):
            if i == 1:
                opt.zero_grad()
            opt.step(lambda net=net: per_sample_ce(net, X, Y))
    assert _same(_weights(nets[0]), _weights(nets[1]))


def _two_step(zero_between: bool, zero_before: bool = True) -> list[torch.Tensor]:
    net = make_net()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=0.05), lr=0.1)
    for _ in range(3):
        if zero_before:
            opt.zero_grad()
        per_sample_ce(net, X, Y).mean().backward()
        opt.first_step()
        if zero_between:
            opt.zero_grad()
        per_sample_ce(net, X, Y).mean().backward()
        opt.second_step()
    return _weights(net)


def test_two_step_the_second_backward_never_adds_to_the_first():
    """first_step takes the gradient at w: without zero_grad() in between, g_p is not g + g_p."""
    assert _same(_two_step(zero_between=False), _two_step(zero_between=True))


def test_two_step_without_a_second_backward_is_refused_and_restores_w():
    net = make_net()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=0.05), lr=0.1)
    before = _weights(net)
    per_sample_ce(net, X, Y).mean().backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="found no gradient"):
        opt.second_step()
    assert _same(_weights(net), before)


def test_first_step_without_a_new_backward_is_refused():
    net = make_net()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=0.05), lr=0.1)
    with pytest.raises(RuntimeError, match="run loss.backward"):
        opt.first_step()  # nothing in .grad
    per_sample_ce(net, X, Y).mean().backward()
    opt.first_step()
    per_sample_ce(net, X, Y).mean().backward()
    opt.second_step()
    before = _weights(net)
    with pytest.raises(RuntimeError, match="only what the last step left"):
        opt.first_step()  # only what second_step left
    assert _same(_weights(net), before)


def test_a_backward_onto_the_last_steps_gradient_is_warned_once():
    with pytest.warns(RuntimeWarning, match="added its gradient onto the one the last step left") as record:
        _two_step(zero_between=False, zero_before=False)
    assert sum("added its gradient" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():  # zero_grad(set_to_none=False) is recognised: zeroed in place, no warning
        warnings.simplefilter("error")
        net = make_net()
        opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=0.05), lr=0.1)
        for _ in range(2):
            opt.zero_grad(set_to_none=False)
            per_sample_ce(net, X, Y).mean().backward()
            opt.first_step()
            per_sample_ce(net, X, Y).mean().backward()
            opt.second_step()


# ------------------------------------------------------------------ GradScaler
def _scaled_run(kind: str, sam: SAMConfig, overflow: tuple[int, str] | None = None, steps: int = 3):
    """SGD on float64 under a GradScaler("cpu") (2^16: a power of two, so scaling is exact); ``kind`` is the
    closure form, or the two-step recipe finished by scaler.step or by unscale_ + second_step. ``overflow``:
    (step, "first" / "second") makes that pass's loss infinite. Returns weights, scales before each update."""
    net = make_net().double()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, sam, lr=0.1, grad_scaler=scaler)
    scales = []
    for step in range(steps):
        bad = overflow[1] if overflow is not None and overflow[0] == step else None

        def loss(which: str) -> torch.Tensor:
            return F.cross_entropy(net(X64), Y) * (float("inf") if bad == which else 1.0)

        def closure() -> torch.Tensor:
            value = loss("second")
            scaler.scale(value).backward()
            return value

        opt.zero_grad()
        scaler.scale(loss("first")).backward()
        if kind == "closure":
            scaler.step(opt, closure)
        else:
            opt.first_step()
            scaler.scale(loss("second")).backward()
            if kind == "scaler_step":
                scaler.step(opt)
            else:
                scaler.unscale_(opt)
                opt.second_step()
        scales.append(scaler.get_scale())
        scaler.update()
    return _weights(net), scales, opt.engine.skipped_steps


def _unscaled_run(sam: SAMConfig, skip: int | None = None) -> list[torch.Tensor]:
    net = make_net().double()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, sam, lr=0.1)
    for step in range(3):
        opt.zero_grad()
        if step == skip:
            continue

        def closure() -> torch.Tensor:
            value = F.cross_entropy(net(X64), Y)
            value.backward()
            return value

        F.cross_entropy(net(X64), Y).backward()
        opt.step(closure)
    return _weights(net)


@pytest.mark.parametrize("kind", ["closure", "scaler_step", "unscale"])
@pytest.mark.parametrize(
    "sam",
    [
        SAMConfig(rho=0.05),
        SAMConfig(rho=0.05, variant=GSAMOptions()),
        SAMConfig(rho=0.05, variant=FriendlySAMOptions()),
    ],
    ids=["sam", "gsam", "friendly"],
)
def test_a_grad_scaler_step_equals_the_unscaled_step(kind, sam):
    """Both passes unscaled (GSAM's and FriendlySAM's g at w too): the same weights as without a scaler."""
    weights, _, skipped = _scaled_run(kind, sam)
    assert skipped == 0
    assert _same(weights, _unscaled_run(sam))


@pytest.mark.parametrize("kind", ["closure", "scaler_step", "unscale"])
@pytest.mark.parametrize("where", ["first", "second"])
def test_an_overflow_in_either_pass_skips_and_lowers_the_scale(kind, where):
    weights, scales, skipped = _scaled_run(kind, SAMConfig(rho=0.05), overflow=(1, where))
    assert skipped == 1
    assert scales == [2.0**16, 2.0**16, 2.0**15]  # update() after the overflow halved the scale
    assert _same(weights, _unscaled_run(SAMConfig(rho=0.05), skip=1))


def test_a_grad_scaler_step_without_grad_scaler_is_refused_with_the_recipe():
    net = make_net().double()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=0.05), lr=0.1)
    before = _weights(net)
    scaler.scale(F.cross_entropy(net(X64), Y)).backward()
    opt.first_step()
    scaler.scale(F.cross_entropy(net(X64), Y)).backward()
    with pytest.raises(ValueError, match=r"grad_scaler=scaler\).*Recipe: .*scaler.step\(optimizer\)"):
        scaler.step(opt)
    assert _same(_weights(net), before)  # the first_step's perturbation was undone


def test_delta_sam_per_instance_closure_under_a_grad_scaler():
    """optimizer.step(closure); scaler.update(): the optimizer's own backwards are scaled, and unscaled before eps
    and before the base step (scaler.step needs a scaled loss before it, which a per-instance closure has not)."""
    sam = SAMConfig(rho=0.05, reweight=ProbeWeights(score="loss", temperature=0.3))
    nets = [make_net().double(), make_net().double()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaled = DeltaSAM(nets[0].parameters(), torch.optim.SGD, sam, lr=0.1, module=nets[0], grad_scaler=scaler)
    plain = DeltaSAM(nets[1].parameters(), torch.optim.SGD, sam, lr=0.1, module=nets[1])
    for _ in range(3):
        scaled.step(lambda: F.cross_entropy(nets[0](X64), Y, reduction="none"))  # it scales its own backwards
        scaler.update()
        plain.step(lambda: F.cross_entropy(nets[1](X64), Y, reduction="none"))
    assert _same(_weights(nets[0]), _weights(nets[1]))


# ------------------------------------------------------------------ the restore guarantee
def _failing_foreach_copy(monkeypatch) -> list[int]:
    calls = [0]

    def fail(*args, **kwargs):
        calls[0] += 1
        raise NotImplementedError("aten._foreach_copy_ has no kernel for this tensor subclass (injected)")

    monkeypatch.setattr(torch, "_foreach_copy_", fail)
    return calls


@pytest.mark.parametrize(
    "sam",
    [SAMConfig(rho=0.05), SAMConfig(rho=0.05, reweight=ProbeWeights(score="gradnorm", num_probes=2))],
    ids=["sam", "probes"],
)
def test_restore_falls_back_per_tensor_when_the_fused_copy_fails(monkeypatch, sam):
    reference = make_net(batchnorm=True)
    opt = DeltaSAM(reference.parameters(), torch.optim.SGD, sam, lr=0.1, module=reference)
    for _ in range(2):
        opt.step(lambda: per_sample_ce(reference, X, Y))
    calls = _failing_foreach_copy(monkeypatch)
    net = make_net(batchnorm=True)
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, sam, lr=0.1, module=net)
    for _ in range(2):
        opt.step(lambda: per_sample_ce(net, X, Y))
    assert calls[0] > 0  # the fused kernel was tried and failed
    assert _same(_weights(net), _weights(reference))
    assert all(torch.equal(a, b) for a, b in zip(net.buffers(), reference.buffers()))


def test_an_exception_with_a_failing_fused_copy_leaves_w_unperturbed(monkeypatch):
    _failing_foreach_copy(monkeypatch)
    net = make_net()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=0.5), lr=0.1, module=net)
    before = _weights(net)
    per_sample_ce(net, X, Y).mean().backward()

    def closure():
        raise RuntimeError("the pass at w + eps failed")

    with pytest.raises(RuntimeError, match="w \\+ eps failed"):
        opt.step(closure)
    assert _same(_weights(net), before)
    per_sample_ce(net, X, Y).mean().backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="found no gradient"):
        opt.second_step()
    assert _same(_weights(net), before)


def test_a_failing_perturbation_restores_w(monkeypatch):
    net = make_net()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=0.5), lr=0.1, module=net)
    before = _weights(net)
    original = torch._foreach_add_

    def half_then_fail(tensors, *args, **kwargs):
        original(tensors[:1], *[a[:1] if isinstance(a, list) else a for a in args], **kwargs)  # moves one tensor
        raise NotImplementedError("injected: the fused add failed after moving a tensor")

    monkeypatch.setattr(torch, "_foreach_add_", half_then_fail)
    with pytest.raises(NotImplementedError, match="injected"):
        opt.step(lambda: per_sample_ce(net, X, Y))
    assert _same(_weights(net), before)


# ------------------------------------------------------------------ BatchNorm, torch.compile, DeepSpeed, probes
def test_batchnorm_without_module_is_warned_once():
    net = make_net(batchnorm=True)
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=0.05), lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"BatchNorm1d.*module=model") as record:
        for _ in range(3):
            opt.step(lambda: per_sample_ce(net, X, Y))
    assert sum("BatchNorm1d" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net.zero_grad()  # the first optimizer's last gradient is not this one's
        told = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=0.05), lr=0.1, module=net)
        told.step(lambda: per_sample_ce(net, X, Y))
        plain = make_net()
        DeltaSAM(plain.parameters(), torch.optim.SGD, SAMConfig(rho=0.05), lr=0.1).step(
            lambda: per_sample_ce(plain, X, Y)
        )


def test_the_mixin_under_a_compiled_module_equals_eager():
    compiled, eager = MixinClassifier(sam=SAMConfig(rho=0.05)), MixinClassifier(sam=SAMConfig(rho=0.05))
    L.Trainer(max_steps=2, **QUIET).fit(torch.compile(compiled), make_loader())
    L.Trainer(max_steps=2, **QUIET).fit(eager, make_loader())
    assert "per_sample_loss" in compiled.__dict__  # the forward ran compiled
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_deepspeed_is_refused_naming_what_works():
    param = torch.nn.Parameter(torch.zeros(3))
    param.ds_id = 0  # what DeepSpeed ZeRO marks its partitioned parameters with
    with pytest.raises(ValueError, match="does not support DeepSpeed.*DDP.*FSDP2.*FSDP1"):
        shards_of([param])
    trainer = SimpleNamespace(strategy=type("DeepSpeedStrategy", (), {})())
    with pytest.raises(ValueError, match="DeltaSAMCallback cannot run under DeepSpeedStrategy.*strategy='fsdp'"):
        check_strategy(trainer, SAMConfig(), "DeltaSAMCallback")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options, word",
    [({"m": 1}, "m=1"), ({"reweight": GramWeights()}, "reweight='gram'"), ({"sync": "local"}, "sync")],
    ids=["m", "gram", "sync"],
)
def test_lightning_fsdp_strategies_refuse_what_needs_whole_weights(options, word):
    for strategy in ("FSDPStrategy", "ModelParallelStrategy"):
        trainer = SimpleNamespace(strategy=type(strategy, (), {})())
        with pytest.raises(ValueError, match=f"under {strategy}.*{word}"):
            check_strategy(trainer, SAMConfig(rho=0.05, **options), "DeltaSAMMixin")  # type: ignore[arg-type]


def test_sharded_probe_noise_differs_by_rank_and_keeps_the_shared_stream():
    config = SAMConfig(reweight=ProbeWeights(score="gradnorm"))
    params = [torch.ones(5, 4)]
    draws, states = [], []
    for rank in (0, 1):
        noise = ProbeNoise(config.seed, std=config.reweight.probe_std, eta=config.eta)
        noise.rank = rank
        draws.append(noise.draw(params)[0])
        states.append(noise.state_dict()["cpu"])
    assert not torch.equal(draws[0], draws[1])  # other elements, other numbers
    assert torch.equal(states[0], states[1])  # the shared stream (checkpointed) advanced alike
