"""Run by ``torchrun --nproc_per_node=2`` from tests/test_distributed.py: real 2-process DDP (gloo, CPU).

Each case trains with Lightning's DDP strategy (mixin or callback) and saves this rank's
parameters to ``<out>/<case>.rank<r>.pt``; the test compares ranks with each other and with one
process on the doubled batch.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_deltasam import DeltaSAMCallback, SAMConfig  # noqa: E402
from tests.helpers import QUIET, MixinClassifier, PlainClassifier, make_loader  # noqa: E402

warnings.filterwarnings("ignore")


class _CountingHook(L.Callback):
    """Registers a DDP comm hook that counts gradient-bucket all-reduces (Lightning registers none on CPU)."""

    def __init__(self) -> None:
        self.calls = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        trainer.strategy.model.register_comm_hook(None, self._hook)

    def _hook(self, state, bucket):
        self.calls += 1
        return default_hooks.allreduce_hook(state, bucket)


def main() -> None:
    out = sys.argv[1]
    cases = json.loads(sys.argv[2])
    rank = int(os.environ["RANK"])
    for name, spec in cases.items():
        adapter, steps, batch = spec["adapter"], spec["steps"], spec["batch"]
        config = SAMConfig.from_dict(spec["sam"])  # the case's SAMConfig.to_dict()
        if adapter == "mixin":
            module, callbacks = MixinClassifier(sam=config), []
        else:
            module, callbacks = PlainClassifier(), [DeltaSAMCallback(config)]
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=DDPStrategy(process_group_backend="gloo"),
            max_steps=steps,
            callbacks=[*callbacks, hook := _CountingHook()],
            use_distributed_sampler=False,
            precision="64-true" if spec.get("double") else "32-true",
            **QUIET,
        )
        loader = make_loader(batch_size=batch, double=bool(spec.get("double")))
        # rank r takes samples r, r+2, ...: each step's two halves are one process's batch of 2B
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=False)
        trainer.fit(module, DataLoader(loader.dataset, batch_size=batch, sampler=sampler))
        torch.save([p.detach().clone() for p in module.parameters()], os.path.join(out, f"{name}.rank{rank}.pt"))
        with open(os.path.join(out, f"{name}.rank{rank}.hook"), "w") as f:
            f.write(str(hook.calls))


if __name__ == "__main__":
    main()
