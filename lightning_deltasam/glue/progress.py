"""Progress that shows the real budget: optimizer steps done out of the run's total (``trainer.max_steps``,
or the steps of ``trainer.max_epochs`` epochs), with a time estimate for the whole run (:class:`RemainingTime`).

In a terminal, :class:`StepProgressBar` (Lightning's ``RichProgressBar``) draws one bar for the run;
otherwise (output to a file or a pipe) :class:`PlainProgress` prints a plain line every N steps.
:func:`progress_bar` picks one (``callbacks.progress`` in ``conf/callbacks/default.yaml``).
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from typing_extensions import override


def _accumulation(trainer: L.Trainer, module: L.LightningModule | None) -> int:
    """Training batches per optimizer step (the mixin's accumulation or Lightning's)."""
    return max(int(getattr(module, "accumulate_grad_batches", 1) or 1), int(trainer.accumulate_grad_batches))


def step_budget(trainer: L.Trainer, module: L.LightningModule | None = None) -> int:
    """Optimizer steps the run will take: ``max_steps``, or fewer when ``max_epochs`` ends it first."""
    batches = trainer.num_training_batches
    accumulate = _accumulation(trainer, module)
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
    accumulate = _accumulation(trainer, module)
    return max(1, math.ceil(step_budget(trainer, module) / math.ceil(batches / accumulate)))


def validations_left(trainer: L.Trainer, module: L.LightningModule | None = None) -> int | None:
    """Validation passes still to come in this fit, from inside ``on_train_batch_end``: the one the current batch
    is due to end with counts. Lightning's schedule (``val_check_interval`` as a number of batches, across epochs
    or within each ``check_val_every_n_epoch``-th epoch) over the batches of the remaining step budget.
    ``None``: a schedule this cannot count (a time interval, a data set without a length)."""
    if not trainer.enable_validation:
        return 0
    every = trainer.val_check_batch
    if getattr(trainer, "_val_check_time_interval", None) is not None or every is None or not math.isfinite(every):
        return None
    every = max(1, int(every))
    loop = trainer.fit_loop.epoch_loop
    batches = max(0, step_budget(trainer, module) - trainer.global_step) * _accumulation(trainer, module) + 1
    n_epochs = trainer.check_val_every_n_epoch
    if n_epochs is None:  # every `every` batches, counted across epochs
        first = loop.total_batch_idx
        return (first + batches) // every - first // every
    per_epoch = trainer.num_training_batches
    if not math.isfinite(per_epoch) or per_epoch <= 0:
        return None
    count, epoch, first = 0, trainer.current_epoch, loop.batch_idx
    while batches > 0:  # batch indices restart at each epoch; only every n_epochs-th epoch validates
        take = min(int(per_epoch) - first, batches)
        if take <= 0:
            break
        if (epoch + 1) % n_epochs == 0:
            count += (first + take) // every - first // every
        batches -= take
        epoch, first = epoch + 1, 0
    return count


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(round(seconds)))) if math.isfinite(seconds) else "?"


def _finite_sum(values: Any) -> float:
    return float(sum(v for v in values if math.isfinite(v)))


class RemainingTime:
    """The time a fit has left, as both progress displays show it::

        remaining = steps left x training seconds per step  +  validation passes left x seconds per pass

    * **seconds per step**: over the last ``window`` steps, so the estimate follows a change of speed (another
      job on the machine); the fit's first step leaves the rate once later steps exist, as it carries one-off
      costs (the data loader's start, lazy initialization, allocator warm-up) that no later step repeats;
      validation time is never in it.
    * **passes left**: :func:`validations_left`, plus the final validation the app runs after fit when
      ``final_validation``.
    * **seconds per pass**: the mean of this fit's validations; before the first one, the sanity check's seconds
      per batch times the batches of a full pass; 0 with neither (no sanity check: the estimate rises at the first
      validation). A schedule :func:`validations_left` cannot count falls back to the validation seconds per
      training step so far.

    With steady speeds the estimate is exact from the second step on (``tests/test_progress.py``). ``clock``: the
    time source in seconds (tests pass a fake one).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, final_validation: bool = False) -> None:
        self.clock = clock
        self.final_validation = final_validation
        self.start: float | None = None
        self.first_step = 0
        self._sanity_since: float | None = None
        self._sanity_batch_seconds: float | None = None
        self._validating_since: float | None = None
        self.validation_seconds = 0.0
        self.validations = 0
        self._recent: deque[tuple[float, int]] = deque()  # (training seconds so far, step) over the window
        self._estimate: tuple[float, float] | None = None  # (remaining seconds, clock when estimated)

    # the hooks, called by the progress callback
    def sanity_start(self) -> None:
        self._sanity_since = self.clock()

    def sanity_end(self, trainer: L.Trainer) -> None:
        batches = _finite_sum(trainer.num_sanity_val_batches)
        if self._sanity_since is not None and batches > 0:
            self._sanity_batch_seconds = (self.clock() - self._sanity_since) / batches
        self._sanity_since = None

    def train_start(self, trainer: L.Trainer) -> None:
        self.start, self.first_step = self.clock(), trainer.global_step
        self.validation_seconds, self.validations = 0.0, 0
        self._recent = deque([(0.0, trainer.global_step)])
        self._estimate = None

    def validation_start(self, trainer: L.Trainer) -> None:
        if self.start is not None and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._validating_since = self.clock()

    def validation_end(self) -> None:
        if self._validating_since is not None:
            self.validation_seconds += self.clock() - self._validating_since
            self.validations += 1
            self._validating_since = None

    def step(self, trainer: L.Trainer, module: L.LightningModule, window: int) -> tuple[float, float]:
        """At a training batch's end: (training seconds per step, remaining seconds); nan where unknown."""
        assert self.start is not None, "train_start() first"
        now, step = self.clock(), trainer.global_step
        per_step = self._record(now - self.start - self.validation_seconds, step, window)
        steps_left = max(0, step_budget(trainer, module) - step)
        passes = validations_left(trainer, module)
        if passes is None:  # an uncountable schedule: validation seconds per training step so far
            done = step - self.first_step
            validating = steps_left * self.validation_seconds / done if done > 0 else 0.0
        else:
            validating = (passes + int(self.final_validation)) * self.seconds_per_validation(trainer)
        remaining = steps_left * per_step + validating if steps_left else validating
        self._estimate = (remaining, now)
        return per_step, remaining

    def seconds_per_validation(self, trainer: L.Trainer) -> float:
        if self.validations:
            return self.validation_seconds / self.validations
        if self._sanity_batch_seconds is not None:
            return self._sanity_batch_seconds * _finite_sum(trainer.num_val_batches)
        return 0.0

    def remaining(self) -> float | None:
        """The latest estimate, counted down since it was made (``None``: none yet)."""
        if self._estimate is None:
            return None
        remaining, at = self._estimate
        return max(0.0, remaining - (self.clock() - at)) if math.isfinite(remaining) else None

    def elapsed(self) -> float | None:
        return None if self.start is None else self.clock() - self.start

    def _record(self, training_seconds: float, step: int, window: int) -> float:
        """Add (training seconds, step); the training seconds per step over the last ``window`` steps (nan: none)."""
        if self._recent and self._recent[-1][1] == step:  # a batch without an optimizer step (accumulation)
            self._recent.pop()
        self._recent.append((training_seconds, step))
        if len(self._recent) > 2 and self._recent[0][1] == self.first_step:
            self._recent.popleft()  # the first step's one-off costs out of the rate, once other steps exist
        while len(self._recent) > 2 and self._recent[1][1] <= step - window:
            self._recent.popleft()
        (t0, s0), (t1, s1) = self._recent[0], self._recent[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 else float("nan")


# --------------------------------------------------------------------------- the bar, in a terminal
def _rich_columns(bar: StepProgressBar, trainer: L.Trainer) -> list[Any]:
    """Lightning's columns but its it/s, with the run's remaining time, none of them wrapping: in a narrow terminal
    only the metrics (the last column, added by Lightning) give up width, whole ones at a time."""
    from lightning.pytorch.callbacks.progress.rich_progress import (
        CustomBarColumn,
        CustomTimeColumn,
        ProcessingSpeedColumn,
    )
    from rich.table import Column
    from rich.text import Text

    class RunTimeColumn(CustomTimeColumn):
        """``elapsed • remaining``: for the run's bar, :class:`RemainingTime`'s estimate; rich's own otherwise."""

        def render(self, task: Any) -> Text:
            if task.id != bar.train_progress_bar_id or bar.timer.elapsed() is None:
                return super().render(task)
            elapsed, remaining = bar.timer.elapsed(), bar.timer.remaining()
            shown = "-:--:--" if remaining is None else _clock(remaining)
            return Text(f"{_clock(elapsed or 0.0)} • {shown}", style=self.style)

    columns = []
    for column in RichProgressBar.configure_columns(bar, trainer):
        if isinstance(column, ProcessingSpeedColumn):
            continue  # the remaining time says more; its width goes to the metrics
        if isinstance(column, CustomTimeColumn):
            column = RunTimeColumn(style=bar.theme.time)
        if isinstance(column, CustomBarColumn):
            column.bar_width = BAR_WIDTH
        column._table_column = Column(no_wrap=True)  # rich's ProgressColumn(table_column=...), which these lack
        columns.append(column)
    return columns


#: The bar's width in a terminal (Lightning's default is 40): room for the metrics in 80 columns.
BAR_WIDTH = 20


class _Fitting:
    """Rich renderable: the metric texts that fit the cell, whole ones in order; the rest dropped."""

    def __init__(self, texts: list[str], delimiter: str, style: Any) -> None:
        self.texts, self.delimiter, self.style = texts, delimiter, style

    def __rich_console__(self, console: Any, options: Any) -> Iterator[Any]:
        from rich.cells import cell_len
        from rich.text import Text

        shown = ""
        for text in self.texts:
            longer = f"{shown}{self.delimiter}{text}" if shown else text
            if cell_len(longer) > options.max_width:
                break
            shown = longer
        yield Text(shown, style=self.style, no_wrap=True, overflow="crop")

    def __rich_measure__(self, console: Any, options: Any) -> Any:
        from rich.cells import cell_len
        from rich.measure import Measurement

        return Measurement(0, min(options.max_width, cell_len(self.delimiter.join(self.texts))))


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar counting optimizer steps toward the run's budget, ``Epoch e/E`` with E the real
    number of epochs (1-based); its remaining time is :class:`RemainingTime`'s for the rest of the run. The
    metrics follow, validation ones first; in a narrow terminal those that do not fit are dropped (whole ones,
    from the last), never the time.
    ``window``: the steps the rate is measured over (default: a tenth of the budget, at least 10)."""

    def __init__(
        self,
        *args: Any,
        window: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
        final_validation: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.window = window
        self.timer = RemainingTime(clock, final_validation)

    def configure_columns(self, trainer: L.Trainer) -> list:
        return _rich_columns(self, trainer)

    def _init_progress(self, trainer: L.Trainer) -> None:
        fresh = self.is_enabled and (self.progress is None or self._progress_stopped)
        super()._init_progress(trainer)
        if fresh and self.progress is not None and self._metric_component is not None:
            from rich.table import Column

            metrics = _fitting_metrics(self._metric_component)
            metrics._table_column = Column(no_wrap=False, overflow="crop")  # the column that gives up width
            self.progress.columns = (*self.progress.columns[:-1], metrics)
            self._metric_component = metrics

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's version: the run directory already says it
        # validation metrics first: in a narrow terminal the last are dropped, and val/acc is what the run is for
        return dict(sorted(items.items(), key=lambda item: not str(item[0]).startswith("val")))

    def _get_train_description(self, current_epoch: int) -> str:
        total = epoch_budget(self.trainer, self.trainer.lightning_module)
        text = f"Epoch {current_epoch + 1}/{total}"
        return f"{text:{len(self.validation_description)}}"

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_sanity_check_start(trainer, pl_module)
        self.timer.sanity_start()

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.timer.sanity_end(trainer)
        super().on_sanity_check_end(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.timer.train_start(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self.timer.validation_start(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.timer.validation_end()
        super().on_validation_end(trainer, pl_module)

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
        if self.timer.start is not None:
            self.timer.step(trainer, pl_module, self.window or max(10, step_budget(trainer, pl_module) // 10))
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def _fitting_metrics(column: Any) -> Any:
    """Lightning's metrics column, rebuilt so that its text keeps to the width it is given (:class:`_Fitting`)."""
    from lightning.pytorch.callbacks.progress.rich_progress import MetricsTextColumn
    from rich.text import Text

    class FittingMetrics(MetricsTextColumn):
        def render(self, task: Any) -> Any:
            text = super().render(task)  # Lightning's bookkeeping of the current task
            if not isinstance(text, Text) or not text.plain or task.id != self._current_task_id:
                return text
            return _Fitting(list(self._generate_metrics_texts()), self._text_delimiter, self._style)

    return FittingMetrics(column._trainer, column._style, column._text_delimiter, column._metrics_format)


# --------------------------------------------------------------------------- plain lines, elsewhere
class PlainProgress(ProgressBar):
    """One plain line at the first step, every ``every_n_steps`` optimizer steps and at the last: step, loss, rate,
    elapsed, ETA. For output that is not a terminal (a log file, CI).

    ``every_n_steps=None``: about 20 lines per run. s/step is the training time per step over the last ``window``
    steps (default: two lines' worth, at least 10), so it follows a change of speed (a slow first step, another job
    on the machine) within a line or two; the ETA is :class:`RemainingTime`'s: the steps left at that rate plus
    the validation passes still to come (``final_validation``: and the app's final one). ``clock``: the time
    source in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        window: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
        final_validation: bool = False,
    ) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self.window = window
        self.timer = RemainingTime(clock, final_validation)
        self._enabled = True
        self._last_printed = -1

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @override
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.timer.sanity_start()

    @override
    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.timer.sanity_end(trainer)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.timer.train_start(trainer)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.timer.validation_start(trainer)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._enabled or not trainer.is_global_zero or self.timer.start is None:
            return
        step, total = trainer.global_step, step_budget(trainer, pl_module)
        every = self.every_n_steps or max(1, round(total / 20))
        seconds_per_step, eta = self.timer.step(trainer, pl_module, self.window or max(10, 2 * every))
        if step == self._last_printed or (step % every and step < total and step != self.timer.first_step + 1):
            return
        self._last_printed = step
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"step {step}/{total}", f"epoch {trainer.current_epoch + 1}/{epoch_budget(trainer, pl_module)}"]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"{seconds_per_step:.2f} s/step" if math.isfinite(seconds_per_step) else "- s/step")
        parts += [f"elapsed {_clock(self.timer.elapsed() or 0.0)}", f"ETA {_clock(eta)}"]
        print(" | ".join(parts), flush=True)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.timer.validation_end()
        if not self._enabled or not trainer.is_global_zero or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        if shown:
            print(
                f"validation at step {trainer.global_step}: "
                + ", ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items())),
                flush=True,
            )


def progress_bar(
    terminal: bool | None = None, every_n_steps: int | None = None, final_validation: bool = True
) -> ProgressBar:
    """The bar for a terminal (``terminal=None``: when stdout is one, and rich is installed), else plain lines every
    ``every_n_steps``. ``final_validation``: the run validates once more after fit (the app does), which the
    remaining time includes."""
    if terminal is None:
        from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

        terminal = sys.stdout.isatty() and bool(_RICH_AVAILABLE)
    if terminal:
        return StepProgressBar(final_validation=final_validation)
    return PlainProgress(every_n_steps, final_validation=final_validation)
