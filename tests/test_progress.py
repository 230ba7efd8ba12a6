"""Plain progress lines: a recent rate and a truthful ETA, on a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_deltasam.glue.progress import PlainProgress

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
    """1 s a step and a 10 s validation every 5 steps: s/step stays 1.00; the ETA adds the validations' seconds
    per step so far (the line at a step comes before that step's validation)."""
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
    assert by_step[5]["ETA"] == "0:00:15"  # no validation yet: 15 steps of 1 s
    assert by_step[10]["ETA"] == "0:00:20"  # 1 validation in 10 steps: (1 + 1) s a step, 10 steps left
    assert by_step[15]["ETA"] == "0:00:12"  # 2 in 15: (1 + 20 / 15) * 5 = 11.7 s
