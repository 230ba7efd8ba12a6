"""GLUE / TSV task loading (real row formats), metrics, and the data module."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("hydra")  # the GLUE app's tests need the [app] extra

import torch

from lightning_deltasam.glue.data import GlueDataModule
from lightning_deltasam.glue.models import word_tokenizer
from lightning_deltasam.glue.tasks import GLUE_TASKS, glue_task, tsv_task

from .glue_data import GLUE_DIR, needs_glue

REPO = Path(__file__).resolve().parents[1]

# Two rows per task, copied in the official GLUE layout (quotes and all).
MNLI_HEAD = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
]
FIXTURES: dict[str, dict[str, list[list[str]]]] = {
    "CoLA": {
        "train.tsv": [
            ["gj04", "1", "", "Our friends won't buy this analysis, let alone the next one we propose."],
            ["gj04", "0", "*", "They drank the pub."],
        ],
        "dev.tsv": [
            ["bc01", "1", "", "The sailors rode the breeze clear of the rocks."],
            ["bc01", "0", "*", 'The more we study verbs, the crazier they get " .'],
        ],
    },
    "SST-2": {
        "train.tsv": [
            ["sentence", "label"],
            ["hide new secretions from the parental units ", "0"],
            ['the movie \'s " messages " are quite admirable ', "1"],
        ],
        "dev.tsv": [
            ["sentence", "label"],
            ["it 's a charming and often affecting journey . ", "1"],
            ["unflinchingly bleak and desperate ", "0"],
        ],
    },
    "MRPC": {
        "train.tsv": [
            ["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            [
                "1",
                "702876",
                "702977",
                'Amrozi accused his brother , whom he called " the witness " , of '
                "deliberately distorting his evidence .",
                'Referring to him as only " the witness " , Amrozi '
                "accused his brother of deliberately distorting his evidence .",
            ],
            [
                "0",
                "2108705",
                "2108831",
                "Yucaipa owned Dominick 's before selling the chain to Safeway in 1998 for $ 2.5 billion .",
                "Yucaipa bought Dominick 's in 1995 for $ 693 million .",
            ],
        ],
        "dev.tsv": [
            ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            [
                "1",
                "1355540",
                "1355592",
                "He said the foodservice pie business doesn 't fit .",
                '" The foodservice pie business does not fit our long-term growth strategy .',
            ],
        ],
    },
    "QQP": {
        "train.tsv": [
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            [
                "133273",
                "213221",
                "213222",
                "How is the life of a math student?",
                "Which level of prepration is enough for the exam jlpt5?",
                "0",
            ],
            [
                "402555",
                "536040",
                "536041",
                "How do I control my horny emotions?",
                "How do you control your horniness?",
                "1",
            ],
            ["1234", "55", "56", "a malformed row with a missing question"],
        ],
        "dev.tsv": [
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            [
                "201359",
                "303345",
                "303346",
                "Why are African-Americans so beautiful?",
                "Why are hispanics so beautiful?",
                "0",
            ],
        ],
    },
    "STS-B": {
        "train.tsv": [
            [
                "index",
                "genre",
                "filename",
                "year",
                "old_index",
                "source1",
                "source2",
                "sentence1",
                "sentence2",
                "score",
            ],
            [
                "0",
                "main-captions",
                "MSRvid",
                "2012test",
                "0001",
                "none",
                "none",
                "A plane is taking off.",
                "An air plane is taking off.",
                "5.000",
            ],
            [
                "1",
                "main-captions",
                "MSRvid",
                "2012test",
                "0004",
                "none",
                "none",
                "A man is playing a large flute.",
                "A man is playing a flute.",
                "3.800",
            ],
        ],
        "dev.tsv": [
            [
                "index",
                "genre",
                "filename",
                "year",
                "old_index",
                "source1",
                "source2",
                "sentence1",
                "sentence2",
                "score",
            ],
            [
                "0",
                "main-captions",
                "MSRvid",
                "2012test",
                "0000",
                "none",
                "none",
                "A man with a hard hat is dancing.",
                "A man wearing a hard hat is dancing.",
                "5.000",
            ],
            [
                "1",
                "main-captions",
                "MSRvid",
                "2012test",
                "0002",
                "none",
                "none",
                "A young child is riding a horse.",
                "A child is riding a horse.",
                "4.750",
            ],
        ],
    },
    "MNLI": {
        "train.tsv": [
            [*MNLI_HEAD, "label1", "gold_label"],
            [
                "0",
                "31193",
                "31193n",
                "government",
                "( ( Conceptually cream ) skimming )",
                "( ( Product and ) geography )",
                "(ROOT (S ...))",
                "(ROOT (S ...))",
                "Conceptually cream skimming has two basic dimensions - product and geography.",
                "Product and geography are what make cream skimming work. ",
                "neutral",
                "neutral",
            ],
            [
                "1",
                "101457",
                "101457e",
                "telephone",
                "( you ( ( know ... ) ) )",
                "( You ( ... ) )",
                "(ROOT ...)",
                "(ROOT ...)",
                "you know during the season and i guess at at your level uh you lose them to the next level",
                "You lose the things to the following level if the people recall.",
                "entailment",
                "entailment",
            ],
        ],
        "dev_matched.tsv": [
            [*MNLI_HEAD, "label1", "label2", "label3", "label4", "label5", "gold_label"],
            [
                "0",
                "63735",
                "63735n",
                "slate",
                "( ... )",
                "( ... )",
                "(ROOT ...)",
                "(ROOT ...)",
                "The new rights are nice enough",
                "Everyone really likes the newest benefits ",
                "neutral",
                "entailment",
                "neutral",
                "neutral",
                "neutral",
                "neutral",
            ],
        ],
        "dev_mismatched.tsv": [
            [*MNLI_HEAD, "label1", "label2", "label3", "label4", "label5", "gold_label"],
            [
                "0",
                "75290",
                "75290c",
                "letters",
                "( ... )",
                "( ... )",
                "(ROOT ...)",
                "(ROOT ...)",
                "Your contribution helped make it possible for us to provide our students with a quality education.",
                "Your contributions were of no help with our students' education.",
                "contradiction",
                "contradiction",
                "contradiction",
                "contradiction",
                "contradiction",
                "contradiction",
            ],
        ],
    },
    "QNLI": {
        "train.tsv": [
            ["index", "question", "sentence", "label"],
            [
                "0",
                "When did the third Digimon series begin?",
                "Unlike the two seasons before it, Digimon Tamers takes a darker approach.",
                "not_entailment",
            ],
            [
                "1",
                "Which missile batteries often have individual launchers several kilometres from one another?",
                "When MANPADS is operated by specialists, batteries may have several dozen "
                "teams deploying separately in small sections.",
                "entailment",
            ],
        ],
        "dev.tsv": [
            ["index", "question", "sentence", "label"],
            [
                "0",
                "What came into force after the new constitution was herald?",
                "As of that day, the new constitution heralding the Second Republic came into force.",
                "entailment",
            ],
        ],
    },
    "RTE": {
        "train.tsv": [
            ["index", "sentence1", "sentence2", "label"],
            [
                "0",
                "No Weapons of Mass Destruction Found in Iraq Yet.",
                "Weapons of Mass Destruction Found in Iraq.",
                "not_entailment",
            ],
            [
                "1",
                "A place of sorrow, after Pope John Paul II died, became a place of celebration.",
                "Pope Benedict XVI is the new leader of the Roman Catholic Church.",
                "entailment",
            ],
        ],
        "dev.tsv": [
            ["index", "sentence1", "sentence2", "label"],
            [
                "0",
                "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.",
                "Christopher Reeve had an accident.",
                "not_entailment",
            ],
        ],
    },
    "WNLI": {
        "train.tsv": [
            ["index", "sentence1", "sentence2", "label"],
            [
                "0",
                "I stuck a pin through a carrot. When I pulled the pin out, it had a hole.",
                "The carrot had a hole.",
                "1",
            ],
            [
                "1",
                "John couldn't see the stage with Billy in front of him because he is so short.",
                "John is so short.",
                "1",
            ],
            [
                "2",
                "The police arrested all of the gang members. They were trying to stop the drug trade "
                "in the neighborhood.",
                "The police were trying to stop the drug trade.",
                "0",
            ],
        ],
        "dev.tsv": [
            ["index", "sentence1", "sentence2", "label"],
            ["0", "The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned.", "0"],
        ],
    },
}
# task -> (first train texts, first train label, number of train rows, first val label per val split)
EXPECTED = {
    "cola": (("Our friends won't buy this analysis, let alone the next one we propose.",), 1, 2, {"val": 1}),
    "sst2": (("hide new secretions from the parental units ",), 0, 2, {"val": 1}),
    "mrpc": ((FIXTURES["MRPC"]["train.tsv"][1][3], FIXTURES["MRPC"]["train.tsv"][1][4]), 1, 2, {"val": 1}),
    "qqp": (
        ("How is the life of a math student?", "Which level of prepration is enough for the exam jlpt5?"),
        0,
        2,
        {"val": 0},
    ),
    "stsb": (("A plane is taking off.", "An air plane is taking off."), 5.0, 2, {"val": 5.0}),
    "mnli": ((FIXTURES["MNLI"]["train.tsv"][1][8], FIXTURES["MNLI"]["train.tsv"][1][9]), 1, 2, {"val": 1, "val_mm": 2}),
    "qnli": (("When did the third Digimon series begin?", FIXTURES["QNLI"]["train.tsv"][1][2]), 1, 2, {"val": 0}),
    "rte": (
        ("No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons of Mass Destruction Found in Iraq."),
        1,
        2,
        {"val": 1},
    ),
    "wnli": (tuple(FIXTURES["WNLI"]["train.tsv"][1][1:3]), 1, 3, {"val": 0}),
}


def write_rows(path: Path, rows: list[list[str]], delimiter: str = "\t") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(delimiter.join(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    for subdir, files in FIXTURES.items():
        for name, rows in files.items():
            write_rows(root / subdir / name, rows)
    return root


def test_every_glue_task_is_defined() -> None:
    assert sorted(GLUE_TASKS) == sorted(["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"])
    assert {t.main_metric for t in GLUE_TASKS.values()} >= {"val/mcc", "val/f1", "val/pearson", "val/acc"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_glue_formats(glue_dir: Path, name: str) -> None:
    texts, label, rows, val_labels = EXPECTED[name]
    task = glue_task(name, str(glue_dir))
    train = task.load("train")
    assert len(train) == rows
    assert train.texts[0] == texts
    assert train.labels[0] == label
    assert task.val_names == tuple(val_labels)
    for split, first in val_labels.items():
        assert task.load(split).labels[0] == first
    assert task.num_outputs == {"stsb": 1, "mnli": 3}.get(name, 2)


def test_quotes_are_kept_verbatim(glue_dir: Path) -> None:
    """GLUE TSVs are not CSV-quoted: a lone quote must not swallow the following rows."""
    train = glue_task("sst2", str(glue_dir)).load("train")
    assert train.texts[1] == ('the movie \'s " messages " are quite admirable ',)
    dev = glue_task("cola", str(glue_dir)).load("val")
    assert len(dev) == 2 and dev.texts[1][0].endswith('get " .')


def test_qqp_skips_malformed_rows_but_others_fail(glue_dir: Path, tmp_path: Path) -> None:
    assert len(glue_task("qqp", str(glue_dir)).load("train")) == 2
    write_rows(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"], ["no label column"]])
    with pytest.raises(ValueError, match=r"train.tsv:2 has 1 columns"):
        glue_task("sst2", str(tmp_path)).load("train")


def test_unknown_label_names_the_option(glue_dir: Path, tmp_path: Path) -> None:
    write_rows(tmp_path / "RTE" / "train.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "maybe"]])
    with pytest.raises(ValueError, match=r"label 'maybe' is not one of task.labels"):
        glue_task("rte", str(tmp_path)).load("train")


@needs_glue
def test_real_sst2_counts() -> None:
    assert GLUE_DIR is not None
    task = glue_task("sst2", str(GLUE_DIR))
    train, dev = task.load("train"), task.load("val")
    assert (len(train), len(dev)) == (67349, 872)
    assert set(train.labels) == {0, 1} and set(dev.labels) == {0, 1}


def test_missing_data_names_both_ways(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        glue_task("mrpc", str(tmp_path / "nowhere")).load("train")
    message = str(info.value)
    assert "MRPC/train.tsv" in message and "GLUE_DIR" in message and "task.data_dir" in message
    assert "pip install datasets" in message


def test_datasets_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With `datasets` importable, absent files are downloaded; when that fails offline the error says so."""
    calls = []

    def offline(path: str, name: str) -> None:
        calls.append((path, name))
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(FileNotFoundError, match=r"load_dataset\('glue', 'rte'\) failed too: offline"):
        glue_task("rte", str(tmp_path)).load("train")
    assert calls == [("glue", "rte")]

    hub = {"validation_mismatched": {"premise": ["p"], "hypothesis": ["h"], "label": [2]}}
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda path, name: hub))
    split = glue_task("mnli", str(tmp_path)).load("val_mm")
    assert split.texts == [("p", "h")] and split.labels == [2]


