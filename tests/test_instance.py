"""Exact per-instance SAM (m=1) and m-sharpness (m=k): the batched second pass against a loop over instances."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.func import functional_call

from lightning_deltasam import DeltaSAM, DeltaSAMCallback, GramWeights, ProbeWeights, SAMConfig
from lightning_deltasam.gram_capture import UnsupportedModuleError
from lightning_deltasam.oracle import _LossModule, per_sample_grads
from tests.helpers import QUIET, MixinClassifier, PlainClassifier, make_data, make_loader, make_net, per_sample_ce
from tests.test_gram import Positional, TinyBert, make_batch
from tests.test_reliability import Faulty

RHO = 0.05


def loop_reference(
    model: nn.Module, loss_fn, batch, rho: float, m: int, radii: dict[str, float] | None = None
) -> dict[str, torch.Tensor]:
    """(1/n) sum_i grad l_i(w + eps_g(i)), one group at a time: each group's own backward at w, its own eps_g =
    rho G_g/||G_g|| (G_g = sum of its instances' gradients), its own backward at w + eps_g. The whole batch is
    run at each point and the group's losses taken, so nothing depends on how a model treats a sliced batch.
    ``radii`` gives some parameters their own rho (the norm is still taken over every parameter)."""
    wrapper = _LossModule(model, loss_fn)
    w = {f"module.{k}": p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    n = loss_fn(batch).shape[0]
    total = {k: torch.zeros_like(v) for k, v in w.items()}
    for start in range(0, n, m):
        group = list(range(start, min(start + m, n)))
        at_w = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        g = torch.autograd.grad(
            functional_call(wrapper, at_w, (batch,))[group].sum(),
            list(at_w.values()),
            allow_unused=True,
            materialize_grads=True,
        )
        norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
        radius = {k: (radii or {}).get(k[len("module.") :], rho) for k in w}
        at_eps = {k: (v + (radius[k] * gi / norm).to(v.dtype)).requires_grad_(True) for (k, v), gi in zip(w.items(), g)}
        g2 = torch.autograd.grad(
            functional_call(wrapper, at_eps, (batch,))[group].sum(),
            list(at_eps.values()),
            allow_unused=True,
            materialize_grads=True,
        )
        for k, gi in zip(w, g2):
            total[k] += gi / n
    return {k[len("module.") :]: v for k, v in total.items()}


def engine_update(model: nn.Module, loss_fn, batch, sam: SAMConfig) -> dict[str, torch.Tensor]:
    """The descent gradient DeltaSAM hands its base optimizer (the base step replaced by a capture)."""
    model.zero_grad(set_to_none=True)
    got: dict[str, torch.Tensor] = {}
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, sam, lr=1.0, module=model)

    def capture() -> None:
        got.update({k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None})

    opt.base_optimizer.step = capture  # type: ignore[method-assign]
    opt.step(lambda: loss_fn(batch))
    return got


def rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    num = sum(((got.get(k, torch.zeros_like(v)) - v).double() ** 2).sum() for k, v in want.items())
    den = sum((v.double() ** 2).sum() for v in want.values())
    return float((num / den).sqrt())


class Twice(nn.Module):
    """A Linear used twice in one forward, a frozen layer and one whose bias alone trains."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(6, 6)
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.bias_only = nn.Linear(6, 3)
        self.bias_only.weight.requires_grad_(False)

    def forward(self, batch: dict) -> torch.Tensor:
        h = self.fc(torch.tanh(self.fc(batch["x"])))
        return F.cross_entropy(self.bias_only(torch.tanh(self.frozen(h))).mean(1), batch["y"], reduction="none")


def _twice_batch(n: int = 7) -> dict:
    g = torch.Generator().manual_seed(5)
    return {"x": torch.randn(n, 4, 6, generator=g), "y": torch.randint(0, 3, (n,), generator=g)}


def _mlp_loss(net: nn.Module):
    x, y = make_data(n=10)
    return net, (lambda batch: per_sample_ce(net, *batch)), (x, y)


def _own(model: nn.Module, batch) -> tuple:
    return model, (lambda b: model(b)), batch


MODELS = {
    "bert": lambda: _own(TinyBert().eval(), make_batch()),  # embeddings with padding, LayerNorm, attention
    "positional": lambda: _own(Positional().eval(), make_batch()),  # 1-D positions broadcast over the batch
    "twice": lambda: _own(Twice().eval(), _twice_batch()),  # a Linear used twice, frozen weights
    "mlp": lambda: _mlp_loss(make_net(seed=0).eval()),
}


@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.needs("transformers", ids="bert")
def test_batched_route_equals_a_loop_over_instances(name, m):
    model, loss_fn, batch = MODELS[name]()
    want = loop_reference(model, loss_fn, batch, RHO, m)
    got = engine_update(model, loss_fn, batch, SAMConfig(rho=RHO, m=m))
    assert rel(got, want) < 1e-5, rel(got, want)
    # the test tells the routes apart: SAM is far from it
    sam = engine_update(model, loss_fn, batch, SAMConfig(rho=RHO))
    assert rel(sam, want) > 1e-3


@pytest.mark.needs("transformers")
def test_m_equal_to_the_batch_is_sam_and_m_none_is_untouched():
    model, loss_fn, batch = MODELS["bert"]()
    sam = engine_update(model, loss_fn, batch, SAMConfig(rho=RHO))
    whole = engine_update(model, loss_fn, batch, SAMConfig(rho=RHO, m=batch["labels"].shape[0]))
    assert rel(whole, sam) < 1e-5
    again = engine_update(model, loss_fn, batch, SAMConfig(rho=RHO, m=None))
    assert all(torch.equal(again[k], sam[k]) for k in sam)  # m=None is SAM's own path, bit for bit


def test_param_group_radii_and_frozen_groups():
    """Each parameter group moves by its own rho; rho = 0 in a group leaves its parameters unperturbed."""
    model, loss_fn, batch = MODELS["mlp"]()
    groups = [{"params": list(model[0].parameters()), "rho": 0.0}, {"params": list(model[-1].parameters())}]
    model.zero_grad(set_to_none=True)
    got = {}
    opt = DeltaSAM(groups, torch.optim.SGD, SAMConfig(rho=RHO, m=1), lr=1.0, module=model)
    opt.base_optimizer.step = lambda: got.update(  # type: ignore[method-assign]
        {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    )
    opt.step(lambda: loss_fn(batch))
    want = loop_reference(model, loss_fn, batch, RHO, 1, radii={"0.weight": 0.0, "0.bias": 0.0})
    assert rel(got, want) < 1e-5
    assert rel(got, loop_reference(model, loss_fn, batch, RHO, 1)) > 1e-3


@pytest.mark.needs("transformers")
def test_eps_norm_and_loss_rise_are_logged():
    model, loss_fn, batch = MODELS["bert"]()
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, SAMConfig(rho=RHO, m=1), lr=0.0, module=model)
    opt.step(lambda: loss_fn(batch))
    stats = opt.last_stats
    assert stats is not None and abs(stats.eps_norm - RHO) < 1e-6
    assert stats.loss_rise > 0  # every instance moved up its own gradient


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("name", ["bert", "twice"])
@pytest.mark.needs("transformers", ids="bert")
def test_grad_norm_ratio_is_logged_from_per_sample_gradients(name, m):
    """deltasam/grad_norm_ratio = mean_i ||G_g(i)||/|g(i)| / ||g_bar||, against torch.func's per-sample gradients."""
    model, loss_fn, batch = MODELS[name]()
    g = per_sample_grads(model, loss_fn, batch)
    rows = torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], 1).double()
    n = rows.shape[0]
    want = sum(float(rows[s : s + m].sum(0).norm()) for s in range(0, n, m)) / n / float(rows.mean(0).norm())
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, SAMConfig(rho=RHO, m=m), lr=0.0, module=model)
    opt.step(lambda: loss_fn(batch))
    assert opt.last_stats.grad_norm_ratio == pytest.approx(want, rel=1e-5)
    assert opt.last_stats.as_log_dict(0)["deltasam/grad_norm_ratio"] > 1  # a per-instance adversary is the stronger one


