"""The training app behind ``train.py``: build task, data, classifier and Trainer from the Hydra config
(``conf/``, one group per part), fit, validate, report."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ..config import SAMConfig
from .classifier import GlueClassifier
from .data import GlueDataModule
from .models import TextEncoder
from .tasks import TextTask

RESULTS_FILE = "results.json"


def optimizer_options(cfg: DictConfig) -> dict[str, Any]:
    """The ``optimizer`` group as a plain dict, its SAM options validated up front (fail before loading data)."""
    options = OmegaConf.to_container(cfg.optimizer, resolve=True)
    try:
        SAMConfig.split(options)
    except ValueError as err:  # SAMConfig names the bare option: say where it lives
        raise ValueError(f"optimizer.{err}") from None
    return options


#: Errors that mean "bad option or missing data": reported as one ``error:`` line, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, InstantiationException)


def describe_error(err: BaseException) -> str:
    """One line for a :data:`USER_ERRORS` error (the cause of an instantiation error, without config noise)."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return " ".join(str(err).split()) or type(err).__name__


def build_callbacks(cfg: DictConfig, main_metric: str) -> list[Callback]:
    """Instantiate ``cfg.callbacks`` (entries set to null are skipped); checkpoints monitor the task metric by default."""
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        callback = instantiate(node)
        if isinstance(callback, ModelCheckpoint) and callback.monitor is None:
            callback = instantiate(node, monitor=main_metric)
        callbacks.append(callback)
    return callbacks


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


def build_components(cfg: DictConfig, options: Optional[dict[str, Any]] = None) -> tuple[TextTask, GlueDataModule, GlueClassifier, TextEncoder]:
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
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    task, datamodule, model, encoder = build_components(cfg, options)

    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=build_callbacks(cfg, task.main_metric), logger=build_loggers(cfg) or False
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
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
        "classifier_options": {k: v for k, v in OmegaConf.to_container(cfg.classifier, resolve=True).items()
                               if not k.startswith("_")},
        "seed": cfg.seed,
        "steps": trainer.global_step,
        "wall_seconds": round(time.perf_counter() - start, 2),
        "main_metric": task.main_metric,
        **{k: _json_number(v) for k, v in sorted(metrics.items())},
        "best_checkpoint": getattr(checkpoint, "best_model_path", None) or None,
        "output_dir": os.path.abspath(output_dir),
    }
    if trainer.is_global_zero:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, RESULTS_FILE), "w") as f:
            json.dump(results, f, indent=2)
        shown = ", ".join(f"{k}={results[k]:.4f}" for k in sorted(metrics) if results[k] is not None)
        print(
            f"\n{task.name} | {results['model']} | {results['optimizer']} (rho={options.get('rho')}, "
            f"reweight={options.get('reweight')}) | seed {cfg.seed} | {results['steps']} steps in "
            f"{results['wall_seconds']:.0f}s | {shown}\nresults: {os.path.join(output_dir, RESULTS_FILE)}"
        )
        print(json.dumps(results), flush=True)
    return results
