"""Shared by the benchmarks: the app's own config and builders, batches of real SST-2, method configs."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_deltasam import (  # noqa: E402
    ESAMOptions,
    FriendlySAMOptions,
    GramWeights,
    GSAMOptions,
    LookSAMOptions,
    MESAOptions,
    MomentumSAMOptions,
    ProbeWeights,
    SAMConfig,
    SAMOptions,
    WSAMOptions,
)
from lightning_deltasam.glue.app import build_components  # noqa: E402
from lightning_deltasam.glue.cli import CONF_DIR  # noqa: E402


def load_config(overrides: list[str]) -> DictConfig:
    """The training app's config (lightning_deltasam/glue/conf/), composed with ``overrides`` outside a Hydra run.
    The data is read from ``GLUE_DIR`` (the app's default: data/glue)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, "paths.output_dir=/tmp/deltasam-bench"])


def build(model: str, batch_size: int, seed: int = 0, extra: list[str] | None = None) -> tuple[Any, Any, Any]:
    """(task, datamodule ready to load, GlueClassifier with AdamW options) for SST-2."""
    cfg = load_config(
        [
            f"model={model}",
            "task=sst2",
            "optimizer=adamw",
            f"data.batch_size={batch_size}",
            f"seed={seed}",
            *(extra or []),
        ]
    )
    task, datamodule, module, _ = build_components(cfg)
    datamodule.setup("fit")
    return task, datamodule, module


def batches(datamodule: Any, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled training batches in an order fixed by ``seed``."""
    loader = torch.utils.data.DataLoader(
        datamodule.train_set,
        batch_size=datamodule.batch_size,
        shuffle=True,
        collate_fn=datamodule._collator(),
        generator=torch.Generator().manual_seed(seed),
    )
    while True:
        yield from loader


def default_delta_config(**overrides: Any) -> SAMConfig:
    """The library's default delta-SAM configuration (``ProbeWeights()``, every other option default; ``overrides``
    are SAMConfig's own options, e.g. ``rho``).

    ``probe_scope='auto'`` is resolved as for GlueClassifier, which defines the head split: 'head'.
    """
    weights = ProbeWeights()
    if weights.probe_scope == "auto":
        weights = replace(weights, probe_scope="head")
    return SAMConfig(reweight=weights, **overrides)


SKETCH_RANKS = (8, 32, 128)


def gram_configs(rho: float) -> list[SAMConfig]:
    """The rules that read per-instance gradients from the first backward: exact K, and K sketched at each rank."""
    out = [
        SAMConfig(rho=rho, reweight=GramWeights(score="gram", weights="linear")),
        SAMConfig(rho=rho, reweight=GramWeights(score="gradnorm")),
    ]
    out += [
        SAMConfig(rho=rho, reweight=GramWeights(score="gram", weights="linear", sketch_rank=r)) for r in SKETCH_RANKS
    ]
    return out


INSTANCE_MS = (1, 4, 8)


def instance_configs(rho: float) -> list[SAMConfig]:
    """Exact per-instance SAM (m = 1) and m-sharpness (m = 4, 8), each in one batched second pass."""
    return [SAMConfig(rho=rho, m=m) for m in INSTANCE_MS]


VARIANT_INTERVALS = (2, 4)


def variant_configs(rho: float) -> list[SAMConfig]:
    """The SAM-family variants (their Hydra configs' options) and every-k-steps SAM, at SAM's rho."""
    out = [
        SAMConfig(rho=rho, variant=GSAMOptions(min_rho=rho / 5)),
        SAMConfig(rho=rho, variant=WSAMOptions()),
        SAMConfig(rho=rho, variant=LookSAMOptions()),
        SAMConfig(rho=rho, variant=FriendlySAMOptions()),
        SAMConfig(rho=rho, variant=MomentumSAMOptions()),
        SAMConfig(rho=rho, variant=MESAOptions()),
        SAMConfig(rho=rho, variant=ESAMOptions()),
    ]
    return out + [SAMConfig(rho=rho, variant=SAMOptions(interval=k)) for k in VARIANT_INTERVALS]


def period(cfg: SAMConfig) -> int:
    """Steps of one period of the rule's schedule: LookSAM's ``k``, every-k SAM's ``interval``, else 1."""
    if isinstance(cfg.variant, LookSAMOptions):
        return cfg.variant.k
    return cfg.variant.interval if isinstance(cfg.variant, SAMOptions) else 1


def rule_name(cfg: SAMConfig) -> str:
    """A short stable name for a method configuration, e.g. ``gradnorm-softmax-t1-K3-all``."""
    if not cfg.perturbing:
        return "adamw"
    if not isinstance(cfg.variant, SAMOptions):
        return cfg.variant.name
    if cfg.variant.interval > 1:
        return f"sam-every{cfg.variant.interval}"
    if cfg.per_instance:
        return f"instance-m{cfg.m}"
    w = cfg.weighting
    if w is None:
        return "asam" if cfg.adaptive else "sam"
    assert isinstance(w, (ProbeWeights, GramWeights))
    name = f"{w.score}-{w.weights}-t{w.temperature:g}"
    if w.mix:
        name += f"-mix{w.mix:g}"
    if isinstance(w, GramWeights):
        name += f"-{w.mode}" + (f"-r{w.sketch_rank}" if w.sketch_rank is not None else "")
    elif w.score != "loss":
        name += f"-K{w.num_probes}-{w.probe_scope}" + ("-anti" if w.antithetic else "")
    return name


def emit(result: dict[str, Any], out: str | None, print_table: Any) -> dict[str, Any]:
    """Print a benchmark's table and write its JSON to ``out`` (when given)."""
    import json

    print_table(result)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")
