"""Plain progress lines: a recent rate and a truthful ETA, on a fake clock."""

from __future__ import annotations

import io
import re
from datetime import timedelta
from pathlib import Path

import pytest
import torch.nn.functional as F

pytest.importorskip("hydra")  # the GLUE app's tests need the [app] extra

from lightning_deltasam.glue.progress import PlainProgress, StepProgressBar

from .test_app import Tiny, loader, trainer


class FakeClock:
    """Seconds that only move when a step or a validation says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Timed(Tiny):
    """Each training step 'takes' ``seconds(step)``, each validation ``validation`` seconds."""

    def __init__(self, clock: FakeClock, seconds, validation: float = 0.0) -> None:
        super().__init__()
        self.clock, self.seconds, self.validation = clock, seconds, validation

    def training_step(self, batch, batch_idx):
        self.clock.now += self.seconds(self.global_step + 1)
        return super().training_step(batch, batch_idx)

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        if not self.trainer.sanity_checking:
            self.clock.now += self.validation


def fields(line: str) -> dict[str, str]:
    parts = line.split(" | ")
    return {
        "step": parts[0].split()[1].split("/")[0],
        **{p.split(" ", 1)[0]: p.split(" ", 1)[1] for p in parts[1:]},
        "s/step": parts[3].split()[0],
    }


def lines(capsys: pytest.CaptureFixture) -> list[dict[str, str]]:
    return [fields(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]


def test_rate_and_eta_follow_a_change_of_speed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """4 s a step for 20 steps, then 0.5 s: two lines later s/step and the ETA are the new speed's (the average
    since the start, 1.75 s at step 32, was what the ETA used to divide by)."""
    clock = FakeClock()
    t = trainer(
        tmp_path, [PlainProgress(every_n_steps=4, clock=clock)], max_steps=40, max_epochs=-1, limit_val_batches=0
    )
    t.fit(Timed(clock, lambda step: 4.0 if step <= 20 else 0.5), loader(4))
    shown = lines(capsys)
    assert [int(s["step"]) for s in shown] == [1, *range(4, 41, 4)]  # a first line at the first step
    by_step = {int(s["step"]): s for s in shown}
    assert by_step[1]["s/step"] == "4.00" and by_step[1]["elapsed"] == "0:00:04" and by_step[1]["ETA"] == "0:02:36"
    assert by_step[20]["s/step"] == "4.00" and by_step[20]["ETA"] == "0:01:20"
    assert by_step[24]["s/step"] == "2.60"  # the window (steps 15-24) still holds 6 slow steps: (6 * 4 + 4 * 0.5) / 10
    for step in (32, 36):  # from two lines after the change: the new speed
        assert by_step[step]["s/step"] == "0.50" and by_step[step]["ETA"] == f"0:00:{(40 - step) // 2:02d}"
    assert by_step[40]["ETA"] == "0:00:00" and by_step[40]["elapsed"] == "0:01:30"  # 20 * 4 + 20 * 0.5


def test_eta_counts_validations_but_the_rate_does_not(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """1 s a step and a 10 s validation every 5 steps: s/step stays 1.00; the ETA adds the validation passes still
    to come at their measured time (the line at a step comes before that step's validation)."""
    clock = FakeClock()
    t = trainer(
        tmp_path,
        [PlainProgress(every_n_steps=5, clock=clock)],
        max_steps=20,
        max_epochs=-1,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
    )
    t.fit(Timed(clock, lambda step: 1.0, validation=10.0), loader(4), loader(1))
    by_step = {int(s["step"]): s for s in lines(capsys)}
    assert all(s["s/step"] == "1.00" for s in by_step.values())
    assert by_step[5]["ETA"] == "0:00:15"  # no validation measured yet (and no sanity check): 15 steps of 1 s
    assert by_step[10]["ETA"] == "0:00:40"  # 10 steps of 1 s + the validations at 10, 15 and 20 of 10 s
    assert by_step[15]["ETA"] == "0:00:25"  # 5 s + 2 validations
    assert by_step[20]["ETA"] == "0:00:10"  # the last step: its validation is still to come


class Steady(Tiny):
    """The first training step 'takes' ``first`` seconds (one-off costs), the others ``seconds``; each validation
    batch ``per_batch`` seconds (sanity check included)."""

    def __init__(self, clock: FakeClock, first: float, seconds: float, per_batch: float) -> None:
        super().__init__()
        self.clock, self.first, self.seconds, self.per_batch = clock, first, seconds, per_batch
        self.started = 0

    def on_train_start(self) -> None:
        self.started = self.clock.now

    def training_step(self, batch, batch_idx):
        self.clock.now += self.first if self.global_step == 0 else self.seconds
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.clock.now += self.per_batch
        return super().validation_step(batch, batch_idx)


@pytest.mark.parametrize(
    "schedule",
    [
        {"max_steps": 20, "max_epochs": -1, "val_check_interval": 5, "check_val_every_n_epoch": None},
        {"max_steps": -1, "max_epochs": 5, "val_check_interval": 1.0, "check_val_every_n_epoch": 2},
        {"max_steps": 14, "max_epochs": -1, "val_check_interval": 2, "check_val_every_n_epoch": 1},
    ],
    ids=["every-5-batches", "every-2nd-epoch", "twice-an-epoch"],
)
def test_eta_is_the_time_left_when_speeds_are_steady(
    schedule: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A slow first step (10 s, then 1 s a step), validations of 4 batches at 2 s each, and the final validation the
    app runs after fit: from the second step on each line's ETA is the time the run really had left. The rate
    leaves the first step out; the passes to come, the periodic ones and the final one, are priced from the
    sanity check's 2 batches until a validation is measured."""
    clock = FakeClock()
    module = Steady(clock, first=10.0, seconds=1.0, per_batch=2.0)
    progress = PlainProgress(every_n_steps=1, clock=clock, final_validation=True)
    t = trainer(tmp_path, [progress], num_sanity_val_steps=2, limit_val_batches=4, **schedule)
    t.fit(module, loader(8), loader(4))
    t.validate(module, loader(4), verbose=False)  # as the app does after fit
    end = clock.now - module.started
    shown = lines(capsys)
    assert len(shown) == t.global_step and module.validations > 2
    assert shown[0]["s/step"] == "10.00"
    for line in shown[1:]:
        h, m, s = (int(x) for x in line["elapsed"].split(":"))
        assert line["ETA"] == str(timedelta(seconds=int(end - (3600 * h + 60 * m + s)))), line
        assert line["s/step"] == "1.00"


def test_the_old_estimate_was_short_by_the_validations_to_come(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """What the review saw (an early ETA 18% short): at step 5 of 20, with validation passes as long as 5 steps each
    at 5, 10, 15, 20 and after fit, the time left is 15 + 5 x 8 = 55 s; the ETA says so, not 15 s or less."""
    clock = FakeClock()
    t = trainer(
        tmp_path,
        [PlainProgress(every_n_steps=5, clock=clock, final_validation=True)],
        max_steps=20,
        max_epochs=-1,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=2,
        limit_val_batches=4,
    )
    t.fit(Steady(clock, first=1.0, seconds=1.0, per_batch=2.0), loader(8), loader(4))
    by_step = {int(s["step"]): s for s in lines(capsys)}
    assert by_step[5]["ETA"] == "0:00:55"


# --------------------------------------------------------------------------- the bar in an 80-column terminal
class Metered(Tiny):
    """Shows train/loss, val/acc and val/loss on the bar, as the app's classifier does (and more)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log_dict({"val/acc": 0.8394, "val/loss": 0.3762, "val/f1": 0.8123}, prog_bar=True)


def test_an_80_column_bar_keeps_its_remaining_time(tmp_path: Path) -> None:
    """Once val/acc joins the bar, an 80-column terminal shows one line that still ends its counts with
    ``elapsed • remaining``; the metrics that do not fit are dropped whole, from the last."""
    from rich.console import Console

    clock = FakeClock()
    bar = StepProgressBar(clock=clock, console_kwargs={"width": 80, "file": io.StringIO(), "force_terminal": True})
    t = trainer(tmp_path, [bar], max_steps=6, max_epochs=-1, val_check_interval=3, limit_val_batches=1)
    t.fit(Metered(), loader(8), loader(1))
    task = bar.progress.tasks[bar.train_progress_bar_id]
    console = Console(width=80, record=True, file=io.StringIO(), force_terminal=False)
    console.print(bar.progress.make_tasks_table([task]))
    shown = console.export_text().rstrip("\n").splitlines()
    assert len(shown) == 1, shown
    line = shown[0]
    assert len(line.rstrip()) <= 80 and "6/6" in line
    assert re.search(r"6/6 \d:\d\d:\d\d • \d:\d\d:\d\d val/acc: 0\.839 ", line), line  # time, then val/acc
    metrics = line.split(" • ", 1)[1].split()[1:]
    assert all(k.endswith(":") for k in metrics[::2]) and len(metrics) % 2 == 0, line  # whole ones, never cut
    wide = Console(width=160, record=True, file=io.StringIO(), force_terminal=False)
    wide.print(bar.progress.make_tasks_table([task]))
    assert "val/f1: 0.812 train/loss: " in wide.export_text()  # the rest where there is room
