"""The training app behind ``train.py``: build task, data, classifier and Trainer from the Hydra config
(``conf/``, one group per part), fit, validate, report."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, cast

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf

from ..config import SAMConfig
from .checkpoints import ExactResume
from .classifier import GlueClassifier
from .data import GlueDataModule
from .models import TextEncoder
from .tasks import TextTask

RESULTS_FILE = "results.json"
NOT_SAM_OPTIONS = ("lr", "weight_decay", "gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")


def _plain(node: DictConfig) -> dict[str, Any]:
    """A config node as a plain, resolved dict."""
    return cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))


def optimizer_options(cfg: DictConfig) -> dict[str, Any]:
    """The ``optimizer`` group as a plain dict, its SAM options validated up front (fail before loading data)."""
    options = cast(dict[str, Any], OmegaConf.to_container(cfg.optimizer, resolve=True))
    try:
        SAMConfig.from_dict({k: v for k, v in options.items() if k not in NOT_SAM_OPTIONS})
    except ValueError as err:  # SAMConfig names the bare option: say where it lives
        raise ValueError(f"optimizer.{err}") from None
    return options


def _option_value(value: Any) -> str:
    """A value as the command line writes it: ``true``, ``null``, ``0.05``, ``gradnorm``."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def _rule(options: Any, always: tuple[str, ...] = ()) -> str:
    """``name`` or ``name(option=value, ...)`` of a rule's options (a variant or a weighting): the ``always`` ones
    that it has, then the others that differ from the rule's defaults."""
    name = str(getattr(options, "name", options))
    try:
        values = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
        defaults = {f.name: getattr(type(options)(), f.name) for f in dataclasses.fields(options)}
    except TypeError:  # not a dataclass of options: a bare name
        return name
    shown = [k for k in always if k in values] + [k for k in values if k not in always and values[k] != defaults[k]]
    return f"{name}({', '.join(f'{k}={_option_value(values[k])}' for k in shown)})" if shown else name


def describe_step(config: SAMConfig) -> str:
    """What a :class:`SAMConfig` step runs, in the ``optimizer`` group's option names, for the run's summary line:
    ``rho=0 (AdamW)``, ``variant=sam rho=0.01 m=1``, ``variant=gsam(min_rho=0.01) rho=0.05``,
    ``variant=sam rho=0.05 reweight=probes(score=gradnorm, weights=softmax, temperature=4.0)``.

    The variant always, rho, ``adaptive`` and ``m`` / ``match_rho`` when set, the weighting's score and form when
    delta-SAM. The one place that reads SAMConfig's attributes for display: adapt it when they change."""
    get = functools.partial(getattr, config)
    if not get("rho", None):
        return "rho=0 (AdamW)"
    parts = [f"variant={_rule(get('variant', 'sam'))}", f"rho={_option_value(get('rho'))}"]
    if get("adaptive", False):
        parts.append("adaptive=true")
    if get("m", None) is not None:
        parts.append(f"m={_option_value(get('m'))}")
        if get("match_rho", False):
            parts.append("match_rho=true")
    reweight = get("reweight", None)
    if reweight is not None:
        form = (
            ("score", "weights", "temperature")
            if getattr(reweight, "weights", None) == "softmax"
            else ("score", "weights")
        )
        parts.append(f"reweight={_rule(reweight, always=form)}")
    return " ".join(parts)


#: Errors that mean "bad option or missing data": reported as one ``error:`` line, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, InstantiationException, MisconfigurationException)


