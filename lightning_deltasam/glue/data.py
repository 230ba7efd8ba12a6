"""The LightningDataModule of the ``data`` config group: dataloaders for a :class:`~.tasks.TextTask`."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Union

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning.pytorch.utilities import rank_zero_info

from ..config import check_int, check_number
from .tasks import Split, TextTask


class TextDataset(Dataset):
    """Indexable view of a :class:`Split` (optionally a subset of its rows)."""

    def __init__(self, split: Split, indices: Optional[Sequence[int]] = None) -> None:
        self.split = split
        self.indices = list(range(len(split))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[tuple[str, ...], Union[int, float]]:
        j = self.indices[i]
        return self.split.texts[j], self.split.labels[j]


class Collator:
    """Tokenizes a list of examples, padding to the longest in the batch and truncating at ``max_length``."""

    def __init__(self, tokenizer: Any, max_length: int, regression: bool) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.regression = regression

    def __call__(self, rows: Sequence[tuple[tuple[str, ...], Union[int, float]]]) -> dict[str, Tensor]:
        texts, labels = zip(*rows)
        columns = list(zip(*texts))  # one list per text column
        batch = dict(
            self.tokenizer(
                *columns, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if self.regression else torch.long)
        return batch


class GlueDataModule(L.LightningDataModule):
    """Train/validation dataloaders for a :class:`TextTask` with per-batch dynamic padding and seeded order.

    ``limit_train`` keeps a seeded random subset of the train split (quick runs); the train order is
    shuffled by a generator seeded with ``seed`` so identical seeds give identical batches.
    ``label_noise=p`` flips a seeded random share p of the training labels (after ``limit_train``) to another
    class, drawn uniformly among the others; validation splits and the data order are untouched.
    """

    def __init__(
        self,
        task: TextTask,
        tokenizer: Any = None,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        max_length: int = 64,
        limit_train: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
        label_noise: float = 0.0,
    ) -> None:
        super().__init__()
        check_int("data.batch_size", batch_size, minimum=1)
        check_int("data.max_length", max_length, minimum=1)
        if eval_batch_size is not None:
            check_int("data.eval_batch_size", eval_batch_size, minimum=1)
        if limit_train is not None:
            check_int("data.limit_train", limit_train, minimum=1, hint=" Use null for the whole train split.")
        check_int("data.num_workers", num_workers, minimum=0)
        check_number("data.label_noise", label_noise, minimum=0.0, below=1.0)
        if label_noise > 0 and task.regression:
            raise ValueError(
                f"data.label_noise={label_noise} flips class labels, but task {task.name!r} is a regression task "
                "(task.regression=true); use it with a classification task, or data.label_noise=0."
            )
        self.task = task
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.max_length = max_length
        self.limit_train = limit_train
        self.num_workers = num_workers
        self.seed = seed
        self.label_noise = float(label_noise)
        self.flipped_labels = 0
        self.train_set: Optional[TextDataset] = None
        self.val_sets: dict[str, TextDataset] = {}

    def train_texts(self) -> Iterator[str]:
        """Every sentence of the full train split (a vocabulary source for from-scratch tokenizers)."""
        for row in self.task.load("train").texts:
            yield from row

    def setup(self, stage: Optional[str] = None) -> None:
        """Read the splits (cached by the task) and draw the seeded ``limit_train`` subset."""
        if self.train_set is None:
            train = self.task.load("train")
            indices = None
            if self.limit_train is not None and self.limit_train < len(train):
                g = torch.Generator().manual_seed(self.seed)
                indices = sorted(torch.randperm(len(train), generator=g)[: self.limit_train].tolist())
            if self.label_noise > 0:
                train, self.flipped_labels = self._noisy(train, indices)
                rank_zero_info(
                    f"data.label_noise={self.label_noise}: flipped {self.flipped_labels} of "
                    f"{len(indices) if indices is not None else len(train)} training labels (seed {self.seed})."
                )
            self.train_set = TextDataset(train, indices)
        for name in self.task.val_names:
            if name not in self.val_sets:
                self.val_sets[name] = TextDataset(self.task.load(name))

    def _noisy(self, train: Split, indices: Optional[Sequence[int]]) -> tuple[Split, int]:
        """A copy of ``train`` with round(p * n) of the n used rows' labels moved to another class, uniformly."""
        rows = list(range(len(train))) if indices is None else list(indices)
        classes = self.task.num_outputs
        if classes < 2:
            raise ValueError(f"data.label_noise needs at least 2 classes; task {self.task.name!r} has {classes}.")
        count = round(self.label_noise * len(rows))
        g = torch.Generator().manual_seed(self.seed + 1)  # its own stream: limit_train's subset draws from seed
        chosen = torch.randperm(len(rows), generator=g)[:count].tolist()
        shifts = torch.randint(1, classes, (count,), generator=g).tolist()
        labels = list(train.labels)
        for position, shift in zip(chosen, shifts):
            row = rows[position]
            labels[row] = (int(labels[row]) + shift) % classes
        return Split(train.texts, labels), count

    def _collator(self) -> Collator:
        if self.tokenizer is None:
            raise ValueError("GlueDataModule.tokenizer is None; pass the encoder's tokenizer before training.")
        return Collator(self.tokenizer, self.max_length, self.task.regression)

    def train_dataloader(self) -> DataLoader:
        """Shuffled train batches in an order fixed by ``seed``."""
        if self.train_set is None:
            raise RuntimeError("GlueDataModule.train_dataloader() needs setup('fit') first (the Trainer calls it).")
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, collate_fn=self._collator(),
            generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per validation split, in :attr:`TextTask.val_names` order."""
        return [
            DataLoader(self.val_sets[name], batch_size=self.eval_batch_size, collate_fn=self._collator(),
                       num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
            for name in self.task.val_names
        ]