@pytest.mark.parametrize("name", ["bert", "mlp"])
@pytest.mark.needs("transformers", ids="bert")
def test_match_rho_is_the_fixed_route_at_rho_over_the_ratio(name):
    """match_rho=True at rho equals m=1 at the fixed radius rho / (mean_i ||g_i|| / ||g_bar||), the ratio from
    torch.func's per-sample gradients; with m = B (one group, ratio 1) it is SAM at rho."""
    model, loss_fn, batch = MODELS[name]()
    g = per_sample_grads(model, loss_fn, batch)
    rows = torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], 1).double()
    ratio = float(rows.norm(dim=1).mean() / rows.mean(0).norm())
    want = loop_reference(model, loss_fn, batch, rho=RHO / ratio, m=1)
    assert rel(engine_update(model, loss_fn, batch, SAMConfig(rho=RHO, m=1, match_rho=True)), want) < 1e-5
    assert rel(engine_update(model, loss_fn, batch, SAMConfig(rho=RHO, m=1)), want) > 1e-3  # the radius did change
    n = rows.shape[0]
    sam = engine_update(model, loss_fn, batch, SAMConfig(rho=RHO))
    assert rel(engine_update(model, loss_fn, batch, SAMConfig(rho=RHO, m=n, match_rho=True)), sam) < 1e-5


