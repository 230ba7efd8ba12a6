"""Resuming the app's runs: from any checkpoint, a run continues as if it had never stopped (bit for bit)."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest

pytest.importorskip("hydra")  # the GLUE app's tests need the [app] extra

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_deltasam.glue.checkpoints import ExactResume
from lightning_deltasam.glue.data import ResumableDataLoader
from tests.glue_data import needs_glue

REPO = Path(__file__).resolve().parents[1]
needs_sst2 = needs_glue  # the app's runs read SST-2 from GLUE_DIR (skipped, saying so, when it is unset)

BATCHES = 5  # an epoch: 40 rows in batches of 8


# --------------------------------------------------------------------------- Lightning level
class Recorder(L.LightningModule):
    """Dropout (draws from torch's generator) and a record of every step's epoch and rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2))
        self.steps: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        x, y, rows = batch
        self.steps.append((self.current_epoch, rows.tolist()))
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        assert self.trainer.estimated_stepping_batches > 0  # as the app's schedule: Lightning builds the loader early
        return torch.optim.SGD(self.parameters(), lr=0.1)


def rows(resumable: bool = True, workers: int = 0, shuffle: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(8 * BATCHES, 4, generator=g),
        torch.randint(0, 2, (8 * BATCHES,), generator=g),
        torch.arange(8 * BATCHES),
    )
    kind = ResumableDataLoader if resumable else DataLoader
    return kind(
        data,
        batch_size=8,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(1),
        num_workers=workers,
        persistent_workers=workers > 0,
    )


class SaveAt(L.Callback):
    """Saves a checkpoint at step k, at the end of the batch or of the validation there."""

    def __init__(self, step: int, where: str, path: Path) -> None:
        self.step, self.where, self.path = step, where, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.where == "batch" and trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)

    def on_validation_end(self, trainer, pl_module):
        if self.where == "validation" and trainer.global_step == self.step and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)


BUDGETS = {"steps": dict(max_steps=13, max_epochs=10), "epochs": dict(max_steps=-1, max_epochs=3)}


def fit(
    budget: dict,
    ckpt: Path | None = None,
    callbacks: tuple = (),
    validate_every: int | None = None,
    workers: int = 0,
    resumable: bool = True,
) -> tuple[Recorder, L.Trainer]:
    L.seed_everything(0, verbose=False)
    module = Recorder()
    trainer = L.Trainer(
        callbacks=[ExactResume(), *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=validate_every,
        check_val_every_n_epoch=None if validate_every else 1,
        limit_val_batches=1 if validate_every else 0,
        **budget,
    )
    trainer.fit(module, rows(resumable, workers), rows(shuffle=False) if validate_every else None, ckpt_path=ckpt)
    return module, trainer


@functools.cache
def uninterrupted(budget: str, workers: int = 0) -> tuple[list[torch.Tensor], list, int, int]:
    module, trainer = fit(BUDGETS[budget], workers=workers)
    return [p.detach().clone() for p in module.parameters()], module.steps, trainer.global_step, trainer.current_epoch


def same_weights(module: L.LightningModule, weights: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, w) for p, w in zip(module.parameters(), weights))


@pytest.mark.parametrize("workers", [0, 2])
def test_resumable_loader_keeps_the_plain_loaders_order(workers: int) -> None:
    """Never resumed, the loader is the plain DataLoader: the same batches, epoch after epoch."""
    plain, _ = fit(BUDGETS["epochs"], resumable=False, workers=workers)
    resumable, _ = fit(BUDGETS["epochs"], workers=workers)
    assert resumable.steps == plain.steps and len(plain.steps) == 3 * BATCHES
    assert plain.steps[0][1] != plain.steps[BATCHES][1]  # each epoch draws its own order
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), resumable.parameters()))


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("step", [3, BATCHES, 7])  # inside epoch 0, at its end, inside epoch 1
@pytest.mark.parametrize("how", ["stopped", "batch", "validation"])
def test_resumed_run_equals_the_uninterrupted_one(budget: str, step: int, how: str, tmp_path: Path) -> None:
    """Saved at a stop after ``step`` steps (max_steps), at the end of that step's batch, or at a validation there."""
    path = tmp_path / "at.ckpt"
    if how == "stopped":
        _, trainer = fit({**BUDGETS[budget], "max_steps": step})
        trainer.save_checkpoint(path)  # what ModelCheckpoint saves at on_train_end
    else:
        fit(BUDGETS[budget], callbacks=(SaveAt(step, how, path),), validate_every=step if how == "validation" else None)
    weights, steps, global_step, epoch = uninterrupted(budget)
    module, trainer = fit(BUDGETS[budget], ckpt=path, validate_every=step if how == "validation" else None)
    assert module.steps == steps[step:]  # the same rows at the same epochs, from the next step on
    assert (trainer.global_step, trainer.current_epoch) == (global_step, epoch)
    assert same_weights(module, weights)


