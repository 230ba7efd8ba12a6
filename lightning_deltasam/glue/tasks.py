"""The ``task`` config group: GLUE and custom TSV text-classification tasks (files, labels, metrics)."""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryMatthewsCorrCoef, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

Column = int | str

#: Metric name -> factory(num_classes); names become the logged keys, e.g. ``val/acc``.
METRICS: dict[str, Callable[[int], Metric]] = {
    "acc": lambda n: MulticlassAccuracy(num_classes=n, average="micro"),
    "f1": lambda n: BinaryF1Score(),
    "mcc": lambda n: BinaryMatthewsCorrCoef(),
    "pearson": lambda n: PearsonCorrCoef(),
    "spearman": lambda n: SpearmanCorrCoef(),
}
REGRESSION_METRICS = ("pearson", "spearman")
BINARY_METRICS = ("f1", "mcc")


@dataclass
class Split:
    """The rows of one split: one tuple of texts (one or two sentences) and one label per example."""

    texts: list[tuple[str, ...]]
    labels: list[int | float]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TextTask:
    """A sentence or sentence-pair classification/regression task stored as delimited text files.

    Every GLUE task is one of these with fixed columns (see :data:`GLUE_TASKS`); the ``tsv`` task
    lets users describe their own files the same way. Columns are header names (when ``header``)
    or 0-based indices (negative counts from the end). ``labels`` lists the raw label strings in
    class-index order (or maps raw label -> index); ``None`` infers the sorted distinct labels of
    the train split. ``val_files`` maps a metric prefix (``val``, ``val_mm``) to a file name.
    """

    name: str
    data_dir: str
    text_columns: Sequence[Column]
    label_column: Column
    header: bool = True
    labels: Sequence[str] | Mapping[str, int] | None = None
    regression: bool = False
    metrics: Sequence[str] = ("acc",)
    train_file: str = "train.tsv"
    val_files: Mapping[str, str] = field(default_factory=lambda: {"val": "dev.tsv"})
    subdir: str = ""
    delimiter: str = "\t"
    skip_malformed: bool = False
    hf_name: str | None = None
    hf_fields: Sequence[str] = ()
    hf_splits: Mapping[str, str] = field(default_factory=dict)
    _splits: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        single = isinstance(self.text_columns, (str, int))  # text_columns=sentence: one column, not letters
        set_("text_columns", (self.text_columns,) if single else tuple(self.text_columns))
        set_("metrics", (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics))
        set_("val_files", {"val": self.val_files} if isinstance(self.val_files, str) else dict(self.val_files))
        set_("hf_fields", tuple(self.hf_fields))
        set_("hf_splits", dict(self.hf_splits))
        if self.labels is not None:
            set_(
                "labels", dict(self.labels) if isinstance(self.labels, Mapping) else tuple(str(x) for x in self.labels)
            )
        if len(self.text_columns) not in (1, 2):
            raise ValueError(
                f"task.text_columns={list(self.text_columns)!r} must name one column (single sentence) "
                "or two (sentence pair)."
            )
        if not self.metrics:
            raise ValueError(f"task.metrics is empty; use some of {sorted(METRICS)}.")
        for m in self.metrics:
            if m not in METRICS:
                raise ValueError(f"task.metrics contains {m!r}; use some of {sorted(METRICS)}.")
            if self.regression != (m in REGRESSION_METRICS):
                kind = "regression" if self.regression else "classification"
                raise ValueError(
                    f"task.metrics={list(self.metrics)!r}: {m!r} does not suit a {kind} task "
                    f"(task.regression={self.regression}); regression uses {list(REGRESSION_METRICS)}."
                )
        if not self.val_files:
            raise ValueError("task.val_files is empty; map a metric prefix to a file, e.g. {val: dev.tsv}.")
        if len(self.delimiter) != 1:
            raise ValueError(f"task.delimiter={self.delimiter!r} must be one character, e.g. '\\t' or ','.")

    # ----------------------------------------------------------------- labels and metrics
    @property
    def val_names(self) -> tuple[str, ...]:
        """Prefixes of the validation splits, in dataloader order (e.g. ``("val", "val_mm")``)."""
        return tuple(self.val_files)

    @property
    def main_metric(self) -> str:
        """The logged key that model selection uses: the first metric on the first val split."""
        return f"{self.val_names[0]}/{self.metrics[0]}"

    @functools.cached_property
    def label_index(self) -> dict[str, int] | None:
        """Raw label string -> class index (``None`` for regression)."""
        if self.regression:
            return None
        if isinstance(self.labels, dict):
            return {str(k): int(v) for k, v in self.labels.items()}
        labels = self.labels
        if labels is None:
            labels = sorted({str(x) for x in self._read(self.train_file, raw_labels=True).labels}, key=_natural)
        return {label: i for i, label in enumerate(labels)}

    @property
    def num_outputs(self) -> int:
        """Width of the model's output layer: 1 for regression, else the number of classes."""
        if self.regression:
            return 1
        assert self.label_index is not None  # a classification task has one
        return max(self.label_index.values()) + 1

    def build_metrics(self, prefix: str) -> MetricCollection:
        """The task's official metrics, logged as ``<prefix>/<name>``."""
        if not self.regression and self.num_outputs != 2:
            binary = [m for m in self.metrics if m in BINARY_METRICS]
            if binary:
                raise ValueError(
                    f"task.metrics={list(self.metrics)!r}: {binary} need 2 classes but task {self.name!r} "
                    f"has {self.num_outputs}; use acc."
                )
        return MetricCollection({m: METRICS[m](self.num_outputs) for m in self.metrics}, prefix=f"{prefix}/")

    # ----------------------------------------------------------------- reading
    def load(self, split: str) -> Split:
        """Rows of ``split`` ("train" or a name from :attr:`val_names`), from files or from ``datasets``."""
        file = self.train_file if split == "train" else self.val_files.get(split)
        if file is None:
            raise ValueError(f"task {self.name!r} has no split {split!r}; it has train and {list(self.val_files)}.")
        if split not in self._splits:
            self._splits[split] = self._load_uncached(split, file)
        return self._splits[split]

    def _load_uncached(self, split: str, file: str) -> Split:
        path = self.path(file)
        if os.path.isfile(path):
            return self._read(file)
        hub_error = None
        if self.hf_name is not None:
            loaded = self._try_datasets(split)
            if isinstance(loaded, Split):
                return loaded
            hub_error = loaded  # None: `datasets` is not installed
        raise FileNotFoundError(self._missing_message(path, hub_error))

    def path(self, file: str) -> str:
        """Absolute path of one of the task's files."""
        return os.path.abspath(os.path.join(os.path.expanduser(self.data_dir), self.subdir, file))

    def _missing_message(self, path: str, hub_error: BaseException | None) -> str:
        msg = f"task {self.name!r}: no data file {path}."
        if self.hf_name is None:
            return msg + " Set task.data_dir (and task.train_file / task.val_files) to your files."
        msg += (
            f" Set GLUE_DIR or task.data_dir to the folder holding the GLUE task folders ({self.subdir}/, ...;"
            f" now {self.data_dir!r})"
        )
        if hub_error is None:
            return msg + ", or `pip install datasets` and run with network access to download it."
        return msg + f"; downloading with datasets.load_dataset('glue', {self.hf_name!r}) failed too: {hub_error}"

    def _try_datasets(self, split: str) -> Split | BaseException | None:
        """Load ``split`` with the optional ``datasets`` package; the error instead of raising, None if absent."""
        try:
            import datasets
        except ImportError:
            return None
        try:
            data = datasets.load_dataset("glue", self.hf_name)[self.hf_splits.get(split, "train")]
            texts = list(zip(*(data[f] for f in self.hf_fields)))
            labels = [float(x) if self.regression else int(x) for x in data["label"]]
        except Exception as err:  # noqa: BLE001 - offline, missing config...: report, don't crash
            return err
        return Split([tuple(str(t) for t in row) for row in texts], labels)

    def _read(self, file: str, raw_labels: bool = False) -> Split:
        path = self.path(file)
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f, delimiter=self.delimiter, quoting=csv.QUOTE_NONE)
            header = next(rows, None) if self.header else None
            text_idx = [self._column(c, header, path, "task.text_columns") for c in self.text_columns]
            label_idx = self._column(self.label_column, header, path, "task.label_column")
            need = max(i if i >= 0 else -i - 1 for i in [*text_idx, label_idx]) + 1
            texts, labels = [], []
            skipped = 0
            for lineno, row in enumerate(rows, start=2 if self.header else 1):
                if not row or row == [""]:
                    continue
                if len(row) < need:
                    if self.skip_malformed:
                        skipped += 1
                        continue
                    raise ValueError(
                        f"{path}:{lineno} has {len(row)} columns but task {self.name!r} reads column "
                        f"{need - 1}; check task.text_columns / task.label_column / task.header / task.delimiter, "
                        "or set task.skip_malformed=true to drop such rows."
                    )
                raw = row[label_idx].strip()
                texts.append(tuple(row[i] for i in text_idx))
                labels.append(raw if raw_labels else self._label(raw, path, lineno))
        if skipped and not raw_labels:
            warnings.warn(
                f"task {self.name!r}: skipped {skipped} malformed row(s) of {path} (fewer than {need} "
                f"columns; task.skip_malformed=true), kept {len(labels)}.",
                UserWarning,
                stacklevel=2,
            )
        return Split(texts, cast(list[int | float], labels))  # raw_labels: the strings, for label_index

    def _label(self, raw: str, path: str, lineno: int) -> int | float:
        if self.regression:
            try:
                return float(raw)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: label {raw!r} is not a number (task.regression=true).") from None
        index = self.label_index
        assert index is not None  # a classification task has one
        try:
            return index[raw]
        except KeyError:
            known = list(index)
            raise ValueError(
                f"{path}:{lineno}: label {raw!r} is not one of task.labels={known}; add it to task.labels."
            ) from None

    def _column(self, column: Column, header: list[str] | None, path: str, option: str) -> int:
        if isinstance(column, int):
            return column
        if isinstance(column, str) and column.lstrip("-").isdigit():
            return int(column)
        if header is None:
            raise ValueError(
                f"task {self.name!r}: {option} names column {column!r} but {path} is read without a header "
                "(task.header=false); give a 0-based index instead."
            )
        names = [h.strip().lstrip("\ufeff") for h in header]
        if column not in names:
            close = difflib.get_close_matches(str(column), names, n=2, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
            raise ValueError(
                f"task {self.name!r}: {option} names column {column!r}, which is not in the header of {path}: "
                f"{names}{hint} Set {option} to one of them (or task.header=false and 0-based indices)."
            )
        return names.index(column)


def _natural(label: str) -> tuple:
    """Sort key putting numeric labels in numeric order ("2" < "10") and the rest alphabetically."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


_PAIR = ("sentence1", "sentence2")
_NLI = ("entailment", "not_entailment")


def _glue(name: str, subdir: str, hf_fields: Sequence[str], **kw: Any) -> TextTask:
    """A GLUE task as laid out in the official distribution, with the HF ``glue`` fallback fields."""
    hf_splits = {"val": "validation", **kw.pop("hf_splits", {})}
    return TextTask(name, "", subdir=subdir, hf_name=name, hf_fields=hf_fields, hf_splits=hf_splits, **kw)


#: The nine GLUE tasks (labels in the HF ``glue`` class order so both sources agree).
GLUE_TASKS: dict[str, TextTask] = {
    t.name: t
    for t in (
        _glue(
            "cola",
            "CoLA",
            ("sentence",),
            header=False,
            text_columns=(3,),
            label_column=1,
            labels=("0", "1"),
            metrics=("mcc",),
        ),
        _glue("sst2", "SST-2", ("sentence",), text_columns=("sentence",), label_column="label", labels=("0", "1")),
        _glue(
            "mrpc",
            "MRPC",
            _PAIR,
            text_columns=("#1 String", "#2 String"),
            label_column="Quality",
            labels=("0", "1"),
            metrics=("f1", "acc"),
        ),
        _glue(
            "stsb",
            "STS-B",
            _PAIR,
            text_columns=_PAIR,
            label_column="score",
            regression=True,
            metrics=("pearson", "spearman"),
        ),
        _glue(
            "qqp",
            "QQP",
            ("question1", "question2"),
            text_columns=("question1", "question2"),
            label_column="is_duplicate",
            labels=("0", "1"),
            metrics=("f1", "acc"),
            skip_malformed=True,
        ),
        _glue(
            "mnli",
            "MNLI",
            ("premise", "hypothesis"),
            text_columns=_PAIR,
            label_column="gold_label",
            labels=("entailment", "neutral", "contradiction"),
            val_files={"val": "dev_matched.tsv", "val_mm": "dev_mismatched.tsv"},
            hf_splits={"val": "validation_matched", "val_mm": "validation_mismatched"},
        ),
        _glue(
            "qnli",
            "QNLI",
            ("question", "sentence"),
            text_columns=("question", "sentence"),
            label_column="label",
            labels=_NLI,
        ),
        _glue("rte", "RTE", _PAIR, text_columns=_PAIR, label_column="label", labels=_NLI),
        _glue("wnli", "WNLI", _PAIR, text_columns=_PAIR, label_column="label", labels=("0", "1")),
    )
}


def glue_task(name: str, data_dir: str) -> TextTask:
    """The GLUE task ``name`` reading from ``<data_dir>/<TASK-DIR>/`` (e.g. ``data/glue/SST-2/train.tsv``)."""
    if name not in GLUE_TASKS:
        raise ValueError(f"task.name={name!r} is not a GLUE task; use one of {sorted(GLUE_TASKS)} or task=tsv.")
    return dataclasses.replace(GLUE_TASKS[name], data_dir=str(data_dir))


def tsv_task(
    data_dir: str,
    text_columns: Column | Sequence[Column],
    label_column: Column,
    name: str = "tsv",
    header: bool = True,
    labels: Sequence[str] | Mapping[str, int] | None = None,
    regression: bool = False,
    metrics: str | Sequence[str] | None = None,
    train_file: str = "train.tsv",
    val_files: str | Mapping[str, str] | None = None,
    delimiter: str = "\t",
    skip_malformed: bool = False,
) -> TextTask:
    """A user task from any sentence (pair) classification or regression TSV/CSV files."""
    return TextTask(
        name=name,
        data_dir=str(data_dir),
        label_column=label_column,
        header=header,
        text_columns=cast(Sequence[Column], text_columns),  # TextTask takes one column as it is, too
        labels=labels,
        regression=regression,
        metrics=metrics or (REGRESSION_METRICS if regression else ("acc",)),
        train_file=train_file,
        delimiter=delimiter,
        val_files=cast(Mapping[str, str], val_files or {"val": "dev.tsv"}),  # TextTask takes one file name, too
        skip_malformed=skip_malformed,
    )
