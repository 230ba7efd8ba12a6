"""Progress that shows the real budget: optimizer steps done out of the run's total (``trainer.max_steps``,
or the steps of ``trainer.max_epochs`` epochs), with a time estimate for the whole run.

In a terminal, :class:`StepProgressBar` (Lightning's ``RichProgressBar``) draws one bar for the run;
otherwise (output to a file or a pipe) :class:`PlainProgress` prints a plain line every N steps.
:func:`progress_bar` picks one (``callbacks.progress`` in ``conf/callbacks/default.yaml``).
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from typing_extensions import override


def step_budget(trainer: L.Trainer, module: L.LightningModule | None = None) -> int:
    """Optimizer steps the run will take: ``max_steps``, or fewer when ``max_epochs`` ends it first."""
    batches = trainer.num_training_batches
    accumulate = max(int(getattr(module, "accumulate_grad_batches", 1) or 1), int(trainer.accumulate_grad_batches))
    epochs_total = None
    if trainer.max_epochs is not None and trainer.max_epochs >= 0 and math.isfinite(batches):
        epochs_total = trainer.max_epochs * math.ceil(batches / accumulate)
    steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else None
    if steps is None:
        return int(epochs_total) if epochs_total is not None else 0
    return int(min(steps, epochs_total)) if epochs_total is not None else int(steps)


def epoch_budget(trainer: L.Trainer, module: L.LightningModule | None = None) -> int:
    """Epochs the run will (at least partly) go through."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches <= 0:
        return int(trainer.max_epochs or 1)
    accumulate = max(int(getattr(module, "accumulate_grad_batches", 1) or 1), int(trainer.accumulate_grad_batches))
    return max(1, math.ceil(step_budget(trainer, module) / math.ceil(batches / accumulate)))


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(round(seconds)))) if math.isfinite(seconds) else "?"


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar counting optimizer steps toward the run's budget, ``Epoch e/E`` with E the real
    number of epochs (1-based); its time estimate is for the rest of the run."""

    def _get_train_description(self, current_epoch: int) -> str:
        total = epoch_budget(self.trainer, self.trainer.lightning_module)
        text = f"Epoch {current_epoch + 1}/{total}"
        return f"{text:{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled:
            return
        description = self._get_train_description(trainer.current_epoch)
        if self.progress is not None:
            if self.train_progress_bar_id is None:
                self.train_progress_bar_id = self.progress.add_task(
                    description, total=step_budget(trainer, pl_module), completed=trainer.global_step
                )
            else:  # one bar for the whole run: only the epoch in its description changes
                self.progress.update(self.train_progress_bar_id, description=description, visible=True)
        self.refresh()

    def _initialize_train_progress_bar_id(self) -> None:  # resumed mid-epoch
        assert self.progress is not None  # Lightning calls this only while the bar runs
        self.train_progress_bar_id = self.progress.add_task(
            self._get_train_description(self.trainer.current_epoch),
            total=step_budget(self.trainer, self.trainer.lightning_module),
            completed=self.trainer.global_step,
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


class PlainProgress(ProgressBar):
    """One plain line at the first step, every ``every_n_steps`` optimizer steps and at the last: step, loss, rate,
    elapsed, ETA. For output that is not a terminal (a log file, CI).

    ``every_n_steps=None``: about 20 lines per run. s/step is the training time per step over the last ``window``
    steps (default: two lines' worth, at least 10), so it follows a change of speed (a slow first step, another job
    on the machine) within a line or two; the ETA adds the validations' time per step so far. ``clock``: the
    time source in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        window: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self.window = window
        self.clock = clock
        self._enabled = True
        self._start: float | None = None
        self._first_step = 0
        self._last_printed = -1
        self._validating_since: float | None = None
        self._validation_seconds = 0.0
        self._recent: deque[tuple[float, int]] = deque()  # (training seconds so far, step), the window's steps

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._first_step = self.clock(), trainer.global_step
        self._validation_seconds = 0.0
        self._recent = deque([(0.0, trainer.global_step)])

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._validating_since = self.clock()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._enabled or not trainer.is_global_zero or self._start is None:
            return
        now, step, total = self.clock(), trainer.global_step, step_budget(trainer, pl_module)
        every = self.every_n_steps or max(1, round(total / 20))
        seconds_per_step = self._record(
            now - self._start - self._validation_seconds, step, self.window or max(10, 2 * every)
        )
        if step == self._last_printed or (step % every and step < total and step != self._first_step + 1):
            return
        self._last_printed = step
        done = step - self._first_step
        per_step = seconds_per_step + self._validation_seconds / done if done > 0 else float("nan")
        eta = (total - step) * per_step
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"step {step}/{total}", f"epoch {trainer.current_epoch + 1}/{epoch_budget(trainer, pl_module)}"]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"{seconds_per_step:.2f} s/step" if math.isfinite(seconds_per_step) else "- s/step")
        parts += [f"elapsed {_clock(now - self._start)}", f"ETA {_clock(eta)}"]
        print(" | ".join(parts), flush=True)

    def _record(self, training_seconds: float, step: int, window: int) -> float:
        """Add (training seconds, step); the training seconds per step over the last ``window`` steps (nan: none)."""
        if self._recent and self._recent[-1][1] == step:  # a batch without an optimizer step (accumulation)
            self._recent.pop()
        self._recent.append((training_seconds, step))
        while len(self._recent) > 2 and self._recent[1][1] <= step - window:
            self._recent.popleft()
        (t0, s0), (t1, s1) = self._recent[0], self._recent[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 else float("nan")

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validating_since is not None:
            self._validation_seconds += self.clock() - self._validating_since
            self._validating_since = None
        if not self._enabled or not trainer.is_global_zero or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        if shown:
            print(
                f"validation at step {trainer.global_step}: "
                + ", ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items())),
                flush=True,
            )


def progress_bar(terminal: bool | None = None, every_n_steps: int | None = None) -> ProgressBar:
    """The bar for a terminal (``terminal=None``: when stdout is one), else plain lines every ``every_n_steps``."""
    if terminal is None:
        terminal = sys.stdout.isatty()
    return StepProgressBar() if terminal else PlainProgress(every_n_steps)