def test_tsv_task_by_index_without_header_and_label_map(tmp_path: Path) -> None:
    write_rows(tmp_path / "train.csv", [["pos", "great fun", "x"], ["neg", "dull", "y"], ["pos", "loved it", "z"]], ",")
    write_rows(tmp_path / "dev.csv", [["neg", "boring", "w"]], ",")
    task = tsv_task(
        str(tmp_path),
        text_columns=[1],
        label_column=0,
        header=False,
        labels={"neg": 0, "pos": 1},
        train_file="train.csv",
        val_files={"val": "dev.csv"},
        delimiter=",",
    )
    train = task.load("train")
    assert train.texts == [("great fun",), ("dull",), ("loved it",)] and train.labels == [1, 0, 1]
    assert task.load("val").labels == [0] and task.main_metric == "val/acc"


def test_tsv_task_pairs_by_name_infers_labels(tmp_path: Path) -> None:
    header = ["id", "premise", "hypothesis", "gold"]
    write_rows(tmp_path / "train.tsv", [header, ["1", "a", "b", "10"], ["2", "c", "d", "2"], ["3", "e", "f", "1"]])
    write_rows(tmp_path / "dev.tsv", [header, ["1", "g", "h", "2"]])
    task = tsv_task(str(tmp_path), text_columns=["premise", "hypothesis"], label_column="gold")
    assert task.label_index == {"1": 0, "2": 1, "10": 2}  # numeric labels in numeric order
    assert task.load("train").texts[0] == ("a", "b") and task.num_outputs == 3
    with pytest.raises(ValueError, match="need 2 classes"):
        tsv_task(str(tmp_path), text_columns=["premise"], label_column="gold", metrics=["f1"]).build_metrics("val")
    with pytest.raises(ValueError, match="not in the header"):
        tsv_task(str(tmp_path), text_columns=["text"], label_column="gold").load("train")


