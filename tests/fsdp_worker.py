"""Run by ``torchrun --nproc_per_node=2`` from tests/test_sharded.py: real 2-process sharded training (gloo, CPU).

Each case shards a small float64 MLP whose layers do not divide by the world size (7 and 3 rows over 2 ranks)
with FSDP2 (``fully_shard``), FSDP1 (``FullyShardedDataParallel``, ``use_orig_params`` both ways) or Lightning's
``ModelParallelStrategy`` (callback, mixin), trains a few steps, and rank 0 saves the full parameters to
``<out>/<case>.pt`` (or the error message of a refused case to ``<out>/<case>.err``); the test compares them with
one process on the global batch. Rank r takes samples r, r + 2, ... of each global batch.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_deltasam import DeltaSAM, SAMConfig  # noqa: E402
from lightning_deltasam.distributed import Shards  # noqa: E402
from tests.helpers import make_data  # noqa: E402

warnings.filterwarnings("ignore")
GLOBAL_BATCH = 16


def make_mlp() -> nn.Module:
    """10 -> 7 -> 3, float64: every weight and bias splits unevenly over 2 ranks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def batches(steps: int, rank: int | None = None, world: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches of ``steps`` steps (or rank ``rank``'s part of each)."""
    x, y = make_data(n=GLOBAL_BATCH * steps, d=10, classes=3, seed=0)
    out = []
    for s in range(steps):
        xb, yb = x[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH].double(), y[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH]
        out.append((xb, yb) if rank is None else (xb[rank::world], yb[rank::world]))
    return out


def train(model: nn.Module, data: list, route: str, sam: SAMConfig, nan_at: int | None = None) -> DeltaSAM:
    """DeltaSAM(``sam``) with SGD over ``data``: ``route`` is the per-instance closure, the backward closure or the
    two-step API. ``nan_at``: the loss of that step is NaN on this process (the skip test)."""
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, sam, lr=0.2, module=model)
    for step, (x, y) in enumerate(data):
        poison = float("nan") if step == nan_at else 0.0

        def losses() -> torch.Tensor:
            return F.cross_entropy(model(x), y, reduction="none") + poison

        def closure() -> torch.Tensor:
            loss = losses().mean()
            loss.backward()
            return loss

        if route == "instance":
            opt.step(losses)
        elif route == "closure":
            opt.zero_grad()
            losses().mean().backward()
            opt.step(closure)
        else:
            opt.zero_grad()
            losses().mean().backward()
            opt.first_step()
            losses().mean().backward()
            opt.second_step()
    return opt


def shard(model: nn.Module, kind: str) -> nn.Module:
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2]):
            fully_shard(layer)
        return fully_shard(model)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(model, use_orig_params=kind == "fsdp1_orig", device_id=torch.device("cpu"))


def full_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The unsharded parameters in the order of ``make_mlp().parameters()`` (every rank joins the gather)."""
    state = model.state_dict()
    names = [n for n, _ in make_mlp().named_parameters()]
    out = []
    for n in names:
        t = next(v for k, v in state.items() if k.endswith(n))
        out.append((t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone())
    return out


def run_raw(spec: dict, rank: int) -> list[torch.Tensor]:
    model = shard(make_mlp(), spec["shard"])
    data = batches(spec["steps"], rank)
    if spec.get("per_shard_norm"):  # the bug this library had: each rank's eps normalized by its own shard's norm
        original = Shards.sum_
        Shards.sum_ = lambda self, tensor: tensor  # type: ignore[method-assign]
        try:
            train(model, data, spec["route"], spec["sam"])
        finally:
            Shards.sum_ = original  # type: ignore[method-assign]
    elif spec.get("resume"):  # state_dict after 2 steps into a new optimizer, then the 3rd step
        opt = train(model, data[:2], spec["route"], spec["sam"])
        state = opt.state_dict()
        fresh = train(model, [], spec["route"], spec["sam"])
        fresh.load_state_dict(state)
        fresh.zero_grad()  # the old optimizer's last gradient is not the new one's
        x, y = data[2]
        fresh.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    else:
        opt = train(model, data, spec["route"], spec["sam"], nan_at=spec.get("nan_at", {}).get(str(rank)))
        if rank == 0:
            with open(spec["out"] + ".skips", "w") as f:
                f.write(str(opt.engine.skipped_steps))
    return full_parameters(model)


def run_lightning(spec: dict, rank: int) -> list[torch.Tensor]:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_deltasam import DeltaSAMCallback, DeltaSAMMixin

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def per_sample_loss(self, batch):
            return F.cross_entropy(self.net(batch[0]), batch[1], reduction="none")

        def training_step(self, batch, batch_idx):
            return self.per_sample_loss(batch).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

    class Mixin(DeltaSAMMixin, Plain):
        per_sample_loss = Plain.per_sample_loss  # the mixin's own stub comes first in the bases

    config = spec["sam"]
    module, callbacks = (
        (Mixin(sam=config), []) if spec["shard"] == "lightning_mixin" else (Plain(), [DeltaSAMCallback(config)])
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo"),
        max_steps=spec["steps"],
        callbacks=callbacks,
        use_distributed_sampler=False,
        precision="32-true",  # ModelParallelStrategy refuses 64-true; the model is float64 itself
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    xs, ys = zip(*batches(spec["steps"], rank))
    loader = DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=GLOBAL_BATCH // 2)
    trainer.fit(module, loader)
    return full_parameters(module.net)


def main() -> None:
    out, cases = sys.argv[1], json.loads(sys.argv[2])
    timings: dict[str, float] = {}
    dist.init_process_group("gloo")  # Lightning's strategy reuses it
    rank = dist.get_rank()
    for name, spec in cases.items():
        run = run_lightning if spec["shard"].startswith("lightning") else run_raw
        spec = {**spec, "out": os.path.join(out, name), "sam": SAMConfig.from_dict(spec["sam"])}
        start = time.perf_counter()
        try:
            params = run(spec, rank)
        except Exception as err:  # a refused case: its message is the result
            if rank == 0:
                with open(os.path.join(out, f"{name}.err"), "w") as f:
                    f.write(f"{type(err).__name__}: {err}")
            continue
        timings[name] = time.perf_counter() - start
        if rank == 0:
            torch.save(params, os.path.join(out, f"{name}.pt"))
    if int(os.environ["RANK"]) == 0:
        with open(os.path.join(out, "timings.json"), "w") as f:
            json.dump(timings, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
