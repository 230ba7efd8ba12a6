"""The step engine through the plain ``DeltaSAM`` optimizer: equivalence to references, weights, restore."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_deltasam import DeltaSAM, FriendlySAMOptions, GramWeights, ProbeWeights, SAMConfig
from lightning_deltasam.ascent.base import Ascent, AscentGroup
from lightning_deltasam.backend import Backend, make_backend
from lightning_deltasam.delta_weights import compute_weights
from lightning_deltasam.distributed import Reducer, norm_of
from lightning_deltasam.engine import SAMEngine
from lightning_deltasam.passes import Passes
from tests.helpers import make_data, make_net, per_sample_ce, reference_sam_update

RHO, LR = 0.05, 0.1


def _params_equal(net: nn.Module, expected: dict[str, torch.Tensor], atol: float) -> None:
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], atol=atol, rtol=0)


def _one_step(net: nn.Module, x, y, sam: SAMConfig) -> DeltaSAM:
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, sam, lr=LR)
    opt.step(lambda: per_sample_ce(net, x, y))
    return opt


def test_sam_matches_hand_written_two_pass_reference():
    x, y = make_data(n=16)
    net = make_net()
    expected = reference_sam_update(net, x, y, RHO, LR)
    _one_step(net, x, y, SAMConfig(rho=RHO))
    _params_equal(net, expected, atol=1e-6)


def test_asam_matches_its_formula():
    x, y = make_data(n=16)
    net = make_net()
    expected = reference_sam_update(net, x, y, 0.5, LR, adaptive=True, eta=0.01)
    _one_step(net, x, y, SAMConfig(rho=0.5, adaptive=True, eta=0.01))
    _params_equal(net, expected, atol=1e-6)


def test_asam_perturbation_is_rho_T2_g_over_norm_Tg():
    """The rule's direction + perturb_ (what the step runs) move w by eps = rho T^2 g / ||T g||."""
    torch.manual_seed(0)
    params = [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    grads = [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    before = [p.clone() for p in params]
    engine = SAMEngine([{"params": params}], SAMConfig(rho=0.3, adaptive=True, eta=0.05))
    direction, norms = engine.rule.direction(params, grads, True, 0.05)
    norm = norm_of(norms)
    t = [p.abs() + 0.05 for p in params]
    ref_norm = torch.sqrt(sum(((ti * g) ** 2).sum() for ti, g in zip(t, grads)))
    assert norm == pytest.approx(float(ref_norm), rel=1e-6)
    eps_norm = engine.rule.perturb_(Ascent([AscentGroup(params, direction, 0.3, None)], norm))
    ref_eps = [0.3 * ti * ti * g / ref_norm for ti, g in zip(t, grads)]
    for p, b, e in zip(params, before, ref_eps):
        torch.testing.assert_close(p - b, e)
    assert eps_norm == pytest.approx(float(torch.sqrt(sum((e**2).sum() for e in ref_eps))), rel=1e-6)


def test_delta_sam_with_loss_score_matches_weighted_reference():
    """score='loss', weights='softmax' is exactly delta = softmax(l / (tau * mean|l|)) (the fixed contract)."""
    x, y = make_data(n=16)
    net = make_net()
    with torch.no_grad():
        losses = per_sample_ce(net, x, y)
    tau = 0.7
    delta = torch.softmax(losses / (tau * losses.abs().mean()), dim=0)
    expected = reference_sam_update(net, x, y, RHO, LR, weights=delta)
    _one_step(net, x, y, SAMConfig(rho=RHO, reweight=ProbeWeights(score="loss", temperature=tau)))
    _params_equal(net, expected, atol=1e-6)


@pytest.mark.parametrize("score", ["sharpness", "gradnorm", "gram"])
def test_delta_sam_with_huge_temperature_equals_sam(score):
    x, y = make_data(n=16)
    sam_net, delta_net = make_net(dropout=0.2), make_net(dropout=0.2)
    torch.manual_seed(3)
    _one_step(sam_net, x, y, SAMConfig(rho=RHO))
    torch.manual_seed(3)  # same dropout masks: the probes replay the first pass's RNG state
    opt = _one_step(
        delta_net, x, y, SAMConfig(rho=RHO, reweight=ProbeWeights(score=score, temperature=1e9, num_probes=2))
    )
    assert opt.last_stats.weight_max == pytest.approx(1 / 16, rel=1e-5)
    _params_equal(delta_net, dict(sam_net.named_parameters()), atol=1e-6)


def test_delta_sam_with_full_mix_is_exactly_uniform():
    x, y = make_data(n=16)
    a, b = make_net(), make_net()
    _one_step(a, x, y, SAMConfig(rho=RHO))
    _one_step(b, x, y, SAMConfig(rho=RHO, reweight=ProbeWeights(score="gradnorm", mix=1.0)))
    _params_equal(b, dict(a.named_parameters()), atol=1e-6)


def test_softmax_weights_follow_the_documented_formula():
    s = torch.tensor([0.3, -1.2, 2.5, 0.0, 4.0])
    for tau in (0.5, 1.0, 3.0):
        w = compute_weights(s, ProbeWeights(temperature=tau), Reducer())
        torch.testing.assert_close(w.delta, torch.softmax(s / (tau * s.abs().mean()), dim=0))
    lin = compute_weights(s, ProbeWeights(weights="linear"), Reducer())
    torch.testing.assert_close(lin.delta, s.clamp_min(0) / s.clamp_min(0).sum())


ADVERSARIAL = {
    "all_equal": [2.0, 2.0, 2.0, 2.0],
    "all_zero": [0.0, 0.0, 0.0, 0.0],
    "inf": [1.0, float("inf"), 0.5, 2.0],
    "neg_inf": [1.0, float("-inf"), 0.5, 2.0],
    "nan": [1.0, float("nan"), 0.5, 2.0],
    "huge": [1e30, -1e30, 3e38, 1.0],
    "tiny": [1e-40, 2e-40, 0.0, 5e-41],
    "all_negative": [-1.0, -2.0, -3.0, -0.5],
    "one_instance": [7.0],
}


@pytest.mark.parametrize("weights", ["softmax", "linear"])
@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_weights_are_a_finite_distribution_for_adversarial_scores(case, weights):
    s = torch.tensor(ADVERSARIAL[case])
    w = compute_weights(s, ProbeWeights(weights=weights), Reducer())
    assert torch.isfinite(w.delta).all()
    assert (w.delta >= 0).all()
    assert float(w.delta.sum()) == pytest.approx(1.0, abs=1e-6)
    if case in ("inf", "neg_inf", "nan", "all_zero"):
        assert w.fallback and torch.equal(w.delta, torch.full_like(s, 1 / len(s)))
    if case == "all_equal":
        torch.testing.assert_close(w.delta, torch.full_like(s, 0.25))


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize(
    "reweight",
    [None, ProbeWeights(score="gradnorm"), ProbeWeights(score="sharpness")],
    ids=["sam", "gradnorm", "sharpness"],
)
def test_restore_is_bitwise_after_step_and_after_an_exception(reweight):
    x, y = make_data(n=16)
    net = make_net(dropout=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    engine = SAMEngine([{"params": list(net.parameters())}], SAMConfig(rho=0.7, reweight=reweight))
    engine.step(Passes(lambda: per_sample_ce(net, x, y), Backend(Reducer())), base_step=lambda: None)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))

    calls = {"n": 0}

    def failing_forward():
        calls["n"] += 1
        if calls["n"] > 1 + (2 if reweight else 0):  # fail in the second pass, at w + eps
            raise _Boom("user code failed at w + eps")
        return per_sample_ce(net, x, y)

    with pytest.raises(_Boom):
        engine.step(Passes(failing_forward, Backend(Reducer())), base_step=lambda: None)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_exception_inside_a_probe_restores_weights():
    x, y = make_data(n=8)
    net = make_net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO, reweight=ProbeWeights(num_probes=3)), lr=LR)

    def closure():
        if not torch.is_grad_enabled():  # probes run without grad
            raise KeyboardInterrupt
        return per_sample_ce(net, x, y)

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_zero_gradient_gives_zero_eps_and_none_grads_are_left_alone():
    x, _ = make_data(n=8)
    lin, unused = nn.Linear(10, 1), nn.Parameter(torch.randn(3))
    before_unused = unused.detach().clone()
    opt = DeltaSAM([*lin.parameters(), unused], torch.optim.SGD, SAMConfig(rho=RHO), lr=LR)
    opt.step(lambda: lin(x).squeeze(1) * 0.0)
    assert opt.last_stats.eps_norm == 0.0
    assert all(torch.isfinite(p).all() for p in lin.parameters())
    assert torch.equal(unused.detach(), before_unused) and unused.grad is None


