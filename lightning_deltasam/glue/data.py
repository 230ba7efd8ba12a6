"""The LightningDataModule of the ``data`` config group: dataloaders for a :class:`~.tasks.TextTask`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..config import check_int, check_number
from .tasks import Split, TextTask


class TextDataset(Dataset):
    """Indexable view of a :class:`Split` (optionally a subset of its rows)."""

    def __init__(self, split: Split, indices: Sequence[int] | None = None) -> None:
        self.split = split
        self.indices = list(range(len(split))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[tuple[str, ...], int | float]:
        j = self.indices[i]
        return self.split.texts[j], self.split.labels[j]


class Collator:
    """Tokenizes a list of examples, padding to the longest in the batch and truncating at ``max_length``."""

    def __init__(self, tokenizer: Any, max_length: int, regression: bool) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.regression = regression

    def __call__(self, rows: Sequence[tuple[tuple[str, ...], int | float]]) -> dict[str, Tensor]:
        texts, labels = zip(*rows)
        columns = list(zip(*texts))  # one list per text column
        batch = dict(
            self.tokenizer(
                *columns, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if self.regression else torch.long)
        return batch


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` Lightning can checkpoint and resume in the middle of an epoch (``state_dict`` /
    ``load_state_dict``, saved with the fit loop): a resumed run gets the batches the interrupted one would have.

    The state is the ``generator``'s state from just before the sampler drew this epoch's order, and the number of
    batches handed out since; resuming redraws that order and skips those batches (their indices only: nothing is
    loaded). Runs that never resume are unchanged: the order is the plain ``DataLoader``'s for the same generator.
    Shuffle with a seeded ``generator`` (a ``DistributedSampler`` orders by its seed and epoch instead).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._order: Tensor | None = None  # generator state before this epoch's order was drawn
        self._handed_out = 0  # batches of this epoch handed out
        self._resume: tuple[Tensor | None, int] | None = None  # (order, batches to skip) for the next epoch

    @property
    def _index_sampler(self) -> Any:  # what every iterator draws its batches of indices from
        return _ResumingSampler(super()._index_sampler, self)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where this epoch's order came from and how many batches were handed out; at an epoch's end, the
        generator's state for the next epoch's order instead."""
        if self._handed_out >= len(self):
            return {"generator": self.generator.get_state() if self.generator is not None else None}
        return {"order": self._order, "batches": self._handed_out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration continues where the saved one stopped."""
        if "generator" in state:  # the saved epoch was complete: the next one starts afresh
            if state["generator"] is None or self.generator is None:
                return
            if self.num_workers > 0 and self.persistent_workers:  # reused workers: no new base seed is drawn
                self._resume = (state["generator"], 0)
            else:
                self.generator.set_state(state["generator"])
            return
        self._resume = (state["order"], int(state["batches"]))


class _ResumingSampler:
    """The loader's batch sampler for one epoch: records the generator's state as the epoch's order is drawn,
    or restores a saved one and skips the batches already handed out."""

    def __init__(self, sampler: Any, loader: ResumableDataLoader) -> None:
        self.sampler = sampler
        self.loader = loader

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        loader = self.loader
        (order, skip), loader._resume = loader._resume or (None, 0), None
        if order is not None and loader.generator is not None:
            loader.generator.set_state(order)
        loader._order = loader.generator.get_state() if loader.generator is not None else None
        loader._handed_out = skip
        batches = iter(self.sampler)  # the sampler draws the epoch's order at its first batch
        for _ in range(skip):
            next(batches, None)
        yield from batches


class GlueDataModule(L.LightningDataModule):
    """Train/validation dataloaders for a :class:`TextTask` with per-batch dynamic padding and seeded order.

    ``limit_train`` keeps a seeded random subset of the train split (quick runs); the train order is
    shuffled by a generator seeded with ``seed`` so identical seeds give identical batches.
    ``label_noise=p`` flips a seeded random share p of the training labels (after ``limit_train``) to another
    class, drawn uniformly among the others; validation splits and the data order are untouched.
    ``holdout=q`` validates on a seeded share q of the training rows (after ``limit_train``, with their labels as
    trained on, so noisy under ``label_noise``) instead of the dev set, and trains on the rest: for choosing
    options such as rho without looking at the dev set that results are reported on.
    """

    def __init__(
        self,
        task: TextTask,
        tokenizer: Any = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        max_length: int = 64,
        limit_train: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        label_noise: float = 0.0,
        holdout: float = 0.0,
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
        check_number(
            "data.holdout",
            holdout,
            minimum=0.0,
            below=1.0,
            hint=" It is the share of the training rows "
            "validated on instead of the dev set; 0 validates on the dev set.",
        )
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
        self.holdout = float(holdout)
        self.flipped_labels = 0
        self.train_set: TextDataset | None = None
        self.val_sets: dict[str, TextDataset] = {}

    def train_texts(self) -> Iterator[str]:
        """Every sentence of the full train split (a vocabulary source for from-scratch tokenizers)."""
        for row in self.task.load("train").texts:
            yield from row

    def setup(self, stage: str | None = None) -> None:
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
            if self.holdout > 0:
                self.train_set, held = self._split_holdout(train, indices)
                self.val_sets = {self.task.val_names[0]: held}
                rank_zero_info(
                    f"data.holdout={self.holdout}: validating on {len(held)} held-out training rows, "
                    f"training on {len(self.train_set)} (seed {self.seed}); the dev set is not used."
                )
            else:
                self.train_set = TextDataset(train, indices)
        if self.holdout > 0:
            return
        for name in self.task.val_names:
            if name not in self.val_sets:
                self.val_sets[name] = TextDataset(self.task.load(name))

    def _split_holdout(self, train: Split, indices: Sequence[int] | None) -> tuple[TextDataset, TextDataset]:
        """(train rows, held-out rows): a seeded random share ``holdout`` of the used rows, drawn from its own stream."""
        rows = list(range(len(train))) if indices is None else list(indices)
        count = round(self.holdout * len(rows))
        if count == 0 or count == len(rows):
            raise ValueError(
                f"data.holdout={self.holdout} of {len(rows)} training rows leaves an empty split; "
                "use a share that keeps rows on both sides."
            )
        g = torch.Generator().manual_seed(self.seed + 2)  # limit_train draws from seed, label_noise from seed + 1
        order = torch.randperm(len(rows), generator=g).tolist()
        held = sorted(rows[i] for i in order[:count])
        kept = sorted(rows[i] for i in order[count:])
        return TextDataset(train, kept), TextDataset(train, held)

    def _noisy(self, train: Split, indices: Sequence[int] | None) -> tuple[Split, int]:
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

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled train batches in an order fixed by ``seed``, resumable mid-epoch."""
        if self.train_set is None:
            raise RuntimeError("GlueDataModule.train_dataloader() needs setup('fit') first (the Trainer calls it).")
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=self._collator(),
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per validation split, in :attr:`TextTask.val_names` order."""
        return [
            DataLoader(
                self.val_sets[name],
                batch_size=self.eval_batch_size,
                collate_fn=self._collator(),
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
            )
            for name in self.task.val_names
            if name in self.val_sets  # data.holdout: the held-out rows only
        ]
