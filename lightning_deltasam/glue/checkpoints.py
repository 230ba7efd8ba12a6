"""Checkpoints of the app's runs.

:class:`RunCheckpoint`: a ``ModelCheckpoint`` that keeps one file when it can: ``last.ckpt`` is a symbolic link to
the best checkpoint while the best is the latest state, and a file of its own only once training has moved past the
best. It is also always the latest state (after every validation and at the end of training).

:class:`ExactResume`: what a checkpoint needs beyond Lightning's own for a resumed run to equal the uninterrupted one.
"""

from __future__ import annotations

import os
import random
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from typing_extensions import override

RNG_KEY = "rng_states"


class RunCheckpoint(ModelCheckpoint):
    """``save_last=True`` without a second copy of the same weights.

    Lightning's ``save_last="link"`` links ``last.ckpt`` to whichever file it saved last, even when that is an
    older best: here the link is made only when the best was saved at this very step; otherwise ``last.ckpt``
    is written as a file (replacing a link, never writing through it).
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._ensure_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._ensure_last(trainer)

    def _ensure_last(self, trainer: L.Trainer) -> None:
        """Lightning (2.6) writes ``last.ckpt`` only at steps where it saved a top-k file: keep it current."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if not self.save_last:
            return
        filepath = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        best_now = (
            self.save_top_k != 0
            and self._last_global_step_saved == trainer.global_step
            and self._last_checkpoint_saved
            and os.path.abspath(self._last_checkpoint_saved) != os.path.abspath(filepath)
            and self._last_checkpoint_saved == self.best_model_path
        )
        self.last_model_path = filepath
        if best_now:
            self._link_checkpoint(trainer, self._last_checkpoint_saved, filepath)
            return
        if trainer.is_global_zero and os.path.islink(filepath):
            os.remove(filepath)
        trainer.strategy.barrier("RunCheckpoint.unlink_last")
        self._save_checkpoint(trainer, filepath)


class ExactResume(Callback):
    """Makes a run resumed from any of its checkpoints continue as if never stopped (the app always adds it).

    * The random number generators (torch's, CUDA's, Python's, NumPy's: dropout) are saved in the checkpoint and
      restored when training starts again.
    * The train loader's position (:class:`~.data.ResumableDataLoader`, saved by Lightning with the fit loop) is
      loaded before the first batch. Lightning (2.6) loads it only when it creates the train loader, which
      ``configure_optimizers`` already did (for ``trainer.estimated_stepping_batches``) before the checkpoint was
      read, and not at all after a complete epoch of epoch-based training (the next epoch then repeated the first
      one's order instead of drawing its own).
    * The loop counters of a fit that stopped (``max_steps``, ``should_stop``) are set as :func:`reopen_stopped_epoch`
      says, on saving and on loading (older checkpoints): resuming a stop inside an epoch started the next epoch
      with the rest of the stopped one (progress showed ``epoch 2/1``, and ``max_epochs`` ended runs early).
      Lightning's ``on_train_epoch_end`` hooks still ran at the stop (epoch-interval schedulers, epoch metrics).
    """

    def __init__(self) -> None:
        self._rng: dict[str, Any] | None = None
        self._loader_states: list[dict[str, Any]] = []

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = rng_states()
        reopen_stopped_epoch(checkpoint)

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        reopen_stopped_epoch(checkpoint)  # before Lightning restores its loops from it
        self._rng = checkpoint.get(RNG_KEY)
        self._loader_states = list(_fit_loop_state(checkpoint).get("state_dict", {}).get("combined_loader", []))

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        states, self._loader_states = self._loader_states, []
        if states:  # loading twice is harmless: no batch has been drawn yet
            loaders = [dl for dl in _leaves(trainer.train_dataloader) if callable(getattr(dl, "load_state_dict", None))]
            if len(loaders) != len(states):
                raise RuntimeError(
                    f"the checkpoint has the positions of {len(states)} train loaders, but this run "
                    f"has {len(loaders)} resumable ones; resume with the same data settings."
                )
            for loader, state in zip(loaders, states):
                loader.load_state_dict(state)
        if self._rng is not None:
            set_rng_states(self._rng)
            self._rng = None


def rng_states() -> dict[str, Any]:
    """The states of the generators training draws from (CUDA's only once CUDA is in use)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return states
    name, keys, position, has_gauss, gauss = cast(tuple[str, Any, int, int, float], np.random.get_state(legacy=True))
    states["numpy"] = (name, keys.tolist(), position, has_gauss, gauss)  # plain types: weights_only loading takes them
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore :func:`rng_states` (CUDA's when this process sees as many devices)."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in states:
        import numpy as np

        name, keys, position, has_gauss, gauss = states["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))


def reopen_stopped_epoch(checkpoint: dict[str, Any]) -> None:
    """Fix the loop counters of a ``checkpoint`` saved after the fit stopped, so resuming continues in step.

    Lightning (2.6) counts the epoch a fit stopped in as processed and completed. Stopped inside the epoch (its batch
    progress has batches left), the epoch is set back to started, not complete: the state Lightning saves at a
    validation inside an epoch, from which it resumes that epoch at the next batch. Stopped at the epoch's last
    batch, the epoch stays complete and the batch count is cleared for the next one (Lightning kept it, and a
    ``max_steps`` run resumed there ran its next epoch for one batch).
    """
    fit = _fit_loop_state(checkpoint)
    epochs, batches = fit.get("epoch_progress"), fit.get("epoch_loop.batch_progress")
    if not epochs or not batches:
        return
    counted_complete = all(
        p["completed"] >= 1 and len({p["ready"], p["started"], p["processed"], p["completed"]}) == 1
        for p in (epochs["total"], epochs["current"])
    )
    if not counted_complete or batches["current"]["completed"] == 0:
        return
    if batches["is_last_batch"]:  # the epoch did end: none of the next one's batches are done yet
        batches["current"] = {k: 0 for k in batches["current"]}
        batches["is_last_batch"] = False
        return
    for progress in (epochs["total"], epochs["current"]):
        progress["processed"] -= 1
        progress["completed"] -= 1
    checkpoint["epoch"] = epochs["current"]["completed"]


def _fit_loop_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return checkpoint.get("loops", {}).get("fit_loop", {})


def _leaves(loaders: Any) -> list[Any]:
    """The loaders in ``trainer.train_dataloader`` (one, or a list / dict of them)."""
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return [leaf for item in loaders for leaf in _leaves(item)]
    return [loaders]
