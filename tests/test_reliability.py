"""Reliability: precision modes, non-finite values, exceptions mid-step, resume, accumulation, input checks."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_deltasam import GramWeights, ProbeWeights, SAMConfig
from tests.helpers import QUIET, MixinClassifier, make_data, make_loader, make_net, per_sample_ce, reference_sam_update


class SGDClassifier(MixinClassifier):
    """SGD, so a skipped step (no gradient) provably leaves the weights alone."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Faulty(SGDClassifier):
    """per_sample_loss misbehaves on call number ``at`` (1-based) of the whole run."""

    def __init__(self, at: int, fault: str, **options):
        super().__init__(**options)
        self.at, self.fault, self.calls = at, fault, 0
        self.weights_at_batch_start: list[list[torch.Tensor]] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.weights_at_batch_start.append([p.detach().clone() for p in self.parameters()])

    def per_sample_loss(self, batch):
        self.calls += 1
        losses = super().per_sample_loss(batch)
        if self.calls == self.at:
            if self.fault == "raise":
                raise RuntimeError("user code failed mid-step")
            if self.fault == "interrupt":
                raise KeyboardInterrupt
            return losses * float(self.fault)  # nan or inf
        return losses


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("fault", ["nan", "inf"])
@pytest.mark.parametrize("call", [3, 4], ids=["first-pass", "second-pass"])
def test_non_finite_loss_skips_the_step_and_training_continues(fault, call):
    # SAM: 2 calls per step, so call 3 is step 2's first pass and call 4 its second pass
    module = Faulty(at=call, fault=fault, sam=SAMConfig(rho=0.05))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = L.Trainer(max_steps=4, **QUIET)
        trainer.fit(module, make_loader())
    starts = module.weights_at_batch_start
    assert all(torch.equal(a, b) for a, b in zip(starts[1], starts[2]))  # step 2 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(starts[2], starts[3]))  # step 3 trained
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert module._deltasam_engine.skipped_steps == 1
    assert float(trainer.callback_metrics["deltasam/skipped_steps"]) == 1.0
    assert trainer.global_step == 4  # a skipped step still counts as a step
    assert sum("skipped a step" in str(w.message) for w in caught) == 1


def test_nan_in_a_probe_falls_back_to_uniform_weights():
    # delta-SAM with 3 probes: call 2 is a probe of step 1 (calls: probe x3, first, second)
    module = Faulty(at=2, fault="nan", sam=SAMConfig(rho=0.05, reweight=ProbeWeights(num_probes=3, probe_scope="all")))
    reference = SGDClassifier(sam=SAMConfig(rho=0.05))
    L.Trainer(max_steps=1, **QUIET).fit(module, make_loader())
    L.Trainer(max_steps=1, **QUIET).fit(reference, make_loader())
    assert module.deltasam_last_stats.weight_fallback
    for a, b in zip(module.parameters(), reference.parameters()):  # uniform weights: exactly SAM's step
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


@pytest.mark.parametrize("fault", ["raise", "interrupt"])
@pytest.mark.parametrize("call", [2, 5], ids=["probe", "second-pass"])
def test_exception_mid_step_restores_weights_before_propagating(fault, call):
    module = Faulty(
        at=call, fault=fault, sam=SAMConfig(rho=0.5, reweight=ProbeWeights(num_probes=3, probe_scope="all"))
    )
    trainer = L.Trainer(max_steps=2, **QUIET)
    try:
        trainer.fit(module, make_loader())
    except (RuntimeError, KeyboardInterrupt, SystemExit):
        pass
    assert module.calls == call  # the fault happened, inside step 1
    assert all(torch.equal(a, b) for a, b in zip(module.weights_at_batch_start[0], module.parameters()))