def describe_error(err: BaseException) -> str:
    """One line for a :data:`USER_ERRORS` error (the cause of an instantiation error, without config noise)."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return " ".join(str(err).split()) or type(err).__name__


def build_callbacks(cfg: DictConfig, main_metric: str) -> list[Callback]:
    """Instantiate ``cfg.callbacks`` (entries set to null are skipped); checkpoints monitor the task metric by default."""
    callbacks = []
    progress = cfg.trainer.get("enable_progress_bar", True) is not False
    for node in (cfg.get("callbacks") or {}).values():
        if node is None:
            continue
        callback = instantiate(node)
        if isinstance(callback, ProgressBar) and not progress:
            continue  # trainer.enable_progress_bar=false: no bar and no plain lines
        if isinstance(callback, ModelCheckpoint) and callback.monitor is None:
            callback = instantiate(node, monitor=main_metric)
        callbacks.append(callback)
    return callbacks


def check_accelerator(cfg: DictConfig) -> None:
    """``trainer.accelerator=gpu`` (``trainer=gpu``) on a machine without a usable GPU: say what to use instead."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    if torch.cuda.is_available():
        return
    why = (
        "this torch is the CPU-only build (README: Install has the CUDA wheel)"
        if torch.version.cuda is None
        else "torch.cuda.is_available() is False"
    )
    raise ValueError(
        f"trainer.accelerator={accelerator} (trainer={_picked('trainer', 'gpu')}) but no CUDA GPU is "
        f"usable here: {why}; use trainer=cpu (or trainer=ddp trainer.accelerator=cpu for CPU processes)."
    )


#: Overrides that may differ between a run and its resumption with ``ckpt_path=last`` (a longer budget).
RESUME_MAY_DIFFER = ("ckpt_path", "trainer.max_steps", "trainer.max_epochs")


def _settings(overrides: Any) -> tuple[str, ...]:
    """A run's overrides without those that may change when resuming it."""
    return tuple(sorted(str(o) for o in overrides if str(o).lstrip("+~").split("=", 1)[0] not in RESUME_MAY_DIFFER))


def resolve_checkpoint(cfg: DictConfig) -> str | None:
    """``ckpt_path`` as a file: ``last`` is this run dir's ``checkpoints/last.ckpt`` if it exists, else the newest
    ``checkpoints/last.ckpt`` of an earlier run of the same settings beside this one
    (``outputs/<task>-<model>-<optimizer>/*``, or ``multirun/*/*`` for a sweep job) whose overrides equal these
    but for :data:`RESUME_MAY_DIFFER`."""
    path = cfg.get("ckpt_path")
    if path is None:
        return None
    if str(path) != "last":
        if not os.path.isfile(os.path.expanduser(str(path))):
            raise FileNotFoundError(f"ckpt_path={path}: no such checkpoint file; give a .ckpt file or ckpt_path=last.")
        return os.path.expanduser(str(path))
    here = Path(str(cfg.paths.output_dir)).resolve()
    if (here / "checkpoints" / "last.ckpt").is_file():
        return str(here / "checkpoints" / "last.ckpt")
    if not HydraConfig.initialized():
        raise ValueError("ckpt_path=last finds earlier runs through Hydra's run directories; give the file instead.")
    hydra_cfg = HydraConfig.get()
    from hydra.types import RunMode

    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    base = here.parent.parent if sweep else here.parent
    runs = base.glob("*/*") if sweep else base.glob("*")
    mine = _settings(hydra_cfg.overrides.task)
    found = []
    for run_dir in runs:
        last, record = run_dir / "checkpoints" / "last.ckpt", run_dir / ".hydra" / "overrides.yaml"
        if run_dir.resolve() == here or not last.is_file() or not record.is_file():
            continue
        if _settings(OmegaConf.load(record)) == mine:
            found.append((last.stat().st_mtime, str(last)))
    if not found:
        raise FileNotFoundError(
            f"ckpt_path=last: no earlier run under {base} with these settings ({', '.join(mine) or 'the defaults'}; "
            f"{', '.join(RESUME_MAY_DIFFER[1:])} may differ) has checkpoints/last.ckpt; run without ckpt_path first, "
            "or give ckpt_path=<run dir>/checkpoints/last.ckpt."
        )
    return max(found)[1]


class StartStep(Callback):
    """The global step this process's training starts at: 0, or a resumed checkpoint's (read once it is loaded)."""

    def __init__(self) -> None:
        self.step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step


def build_loggers(cfg: DictConfig) -> list[Any]:
    """Instantiate ``cfg.logger`` (entries set to null are skipped)."""
    return [instantiate(node) for node in (cfg.get("logger") or {}).values() if node is not None]


def _picked(group: str, default: str) -> str:
    """The option picked for a config group (``task=sst2`` -> ``sst2``), when run under Hydra."""
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get(group, default))
    return default


