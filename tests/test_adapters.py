"""Mixin, callback and plain optimizer: one engine, the same weights; the callback's refusals and logging."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_deltasam import (
    DeltaSAM,
    DeltaSAMCallback,
    FriendlySAMOptions,
    GramWeights,
    GSAMOptions,
    LookSAMOptions,
    ProbeWeights,
    SAMConfig,
    SAMOptions,
    WSAMOptions,
)
from lightning_deltasam.ascent.msam import MomentumSAMOptions
from tests.helpers import QUIET, MixinClassifier, PlainClassifier, make_loader, make_net, per_sample_ce

STEPS = 8  # two epochs of 4 batches
CASES = [
    SAMConfig(rho=0.05),
    SAMConfig(rho=0.05, reweight=ProbeWeights(score="gradnorm", num_probes=3, probe_scope="all")),
    SAMConfig(rho=0.05, reweight=ProbeWeights(score="gram", num_probes=4, antithetic=True, probe_scope="all")),
    SAMConfig(rho=0.5, adaptive=True, reweight=ProbeWeights(score="loss")),
    SAMConfig(rho=0.05, reweight=GramWeights(score="gram", weights="linear")),
    SAMConfig(rho=0.05, reweight=GramWeights(score="gram", weights="linear", sketch_rank=4)),
    SAMConfig(rho=0.05, m=1),
    SAMConfig(rho=0.05, m=3),
    SAMConfig(rho=0.05, variant=GSAMOptions(alpha=0.3)),
    SAMConfig(rho=0.05, variant=WSAMOptions(gamma=0.8)),
    SAMConfig(rho=0.1, variant=LookSAMOptions(k=3)),
    SAMConfig(rho=0.05, variant=FriendlySAMOptions()),
    SAMConfig(rho=0.05, variant=SAMOptions(interval=3)),
    SAMConfig(rho=0.05, variant=MomentumSAMOptions()),
]


def _plain_run(sam: SAMConfig) -> torch.nn.Module:
    net = make_net(seed=0)
    opt = DeltaSAM(net.parameters(), torch.optim.AdamW, sam, lr=1e-2, module=net)
    loader = make_loader()
    steps = 0
    while steps < STEPS:
        for x, y in loader:
            opt.step(lambda: per_sample_ce(net, x, y))
            steps += 1
    return net


@pytest.mark.parametrize("sam", CASES, ids=lambda c: c.describe())
def test_mixin_callback_and_optimizer_give_the_same_weights(sam):
    reference = _plain_run(sam)

    mixin = MixinClassifier(sam=sam)
    L.Trainer(max_steps=STEPS, **QUIET).fit(mixin, make_loader())

    plain = PlainClassifier()
    L.Trainer(max_steps=STEPS, callbacks=[DeltaSAMCallback(sam)], **QUIET).fit(plain, make_loader())

    for a, b, c in zip(reference.parameters(), mixin.net.parameters(), plain.net.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
        torch.testing.assert_close(c, a, atol=1e-6, rtol=0)


def test_mixin_logs_loss_and_diagnostics():
    module = MixinClassifier(sam=SAMConfig(rho=0.05, reweight=ProbeWeights()))
    trainer = L.Trainer(max_steps=2, **QUIET)
    trainer.fit(module, make_loader())
    logged = trainer.callback_metrics
    for key in (
        "train/loss",
        "deltasam/eps_norm",
        "deltasam/loss_rise",
        "deltasam/weight_entropy",
        "deltasam/weight_max",
        "deltasam/skipped_steps",
    ):
        assert key in logged, key
    assert float(logged["deltasam/eps_norm"]) == pytest.approx(0.05, rel=1e-4)
    assert 0 < float(logged["deltasam/weight_max"]) <= 1
    assert float(logged["deltasam/weight_entropy"]) <= torch.log(torch.tensor(16.0)).item() + 1e-5


def test_mixin_steps_step_interval_schedulers_and_clips():
    class Scheduled(MixinClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module = Scheduled(sam=SAMConfig(rho=0.05), gradient_clip_val=1e-3)
    before = [p.detach().clone() for p in module.parameters()]
    L.Trainer(max_steps=3, **QUIET).fit(module, make_loader())
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.125)
    # each SGD update has norm <= lr * clip: 1e-3 + 0.5e-3 + 0.25e-3
    total = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(module.parameters(), before)))
    assert float(total) <= 1.75e-3 + 1e-7


def test_callback_sam_logs_training_step_once_at_w():
    module = PlainClassifier()
    callback = DeltaSAMCallback(SAMConfig(rho=0.5))
    L.Trainer(max_steps=3, callbacks=[callback], **QUIET).fit(module, make_loader())
    assert len(module.logged) == 6  # training_step ran twice per step ...
    logged = module.trainer.callback_metrics
    # ... but the logged value is the loss at w, the first run, not the perturbed one
    assert float(logged["train_loss"]) == pytest.approx(module.logged[-2], rel=1e-6)
    assert float(logged["deltasam/loss"]) == pytest.approx(module.logged[-2], rel=1e-6)
    assert module.logged[-1] > module.logged[-2]


def test_callback_delta_needs_per_sample_loss_at_fit_start():
    module = PlainClassifier(with_per_sample=False)
    trainer = L.Trainer(max_steps=1, callbacks=[DeltaSAMCallback(SAMConfig(reweight=ProbeWeights()))], **QUIET)
    with pytest.raises(ValueError, match="per_sample_loss"):
        trainer.fit(module, make_loader())
    # plain SAM works without it
    L.Trainer(max_steps=1, callbacks=[DeltaSAMCallback(SAMConfig(rho=0.05))], **QUIET).fit(
        PlainClassifier(with_per_sample=False), make_loader()
    )


def test_callback_refuses_what_it_cannot_do():
    fp16 = MixedPrecision(precision="16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="16-mixed"):
        L.Trainer(max_steps=1, plugins=[fp16], callbacks=[DeltaSAMCallback()], **QUIET).fit(
            PlainClassifier(), make_loader()
        )
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        L.Trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[DeltaSAMCallback()], **QUIET).fit(
            PlainClassifier(), make_loader()
        )
    with pytest.raises(ValueError, match="DeltaSAMMixin"):
        L.Trainer(max_steps=1, callbacks=[DeltaSAMCallback()], **QUIET).fit(MixinClassifier(), make_loader())


def test_callback_unwraps_the_optimizer_after_fit():
    module = PlainClassifier()
    trainer = L.Trainer(max_steps=1, callbacks=[DeltaSAMCallback()], **QUIET)
    trainer.fit(module, make_loader())
    assert "step" not in trainer.optimizers[0].__dict__ or getattr(
        trainer.optimizers[0].step, "_wrapped_by_lr_sched", False
    )


def test_mixin_validates_its_options():
    with pytest.raises(ValueError, match="rho"):
        MixinClassifier(sam=SAMConfig(rho=-1))
    with pytest.raises(TypeError, match="must be a SAMConfig"):
        MixinClassifier(sam={"rho": 0.1})
    with pytest.raises(ValueError, match="gradient_clip_algorithm"):
        MixinClassifier(gradient_clip_algorithm="l1")


HEAD = SAMConfig(rho=0.05, reweight=ProbeWeights(score="gradnorm", probe_scope="head", num_probes=8))


def test_head_probes_mixin_and_callback_agree():
    mixin = MixinClassifier(sam=HEAD)
    L.Trainer(max_steps=STEPS, **QUIET).fit(mixin, make_loader())
    plain = PlainClassifier()
    L.Trainer(max_steps=STEPS, callbacks=[DeltaSAMCallback(HEAD)], **QUIET).fit(plain, make_loader())
    for b, c in zip(mixin.net.parameters(), plain.net.parameters()):
        torch.testing.assert_close(c, b, atol=1e-6, rtol=0)
    # and they are a real reweighting: not SAM's weights
    sam = MixinClassifier(sam=SAMConfig(rho=0.05))
    L.Trainer(max_steps=STEPS, **QUIET).fit(sam, make_loader())
    assert max(float((a - b).abs().max()) for a, b in zip(sam.parameters(), mixin.parameters())) > 1e-5


def test_head_probe_losses_are_the_loss_with_head_parameters_replaced():
    from lightning_deltasam.probing import probe_plan

    module = MixinClassifier()
    x, y = next(iter(make_loader()))
    forward, head = probe_plan(module, (x, y), "head")
    torch.testing.assert_close(forward(), module.per_sample_loss((x, y)))
    shifted = [p.detach() + 0.1 for p in head.params]
    got = head.losses(shifted)
    with torch.no_grad():
        for p, s in zip(head.params, shifted):
            p.copy_(s)
        want = module.per_sample_loss((x, y))
    torch.testing.assert_close(got, want)


def test_head_probe_at_zero_offset_measures_zero_under_dropout(monkeypatch):
    from lightning_deltasam.probing import ProbeNoise

    monkeypatch.setattr(ProbeNoise, "draw", lambda self, params: [torch.zeros_like(p) for p in params])
    module = MixinClassifier(sam=SAMConfig(rho=0.05, reweight=ProbeWeights(score="sharpness", probe_scope="head")))
    module.net[2].p = 0.5  # dropout below the split
    L.Trainer(max_steps=1, **QUIET).fit(module, make_loader())
    assert module.deltasam_last_stats.weight_fallback


def test_head_scope_needs_the_split():
    class NoSplit(PlainClassifier):
        per_sample_features = None

    with pytest.raises(ValueError, match="per_sample_features"):
        L.Trainer(max_steps=1, callbacks=[DeltaSAMCallback(HEAD)], **QUIET).fit(NoSplit(), make_loader())
    with pytest.raises(ValueError, match="probe_scope"):
        DeltaSAM(make_net().parameters(), torch.optim.SGD, HEAD, lr=0.1)


def test_callback_refuses_two_optimizers():
    """Lightning 2.x already refuses several optimizers under automatic optimization (before any callback hook);
    the callback's own check guards the one engine it keeps, should an optimizer list reach it."""
    from types import SimpleNamespace

    module = PlainClassifier()
    params = list(module.parameters())
    two = SimpleNamespace(optimizers=[torch.optim.SGD(params[:2], lr=0.1), torch.optim.SGD(params[2:], lr=0.1)])
    with pytest.raises(ValueError, match="supports one optimizer.*returned 2"):
        DeltaSAMCallback().on_fit_start(two, module)
    assert all("step" not in opt.__dict__ for opt in two.optimizers)  # nothing wrapped


