"""The ``classifier`` config group: ``GlueClassifier``, a sentence (pair) classifier / regressor trained with SAM
or delta-SAM through the mixin. ``conf/classifier/glue.yaml`` builds it with ``_target_``; the app passes the
encoder (``model`` group), the task (``task`` group) and the ``optimizer`` group's options."""

from __future__ import annotations

import math
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torchmetrics import MetricCollection

from ..config import SAMConfig
from ..mixin import DeltaSAMMixin
from ..options import check_number
from .models import TextEncoder
from .tasks import TextTask


class GlueClassifier(DeltaSAMMixin, L.LightningModule):
    """Encoder + dropout + linear head; per-sample cross entropy (or MSE for regression tasks).

    ``lr``/``weight_decay`` configure AdamW, ``warmup_ratio`` its linear warmup and decay; the clipping and
    accumulation keywords go to :class:`DeltaSAMMixin`, every other keyword (``rho``, ``variant``, ``reweight``,
    ...) is a :class:`SAMConfig` option (``SAMConfig.from_dict``), and the mixin's ``training_step`` runs that
    step over :meth:`per_sample_loss`.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        task: TextTask,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        head_dropout: float = 0.1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        accumulate_grad_batches: int = 1,
        **sam: Any,
    ) -> None:
        super().__init__(
            sam=SAMConfig.from_dict(sam),
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,  # type: ignore[arg-type]
            accumulate_grad_batches=accumulate_grad_batches,
        )
        check_number("optimizer.lr", lr, minimum=0.0, strict=True)
        check_number("optimizer.weight_decay", weight_decay, minimum=0.0)
        check_number("classifier.warmup_ratio", warmup_ratio, minimum=0.0, below=1.0)
        check_number("classifier.head_dropout", head_dropout, minimum=0.0, below=1.0)
        self.save_hyperparameters(ignore=["encoder", "task"])
        self.hparams.update(task=task.name, encoder=type(encoder).__name__)  # recorded in checkpoints
        self.task = task
        self.encoder = encoder
        self.dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(encoder.hidden_size, task.num_outputs)
        self.val_metrics = nn.ModuleList(task.build_metrics(name) for name in task.val_names)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits [B, C] (or scores [B, 1] for regression) of a tokenized batch."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.head(self.dropout(self.encoder(**inputs)))

    def per_sample_loss(self, batch: dict[str, Tensor]) -> Tensor | tuple[Tensor, Tensor]:
        """Loss of each example [B]: what SAM perturbs against and delta-SAM reweights; with the logits when the
        variant reads the outputs (MESA)."""
        if self.deltasam_config.variant.needs_outputs:
            logits = self.head(self.per_sample_features(batch))
            return self._losses(logits, batch["labels"]), logits
        return self.per_sample_loss_from_features(self.per_sample_features(batch), batch)

    # The split for probe_scope="head": delta-SAM's probes perturb the linear head only, on the
    # pooled (dropped-out) features of the first pass, instead of re-running the encoder.
    def per_sample_features(self, batch: dict[str, Tensor]) -> Tensor:
        """Dropped-out pooled encoder features [B, H]: everything below the probed head."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.dropout(self.encoder(**inputs))

    def per_sample_loss_from_features(self, features: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The head and the per-example loss on given features."""
        return self._losses(self.head(features), batch["labels"])

    def probe_head(self) -> nn.Module:
        """The layers head-only probes perturb."""
        return self.head

    def _losses(self, outputs: Tensor, labels: Tensor) -> Tensor:
        if self.task.regression:
            return F.mse_loss(outputs.squeeze(-1), labels, reduction="none")
        return F.cross_entropy(outputs, labels, reduction="none")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Update the split's metrics; Lightning computes, syncs and logs them at epoch end."""
        outputs = self(batch)
        labels = batch["labels"]
        preds = outputs.squeeze(-1) if self.task.regression else outputs.argmax(-1)
        metrics = cast(MetricCollection, self.val_metrics[dataloader_idx])
        metrics.update(preds, labels)
        name = self.task.val_names[dataloader_idx]
        size = labels.shape[0]
        self.log(
            f"{name}/loss",
            self._losses(outputs, labels).mean(),
            batch_size=size,
            add_dataloader_idx=False,
            sync_dist=True,
        )
        self.log_dict(metrics, batch_size=size, add_dataloader_idx=False, prog_bar=dataloader_idx == 0)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """AdamW (no decay on biases and LayerNorm weights) with linear warmup then linear decay per step."""
        from transformers import get_linear_schedule_with_warmup

        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams["lr"],
        )
        total = self.trainer.estimated_stepping_batches
        if self.trainer.max_steps == -1 and math.isfinite(total):  # the mixin accumulates: fewer optimizer steps
            total = math.ceil(total / self.accumulate_grad_batches)
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                f"the number of training steps is {total}; set trainer.max_steps or trainer.max_epochs "
                "so the learning-rate schedule has an end."
            )
        scheduler = get_linear_schedule_with_warmup(
            optimizer, num_warmup_steps=int(self.hparams["warmup_ratio"] * total), num_training_steps=int(total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