def test_match_rho_refusals():
    """match_rho needs m; under DDP with sync='global' it needs the global ||g_bar||, which the route does not form."""
    from lightning_deltasam.backend import Backend
    from lightning_deltasam.distributed import Reducer
    from lightning_deltasam.engine import SAMEngine
    from lightning_deltasam.passes import Passes

    with pytest.raises(ValueError, match="match_rho=True scales the radius of the per-instance route"):
        SAMConfig(match_rho=True)
    model, loss_fn, batch = MODELS["mlp"]()

    class TwoRanks(Reducer):
        world_size = 2

    params = [p for p in model.parameters() if p.requires_grad]
    engine = SAMEngine([{"params": params}], SAMConfig(rho=RHO, m=1, match_rho=True))
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"match_rho=True under DDP with sync='global' \(2 ranks\)"):
        engine.step(Passes(lambda: loss_fn(batch), Backend(TwoRanks()), module=model), lambda: None)
    assert all(torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.needs("transformers")
def test_bf16_autocast_is_close_to_float32():
    model, loss_fn, batch = MODELS["bert"]()
    want = engine_update(model, loss_fn, batch, SAMConfig(rho=RHO, m=1))

    def autocast_loss(b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(b).float()

    got = engine_update(model, autocast_loss, batch, SAMConfig(rho=RHO, m=1))
    assert rel(got, want) < 0.05


# ------------------------------------------------------------------------------------------ adapters
def _plain_run(sam: SAMConfig, steps: int = 6) -> nn.Module:
    net = make_net(seed=0)
    opt = DeltaSAM(net.parameters(), torch.optim.AdamW, sam, lr=1e-2, module=net)
    done = 0
    while done < steps:
        for x, y in make_loader():
            if done == steps:
                break
            opt.step(lambda: per_sample_ce(net, x, y))
            done += 1
    return net


@pytest.mark.parametrize("m", [1, 4])
def test_mixin_callback_and_optimizer_agree(m):
    reference = _plain_run(SAMConfig(rho=RHO, m=m))
    mixin = MixinClassifier(sam=SAMConfig(rho=RHO, m=m))
    L.Trainer(max_steps=6, **QUIET).fit(mixin, make_loader())
    plain = PlainClassifier()
    L.Trainer(max_steps=6, callbacks=[DeltaSAMCallback(SAMConfig(rho=RHO, m=m))], **QUIET).fit(plain, make_loader())
    sam = _plain_run(SAMConfig(rho=RHO))
    for a, b, c in zip(reference.parameters(), mixin.net.parameters(), plain.net.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
        torch.testing.assert_close(c, a, atol=1e-6, rtol=0)
    assert max(float((a - s).abs().max()) for a, s in zip(reference.parameters(), sam.parameters())) > 1e-4


def test_callback_with_m_needs_per_sample_loss():
    plain = PlainClassifier(with_per_sample=False)
    with pytest.raises(ValueError, match=r"DeltaSAMCallback\(m=1\) needs PlainClassifier.per_sample_loss"):
        L.Trainer(max_steps=1, callbacks=[DeltaSAMCallback(SAMConfig(m=1))], **QUIET).fit(plain, make_loader())


def test_app_config_and_options():
    assert SAMConfig(m=1).per_instance and not SAMConfig(m=1, rho=0.0).per_instance


@pytest.mark.parametrize(
    "options,match",
    [
        ({"m": 0}, r"m=0 must be an integer >= 1"),
        ({"m": 2.0}, r"m=2.0 must be an integer"),
        ({"m": 1, "reweight": ProbeWeights()}, r"m=1 with reweight='probes'.*Use one"),
        ({"m": 1, "reweight": GramWeights()}, r"m=1 with reweight='gram'.*Use one"),
        ({"m": 1, "adaptive": True}, r"adaptive=True with m=1.*not low-rank"),
    ],
)
def test_bad_combinations_name_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        SAMConfig(**options)


def test_two_step_api_backward_closure_and_missing_module_are_refused():
    net = make_net()
    x, y = make_data(n=8)
    with pytest.raises(ValueError, match=r"m=1 forms per-instance gradients from the model's layers.*module=model"):
        DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(m=1), lr=0.1)
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(m=1), lr=0.1, module=net)
    per_sample_ce(net, x, y).mean().backward()
    with pytest.raises(ValueError, match=r"m=1 needs per-instance losses.*first_step\(\)/second_step\(\)"):
        opt.first_step()
    with pytest.raises(ValueError, match=r"m=1 needs per-instance losses"):  # the backward-closure contract
        opt.step(lambda: per_sample_ce(net, x, y).mean().backward())
    net.zero_grad(set_to_none=True)
    groups = [{"params": list(net.parameters()), "adaptive": True}]
    opt = DeltaSAM(groups, torch.optim.SGD, SAMConfig(m=1), lr=0.1, module=net)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['adaptive'\]=True with m=1"):
        opt.step(lambda: per_sample_ce(net, x, y))


def test_unsupported_layers_are_refused_naming_the_route():
    class WithConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3)

    model = WithConv()
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, SAMConfig(m=1), lr=0.1, module=model)
    with pytest.raises(UnsupportedModuleError, match=r"per-instance route \(m=1\).*Conv1d.*m=None"):
        opt.step(lambda: model.conv(torch.randn(2, 2, 5)).sum((1, 2)))