def test_callback_options_are_samconfigs():
    """The callback's one option is a SAMConfig (default: SAMConfig's defaults; nothing hidden in **options)."""
    import inspect

    params = inspect.signature(DeltaSAMCallback.__init__).parameters
    assert {n: p.default for n, p in params.items() if n != "self"} == {"sam": None}
    assert "sam:" in DeltaSAMCallback.__doc__  # documented under Args:
    assert DeltaSAMCallback().config == SAMConfig()
    config = SAMConfig(rho=0.1, reweight=ProbeWeights())
    assert DeltaSAMCallback(config).config == config == SAMConfig(rho=0.1, reweight=ProbeWeights())
    assert DeltaSAMCallback(sam=config).config == config
    with pytest.raises(TypeError, match="must be a SAMConfig"):
        DeltaSAMCallback({"rho": 0.1})
    with pytest.raises(TypeError):  # SAM options are no longer keywords of the callback
        DeltaSAMCallback(rho=0.1)
    assert DeltaSAMCallback().state_key == "DeltaSAMCallback"  # the base class's key: old checkpoints still load


def test_lightning_internals_the_callback_reads():
    """On the installed Lightning, optimizer.step gets partial(_wrap_closure, model, optimizer, Closure) and the
    Closure keeps its result in ``_result``: what lightning_closure_parts relies on."""
    import functools

    import lightning
    from lightning.pytorch.loops.optimization.automatic import Closure, ClosureResult

    from lightning_deltasam.callback import lightning_closure_parts

    seen = {}

    class Spy(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            original = optimizer.step

            def step(closure=None, **kwargs):
                seen["partial"] = isinstance(closure, functools.partial)
                inner, get_result, set_result = lightning_closure_parts(closure)
                seen["inner"] = inner
                loss = inner()
                seen["result"] = get_result()
                set_result(seen["result"])
                seen["loss"] = loss
                return original(closure=lambda: loss, **kwargs)

            optimizer.step = step

    L.Trainer(max_steps=1, callbacks=[Spy()], **QUIET).fit(PlainClassifier(), make_loader())
    assert seen["partial"] and isinstance(seen["inner"], Closure), lightning.__version__
    assert isinstance(seen["result"], ClosureResult) and torch.equal(seen["result"].loss, seen["loss"])
    plain = lambda: 1.0  # noqa: E731  (any other closure: run as it is, no result)
    inner, get_result, _ = lightning_closure_parts(plain)
    assert inner is plain and get_result() is None


def test_library_imports_without_lightning():
    """DeltaSAM and SAMConfig need PyTorch only; the Lightning adapters are lazy attributes."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom lightning_deltasam import DeltaSAM, SAMConfig\n"
        "assert not any(m == 'lightning' or m.startswith(('lightning.', 'lightning_fabric', 'pytorch_lightning')) "
        "for m in sys.modules), sorted(m for m in sys.modules if m.startswith('lightning'))\n"
        "import lightning_deltasam\nassert 'glue' not in dir(lightning_deltasam)\n"
        "from lightning_deltasam import DeltaSAMCallback, DeltaSAMMixin\nassert 'lightning' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_library_never_imports_the_app():
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "lightning_deltasam"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = "." * node.level + (node.module or "")
                assert "glue" not in name, f"{path.name} imports {name}"