def test_kill_and_resume_continues_bitwise(tmp_path):
    """2 epochs straight == 1 epoch, killed, resumed from last.ckpt for the 2nd (weights, AdamW, LR schedule, probes)."""

    class Scheduled(MixinClassifier):
        def __init__(self, kill_at=None, **kw):
            super().__init__(**kw)
            self.kill_at = kill_at

        def on_train_batch_start(self, batch, batch_idx):
            if self.kill_at is not None and self.global_step == self.kill_at:
                raise KeyboardInterrupt  # killed after the epoch-1 checkpoint

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def run(root, kill_at=None, ckpt_path=None):
        module = Scheduled(
            kill_at=kill_at, sam=SAMConfig(rho=0.05, reweight=ProbeWeights(score="gram", num_probes=4)), seed=0
        )
        ckpt = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=-1, every_n_epochs=1)
        trainer = L.Trainer(
            max_epochs=2,
            callbacks=[ckpt],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        try:
            trainer.fit(module, make_loader(), ckpt_path=ckpt_path)
        except (KeyboardInterrupt, SystemExit):
            pass
        return module

    straight = run(tmp_path / "straight")
    killed = run(tmp_path / "killed", kill_at=5)
    assert killed.global_step == 5 or killed.global_step == 4
    resumed = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "killed" / "last.ckpt"))
    assert resumed.trainer.global_step == 8
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
    state = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=False)
    assert state["deltasam"]["engine"]["generators"]  # the probe generator travels with the checkpoint
    ckpt_weights = [v for k, v in state["state_dict"].items() if k.startswith("net.")]
    assert not all(torch.equal(a, b) for a, b in zip(ckpt_weights, straight.net.parameters()))  # a real mid-run state


def test_gradient_accumulation_matches_a_reference():
    """k=2: each micro-batch is perturbed by its own eps; the SGD step uses the mean descent gradient."""
    x, y = make_data()
    module = SGDClassifier(sam=SAMConfig(rho=0.05), accumulate_grad_batches=2)
    L.Trainer(max_steps=2, **QUIET).fit(module, make_loader(batch_size=8))

    net = make_net()
    for window in range(2):
        grads = []
        for micro in range(2):
            lo = (2 * window + micro) * 8
            after = reference_sam_update(net, x[lo : lo + 8], y[lo : lo + 8], 0.05, lr=1.0)
            grads.append({k: p.detach() - after[k] for k, p in net.named_parameters()})
        with torch.no_grad():
            for k, p in net.named_parameters():
                p -= 0.1 * (grads[0][k] + grads[1][k]) / 2
    assert module.trainer.global_step == 2
    for a, b in zip(module.net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_a_non_finite_micro_batch_skips_its_whole_window():
    module = Faulty(at=3, fault="nan", sam=SAMConfig(rho=0.05), accumulate_grad_batches=2)  # call 3: window 1, micro 2
    L.Trainer(max_steps=2, **QUIET).fit(module, make_loader(batch_size=8))
    starts = module.weights_at_batch_start
    assert all(torch.equal(a, b) for a, b in zip(starts[0], starts[2]))
    assert not all(torch.equal(a, b) for a, b in zip(starts[2], _weights(module)))


def _fp16_plugin():
    return MixedPrecision(precision="16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))


def test_fp16_mixed_with_grad_scaler_trains_and_skips_overflow():
    module = Faulty(
        at=4, fault="inf", sam=SAMConfig(rho=0.05, reweight=ProbeWeights(score="loss")), gradient_clip_val=0.5
    )
    trainer = L.Trainer(max_steps=4, plugins=[_fp16_plugin()], **QUIET)
    trainer.fit(module, make_loader())
    starts = module.weights_at_batch_start
    assert all(torch.equal(a, b) for a, b in zip(starts[1], starts[2]))  # the overflowed step is skipped
    assert not all(torch.equal(a, b) for a, b in zip(starts[2], starts[3]))
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**10  # and the scaler backed off
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_fp16_grad_scaler_with_the_exact_rule_trains_and_skips_overflow():
    """The first pass's activation backward runs at the scaler's scale (no float16 underflow), then unscales."""
    module = Faulty(at=4, fault="inf", sam=SAMConfig(rho=0.05, reweight=GramWeights(score="gram", weights="linear")))
    trainer = L.Trainer(max_steps=4, plugins=[_fp16_plugin()], **QUIET)
    trainer.fit(module, make_loader())
    starts = module.weights_at_batch_start
    assert all(torch.equal(a, b) for a, b in zip(starts[1], starts[2]))  # the overflowed step is skipped
    assert not all(torch.equal(a, b) for a, b in zip(starts[2], starts[3]))
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_clipping_acts_on_the_unscaled_descent_gradient_under_fp16():
    class Clipped(SGDClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0)

    module = Clipped(sam=SAMConfig(rho=0.05), gradient_clip_val=1e-3, gradient_clip_algorithm="value")
    before = _weights(module)
    L.Trainer(max_steps=1, plugins=[_fp16_plugin()], **QUIET).fit(module, make_loader())
    change = max(float((a - b).abs().max()) for a, b in zip(before, module.parameters()))
    assert 0 < change <= 1e-3 + 1e-7  # |lr * clipped grad| <= 1e-3, at the true (unscaled) scale


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "64-true"])
@pytest.mark.parametrize(
    "rule", [ProbeWeights(), GramWeights(score="gram", weights="linear")], ids=["default", "exact"]
)
def test_other_precisions_train(precision, rule):
    module = MixinClassifier(sam=SAMConfig(rho=0.05, reweight=rule))
    before = _weights(module)
    L.Trainer(max_steps=3, precision=precision, **QUIET).fit(module, make_loader(double=precision == "64-true"))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert not all(torch.equal(a.to(p.dtype), p) for a, p in zip(before, module.parameters()))


