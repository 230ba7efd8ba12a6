"""Small models, data and hand-written references shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_deltasam import DeltaSAMMixin

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def make_data(n: int = 64, d: int = 10, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def make_loader(batch_size: int = 16, double: bool = False, **kw) -> DataLoader:
    x, y = make_data(**kw)
    x = x.double() if double else x
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def make_net(d: int = 10, classes: int = 3, seed: int = 0, dropout: float = 0.0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(d, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, classes)]
    return nn.Sequential(*layers)


def per_sample_ce(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(net(x), y, reduction="none")


def reference_sam_update(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    rho: float,
    lr: float,
    weights: torch.Tensor | None = None,
    adaptive: bool = False,
    eta: float = 0.01,
) -> dict[str, torch.Tensor]:
    """Hand-written two-pass (weighted) SAM with an SGD descent: the parameters after one step."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    losses = F.cross_entropy(functional_call(net, params, (x,)), y, reduction="none")
    w = torch.full_like(losses, 1.0 / len(losses)) if weights is None else weights
    grads = torch.autograd.grad((w * losses).sum(), list(params.values()))
    if adaptive:
        t = [p.detach().abs() + eta for p in params.values()]
        norm = torch.sqrt(sum(((ti * g) ** 2).sum() for ti, g in zip(t, grads)))
        eps = [rho * ti * ti * g / norm for ti, g in zip(t, grads)]
    else:
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        eps = [rho * g / norm for g in grads]
    perturbed = {k: (v.detach() + e).requires_grad_(True) for (k, v), e in zip(params.items(), eps)}
    loss2 = F.cross_entropy(functional_call(net, perturbed, (x,)), y)
    g2 = torch.autograd.grad(loss2, list(perturbed.values()))
    return {k: v.detach() - lr * g for (k, v), g in zip(params.items(), g2)}


class MixinClassifier(DeltaSAMMixin, L.LightningModule):
    """The README's mixin example, parameterized."""

    def __init__(self, lr: float = 1e-2, seed: int = 0, **options):
        super().__init__(**options)
        self.lr = lr
        self.net = make_net(seed=seed)

    def per_sample_loss(self, batch):
        x, y = batch
        if self.deltasam_config.variant.needs_outputs:  # MESA: the pair (losses, logits)
            logits = self.net(x)
            return F.cross_entropy(logits, y, reduction="none"), logits
        return per_sample_ce(self.net, x, y)

    # the split for probe_scope="head": the last Linear is the probed head
    def per_sample_features(self, batch):
        return self.net[:-1](batch[0])

    def per_sample_loss_from_features(self, features, batch):
        return F.cross_entropy(self.net[-1](features), batch[1], reduction="none")

    def probe_head(self):
        return self.net[-1]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class PlainClassifier(L.LightningModule):
    """An automatic-optimization module with no knowledge of SAM (for the callback)."""

    def __init__(self, lr: float = 1e-2, seed: int = 0, with_per_sample: bool = True):
        super().__init__()
        self.lr = lr
        self.net = make_net(seed=seed)
        if not with_per_sample:
            self.per_sample_loss = None  # type: ignore[assignment]
        self.logged: list[float] = []

    def per_sample_loss(self, batch):
        x, y = batch
        return per_sample_ce(self.net, x, y)

    per_sample_features = MixinClassifier.per_sample_features
    per_sample_loss_from_features = MixinClassifier.per_sample_loss_from_features
    probe_head = MixinClassifier.probe_head

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = per_sample_ce(self.net, x, y).mean()
        self.log("train_loss", loss)
        self.logged.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


ROOT = Path(__file__).resolve().parents[1]


def run_workers(worker: str, out: Path, cases: dict, port: int, timeout: int) -> None:
    """``tests/<worker>`` on 2 processes under torchrun (one thread each), writing its results under ``out``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    cmd += [str(ROOT / "tests" / worker), str(out), json.dumps(cases)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
