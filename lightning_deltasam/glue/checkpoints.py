"""``ModelCheckpoint`` that keeps one file when it can: ``last.ckpt`` is a symbolic link to the best checkpoint
while the best is the latest state, and a file of its own only once training has moved past the best.
It is also always the latest state (after every validation and at the end of training)."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


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
            self.save_top_k != 0 and self._last_global_step_saved == trainer.global_step
            and self._last_checkpoint_saved and os.path.abspath(self._last_checkpoint_saved) != os.path.abspath(filepath)
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