def test_batchnorm_statistics_updated_once_per_step_through_the_mixin():
    class BN(MixinClassifier):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.net = make_net(batchnorm=True)

    module = BN(sam=SAMConfig(rho=0.05, reweight=ProbeWeights(num_probes=3)))
    L.Trainer(max_steps=3, **QUIET).fit(module, make_loader())
    assert int(module.net[1].num_batches_tracked) == 3


class _Bad(MixinClassifier):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def per_sample_loss(self, batch):
        x, y = batch
        losses = per_sample_ce(self.net, x, y)
        return {"scalar": losses.mean(), "length": losses[:-1], "int": y, "list": [1.0]}[self.mode]


@pytest.mark.parametrize(
    "mode,error,match",
    [
        ("scalar", ValueError, r"_Bad.per_sample_loss must return per-instance losses of shape \[B\]; got shape \(\)"),
        ("length", ValueError, r"_Bad.per_sample_loss returned shape \(15,\) but the batch holds 16"),
        ("int", TypeError, r"_Bad.per_sample_loss must return a floating-point tensor; got dtype torch.int64"),
        ("list", TypeError, r"_Bad.per_sample_loss must return a tensor"),
    ],
)
def test_per_sample_loss_contract_errors_name_the_method_and_shape(mode, error, match):
    with pytest.raises(error, match=match):
        L.Trainer(max_steps=1, **QUIET).fit(_Bad(mode), make_loader())


def test_no_trainable_parameters_and_empty_batch_are_clear_errors():
    frozen = MixinClassifier()
    for p in frozen.parameters():
        p.requires_grad_(False)

    class Frozen(MixinClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD([nn.Parameter(torch.zeros(1), requires_grad=False)], lr=0.1)

    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        L.Trainer(max_steps=1, **QUIET).fit(Frozen(), make_loader())

    class Empty(MixinClassifier):
        def per_sample_loss(self, batch):
            x, y = batch
            return per_sample_ce(self.net, x[:0], y[:0])

    with pytest.raises(ValueError, match="empty"):
        L.Trainer(max_steps=1, **QUIET).fit(Empty(), make_loader())


def test_same_seed_same_results():
    def run():
        module = MixinClassifier(sam=SAMConfig(rho=0.05, reweight=ProbeWeights(score="gradnorm")), seed=3)
        module.net[3].p = 0.3  # dropout: the RNG must be replayed identically too
        L.seed_everything(7, verbose=False)
        L.Trainer(max_steps=4, **QUIET).fit(module, make_loader())
        return _weights(module)

    assert all(torch.equal(a, b) for a, b in zip(run(), run()))


def test_mixin_rejects_bad_accumulation():
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        MixinClassifier(accumulate_grad_batches=0)


def test_plain_optimizer_skips_non_finite_steps():
    from lightning_deltasam import DeltaSAM

    net = make_net()
    x, y = make_data(n=8)
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=0.05), lr=0.1)
    before = _weights(net)
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step(lambda: F.cross_entropy(net(x), y, reduction="none") * float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert opt.engine.skipped_steps == 1