@pytest.mark.parametrize(
    "options",
    [{"m": 1}, {"reweight": GramWeights(score="gram", weights="linear")}],
    ids=["m1", "exact"],
)
@pytest.mark.parametrize("how", ["torch.compile", "Module.compile", "submodule"])
def test_compiled_modules_get_a_clear_error(options, how):
    """A compiled graph bypasses the layer hooks: a clear error naming torch.compile, never a different update."""
    net = make_net()
    if how == "torch.compile":
        module = torch.compile(net, backend="eager")
    elif how == "Module.compile":
        module = net
        net.compile(backend="eager")
    else:
        module = nn.Sequential(torch.compile(net, backend="eager"))
    x, y = make_data(n=8)
    opt = DeltaSAM(module.parameters(), torch.optim.SGD, SAMConfig(rho=RHO, **options), lr=0.1, module=module)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"torch\.compile.*_orig_mod"):
        opt.step(lambda: F.cross_entropy(module(x), y, reduction="none"))
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    # the way out the error names: the uncompiled module gives the eager update
    if how == "torch.compile":
        opt = DeltaSAM(
            net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO, **options), lr=0.1, module=module._orig_mod
        )
        opt.step(lambda: per_sample_ce(net, x, y))


def test_a_compiled_function_inside_the_loss_is_refused_or_exact():
    """torch.compile around the call (not the module): the hooks either refuse from inside the trace or, where
    dynamo runs them eagerly, the update is the eager one; never a silently different update."""
    net = make_net()
    x, y = make_data(n=8)
    want = engine_update(net, lambda b: per_sample_ce(net, *b), (x, y), SAMConfig(rho=RHO, m=1))
    compiled = torch.compile(lambda inputs: net(inputs), backend="aot_eager")
    try:
        got = engine_update(
            net, lambda b: F.cross_entropy(compiled(b[0]), b[1], reduction="none"), (x, y), SAMConfig(rho=RHO, m=1)
        )
    except ValueError as err:
        assert "torch.compile" in str(err)
    else:
        assert rel(got, want) < 1e-5