def test_probe_at_zero_offset_gives_zero_differences_under_dropout(monkeypatch):
    """With dw = 0 every probe difference is exactly 0 (dropout masks replayed), so scores are all 0."""
    x, y = make_data(n=16)
    net = make_net(dropout=0.5)
    opt = DeltaSAM(
        net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO, reweight=ProbeWeights(score="sharpness")), lr=LR
    )
    monkeypatch.setattr(opt.engine.first.noise, "draw", lambda params: [torch.zeros_like(p) for p in params])
    opt.step(lambda: per_sample_ce(net, x, y))
    assert opt.last_stats.weight_fallback  # all-zero scores: uniform, flagged


def test_batchnorm_statistics_are_updated_by_the_first_pass_only():
    x, y = make_data(n=16)
    net = make_net(batchnorm=True)
    ref = make_net(batchnorm=True)
    ref.train()
    with torch.no_grad():
        ref(x)  # one train-mode forward at w: the statistics the step must keep
    opt = DeltaSAM(
        net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO, reweight=ProbeWeights(num_probes=3)), lr=LR, module=net
    )
    opt.step(lambda: per_sample_ce(net, x, y))
    bn, ref_bn = net[1], ref[1]
    assert torch.equal(bn.running_mean, ref_bn.running_mean)
    assert torch.equal(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_rho_zero_is_the_base_optimizer():
    x, y = make_data(n=16)
    a, b = make_net(), make_net()
    opt = DeltaSAM(a.parameters(), torch.optim.SGD, SAMConfig(rho=0.0), lr=LR)
    opt.step(lambda: per_sample_ce(a, x, y))
    sgd = torch.optim.SGD(b.parameters(), lr=LR)
    per_sample_ce(b, x, y).mean().backward()
    sgd.step()
    _params_equal(a, dict(b.named_parameters()), atol=0)


def test_state_dict_round_trip_continues_bitwise():
    x, y = make_data(n=32)

    def run(steps, net, opt):
        for i in range(steps):
            xb, yb = x[(i % 2) * 16 : (i % 2 + 1) * 16], y[(i % 2) * 16 : (i % 2 + 1) * 16]
            opt.step(lambda: per_sample_ce(net, xb, yb))

    def build():
        net = make_net()
        sam = SAMConfig(rho=RHO, reweight=ProbeWeights(score="gram", num_probes=4))
        return net, DeltaSAM(net.parameters(), torch.optim.AdamW, sam, lr=1e-2)

    net, opt = build()
    run(3, net, opt)
    saved = copy.deepcopy((net.state_dict(), opt.state_dict()))  # as torch.save would
    assert "deltasam" in saved[1] and "generators" in saved[1]["deltasam"]
    run(3, net, opt)
    net2, opt2 = build()
    net2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    run(3, net2, opt2)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))


