"""The SAM-family variants (lightning_deltasam/ascent/) against pytorch_optimizer 4.1's classes of the same name,
same options, float64, several steps with SGD and AdamW as the base (so per-parameter state carries across steps);
``interval=k`` against SAM / the base optimizer; bitwise resume; the refused combinations."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from lightning_deltasam import (
    DeltaSAM,
    FriendlySAMOptions,
    GSAMOptions,
    LookSAMOptions,
    ProbeWeights,
    SAMConfig,
    SAMOptions,
    WSAMOptions,
)
from tests.helpers import make_data, make_net, per_sample_ce

pt = pytest.importorskip("pytorch_optimizer")

STEPS, LR, TOL = 6, 0.05, 1e-6
BASES = {"sgd": (torch.optim.SGD, dict(lr=LR, momentum=0.9)), "adamw": (torch.optim.AdamW, dict(lr=LR))}
VARIANTS = {  # name: (our options, pytorch_optimizer's options)
    "gsam": (SAMConfig(rho=0.05, variant=GSAMOptions(min_rho=0.01)), dict(alpha=0.4)),
    "gsam-alpha": (SAMConfig(rho=0.05, variant=GSAMOptions(alpha=0.2)), dict(alpha=0.2)),
    "wsam": (SAMConfig(rho=0.05, variant=WSAMOptions()), dict(rho=0.05)),
    "wsam-coupled": (
        SAMConfig(rho=0.05, variant=WSAMOptions(gamma=0.8, decouple=False)),
        dict(rho=0.05, gamma=0.8, decouple=False),
    ),
    "looksam": (SAMConfig(rho=0.1, variant=LookSAMOptions(k=2)), dict(rho=0.1, k=2)),
    "looksam-alpha": (SAMConfig(rho=0.1, variant=LookSAMOptions(k=3, alpha=0.5)), dict(rho=0.1, k=3, alpha=0.5)),
    "friendly": (SAMConfig(rho=0.05, variant=FriendlySAMOptions()), dict(rho=0.05)),
    "friendly-options": (
        SAMConfig(rho=0.05, variant=FriendlySAMOptions(sigma=0.5, lmbda=0.6)),
        dict(rho=0.05, sigma=0.5, lmbda=0.6),
    ),
}


def _backward_closure(opt, net, x, y):
    """The peers' closure: zero, forward, backward, return the mean loss."""

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    return closure


def _setup():
    x, y = make_data(n=16)
    return make_net().double(), x.double(), y


def _schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 - t / (2 * STEPS))


def _reference(name: str, base: str) -> list[list[torch.Tensor]]:
    """pytorch_optimizer's class, driven as its docs say; the weights after each step."""
    net, x, y = _setup()
    cls, kw = BASES[base]
    options = VARIANTS[name][1]
    variant = name.split("-")[0]
    history = []
    if variant == "gsam":
        base_opt = cls(net.parameters(), **kw)
        sched = _schedule(base_opt)
        ours = VARIANTS[name][0]
        rho = pt.ProportionScheduler(
            sched,
            max_lr=LR,
            min_lr=0.0,
            max_value=ours.rho,
            min_value=ours.variant.min_rho if ours.variant.min_rho is not None else ours.rho,
        )
        opt = pt.GSAM(net.parameters(), base_opt, net, rho, **options)
        for _ in range(STEPS):
            opt.set_closure(F.cross_entropy, x, y)
            opt.step()
            sched.step()
            opt.update_rho_t()
            history.append([p.detach().clone() for p in net.parameters()])
        return history
    if variant == "wsam":
        opt = pt.WSAM(net, net.parameters(), cls, **options, **kw)
    else:
        opt = {"looksam": pt.LookSAM, "friendly": pt.FriendlySAM}[variant](net.parameters(), cls, **options, **kw)
    sched = _schedule(opt.base_optimizer)
    closure = _backward_closure(opt, net, x, y)
    for _ in range(STEPS):
        if variant == "wsam":
            opt.step(closure)
        else:
            closure()
            opt.step(closure)
        sched.step()
        history.append([p.detach().clone() for p in net.parameters()])
    return history


