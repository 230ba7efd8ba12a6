"""Real multi-process DDP on CPU (2 processes, gloo): global sync equals one process on the doubled batch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_deltasam import (
    DeltaSAM,
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
from lightning_deltasam.gram_capture import GramCapture
from tests.helpers import QUIET, MixinClassifier, make_loader, make_net, per_sample_ce, run_workers

ROOT = Path(__file__).resolve().parents[1]
B = 8  # per-rank batch; one process uses 2B on the same samples
STEPS = 6

CASES = {
    "mixin_sam": {"adapter": "mixin", "sam": SAMConfig(rho=0.05)},
    "mixin_delta_gradnorm": {
        "adapter": "mixin",
        "sam": SAMConfig(rho=0.05, reweight=ProbeWeights(score="gradnorm", temperature=0.5, probe_scope="all")),
    },
    "mixin_delta_gram_asam": {
        "adapter": "mixin",
        "sam": SAMConfig(rho=0.5, adaptive=True, reweight=ProbeWeights(score="gram", num_probes=4, probe_scope="all")),
    },
    # curvature scores difference losses at 1e-4 of their size: float32 rounding of a batch of 8
    # vs 16 would swamp the comparison, so this case runs in float64
    "mixin_delta_sharpness_linear": {
        "adapter": "mixin",
        "double": True,
        "sam": SAMConfig(
            rho=0.05, reweight=ProbeWeights(score="sharpness", weights="linear", antithetic=True, probe_scope="all")
        ),
    },
    "mixin_delta_head_gram": {
        "adapter": "mixin",
        "sam": SAMConfig(rho=0.05, reweight=ProbeWeights(score="gram", num_probes=16, probe_scope="head")),
    },
    "callback_sam": {"adapter": "callback", "sam": SAMConfig(rho=0.05)},
    "callback_delta_loss": {
        "adapter": "callback",
        "sam": SAMConfig(rho=0.05, reweight=ProbeWeights(score="loss", temperature=0.3)),
    },
    # the exact Gram rule: each rank forms its own block of K (no cross-rank entries), global ridge and normalization
    "mixin_delta_exact": {
        "adapter": "mixin",
        "sam": SAMConfig(rho=0.05, reweight=GramWeights(score="gram", weights="linear")),
    },
    "callback_delta_exact_local": {
        "adapter": "callback",
        "sam": SAMConfig(rho=0.05, reweight=GramWeights(score="gram", weights="linear"), sync="local"),
    },
    "mixin_sam_local": {"adapter": "mixin", "sam": SAMConfig(rho=0.05, sync="local")},
    # per-instance SAM: no perturbation all-reduce (each rank's instances are complete on it); m-sharpness groups
    # consecutive instances of each rank's batch
    "mixin_instance_m1": {"adapter": "mixin", "sam": SAMConfig(rho=0.05, m=1)},
    "callback_instance_m1": {"adapter": "callback", "sam": SAMConfig(rho=0.05, m=1)},
    "mixin_instance_m2": {"adapter": "mixin", "sam": SAMConfig(rho=0.05, m=2)},
    "mixin_delta_local": {
        "adapter": "mixin",
        "sam": SAMConfig(rho=0.05, reweight=ProbeWeights(score="loss", temperature=0.3), sync="local"),
    },
    # the SAM-family variants: the rule sees the all-reduced g at w and DDP's averaged g_p; its state is identical on ranks
    "mixin_gsam": {"adapter": "mixin", "sam": SAMConfig(rho=0.05, variant=GSAMOptions())},
    "callback_wsam": {"adapter": "callback", "sam": SAMConfig(rho=0.05, variant=WSAMOptions())},
    "mixin_looksam": {"adapter": "mixin", "sam": SAMConfig(rho=0.1, variant=LookSAMOptions(k=2))},
    "callback_friendly": {"adapter": "callback", "sam": SAMConfig(rho=0.05, variant=FriendlySAMOptions(sigma=0.5))},
    "mixin_interval": {"adapter": "mixin", "sam": SAMConfig(rho=0.05, variant=SAMOptions(interval=2))},
    "mixin_msam": {"adapter": "mixin", "sam": SAMConfig(rho=0.3, variant=MomentumSAMOptions())},
    # MESA: the EMA teacher's forward on each rank's half; the mean KL of equal halves is the batch's
    "mixin_mesa": {"adapter": "mixin", "sam": SAMConfig(variant=MESAOptions(decay=0.5))},
    # ESAM: each rank selects within its own batch (as the authors' DDP runs do), so it is not one process's step
    # on the doubled batch; the drawn tensors are the same on every rank
    "mixin_esam": {"adapter": "mixin", "sam": SAMConfig(rho=0.05, variant=ESAMOptions(beta=0.5, gamma=0.5))},
}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    # the workers get each case's SAMConfig as a plain dict (SAMConfig.from_dict rebuilds it)
    cases = {k: {**v, "sam": v["sam"].to_dict(), "steps": STEPS, "batch": B} for k, v in CASES.items()}
    run_workers("ddp_worker.py", out, cases, port=29517, timeout=300)
    results = {name: [torch.load(out / f"{name}.rank{r}.pt") for r in (0, 1)] for name in CASES}
    results["hook_calls"] = {name: int((out / f"{name}.rank0.hook").read_text()) for name in CASES}
    return results


def _single_process(config: SAMConfig, double: bool = False) -> list[torch.Tensor]:
    """The same samples, one process, batch 2B: what global sync must reproduce."""
    if config.step_probe_scope == "head":  # head probes need the module's split: the mixin, one process
        module = MixinClassifier(sam=config)
        L.Trainer(max_steps=STEPS, **QUIET).fit(module, make_loader(batch_size=2 * B))
        return [p.detach() for p in module.parameters()]
    net = make_net(seed=0).to(torch.float64 if double else torch.float32)
    opt = DeltaSAM(net.parameters(), torch.optim.AdamW, replace(config, sync="global"), lr=1e-2, module=net)
    steps = 0
    rank_major = torch.cat([torch.arange(0, 2 * B, 2), torch.arange(1, 2 * B, 2)])  # rank 0's samples, then rank 1's
    while steps < STEPS:
        for x, y in make_loader(batch_size=2 * B, double=double):
            if steps == STEPS:
                break
            if config.m is not None:  # groups of m are consecutive within each rank's batch
                x, y = x[rank_major], y[rank_major]
            opt.step(lambda: _forward(net, x, y, config))
            steps += 1
    return [p.detach() for p in net.parameters()]


def _forward(net, x, y, config: SAMConfig):
    """Per-instance losses, with the logits for MESA."""
    if not config.variant.needs_outputs:
        return per_sample_ce(net, x, y)
    logits = net(x)
    return torch.nn.functional.cross_entropy(logits, y, reduction="none"), logits


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_hold_identical_parameters(ddp_results, name):
    rank0, rank1 = ddp_results[name]
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))


def _rank_blocks(monkeypatch) -> None:
    """One process whose Gram matrix keeps only the entries of samples on the same rank (rank = position mod 2)."""
    full = GramCapture.gram

    def blocks(self):
        k = full(self)
        rank = torch.arange(k.shape[0]) % 2
        return k * (rank[:, None] == rank[None, :])

    monkeypatch.setattr(GramCapture, "gram", blocks)


@pytest.mark.parametrize(
    "name", [n for n in CASES if not n.endswith("_local") and not CASES[n]["sam"].variant.selects_instances]
)
def test_global_sync_equals_one_process_on_the_doubled_batch(ddp_results, name, monkeypatch):
    if isinstance(CASES[name]["sam"].reweight, GramWeights):
        _rank_blocks(monkeypatch)
    expected = _single_process(CASES[name]["sam"], double=bool(CASES[name].get("double")))
    for got, want in zip(ddp_results[name][0], expected):  # 1e-5 relative, tensor by tensor (float rounding)
        assert float((got - want).norm() / want.norm()) < 1e-5, (name, float((got - want).norm() / want.norm()))


def test_exact_rule_needs_its_rank_blocks(ddp_results):
    """Without the block structure the one-process step differs: the test above checks the semantics, not a no-op."""
    expected = _single_process(CASES["mixin_delta_exact"]["sam"])
    diff = max(float((g - w).abs().max()) for g, w in zip(ddp_results["mixin_delta_exact"][0], expected))
    assert diff > 1e-6


@pytest.mark.parametrize("name", ["mixin_sam_local", "mixin_delta_local", "callback_delta_exact_local"])
def test_local_sync_is_a_different_step(ddp_results, name):
    expected = _single_process(CASES[name]["sam"])
    diff = max(float((g - w).abs().max()) for g, w in zip(ddp_results[name][0], expected))
    assert diff > 1e-4, "sync='local' reproduced the global step: the per-rank perturbation is not real"


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_reduces_only_the_descent_backward(ddp_results, name):
    """The first backward runs under no_sync (reduced once, explicitly): DDP's hook fires once a step."""
    assert ddp_results["hook_calls"][name] == STEPS