def test_lr_scheduler_drives_the_shared_param_groups():
    net = make_net()
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=RHO), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = make_data(n=8)
    opt.step(lambda: per_sample_ce(net, x, y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize(
    "options,name",
    [  # each option is checked by the class that holds it: SAMConfig's own, a weighting's in ProbeWeights
        ((SAMConfig, {"rho": -0.1}), "rho"),
        ((SAMConfig, {"rho": float("nan")}), "rho"),
        ((SAMConfig, {"reweight": "per-instance"}), "reweight"),
        ((ProbeWeights, {"score": "curvature"}), "score"),
        ((ProbeWeights, {"weights": "exp"}), "weights"),
        ((ProbeWeights, {"temperature": 0}), "temperature"),
        ((ProbeWeights, {"num_probes": 0}), "num_probes"),
        ((ProbeWeights, {"num_probes": 2.5}), "num_probes"),
        ((ProbeWeights, {"probe_std": 0.0}), "probe_std"),
        ((ProbeWeights, {"probe_scale": "log"}), "probe_scale"),
        ((SAMConfig, {"sync": "ring"}), "sync"),
        ((SAMConfig, {"adaptive": "yes"}), "adaptive"),
        ((ProbeWeights, {"mix": 1.5}), "mix"),
    ],
)
def test_bad_options_raise_naming_the_option(options, name):
    net = make_net()
    cls, values = options

    def build():
        sam = SAMConfig(rho=RHO, reweight=cls(**values)) if cls is ProbeWeights else SAMConfig(**values)
        return DeltaSAM(net.parameters(), torch.optim.SGD, sam, lr=LR)

    with pytest.raises(ValueError, match=name):
        build()


def test_closure_must_return_per_instance_losses():
    net = make_net()
    x, y = make_data(n=8)
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(), lr=LR)
    with pytest.raises(ValueError, match=r"shape \[B\].*got shape \(\)"):
        opt.step(lambda: per_sample_ce(net, x, y).mean())
    with pytest.raises(TypeError, match="floating-point"):
        opt.step(lambda: y)
    with pytest.raises(ValueError, match="closure=..."):
        opt.step()


def test_probe_noise_is_seeded_and_scaled():
    params = [torch.full((1000,), 2.0)]
    config = SAMConfig(eta=0.0, seed=5, reweight=ProbeWeights(probe_std=0.1, probe_scale="relative"))
    engine = SAMEngine([{"params": params}], config)
    a = engine.first.noise.draw(params)[0]
    engine2 = SAMEngine([{"params": params}], config)
    assert torch.equal(a, engine2.first.noise.draw(params)[0])
    assert float(a.std()) == pytest.approx(0.2, rel=0.1)  # sigma * |w|
    assert math.isfinite(float(a.sum()))


def test_each_option_value_is_one_registered_part_in_a_small_file():
    """Each variant's options class is one ascent rule and each weighting's options class (None: uniform) one
    first-pass weighting, each registered by its options class in a file of its own; a variant's file stays small
    (its mathematics and state only: the lines of its options dataclass, declared in the same file, not counted)."""
    import inspect

    from lightning_deltasam.ascent import RULES
    from lightning_deltasam.firstpass import WEIGHTINGS
    from lightning_deltasam.options import VariantOptions, WeightingOptions

    assert set(RULES) == set(VariantOptions.registry.values())
    assert set(WEIGHTINGS) == {None, *WeightingOptions.registry.values()}
    for options, cls in [*RULES.items(), *WEIGHTINGS.items()]:
        if options is not None and options.name == "sam":  # SAM is the base class the variants override
            continue
        lines = len(inspect.getsource(inspect.getmodule(cls)).splitlines())
        if options is not None:
            lines -= len(inspect.getsource(options).splitlines())
        assert lines <= 80, (options, cls)

    def weighting_of(config: SAMConfig):
        return SAMEngine([{"params": [torch.zeros(2, requires_grad=True)]}], config).first.weighting

    assert type(weighting_of(SAMConfig())) is WEIGHTINGS[None]
    assert type(weighting_of(SAMConfig(reweight=ProbeWeights()))) is WEIGHTINGS[ProbeWeights]
    sketch = weighting_of(SAMConfig(reweight=GramWeights(score="gram", sketch_rank=32)))
    assert type(sketch) is WEIGHTINGS[GramWeights] and sketch.options.mode == "sketch"
    # no perturbation, no weights
    assert type(weighting_of(SAMConfig(rho=0.0, reweight=ProbeWeights()))) is WEIGHTINGS[None]


def test_a_registered_weighting_is_the_one_the_step_runs(monkeypatch):
    """Swapping the registry's class for ProbeWeights changes the step: eps follows instance 0's gradient
    only, and the descent gradient is the mean loss's gradient at w + rho g_0/||g_0||."""
    from lightning_deltasam.delta_weights import Weights
    from lightning_deltasam.firstpass import WEIGHTINGS, Weighting

    class FirstOnly(Weighting):
        def weigh(self, passes, head, prepared):
            losses = passes.losses("FirstOnly")
            delta = torch.zeros_like(losses)
            delta[0] = 1.0
            passes.backend.backward((delta * losses).sum())
            return losses, Weights(delta=delta, fallback=False)

    monkeypatch.setitem(WEIGHTINGS, ProbeWeights, FirstOnly)
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    engine = SAMEngine([{"params": [w]}], SAMConfig(rho=0.1, reweight=ProbeWeights()))
    assert isinstance(engine.first.weighting, FirstOnly)
    seen = []
    engine.step(Passes(lambda: (x @ w - y) ** 2, make_backend(engine.config.sync)), lambda: seen.append(w.grad.clone()))
    g0 = 2 * (x[0] @ w.detach() - y[0]) * x[0]
    wp = w.detach() + 0.1 * g0 / g0.norm()
    expected = (2 * (x @ wp - y)[:, None] * x).mean(0)
    torch.testing.assert_close(seen[0], expected)


# ------------------------------------------------------------------ the rule's checkpointed state
def _two_layers_alike() -> nn.Module:
    """Layers 0 and 2 have the same shapes: handing one's state to the other would raise no shape error."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3))


def _friendly(net: nn.Module, named: bool) -> DeltaSAM:
    sam = SAMConfig(variant=FriendlySAMOptions())  # FriendlySAM keeps per-parameter state "m"
    return DeltaSAM(net.parameters(), torch.optim.SGD, sam, lr=LR, module=net if named else None)


@pytest.mark.parametrize("named", [True, False], ids=["by-name", "by-position"])
def test_rule_state_is_keyed_by_parameter_and_survives_freezing_a_layer(named):
    """The rule's state in a checkpoint is keyed by parameter name (DeltaSAM(module=...)), or without the module by
    "param_groups.<g>.<i>", the position among every parameter of the groups, trainable or not: freezing layer 0
    between save and load gives each parameter the state saved for that same parameter."""
    x, y = make_data(n=16)
    net = _two_layers_alike()
    opt = _friendly(net, named)
    for _ in range(2):
        opt.step(lambda: per_sample_ce(net, x, y))
    saved = copy.deepcopy(opt.state_dict())
    rule = saved["deltasam"]["rule"]
    names = [name for name, _ in net.named_parameters()]
    keys = names if named else [f"param_groups.0.{i}" for i in range(len(names))]
    assert sorted(rule) == sorted(keys)
    for key, p in zip(keys, net.parameters()):  # what was saved under a key is that parameter's state
        assert set(rule[key]) == {"m"} and torch.equal(rule[key]["m"], opt.engine.rule.state[p]["m"])
    assert not torch.equal(rule[keys[0]]["m"], rule[keys[2]]["m"])  # layers 0 and 2: same shape, other state

    fresh = _two_layers_alike()
    opt2 = _friendly(fresh, named)
    for p in fresh[0].parameters():  # frozen BEFORE loading
        p.requires_grad_(False)
    opt2.load_state_dict(saved)
    state = opt2.engine.rule.state
    for key, p in zip(keys, fresh.parameters()):
        assert set(state[p]) == {"m"} and torch.equal(state[p]["m"], rule[key]["m"]), key

    # control: the old keying, position among the trainable parameters, would have handed layer 2's weight (now the
    # first trainable parameter) the state of layer 0's weight, silently (same shape), through the same loader
    trainable = [p for p in fresh.parameters() if p.requires_grad]
    assert trainable[0] is fresh[2].weight and names[0] == "0.weight"
    legacy = _friendly(_two_layers_alike(), named)
    for p in legacy.param_groups[0]["params"][:2]:
        p.requires_grad_(False)
    legacy.load_state_dict({**saved, "deltasam": {**saved["deltasam"], "rule": {0: rule[keys[0]]}}})
    mismatched = legacy.engine.rule.state[legacy.param_groups[0]["params"][2]]["m"]
    assert torch.equal(mismatched, rule[keys[0]]["m"]) and not torch.equal(mismatched, rule[keys[2]]["m"])