def _ours(sam: SAMConfig, base: str, path: str = "per-instance", steps: int = STEPS) -> list[list[torch.Tensor]]:
    net, x, y = _setup()
    cls, kw = BASES[base]
    opt = DeltaSAM(net.parameters(), cls, sam, **kw)
    sched = _schedule(opt)
    history = []
    for _ in range(steps):
        if path == "per-instance":
            opt.step(lambda: per_sample_ce(net, x, y))
        else:  # the backward-closure contract: the caller's backward at w first
            _backward_closure(opt, net, x, y)()
            opt.step(_backward_closure(opt, net, x, y))
        sched.step()
        history.append([p.detach().clone() for p in net.parameters()])
    return history


def _worst(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]) -> float:
    """The largest relative difference of the update w_t - w_0, tensor by tensor, over every step."""
    start = [p.detach() for p in _setup()[0].parameters()]
    return max(float((g - w).norm() / (w - s).norm()) for gs, ws in zip(got, want) for g, w, s in zip(gs, ws, start))


@pytest.mark.parametrize("path", ["per-instance", "closure"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_equals_pytorch_optimizer(name, base, path):
    want = _reference(name, base)
    got = _ours(VARIANTS[name][0], base, path)
    assert _worst(got, want) < TOL, _worst(got, want)


@pytest.mark.parametrize("name", ["gsam", "wsam", "looksam", "friendly"])
def test_each_variant_is_not_sam(name):
    """The comparison above can fail: each variant's update differs from SAM's with the same rho."""
    sam = _ours(SAMConfig(rho=VARIANTS[name][0].rho), "adamw")
    assert _worst(_ours(VARIANTS[name][0], "adamw"), sam) > 1e-3


@pytest.mark.parametrize("base", list(BASES))
def test_interval_is_sam_on_every_kth_step_and_the_base_step_otherwise(base):
    net, x, y = _setup()
    cls, kw = BASES[base]
    ref = pt.SAM(net.parameters(), cls, rho=0.05, perturb_eps=0.0, **kw)
    want = []
    for t in range(STEPS):
        ref.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if (t + 1) % 3 == 0:
            ref.step(_backward_closure(ref, net, x, y))
        else:
            ref.base_optimizer.step()
        want.append([p.detach().clone() for p in net.parameters()])
    net2, _, _ = _setup()
    opt = DeltaSAM(net2.parameters(), cls, SAMConfig(rho=0.05, variant=SAMOptions(interval=3)), **kw)
    for t in range(STEPS):
        opt.step(lambda: per_sample_ce(net2, x, y))
        for a, b in zip(net2.parameters(), want[t]):
            torch.testing.assert_close(a.detach(), b, atol=1e-9, rtol=1e-9)
    assert opt.engine.steps == STEPS


@pytest.mark.parametrize("name", ["gsam", "wsam", "looksam", "friendly"])
def test_resume_is_bitwise(name):
    """state_dict mid-run (the rule's per-parameter state, its step count) and load: the same weights bit for bit."""
    options = VARIANTS[name][0]
    net, x, y = _setup()
    opt = DeltaSAM(net.parameters(), torch.optim.AdamW, options, lr=LR)
    for _ in range(3):
        opt.step(lambda: per_sample_ce(net, x, y))
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    assert name in ("wsam", "gsam") or saved_opt["deltasam"]["rule"], "the rule's state is checkpointed"
    for _ in range(3):
        opt.step(lambda: per_sample_ce(net, x, y))
    net2, _, _ = _setup()
    net2.load_state_dict(saved_net)
    opt2 = DeltaSAM(net2.parameters(), torch.optim.AdamW, options, lr=LR)
    opt2.load_state_dict(saved_opt)
    for _ in range(3):
        opt2.step(lambda: per_sample_ce(net2, x, y))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: SAMConfig(variant=GSAMOptions(), reweight=ProbeWeights()), "variant='gsam' with reweight='probes'"),
        (lambda: SAMConfig(variant=WSAMOptions(), m=1), "variant='wsam' with m=1"),
        (
            lambda: SAMConfig.from_dict({"variant": {"name": "looksam", "interval": 2}}),
            "variant='looksam' has no option 'interval'; its options: k, alpha.",
        ),
        (
            lambda: SAMConfig.from_dict({"variant": "bsam"}),
            "variant='bsam' is not supported; use one of ",
        ),
        (
            lambda: SAMConfig.from_dict({"variant": {"name": "sam", "alpha": 0.3}}),
            "variant='sam' has no option 'alpha'; its options: interval.",
        ),
        (
            lambda: SAMConfig.from_dict({"variant": {"name": "wsam", "min_rho": 0.1}}),
            "variant='wsam' has no option 'min_rho'; its options: gamma, decouple.",
        ),
        (lambda: WSAMOptions(gamma=1.0), "gamma=1.0 must be >= 0.0 and < 1.0"),
        (lambda: SAMOptions(interval=0), "interval=0 must be an integer >= 1"),
    ],
    ids=["gsam-reweight", "wsam-m", "looksam-interval", "bsam", "sam-alpha", "wsam-min_rho", "gamma", "interval"],
)
def test_refused_combinations_name_the_option(build, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        build()


def test_skipped_step_keeps_the_rule_state():
    """A non-finite step commits nothing: FriendlySAM's momentum stays as the last good step left it."""
    net, x, y = _setup()
    opt = DeltaSAM(net.parameters(), torch.optim.AdamW, SAMConfig(rho=0.05, variant=FriendlySAMOptions()), lr=LR)
    opt.step(lambda: per_sample_ce(net, x, y))
    before = {k: v.clone() for k, v in opt.engine.rule.state[next(iter(opt.engine.rule.state))].items()}
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step(lambda: per_sample_ce(net, x, y) * float("nan"))
    after = opt.engine.rule.state[next(iter(opt.engine.rule.state))]
    assert all(torch.equal(before[k], after[k]) for k in before) and opt.engine.steps == 2


def test_every_option_is_in_the_yaml_and_the_readme_table():
    """SAMConfig is the one source: the app's optimizer/adamw.yaml holds each option with its default, the library guide's table
    lists each with its default (the callback's signature is checked in test_adapters)."""
    import dataclasses
    import re
    from pathlib import Path

    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    fields = {f.name: getattr(SAMConfig(), f.name) for f in dataclasses.fields(SAMConfig)}
    from lightning_deltasam.glue.cli import CONF_DIR

    conf = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "optimizer" / "adamw.yaml"))
    assert set(fields) <= set(conf), set(fields) - set(conf)
    for name, default in fields.items():
        if name in ("variant", "reweight"):  # a rule's options: its name (and any option set), as from_dict reads it
            assert getattr(SAMConfig.from_dict({name: conf[name]}), name) == default, (name, conf[name], default)
        elif name not in ("rho", "seed"):  # adamw is rho=0 on purpose; the seed is the app's
            assert conf[name] == default, (name, conf[name], default)
    readme = (root / "docs" / "library.md").read_text().split("## Options (the same for all three adapters)", 1)[1]
    table = next(block for block in readme.split("\n\n") if block.startswith("| option | default |"))
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", table, flags=re.MULTILINE))
    assert set(rows) == set(fields), set(fields) ^ set(rows)
    for name, default in fields.items():
        shown = rows[name].strip('`"')
        if name == "variant":  # the default rule's options, all at their defaults
            assert shown == f"{type(default).__name__}()" and default == type(default)(), (name, shown)
            continue
        assert shown == str(default) or (isinstance(default, float) and float(shown) == default), (name, shown)