def _json_number(value: Any) -> Any:
    """A JSON-friendly scalar (tensors to floats, rounded for reading)."""
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def build_components(
    cfg: DictConfig, options: dict[str, Any] | None = None
) -> tuple[TextTask, GlueDataModule, GlueClassifier, TextEncoder]:
    """(task, datamodule, classifier, encoder) as ``cfg`` says; the benchmarks build through this too."""
    options = optimizer_options(cfg) if options is None else options
    # Partials: errors of our own constructors surface unwrapped, and runtime objects passed
    # as arguments are not turned into config nodes by instantiate().
    task = instantiate(cfg.task, _partial_=True)()
    datamodule = instantiate(cfg.data, _partial_=True)(task=task)
    encoder = instantiate(cfg.model.encoder, _partial_=True)(train_texts=datamodule.train_texts())
    datamodule.tokenizer = encoder.tokenizer
    classifier = instantiate(cfg.classifier, _partial_=True)(encoder=encoder, task=task, **options)
    return task, datamodule, classifier, encoder


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and validate as ``cfg`` says; write ``results.json`` in the run dir and return its contents."""
    start = time.perf_counter()
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"{', '.join(missing)} must be set (??? in the config), e.g. {missing[0]}=<value>.")
    options = optimizer_options(cfg)
    check_accelerator(cfg)
    ckpt_path = resolve_checkpoint(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    task, datamodule, model, encoder = build_components(cfg, options)

    started = StartStep()
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=[*build_callbacks(cfg, task.main_metric), ExactResume(), started],
        logger=build_loggers(cfg) or False,
    )
    if ckpt_path is not None and trainer.is_global_zero:
        print(f"resuming from {ckpt_path}", flush=True)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics: dict[str, Any] = {}
    for loader_metrics in trainer.validate(model, datamodule=datamodule, verbose=False):
        metrics.update(loader_metrics)

    output_dir = cfg.paths.output_dir
    checkpoint = trainer.checkpoint_callback
    results = {
        "task": task.name,
        "model": _picked("model", type(encoder).__name__),
        "optimizer": _picked("optimizer", "custom"),
        "optimizer_options": options,
        "classifier_options": {k: v for k, v in _plain(cfg.classifier).items() if not k.startswith("_")},
        "seed": cfg.seed,
        "steps": trainer.global_step,
        "steps_run": trainer.global_step - started.step,  # in this process: steps minus a resumed checkpoint's
        "resumed_from": ckpt_path,
        "label_noise": datamodule.label_noise,
        "flipped_labels": datamodule.flipped_labels,
        "holdout": datamodule.holdout,  # > 0: the val/ metrics are on held-out training rows, not the dev set
        "dev_examples": len(datamodule.val_sets[task.val_names[0]])
        if task.val_names[0] in datamodule.val_sets
        else None,
        "wall_seconds": round(time.perf_counter() - start, 2),
        "main_metric": task.main_metric,
        **{k: _json_number(v) for k, v in sorted(metrics.items())},
        "best_checkpoint": getattr(checkpoint, "best_model_path", None) or None,
        "output_dir": os.path.abspath(output_dir),
    }
    if trainer.is_global_zero:
        report(results, sorted(metrics), started.step, describe_step(model.deltasam_config))
    return results


def report(results: dict[str, Any], metric_names: list[str], resumed_at: int, step: str) -> None:
    """Write ``results.json`` in the run dir and print the summary line and the results (rank 0 only)."""
    output_dir = results["output_dir"]
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, RESULTS_FILE), "w") as f:
        json.dump(results, f, indent=2)
    shown = ", ".join(f"{k}={results[k]:.4f}" for k in metric_names if results[k] is not None)
    steps = f"{results['steps_run']} steps in {results['wall_seconds']:.0f}s"
    if resumed_at:
        steps += f" (resumed at step {resumed_at}, now {results['steps']})"
    print(
        f"\n{results['task']} | {results['model']} | {results['optimizer']}: {step} | seed {results['seed']} | "
        f"{steps} | {shown}\nresults: {os.path.join(output_dir, RESULTS_FILE)}"
    )
    print(json.dumps(results), flush=True)
