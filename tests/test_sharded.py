"""Real 2-process sharded training on CPU (gloo, float64): FSDP2 (``fully_shard`` and Lightning's
``ModelParallelStrategy``, callback and mixin) and FSDP1 (``use_orig_params`` both ways) equal one process on the
global batch, with parameters that do not divide by the world size; what sharding cannot do is refused by name.

One ``torchrun`` runs every case (tests/fsdp_worker.py); the one-process references run here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_deltasam import (
    FriendlySAMOptions,
    GramWeights,
    GSAMOptions,
    LookSAMOptions,
    ProbeWeights,
    SAMConfig,
    SAMOptions,
    WSAMOptions,
)
from tests.fsdp_worker import batches, make_mlp, train
from tests.helpers import run_workers

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
TOL = 1e-6  # relative, tensor by tensor (float64)

RULES = {
    "sam": ("instance", SAMConfig(rho=0.05)),
    "asam": ("instance", SAMConfig(rho=0.5, adaptive=True)),
    "delta": ("instance", SAMConfig(rho=0.05, reweight=ProbeWeights(score="loss", temperature=0.3))),
    "gsam": ("instance", SAMConfig(rho=0.05, variant=GSAMOptions(alpha=0.3))),
    "wsam": ("instance", SAMConfig(rho=0.05, variant=WSAMOptions(gamma=0.8))),
    "looksam": ("instance", SAMConfig(rho=0.1, variant=LookSAMOptions(k=2))),
    "friendly": ("instance", SAMConfig(rho=0.05, variant=FriendlySAMOptions(sigma=0.5))),
    "interval": ("instance", SAMConfig(rho=0.05, variant=SAMOptions(interval=2))),
    "sam_closure": ("closure", SAMConfig(rho=0.05)),
    "gsam_closure": ("closure", SAMConfig(rho=0.05, variant=GSAMOptions())),
    "sam_two_step": ("two_step", SAMConfig(rho=0.05)),
    "asam_two_step": ("two_step", SAMConfig(rho=0.5, adaptive=True)),
}
RAW = ("fsdp2", "fsdp1", "fsdp1_orig")
LIGHTNING = {
    "lightning_callback-sam": SAMConfig(rho=0.05),
    "lightning_callback-delta": SAMConfig(rho=0.05, reweight=ProbeWeights(score="loss", temperature=0.3)),
    "lightning_callback-gsam": SAMConfig(rho=0.05, variant=GSAMOptions()),
    "lightning_mixin-sam": SAMConfig(rho=0.05),
    "lightning_mixin-asam": SAMConfig(rho=0.5, adaptive=True),
    "lightning_mixin-delta": SAMConfig(rho=0.05, reweight=ProbeWeights(score="loss", temperature=0.3)),
}
REFUSED = {  # case -> (shard, config, words the message must hold)
    "refused-m": ("fsdp2", SAMConfig(rho=0.05, m=1), ["m=1", "FSDP2", "DDP"]),
    "refused-exact": (
        "fsdp1",
        SAMConfig(rho=0.05, reweight=GramWeights()),
        ["reweight='gram'", "FSDP1", "ProbeWeights"],
    ),
    "refused-local": ("fsdp2", SAMConfig(rho=0.05, sync="local"), ["sync='local'", "FSDP2", "sync='global'"]),
    "refused-looksam-flat": (
        "fsdp1",
        SAMConfig(rho=0.1, variant=LookSAMOptions(k=2)),
        ["looksam", "use_orig_params=True"],
    ),
}
EXPECTED_REFUSALS = {("fsdp1", "looksam")}  # LookSAM normalizes per tensor: FSDP1's flat parameters are refused

CASES: dict[str, dict] = {}
for shard in RAW:
    for rule, (route, config) in RULES.items():
        CASES[f"{shard}-{rule}"] = {"shard": shard, "route": route, "sam": config}
for name, config in LIGHTNING.items():
    CASES[name] = {"shard": name.split("-")[0], "route": "instance", "sam": config}
for name, (shard, config, _) in REFUSED.items():
    CASES[name] = {"shard": shard, "route": "instance", "sam": config}
CASES["fsdp2-per_shard_norm"] = {
    "shard": "fsdp2",
    "route": "instance",
    "sam": SAMConfig(rho=0.5),
    "per_shard_norm": True,
}
CASES["fsdp2-resume"] = {"shard": "fsdp2", "route": "instance", "sam": RULES["friendly"][1], "resume": True}
CASES["fsdp2-skip"] = {"shard": "fsdp2", "route": "instance", "sam": SAMConfig(rho=0.05), "nan_at": {"1": 1}}
CASES["fsdp1_orig-probes"] = {
    "shard": "fsdp1_orig",
    "route": "instance",
    "sam": SAMConfig(rho=0.05, reweight=ProbeWeights(score="gradnorm", num_probes=3)),
}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    # the worker gets each case's SAMConfig as a plain dict (SAMConfig.from_dict rebuilds it)
    cases = {k: {**v, "sam": v["sam"].to_dict(), "steps": STEPS} for k, v in CASES.items()}
    run_workers("fsdp_worker.py", out, cases, port=29523, timeout=600)
    return out


def _one_process(route: str, config: SAMConfig, nan_at: int | None = None) -> list[torch.Tensor]:
    model = make_mlp()
    train(model, batches(STEPS), route, config, nan_at=nan_at)
    return [p.detach() for p in model.parameters()]


def _relative(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g - w).norm() / w.norm()) for g, w in zip(got, want))


def _result(out: Path, name: str) -> list[torch.Tensor]:
    err = out / f"{name}.err"
    assert not err.exists(), err.read_text()
    return torch.load(out / f"{name}.pt")


@pytest.mark.parametrize("shard", RAW)
@pytest.mark.parametrize("rule", list(RULES))
def test_sharded_step_equals_one_process_on_the_global_batch(sharded, shard, rule):
    if (shard, rule) in EXPECTED_REFUSALS:
        assert "use_orig_params=True" in (sharded / f"{shard}-{rule}.err").read_text()
        return
    route, config = RULES[rule]
    assert _relative(_result(sharded, f"{shard}-{rule}"), _one_process(route, config)) < TOL


@pytest.mark.parametrize("name", list(LIGHTNING))
def test_model_parallel_strategy_equals_one_process(sharded, name):
    assert _relative(_result(sharded, name), _one_process("instance", LIGHTNING[name])) < TOL


def test_the_update_moves_well_beyond_the_tolerance():
    """The comparisons above are not trivially met: 3 SAM steps move w by far more than the tolerance."""
    start = [p.detach() for p in make_mlp().parameters()]
    assert _relative(_one_process("instance", SAMConfig(rho=0.05)), start) > 1e3 * TOL


def test_a_per_shard_norm_is_caught(sharded):
    """Normalizing eps by each rank's own shard (what the library did under FSDP) is far from one process."""
    assert _relative(_result(sharded, "fsdp2-per_shard_norm"), _one_process("instance", SAMConfig(rho=0.5))) > 1e-3


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_sharding_cannot_do_is_refused_by_name(sharded, name):
    message = (sharded / f"{name}.err").read_text()
    for word in REFUSED[name][2]:
        assert word in message, (word, message)


def test_state_dict_resumes_a_sharded_run(sharded):
    """FriendlySAM's momentum (per-parameter state, each rank its shard) and the counters survive state_dict."""
    assert _relative(_result(sharded, "fsdp2-resume"), _one_process("instance", RULES["friendly"][1])) < TOL


def test_ranks_skip_together_when_one_rank_is_not_finite(sharded):
    assert (sharded / "fsdp2-skip.skips").read_text() == "1"  # both ranks skipped the step (rank 0 counts it)
    assert _relative(_result(sharded, "fsdp2-skip"), _one_process("instance", SAMConfig(rho=0.05), nan_at=1)) < TOL


def test_probe_noise_of_sharded_parameters_trains(sharded):
    """delta-SAM's probes under sharding: each rank draws its shard's noise from its own stream (not one
    process's numbers); the step runs and stays finite."""
    params = _result(sharded, "fsdp1_orig-probes")
    assert all(torch.isfinite(p).all() for p in params)
    assert _relative(params, [p.detach() for p in make_mlp().parameters()]) > 1e3 * TOL