def test_a_base_argument_named_like_a_variant_option_goes_through_base_kwargs():
    """RMSprop's ``alpha`` is also GSAM's / LookSAM's: a keyword goes to the base optimizer (the SAM options are in
    the SAMConfig), as a plain keyword or through ``base_kwargs``; for a base optimizer that does not take it, the
    keyword is refused naming SAMConfig."""
    net = make_net()
    with pytest.raises(
        TypeError, match=re.escape("DeltaSAM got alpha=0.9, a SAM option: it goes in GSAMOptions(alpha=...) or")
    ):
        DeltaSAM(net.parameters(), torch.optim.SGD, lr=0.01, alpha=0.9)
    plain = DeltaSAM(net.parameters(), torch.optim.RMSprop, SAMConfig(rho=0.05), lr=0.01, alpha=0.9)
    assert plain.base_optimizer.defaults["alpha"] == 0.9 and plain.config.variant == SAMOptions()
    opt = DeltaSAM(net.parameters(), torch.optim.RMSprop, SAMConfig(rho=0.05), lr=0.01, base_kwargs={"alpha": 0.9})
    assert opt.base_optimizer.defaults["alpha"] == 0.9 and opt.config.variant == SAMOptions()
    looksam = DeltaSAM(
        net.parameters(), torch.optim.RMSprop, SAMConfig(variant=LookSAMOptions(alpha=0.5)), base_kwargs={"alpha": 0.8}
    )
    assert looksam.config.variant.alpha == 0.5 and looksam.base_optimizer.defaults["alpha"] == 0.8
