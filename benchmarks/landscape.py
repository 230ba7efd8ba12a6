"""Loss landscape around trained checkpoints: 1-D slices and scalar sharpness.

    python benchmarks/landscape.py ckpt=run1/last.ckpt,run2/last.ckpt task=sst2 model=minilm out=landscape

For each checkpoint, on fixed dev batches (model in eval mode): the loss along filter-normalized
random directions (Li et al., 2018) and along the adversarial direction (the normalized
gradient, over +-4 rho of weight-space distance), all checkpoints in one plot; and the
scalar sharpness: the loss rise at radius ``rho`` along the adversarial direction and along
random unit directions (mean). Flatter minima show smaller rises and wider basins. Keys
``ckpt``, ``out``, ``rho``, ``span``, ``points``, ``directions``, ``batches``, ``seed`` are the
tool's; every other ``key=value`` is a Hydra override of the training app's config (task,
model, data...).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: conf/ and the package
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lightning_deltasam.glue.cli import CONF_DIR  # noqa: E402
from lightning_deltasam.oracle import instances_in  # noqa: E402

TOOL_KEYS = {
    "ckpt": "",
    "out": "landscape",
    "rho": "0.05",
    "span": "1.0",
    "points": "21",
    "directions": "2",
    "batches": "4",
    "seed": "0",
    "labels": "",
}


@dataclass
class Slice:
    alphas: list[float]  # random directions: multiples of the filter-normalized direction
    random: list[list[float]]  # one curve per random direction
    radii: list[float]  # adversarial direction: weight-space distance along the unit gradient
    adversarial: list[float]


def _params(module: nn.Module) -> list[Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def mean_loss(module: nn.Module, batches: list[Any]) -> float:
    """Mean per-instance loss over ``batches``."""
    with torch.no_grad():
        losses = torch.cat([module.per_sample_loss(b).float() for b in batches])
    return float(losses.mean())


def filter_normalized_direction(params: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    """Gaussian direction, each filter (row of a >=2-D weight) rescaled to that filter's norm; 1-D params get 0."""
    out = []
    for p in params:
        if p.dim() < 2:
            out.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        rows, prows = d.reshape(p.shape[0], -1), p.detach().reshape(p.shape[0], -1)
        rows.mul_(prows.norm(dim=1, keepdim=True) / rows.norm(dim=1, keepdim=True).clamp_min(1e-12))
        out.append(d)
    return out


def _norm(vectors: list[Tensor]) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in vectors))


def loss_gradient(module: nn.Module, batches: list[Any]) -> list[Tensor]:
    params = _params(module)
    grads = [torch.zeros_like(p) for p in params]

    n = sum(instances_in(b) for b in batches)
    for b in batches:
        g = torch.autograd.grad(module.per_sample_loss(b).sum() / n, params, allow_unused=True, materialize_grads=True)
        torch._foreach_add_(grads, list(g))
    return grads


def _loss_at(module: nn.Module, batches: list[Any], base: list[Tensor], direction: list[Tensor], alpha: float) -> float:
    params = _params(module)
    with torch.no_grad():
        for p, b, d in zip(params, base, direction):
            p.copy_(b + alpha * d)
    return mean_loss(module, batches)