def test_tsv_task_regression(tmp_path: Path) -> None:
    write_rows(tmp_path / "train.tsv", [["s", "y"], ["a", "0.5"], ["b", "1.5"]])
    task = tsv_task(str(tmp_path), text_columns=["s"], label_column="y", regression=True)
    assert task.metrics == ("pearson", "spearman") and task.num_outputs == 1
    assert task.load("train").labels == [0.5, 1.5]
    with pytest.raises(ValueError, match="does not suit a regression task"):
        tsv_task(str(tmp_path), text_columns=["s"], label_column="y", regression=True, metrics=["acc"])
    with pytest.raises(ValueError, match="one column .* or two"):
        tsv_task(str(tmp_path), text_columns=["s", "s", "s"], label_column="y")


def _compute(name: str, preds: list, target: list) -> dict[str, float]:
    metrics = GLUE_TASKS[name].build_metrics("val")
    metrics.update(torch.tensor(preds), torch.tensor(target))
    return {k: float(v) for k, v in metrics.compute().items()}


def test_metrics_on_hand_checked_inputs() -> None:
    # TP=1 FP=1 TN=2 FN=0: MCC = (1*2 - 1*0) / sqrt(2*1*3*2) = 1/sqrt(3); F1 = 2/3; accuracy 3/4.
    assert _compute("cola", [1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx({"val/mcc": 3**-0.5})
    assert _compute("mrpc", [1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx({"val/f1": 2 / 3, "val/acc": 0.75})
    assert _compute("qqp", [1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx({"val/f1": 2 / 3, "val/acc": 0.75})
    assert _compute("mnli", [0, 1, 2, 2], [0, 1, 2, 0]) == pytest.approx({"val/acc": 0.75})
    assert list(GLUE_TASKS["mnli"].build_metrics("val_mm")) == ["val_mm/acc"]
    # Ranks agree perfectly (spearman 1); pearson = 15.5 / sqrt(62.75 * 5) by hand.
    stsb = _compute("stsb", [0.0, 1.0, 2.0, 10.0], [0.0, 1.0, 2.0, 3.0])
    assert stsb["val/spearman"] == pytest.approx(1.0)
    assert stsb["val/pearson"] == pytest.approx(15.5 / (62.75 * 5) ** 0.5)


def _datamodule(glue_dir: Path, name: str = "wnli", **kw) -> GlueDataModule:
    task = glue_task(name, str(glue_dir))
    dm = GlueDataModule(task, batch_size=2, **kw)
    dm.tokenizer = word_tokenizer(dm.train_texts())
    dm.setup("fit")
    return dm


def test_dynamic_padding_and_truncation(glue_dir: Path) -> None:
    dm = _datamodule(glue_dir, max_length=64)
    batches = list(dm.val_dataloader()[0]) + list(dm.train_dataloader())
    for b in batches:
        assert set(b) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
        assert b["attention_mask"].sum(1).max() == b["input_ids"].shape[1]  # padded to the batch's longest
    assert len({b["input_ids"].shape[1] for b in batches}) > 1
    short = _datamodule(glue_dir, max_length=8)
    assert max(b["input_ids"].shape[1] for b in short.train_dataloader()) == 8
    assert _datamodule(glue_dir, "stsb").val_dataloader()[0].__iter__().__next__()["labels"].dtype == torch.float32


def test_seeded_order_and_limit_train(glue_dir: Path, tmp_path: Path) -> None:
    rows = [["sentence", "label"]] + [[f"sentence number {i}", str(i % 2)] for i in range(100)]
    write_rows(tmp_path / "SST-2" / "train.tsv", rows)
    write_rows(tmp_path / "SST-2" / "dev.tsv", rows[:3])

    def order(seed: int, limit=None) -> list[list[int]]:
        dm = GlueDataModule(glue_task("sst2", str(tmp_path)), batch_size=10, limit_train=limit, seed=seed)
        dm.tokenizer = word_tokenizer(dm.train_texts())
        dm.setup("fit")
        return [b["input_ids"][:, 3].tolist() for b in dm.train_dataloader()]  # token 3: the row number

    assert order(1) == order(1) and order(1) != order(2)
    subset = order(3, limit=20)
    assert sum(len(b) for b in subset) == 20 and subset == order(3, limit=20)
    assert sorted(sum(order(4, limit=20), [])) != sorted(sum(subset, []))
    with pytest.raises(ValueError, match=r"data.limit_train=0 must be an integer >= 1"):
        GlueDataModule(glue_task("sst2", str(tmp_path)), limit_train=0)


# --------------------------------------------------------------------------- data.label_noise
def _noisy(task, p: float, seed: int = 0, limit=None) -> GlueDataModule:
    dm = GlueDataModule(task, batch_size=16, limit_train=limit, seed=seed, label_noise=p)
    dm.setup("fit")
    return dm


def _used_labels(dm: GlueDataModule) -> list:
    return [dm.train_set.split.labels[i] for i in dm.train_set.indices]


@needs_glue
def test_label_noise_flips_a_seeded_share_of_real_sst2() -> None:
    task = glue_task("sst2", str(GLUE_DIR))
    clean = _noisy(task, 0.0, seed=1, limit=1000)
    noisy = _noisy(task, 0.3, seed=1, limit=1000)
    assert clean.flipped_labels == 0 and noisy.flipped_labels == 300
    assert noisy.train_set.indices == clean.train_set.indices  # the same rows...
    before, after = _used_labels(clean), _used_labels(noisy)
    assert sum(a != b for a, b in zip(before, after)) == 300  # ...300 of them with the other class
    assert _used_labels(_noisy(task, 0.3, seed=1, limit=1000)) == after  # same seed: same flips
    assert _used_labels(_noisy(task, 0.3, seed=2, limit=1000)) != after  # another seed: other flips
    # the task's own rows and the dev set are untouched
    assert task.load("train").labels[:50] == clean.train_set.split.labels[:50] and clean.train_set.split is task.load(
        "train"
    )
    assert noisy.val_sets["val"].split is task.load("val")


def test_label_noise_zero_changes_nothing_and_keeps_the_order(glue_dir: Path, tmp_path: Path) -> None:
    rows = [["sentence", "label"]] + [[f"sentence number {i}", str(i % 2)] for i in range(100)]
    write_rows(tmp_path / "SST-2" / "train.tsv", rows)
    write_rows(tmp_path / "SST-2" / "dev.tsv", rows[:5])
    task = glue_task("sst2", str(tmp_path))

    def batches(p: float) -> tuple[list, list]:
        dm = GlueDataModule(task, batch_size=10, seed=5, label_noise=p)
        dm.tokenizer = word_tokenizer(dm.train_texts())
        dm.setup("fit")
        out = list(dm.train_dataloader())
        return [b["input_ids"][:, 3].tolist() for b in out], [b["labels"].tolist() for b in out]

    order0, labels0 = batches(0.0)
    plain = GlueDataModule(task, batch_size=10, seed=5)
    plain.tokenizer = word_tokenizer(plain.train_texts())
    plain.setup("fit")
    assert [b["labels"].tolist() for b in plain.train_dataloader()] == labels0  # p=0 is today's data
    order5, labels5 = batches(0.5)
    assert order5 == order0 and labels5 != labels0  # same order, 50 labels flipped
    assert sum(a != b for x, y in zip(labels0, labels5) for a, b in zip(x, y)) == 50


def test_label_noise_moves_to_another_class_uniformly(tmp_path: Path) -> None:
    rows = [["text", "y"]] + [[f"row {i}", "abc"[i % 3]] for i in range(3000)]
    write_rows(tmp_path / "train.tsv", rows)
    write_rows(tmp_path / "dev.tsv", rows[:4])
    task = tsv_task(str(tmp_path), text_columns="text", label_column="y")
    clean, noisy = _noisy(task, 0.0), _noisy(task, 0.5)
    pairs = [(a, b) for a, b in zip(_used_labels(clean), _used_labels(noisy)) if a != b]
    assert noisy.flipped_labels == len(pairs) == 1500
    moves = {}
    for a, b in pairs:
        moves[(a, b)] = moves.get((a, b), 0) + 1
    assert len(moves) == 6 and all(200 < n < 300 for n in moves.values())  # 6 (from, to) pairs, ~250 each


@pytest.mark.parametrize(
    "p, name, message",
    [
        (1.0, "sst2", r"data.label_noise=1.0 must be >= 0.0 and < 1.0"),
        (-0.1, "sst2", r"data.label_noise=-0.1 must be >= 0.0"),
        (0.2, "stsb", r"data.label_noise=0.2 flips class labels, but task 'stsb' is a regression task"),
    ],
)
def test_label_noise_errors_name_the_option(glue_dir: Path, p: float, name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GlueDataModule(glue_task(name, str(glue_dir)), label_noise=p)
    GlueDataModule(glue_task("stsb", str(glue_dir)), label_noise=0.0)  # p=0 is fine for regression


def test_tsv_errors_name_the_option(tmp_path: Path) -> None:
    write_rows(tmp_path / "train.tsv", [["review", "stars"], ["good", "5"], ["short row"], ["bad", "1"]])
    write_rows(tmp_path / "dev.tsv", [["review", "stars"], ["fine", "5"]])
    with pytest.raises(ValueError, match=r"task.label_column names column 'star'.*did you mean 'stars'"):
        tsv_task(str(tmp_path), text_columns="review", label_column="star").load("train")
    with pytest.raises(ValueError, match=r"task.text_columns names column 'reviews'.*did you mean 'review'"):
        tsv_task(str(tmp_path), text_columns="reviews", label_column="stars").load("train")
    with pytest.raises(ValueError, match=r"train.tsv:3 has 1 columns.*task.skip_malformed=true"):
        tsv_task(str(tmp_path), text_columns="review", label_column="stars").load("train")
    with pytest.warns(UserWarning, match=r"skipped 1 malformed row\(s\) of .*train.tsv.*kept 2"):
        split = tsv_task(str(tmp_path), text_columns="review", label_column="stars", skip_malformed=True).load("train")
    assert len(split) == 2
