"""The callback in users' own Lightning code: accumulation switched on during the fit, LR schedulers."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler

from lightning_deltasam import DeltaSAMCallback, SAMConfig

from .helpers import QUIET, PlainClassifier, make_loader


def _weights(module: L.LightningModule) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _callback_run(steps: int) -> list[torch.Tensor]:
    """The reference: the callback's SAM for ``steps`` steps, no accumulation (4 batches an epoch)."""
    module = PlainClassifier()
    L.Trainer(max_steps=steps, callbacks=[DeltaSAMCallback(SAMConfig(rho=0.05))], **QUIET).fit(module, make_loader())
    return _weights(module)


# --------------------------------------------------------------------------- accumulation during the fit
@pytest.mark.parametrize("scheduling, epoch", [({0: 2}, 0), ({1: 2, 3: 4}, 1)])
def test_callback_refuses_a_gradient_accumulation_scheduler(scheduling: dict, epoch: int) -> None:
    module = PlainClassifier()
    before = _weights(module)
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[GradientAccumulationScheduler(scheduling=scheduling), DeltaSAMCallback(SAMConfig(rho=0.05))],
        **QUIET,
    )
    with pytest.raises(ValueError) as err:
        trainer.fit(module, make_loader())
    message = str(err.value)
    assert (
        "GradientAccumulationScheduler(scheduling=" in message
        and f"accumulate_grad_batches=2 from epoch {epoch}" in message
    )
    assert "DeltaSAMMixin(accumulate_grad_batches=k)" in message
    assert trainer.global_step == 0 and _same(_weights(module), before)  # refused before any step


class AccumulateFrom(L.Callback):
    """Sets ``trainer.accumulate_grad_batches`` at the start of an epoch, as a user's own hook might."""

    def __init__(self, epoch: int, k: int) -> None:
        self.epoch, self.k = epoch, k

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.epoch:
            trainer.accumulate_grad_batches = self.k


@pytest.mark.parametrize("first", [True, False])  # the change's hook runs before / after the callback's
def test_callback_refuses_accumulation_set_at_an_epoch_start(first: bool) -> None:
    module = PlainClassifier()
    change, sam = AccumulateFrom(epoch=1, k=2), DeltaSAMCallback(SAMConfig(rho=0.05))
    trainer = L.Trainer(max_epochs=3, callbacks=[change, sam] if first else [sam, change], **QUIET)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2 \(epoch 1, step 4\)\. .*DeltaSAMMixin"):
        trainer.fit(module, make_loader())
    # epoch 0's 4 steps ran as without the change; epoch 1 was refused before its first forward pass
    assert trainer.global_step == 4 and _same(_weights(module), _callback_run(4))


class AccumulateAtBatch(PlainClassifier):
    """Turns accumulation on in its own ``on_train_batch_start`` (after the callbacks' hooks) at batch 1."""

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx == 1:
            self.trainer.accumulate_grad_batches = 2


def test_callback_refuses_accumulation_set_within_a_batch() -> None:
    module = AccumulateAtBatch()
    trainer = L.Trainer(max_epochs=1, callbacks=[DeltaSAMCallback(SAMConfig(rho=0.05))], **QUIET)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2 \(epoch 0, step 1\)"):
        trainer.fit(module, make_loader())
    assert trainer.global_step == 1 and _same(_weights(module), _callback_run(1))  # the step wrapper refused


# --------------------------------------------------------------------------- LR schedulers
OVERRIDDEN = "has been overridden after learning rate scheduler initialization"
ORDER = "Detected call of `lr_scheduler.step()` before `optimizer.step()`"


class Scheduled(PlainClassifier):
    """AdamW with a per-step LR scheduler; records the learning rate each step runs with."""

    def __init__(self, scheduler: str) -> None:
        super().__init__(lr=1e-2)
        self.scheduler = scheduler
        self.lrs: list[float] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        if self.scheduler == "lambda":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8**s)
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("scheduler", ["lambda", "onecycle"])
def test_callback_keeps_the_lr_schedule_without_scheduler_warnings(scheduler: str) -> None:
    runs = {}
    for name, callbacks in (("plain", []), ("sam", [DeltaSAMCallback(SAMConfig(rho=0.05))])):
        module = Scheduled(scheduler)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            L.Trainer(max_steps=8, callbacks=callbacks, **QUIET).fit(module, make_loader())
        said = [str(w.message) for w in caught]
        assert not [m for m in said if OVERRIDDEN in m or ORDER in m], (name, said)
        runs[name] = module.lrs
    assert len(runs["sam"]) == 8 and len(set(runs["sam"])) > 4  # the schedule moves
    assert runs["sam"] == runs["plain"]  # exactly the same LR at every step