def analyze(
    module: nn.Module, batches: list[Any], rho: float, span: float, points: int, directions: int, seed: int
) -> tuple[Slice, dict[str, float]]:
    """The 1-D slices and the scalar sharpness of ``module`` on ``batches`` (weights restored after)."""
    module.eval()
    params = _params(module)
    base = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    try:
        loss0 = mean_loss(module, batches)
        rand_dirs = [filter_normalized_direction(params, gen) for _ in range(directions)]
        grad = loss_gradient(module, batches)
        gnorm = _norm(grad)
        unit_adv = [g / max(gnorm, 1e-12) for g in grad]
        alphas = [span * (2 * i / (points - 1) - 1) for i in range(points)]
        radii = [4 * rho * (2 * i / (points - 1) - 1) for i in range(points)]  # +-4 rho around w
        curves = [[_loss_at(module, batches, base, d, a) for a in alphas] for d in rand_dirs]
        adv = [_loss_at(module, batches, base, unit_adv, r) for r in radii]
        # scalar sharpness at radius rho (absolute weight-space distance)
        adv_rise = _loss_at(module, batches, base, unit_adv, rho) - loss0
        rises = []
        for _ in range(directions):
            z = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
            zn = _norm(z)
            rises.append(_loss_at(module, batches, base, [v / zn for v in z], rho) - loss0)
    finally:
        with torch.no_grad():
            for p, b in zip(params, base):
                p.copy_(b)
    numbers = {
        "loss": loss0,
        "grad_norm": gnorm,
        "adversarial_rise": adv_rise,
        "random_rise": sum(rises) / len(rises),
        "rho": rho,
    }
    return Slice(alphas, curves, radii, adv), numbers


def plot(results: dict[str, tuple[Slice, dict[str, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, (sl, nums)) in enumerate(results.items()):
        c = colors[i % len(colors)]
        for j, curve in enumerate(sl.random):
            axes[0].plot(sl.alphas, curve, color=c, alpha=0.85 if j == 0 else 0.4, label=label if j == 0 else None)
        axes[1].plot(sl.radii, sl.adversarial, color=c, label=f"{label} (rise at rho: {nums['adversarial_rise']:.3g})")
    axes[0].set(title="filter-normalized random directions", xlabel="alpha (x filter norm)", ylabel="dev loss")
    axes[1].set(title="along the normalized gradient (SAM's adversary)", xlabel="distance ||dw||", ylabel="dev loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    tool, overrides = dict(TOOL_KEYS), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"argument {arg!r} is not key=value")
        if key in tool:
            tool[key] = value
        else:
            overrides.append(arg)
    if not tool["ckpt"]:
        raise ValueError("ckpt=PATH[,PATH...] is required: the checkpoints (Lightning .ckpt files) to analyze.")
    return tool, overrides


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    from lightning_deltasam.glue.app import build_components

    tool, overrides = parse(sys.argv[1:] if argv is None else argv)
    paths = tool["ckpt"].split(",")
    labels = (
        tool["labels"].split(",")
        if tool["labels"]
        else [os.path.basename(os.path.dirname(os.path.dirname(p))) or p for p in paths]
    )
    conf_dir = str(CONF_DIR)
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "paths.output_dir=."])
    task, datamodule, module, _ = build_components(cfg)
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()[0]
    batches = [b for _, b in zip(range(int(tool["batches"])), loader)]
    results: dict[str, tuple[Slice, dict[str, float]]] = {}
    for path, label in zip(paths, labels):
        state = torch.load(path, map_location="cpu", weights_only=False)
        module.load_state_dict(state["state_dict"])
        results[label] = analyze(
            module,
            batches,
            float(tool["rho"]),
            float(tool["span"]),
            int(tool["points"]),
            int(tool["directions"]),
            int(tool["seed"]),
        )
    out = tool["out"]
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    plot(results, out + ".png")
    summary = {label: nums for label, (_, nums) in results.items()}
    payload = {
        "task": task.name,
        "checkpoints": dict(zip(labels, paths)),
        "sharpness": summary,
        "slices": {label: sl.__dict__ for label, (sl, _) in results.items()},
    }
    with open(out + ".json", "w") as f:
        json.dump(payload, f, indent=2)
    print(f"{'checkpoint':30s} {'dev loss':>9s} {'adv rise@rho':>13s} {'rand rise@rho':>14s}")
    for label, nums in summary.items():
        print(f"{label:30s} {nums['loss']:9.4f} {nums['adversarial_rise']:13.4g} {nums['random_rise']:14.4g}")
    print(f"plot: {out}.png  numbers: {out}.json")
    return payload


if __name__ == "__main__":
    if {"-h", "--help", "help"} & set(sys.argv[1:]):
        print(__doc__.strip())
        sys.exit(0)
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
