"""The app around Hydra, in process: option checks, run directory names, progress, checkpoints, label noise."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import lightning as L
import pytest

pytest.importorskip("hydra")  # the GLUE app's tests need the [app] extra

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_deltasam.glue.checkpoints import RunCheckpoint
from lightning_deltasam.glue.cli import OptionError, _run_name, _swept, check_overrides
from lightning_deltasam.glue.progress import PlainProgress, StepProgressBar, epoch_budget, progress_bar, step_budget


# --------------------------------------------------------------------------- unknown options
@pytest.mark.parametrize(
    "args, says",
    [
        (["optimizer.rh=0.1"], "unknown option optimizer.rh; did you mean optimizer.rho"),
        (["+optimizer.rh=0.1"], "unknown option +optimizer.rh (optimizer takes no 'rh'); did you mean +optimizer.rho"),
        (["trainer.max_stepz=3"], "unknown option trainer.max_stepz; did you mean trainer.max_steps"),
        (["task=sst3"], "task=sst3: no such task option; did you mean sst2"),
        (["optimizer=adamw,sm"], "optimizer=sm: no such optimizer option; did you mean sam"),
        (["optimzer.rho=0.1"], "unknown option optimzer.rho (optimzer is not in the config); did you mean optimizer"),
        (["~logger.csvv"], "unknown option ~logger.csvv; did you mean logger.csv"),
        (["+trainer.max_steps=3"], "trainer.max_steps is already an option; set it without the +"),
        (["+trainer.max_stepz=3"], "did you mean +trainer.max_steps"),
        (["optimizer=deltasam", "optimizer.reweight.temprature=2"], "did you mean optimizer.reweight.temperature"),
        (["model=tiny", "model.encoder.d_modle=32"], "did you mean model.encoder.d_model"),
        (["task=tsv", "task.label_colum=x"], "did you mean task.label_column"),
        (["+data.limit_trian=5"], "did you mean +data.limit_train"),
        (["rho=-1"], "unknown option rho (a group's option, not a top-level one); did you mean optimizer.rho?"),
        (["+rho=0.1"], "unknown option +rho (a group's option, not a top-level one); did you mean optimizer.rho?"),
        (["optimizer=sam", "m=1"], "did you mean optimizer.m?"),
        (["max_steps=3"], "did you mean trainer.max_steps?"),
        (["lr=0.1"], "did you mean optimizer.lr or model.lr?"),
    ],
)
def test_unknown_options_name_the_closest(args: list[str], says: str) -> None:
    with pytest.raises(OptionError) as err:
        check_overrides(args)
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "args",
    [
        ["optimizer=sam", "optimizer.rho=0.1", "trainer.max_steps=3", "seed=1,2"],
        ["+trainer.gradient_clip_val=1.0", "+callbacks.early=x", "~logger.csv", "logger.tensorboard=null"],
        ["task=tsv", "task.data_dir=x", "task.text_columns=[a,b]", "hydra.run.dir=/tmp/x", "++anything=1"],
        ["model=tiny", "model.encoder.d_model=32", "+classifier.rho=0.1", "ckpt_path=last"],
        ["optimizer=adamw,sam,deltasam", "data.label_noise=0.3", "callbacks.progress.every_n_steps=5"],
    ],
)
def test_valid_options_pass(args: list[str]) -> None:
    check_overrides(args)


# --------------------------------------------------------------------------- run directory names
def test_run_dir_names_the_data_set_and_the_swept_values(monkeypatch: pytest.MonkeyPatch) -> None:
    root = OmegaConf.create(
        {
            "hydra": {
                "runtime": {"choices": {"task": "tsv", "model": "tiny", "optimizer": "sam"}},
                "job": {"num": 3},
                "overrides": {"task": ["task=tsv", "optimizer=sam", "seed=2"]},
            },
            "task": {"data_dir": "/data/my_reviews"},
        }
    )
    assert _run_name(_root_=root) == "tsv-my_reviews-tiny-sam"  # the model too: tiny and MiniLM runs apart
    root.hydra.runtime.choices.task = "sst2"
    assert _run_name(_root_=root) == "sst2-tiny-sam"
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "task=tsv", "optimizer=adamw,sam", "seed=1,2"])
    assert _swept(_root_=root) == "3_optimizer=sam,seed=2"
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "task=tsv"])
    assert _swept(_root_=root) == "3"


# --------------------------------------------------------------------------- progress
class Tiny(L.LightningModule):
    """Logs ``val/acc`` from a script of values, one per validation."""

    def __init__(self, scores: list[float] = ()) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)
        self.scores = list(scores)
        self.validations = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        score = self.scores[min(self.validations, len(self.scores) - 1)] if self.scores else 0.0
        self.log("val/acc", score)

    def on_validation_epoch_end(self):
        self.validations += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(batches: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(8 * batches, 4, generator=g), torch.randint(0, 2, (8 * batches,), generator=g)),
        batch_size=8,
    )


def trainer(tmp_path: Path, callbacks: list, **kw) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        logger=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **{"enable_checkpointing": False, "num_sanity_val_steps": 0, **kw},
    )


def test_plain_progress_counts_toward_max_steps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    t = trainer(tmp_path, [PlainProgress(every_n_steps=3)], max_steps=7, max_epochs=3, limit_val_batches=0)
    t.fit(Tiny(), loader(4))
    assert (step_budget(t), epoch_budget(t)) == (7, 2)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert [ln.split(" | ")[0] for ln in lines] == [
        "step 1/7",
        "step 3/7",
        "step 6/7",
        "step 7/7",
    ]  # a first line early
    assert lines[0].split(" | ")[1] == "epoch 1/2" and lines[-1].split(" | ")[1] == "epoch 2/2"
    assert all("loss " in ln and "s/step" in ln and "ETA " in ln for ln in lines)
    assert lines[-1].endswith("ETA 0:00:00")


def test_budget_of_whole_epochs(tmp_path: Path) -> None:
    t = trainer(tmp_path, [PlainProgress()], max_steps=-1, max_epochs=3, limit_val_batches=0)
    t.fit(Tiny(), loader(4))
    assert (step_budget(t), epoch_budget(t), t.global_step) == (12, 3, 12)


def test_rich_bar_shows_steps_of_the_run(tmp_path: Path) -> None:
    bar = StepProgressBar()
    t = trainer(tmp_path, [bar], max_steps=6, max_epochs=5, limit_val_batches=0)
    t.fit(Tiny(), loader(4))
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.total, task.completed) == (6, 6)
    assert task.description.strip() == "Epoch 2/2"


def test_progress_picks_plain_lines_without_a_terminal() -> None:
    assert isinstance(progress_bar(), PlainProgress)  # pytest captures stdout: not a terminal
    assert isinstance(progress_bar(terminal=True), StepProgressBar)


# --------------------------------------------------------------------------- checkpoints
def run_checkpoints(tmp_path: Path, scores: list[float]) -> tuple[RunCheckpoint, Path]:
    folder = tmp_path / "checkpoints"
    cb = RunCheckpoint(
        dirpath=folder,
        filename="best-step{step}",
        auto_insert_metric_name=False,
        monitor="val/acc",
        mode="max",
        save_top_k=1,
        save_last=True,
    )
    t = trainer(
        tmp_path,
        [cb],
        max_steps=3 * len(scores),
        val_check_interval=3,
        enable_checkpointing=True,
        enable_progress_bar=False,
    )
    t.fit(Tiny(scores), loader(3 * len(scores)), loader(1))
    return cb, folder


def test_one_checkpoint_while_the_best_is_the_latest(tmp_path: Path) -> None:
    cb, folder = run_checkpoints(tmp_path, [0.1, 0.2, 0.3])
    assert sorted(os.listdir(folder)) == ["best-step9.ckpt", "last.ckpt"]
    assert (folder / "last.ckpt").is_symlink() and os.readlink(folder / "last.ckpt") == "best-step9.ckpt"
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 9


def test_last_is_its_own_file_once_past_the_best(tmp_path: Path) -> None:
    cb, folder = run_checkpoints(tmp_path, [0.1, 0.3, 0.2])
    assert sorted(os.listdir(folder)) == ["best-step6.ckpt", "last.ckpt"]
    assert not (folder / "last.ckpt").is_symlink()
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 9  # the latest, not the best
    assert torch.load(folder / "best-step6.ckpt", weights_only=False)["global_step"] == 6
    assert Path(cb.best_model_path).name == "best-step6.ckpt"


def test_last_written_through_no_link(tmp_path: Path) -> None:
    """Best at step 3, then worse: the link last.ckpt -> best-step3 is replaced, best-step3 keeps step 3."""
    cb, folder = run_checkpoints(tmp_path, [0.5, 0.1, 0.2])
    assert torch.load(folder / "best-step3.ckpt", weights_only=False)["global_step"] == 3
    assert not (folder / "last.ckpt").is_symlink()
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 9


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["optimizer=adamw", "optimizer.variant.interval=2"], "+optimizer.variant.interval=..."),
        (["optimizer=sam", "+optimizer.variant.alpha=0.3"], "optimizer.variant takes: name, interval"),
        (["optimizer=deltasam", "+optimizer.reweight.num_probez=3"], "did you mean +optimizer.reweight.num_probes"),
    ],
)
def test_a_rule_option_is_checked_against_the_chosen_rule(args: list[str], says: str) -> None:
    """``optimizer.variant.<x>`` / ``optimizer.reweight.<x>``: the options the chosen rule's file declares; one the
    yaml does not list is set with ``+``, which the error says."""
    with pytest.raises(OptionError, match=re.escape(says)):
        check_overrides(args)
    check_overrides(["optimizer=adamw", "+optimizer.variant.interval=2"])  # declared by SAMOptions: accepted