@pytest.mark.parametrize("step", [3, BATCHES])
def test_resume_with_persistent_workers(step: int, tmp_path: Path) -> None:
    _, trainer = fit({**BUDGETS["steps"], "max_steps": step}, workers=2)
    trainer.save_checkpoint(tmp_path / "at.ckpt")
    weights, steps, _, _ = uninterrupted("steps", workers=2)
    module, _ = fit(BUDGETS["steps"], ckpt=tmp_path / "at.ckpt", workers=2)
    assert module.steps == steps[step:] and same_weights(module, weights)


# --------------------------------------------------------------------------- the app
APP = [
    "task=sst2",
    "model=tiny",
    "optimizer=deltasam",
    "data.limit_train=64",
    "data.batch_size=16",  # 4 steps an epoch
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.enable_model_summary=false",
    "logger.tensorboard=null",
    "callbacks.progress.every_n_steps=1",
]


def run_app(capsys: pytest.CaptureFixture, out: Path, *overrides: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """The app in process: (results, its progress lines without timings, the warnings it raised)."""
    from hydra import compose, initialize_config_dir

    from lightning_deltasam.glue.app import run
    from lightning_deltasam.glue.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*APP, *overrides, f"paths.output_dir={out}"])
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run(cfg)
    printed = capsys.readouterr().out.splitlines()
    lines = [" | ".join(ln.split(" | ")[:3]) for ln in printed if ln.startswith("step ")]  # step, epoch, loss
    return results, lines, [str(w.message) for w in caught]


def checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


@needs_sst2
def test_app_resumed_mid_epoch_equals_the_uninterrupted_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Run a (5 steps, validation at step 3) is resumed from the checkpoint of that validation: dropout, the train
    order, delta-SAM's probes and AdamW continue exactly; progress shows the same epochs."""
    a, a_lines, _ = run_app(capsys, tmp_path / "a", "trainer.max_steps=5")
    saved = tmp_path / "a" / "checkpoints" / "best-step3.ckpt"
    b, b_lines, said = run_app(capsys, tmp_path / "b", "trainer.max_steps=5", f"ckpt_path={saved}")
    assert b["resumed_from"] == str(saved) and b["steps"] == a["steps"] == 5
    assert b_lines == a_lines[3:] and [ln.split(" | ")[1] for ln in b_lines] == ["epoch 1/2", "epoch 2/2"]
    assert not [m for m in said if "not resumable" in m]
    final_a, final_b = (
        checkpoint(tmp_path / "a/checkpoints/last.ckpt"),
        checkpoint(tmp_path / "b/checkpoints/last.ckpt"),
    )
    assert final_a["state_dict"].keys() == final_b["state_dict"].keys()
    assert all(torch.equal(final_a["state_dict"][k], final_b["state_dict"][k]) for k in final_a["state_dict"])
    moments = [
        (s["exp_avg"], s["exp_avg_sq"]) for c in (final_a, final_b) for s in c["optimizer_states"][0]["state"].values()
    ]
    half = len(moments) // 2
    assert half and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(moments[:half], moments[half:])
    )
    assert {k: v for k, v in a.items() if k.startswith("val")} == {k: v for k, v in b.items() if k.startswith("val")}


@needs_sst2
def test_app_extended_after_a_stop_inside_an_epoch_shows_the_right_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run stopped by max_steps inside its first epoch and extended: it continues that epoch (was: epoch 2/2,
    then 3/2, and the next epoch started early)."""
    run_app(capsys, tmp_path / "a", "trainer.max_steps=3")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert checkpoint(last)["epoch"] == 0  # the stopped epoch is not counted as complete
    b, lines, said = run_app(capsys, tmp_path / "b", "trainer.max_steps=5", f"ckpt_path={last}")
    assert b["steps"] == 5 and [ln.split(" | ")[:2] for ln in lines] == [
        ["step 4/5", "epoch 1/2"],
        ["step 5/5", "epoch 2/2"],
    ]
    assert not [m for m in said if "not resumable" in m]