# ------------------------------------------------------------------------------------------ guarantees
@pytest.mark.parametrize("fault", ["nan", "inf"])
@pytest.mark.parametrize("call", [3, 4], ids=["first-pass", "second-pass"])
def test_non_finite_loss_skips_with_weights_unchanged(fault, call):
    module = Faulty(at=call, fault=fault, sam=SAMConfig(rho=RHO, m=1))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        trainer = L.Trainer(max_steps=4, **QUIET)
        trainer.fit(module, make_loader())
    starts = module.weights_at_batch_start
    assert all(torch.equal(a, b) for a, b in zip(starts[1], starts[2]))
    assert not all(torch.equal(a, b) for a, b in zip(starts[2], starts[3]))
    assert module._deltasam_engine.skipped_steps == 1 and trainer.global_step == 4


def test_exception_in_the_second_pass_leaves_weights_and_hooks_clean():
    module = Faulty(at=2, fault="raise", sam=SAMConfig(rho=RHO, m=1))
    with pytest.raises(RuntimeError, match="user code failed"):
        L.Trainer(max_steps=2, **QUIET).fit(module, make_loader())
    assert all(torch.equal(a, b) for a, b in zip(module.weights_at_batch_start[0], module.parameters()))
    assert not any(layer._forward_hooks for layer in module.net.modules())  # no correction left installed


def test_fp16_grad_scaler_trains_and_skips_overflow():
    plugin = MixedPrecision(precision="16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    module = Faulty(at=4, fault="inf", sam=SAMConfig(rho=RHO, m=1))
    trainer = L.Trainer(max_steps=4, plugins=[plugin], **QUIET)
    trainer.fit(module, make_loader())
    starts = module.weights_at_batch_start
    assert all(torch.equal(a, b) for a, b in zip(starts[1], starts[2]))
    assert not all(torch.equal(a, b) for a, b in zip(starts[2], starts[3]))
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**10


def test_batchnorm_in_training_mode_is_refused_and_in_eval_mode_is_exact():
    net = make_net(batchnorm=True)
    net[1].requires_grad_(False)
    x, y = make_data(n=16)
    opt = DeltaSAM(
        [p for p in net.parameters() if p.requires_grad], torch.optim.SGD, SAMConfig(rho=RHO, m=1), lr=0.1, module=net
    )
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(UnsupportedModuleError, match=r"1 \(BatchNorm1d\).*batch's own statistics.*eval mode"):
        opt.step(lambda: per_sample_ce(net, x, y))
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    net.eval()  # running statistics: every instance has its own gradient
    net.double()
    x = x.double()
    ref = loop_reference(net, lambda b: per_sample_ce(net, *b), (x, y), RHO, 1)
    got = engine_update(net, lambda b: per_sample_ce(net, *b), (x, y), SAMConfig(rho=RHO, m=1))
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-7, atol=1e-9)


def test_resume_from_a_state_dict_continues_bitwise():
    batches = list(make_loader())

    def fresh(seed: int = 0) -> tuple[nn.Module, DeltaSAM]:
        net = make_net(seed=seed)
        return net, DeltaSAM(net.parameters(), torch.optim.AdamW, SAMConfig(rho=RHO, m=2), lr=1e-2, module=net)

    straight, opt = fresh()
    for x, y in batches:
        opt.step(lambda: per_sample_ce(straight, x, y))
    first, opt = fresh()
    for x, y in batches[:2]:
        opt.step(lambda: per_sample_ce(first, x, y))
    saved = ({k: v.clone() for k, v in first.state_dict().items()}, opt.state_dict())
    resumed, opt = fresh(seed=1)
    resumed.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    for x, y in batches[2:]:
        opt.step(lambda: per_sample_ce(resumed, x, y))
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
